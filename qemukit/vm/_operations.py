"""The operations on a running VM, as :class:`~qemukit.vm.AsyncVM`'s methods.

Hot-plug, snapshots, saved state and memory dumps (:mod:`qemukit.hotplug`,
:mod:`qemukit.snapshot`, :mod:`qemukit.dump`), and how the host reaches into the
guest: ssh, copies and the gdb stub (functions of the target in
:mod:`qemukit._access`). :class:`Operations` carries a thin method for each,
with its docstring; :class:`AsyncVM` inherits them (as it inherits the test
writer's verbs from :class:`qemukit.vm._verbs.Verbs`), and the sync :class:`VM`
derives its twins from those. None of them supervises anything: each checks
that the VM runs and hands the VM to the function that does the work.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, cast

from .. import _access
from .._access import CopyVia
from ..dump import DumpFormat, DumpResult, dump_memory
from ..errors import StateError
from ..guest import Progress
from ..hotplug import AsyncHotplug, PluggedDevice
from ..snapshot import Bundle, Snapshots, save_state
from ..timeouts import LOCK_TIMEOUT, SAVE_TIMEOUT, UNPLUG_TIMEOUT
from ._state import VMState

if TYPE_CHECKING:
    from .._launch.process import QemuProcess
    from .._launch.runtime import RuntimeDir
    from ._core import AsyncVM

__all__ = ["Operations"]


class Operations:
    """The operations as methods, for :class:`~qemukit.vm.AsyncVM` to inherit (see the module)."""

    # What the methods read of the VM (AsyncVM sets them).
    state: VMState
    runtime: RuntimeDir | None
    boot_timeout: float
    _hotplug: AsyncHotplug | None
    _proc: QemuProcess | None

    @property
    def _as_vm(self) -> AsyncVM:
        """This VM as the :class:`AsyncVM` it is (the operations take the whole VM)."""
        return cast("AsyncVM", self)

    def _require(self, *states: VMState) -> None:
        """The lifecycle guard: a clear StateError unless the VM is in one of ``states``."""
        if self.state not in states:
            allowed = ", ".join(s.value for s in states)
            raise StateError(f"VM {self._as_vm.name!r} is {self.state.value}; this needs: {allowed}")

    # -- hotplug (qemukit.hotplug) -------------------------------------------------------

    @property
    def hotplug(self) -> AsyncHotplug:
        """Hot-plug disks, NICs, CPUs and memory: ``await vm.hotplug.disk("scratch.qcow2")``.

        See :class:`qemukit.hotplug.AsyncHotplug` (disk, nic, cpu, memory).
        """
        self._require(VMState.RUNNING)
        if self._hotplug is None:
            self._hotplug = AsyncHotplug(self._as_vm)
        return self._hotplug

    def operation_lock(self, timeout: float = LOCK_TIMEOUT) -> AbstractAsyncContextManager[None]:
        """Held by every operation that reads and changes the VM's state files.

        Hotplug (``devices.json``), external snapshots (their records) and
        restore run one at a time per VM, across processes too (an owner and
        a ``qemukit`` command at once): an ``flock`` on ``ops.lock`` in the
        runtime directory. Waiting for it is bounded by ``timeout``.
        """
        if self.runtime is None:
            raise StateError(f"VM {self._as_vm.name!r} has no runtime directory (not started)")
        return self.runtime.operation_lock(timeout)

    async def unplug(self, device: PluggedDevice | str, timeout: float = UNPLUG_TIMEOUT) -> None:
        """Remove a hot-plugged device; returns once QEMU deleted it and its backends.

        Raises :class:`~qemukit.errors.HotplugError` if the guest refuses or
        does not release it within ``timeout`` (it then stays plugged).
        """
        await self.hotplug.unplug(device, timeout)

    async def devices(self) -> list[PluggedDevice]:
        """The devices hot-plugged into this VM (by any process) that are still plugged."""
        return await self.hotplug.devices()

    # -- snapshots (qemukit.snapshot) --------------------------------------------------

    @property
    def snapshots(self) -> Snapshots:
        """Internal and external snapshots: ``await vm.snapshots.save("tag")``.

        See :class:`qemukit.snapshot.Snapshots` (save, load, delete, list,
        external, revert, commit, preflight).
        """
        self._require(VMState.RUNNING)
        return Snapshots(self._as_vm)

    async def save_state(self, path: str | Path, *, stop: bool = False,
                         timeout: float = SAVE_TIMEOUT) -> Bundle:
        """Save the guest's live state to a new bundle directory at ``path``.

        The guest is paused, its state migrated into ``path/state.bin`` and
        each writable disk's top layer copied beside it, then it runs on
        (``stop=True``: QEMU quits instead). :meth:`restore` starts clones
        from the bundle. Raises :class:`~qemukit.errors.SnapshotError`, before
        anything changed, if the VM cannot be saved (and says why).
        """
        self._require(VMState.RUNNING)
        return await save_state(self._as_vm, Path(path), stop=stop, timeout=timeout)

    async def dump_memory(self, path: str | Path, *, format: DumpFormat = "elf",
                          timeout: float = SAVE_TIMEOUT) -> DumpResult:
        """Write the guest's memory to the new file ``path`` as an ELF core (or kdump).

        Readable by ``crash`` and drgn: one ``NT_PRSTATUS`` note per vCPU and
        the RAM. See :func:`qemukit.dump.dump_memory`.
        """
        self._require(VMState.RUNNING)
        return await dump_memory(self._as_vm, path, format=format, timeout=timeout)

    async def gdb_address(self) -> str:
        """Where QEMU's gdb stub listens, as gdb's ``target remote`` takes it.

        By default (``spec.gdb``) the path of a Unix socket in the VM's private
        runtime directory; with ``spec.gdb_port``, ``127.0.0.1:PORT`` (for 0, the
        port the kernel picked). Connect with ``gdb vmlinux -ex 'target remote
        ADDRESS'``. Raises :class:`StateError` if the spec has no gdb stub.
        """
        return await _access.gdb_address(self._as_vm)

    async def ssh_address(self, guest_port: int = 22) -> tuple[str, int]:
        """The host address and port forwarded to the guest's TCP ``guest_port``.

        Asks QEMU (HMP ``info usernet``), so a forward with host port 0 gives
        the port the kernel picked. Raises :class:`StateError` if none.
        """
        return await _access.ssh_address(self._as_vm, guest_port)

    async def ssh_argv(self, command: Sequence[str] = (), *, user: str | None = None,
                       options: Sequence[str] = ()) -> list[str]:
        """The ``ssh`` argv reaching this guest through its forward, with the seed's key.

        ``command`` is an argv, each word quoted for the remote shell. The host
        keys qemukit gave the guest (its seed's, a warm clone's) are pinned
        through ``known_hosts`` in the runtime directory; where qemukit knows
        none, they are not checked. See :func:`qemukit.seed.ssh_argv`.
        """
        return await _access.ssh_argv(self._as_vm, command, user=user, options=options)

    async def wait_ssh(self, timeout: float | None = None) -> float:
        """Wait until ssh logs in to the guest; returns seconds since QEMU started."""
        self._require(VMState.RUNNING)
        await _access.wait_ssh(self._as_vm, self.boot_timeout if timeout is None else timeout)
        assert self._proc is not None
        return self._proc.uptime()

    async def copy_in(self, host_path: str | os.PathLike[str], guest_path: str, *,
                      recursive: bool = False, progress: Progress | None = None,
                      timeout: float = 600.0, via: CopyVia = "auto") -> str:
        """Copy a host file or directory into the guest (see :meth:`AsyncGuest.copy_in`).

        ``via``: ``agent`` (a virtio-serial port plugged for the copy), ``ssh``
        (a tar streamed over the VM's ssh forward with the seed's key, see
        :func:`qemukit.guest.ssh_copy_in`), or ``auto``: the agent when the VM
        has one, else ssh.
        """
        self._require(VMState.RUNNING)
        return await _access.copy_in(self._as_vm, host_path, guest_path, recursive=recursive,
                                     progress=progress, timeout=timeout, via=via)

    async def copy_out(self, guest_path: str, host_path: str | os.PathLike[str], *,
                       recursive: bool = False, progress: Progress | None = None,
                       timeout: float = 600.0, via: CopyVia = "auto") -> Path:
        """Copy a guest file or directory to the host (see :meth:`AsyncGuest.copy_out`).

        ``via`` as for :meth:`copy_in`.
        """
        self._require(VMState.RUNNING)
        return await _access.copy_out(self._as_vm, guest_path, host_path, recursive=recursive,
                                      progress=progress, timeout=timeout, via=via)
