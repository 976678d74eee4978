"""The synchronous :class:`VM` and :class:`VMPool`, derived from :class:`AsyncVM` and
:class:`AsyncVMPool`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from .. import host
from .._launch.netaddr import NetworkMember
from .._launch.runtime import RuntimeDir
from .._launch.start import AdoptedQemu
from .._sync import SyncFacade, blocking, delegated, passthrough, run_sync
from ..errors import StateError
from ..guest import SyncGuest
from ..hotplug import Hotplug
from ..identity import CloneIdentity
from ..kconfig import ResolvedKernel
from ..snapshot import SyncSnapshots
from ..spec import VMSpec
from ..timeouts import BOOT_TIMEOUT, QMP_TIMEOUT, SAVE_TIMEOUT
from ..warm import WarmStart
from ._core import AsyncVM
from ._ladder import ShutdownResult
from ._pool import POOL_WAIT_TIMEOUT, AsyncVMPool
from ._state import VMState


class VM(SyncFacade):
    """A QEMU virtual machine with a synchronous API (see :class:`AsyncVM`).

    ``with VM(spec) as vm: vm.exec(["uname", "-r"])`` boots, runs and stops.
    Works from plain code and from inside a running asyncio loop alike. Each
    method is derived from :class:`AsyncVM`'s (same signature and meaning),
    run on qemukit's own loop thread.
    """

    _aio: AsyncVM

    def __init__(self, spec: VMSpec, *, die_with_parent: bool = True, keep_runtime: bool = False,
                 state_root: Path | None = None, boot_timeout: float = BOOT_TIMEOUT,
                 continue_on_oops: bool = False, incoming: str | None = None,
                 adopt: AdoptedQemu | None = None,
                 modules: str | os.PathLike[str] | None = None,
                 qemu: host.QemuBinary | None = None) -> None:
        super().__init__(AsyncVM(spec, die_with_parent=die_with_parent, keep_runtime=keep_runtime,
                                 state_root=state_root, boot_timeout=boot_timeout,
                                 continue_on_oops=continue_on_oops, incoming=incoming,
                                 adopt=adopt, modules=modules, qemu=qemu))

    @property
    def aio(self) -> AsyncVM:
        """The underlying :class:`AsyncVM`."""
        return self._aio

    spec: delegated[VMSpec] = delegated(lambda vm: vm.spec, "The VM's spec.")
    state: delegated[VMState] = delegated(lambda vm: vm.state, "The lifecycle state.")
    accel: delegated[host.AccelChoice | None] = delegated(
        lambda vm: vm.accel, "The accelerator chosen at start, with the reason.")
    argv: delegated[list[str]] = delegated(lambda vm: vm.argv, "The argv QEMU was started with.")
    runtime: delegated[RuntimeDir | None] = delegated(lambda vm: vm.runtime,
                                                       "The runtime directory.")
    last_shutdown: delegated[ShutdownResult | None] = delegated(
        lambda vm: vm.last_shutdown, "How the VM was stopped (also by a ``with`` block).")
    attached: delegated[bool] = delegated(lambda vm: vm.attached,
                                          "True for a VM taken over with :meth:`attach`.")
    kernel: delegated[ResolvedKernel | None] = delegated(
        lambda vm: vm.kernel, "The kernel as the start resolved it (tree, config, release).")
    qemu: delegated[host.QemuBinary] = delegated(
        lambda vm: vm.qemu, "The QEMU binary (and its qemu-img), found once for the VM's arch.")
    modules: delegated[Path | None] = delegated(
        lambda vm: vm.modules, "Modules appended to the initrd at start, if given.")
    warm_start: delegated[WarmStart | None] = delegated(
        lambda vm: vm.warm_start, "For ``spec.warm``: whether the start was warm, and why.")
    identity: delegated[CloneIdentity | None] = delegated(
        lambda vm: vm.identity,
        "For a warm clone of a cloud-init guest: the host name, MACs and keys it was given.")
    networks: delegated[dict[str, NetworkMember]] = delegated(
        lambda vm: vm.networks,
        "The private networks joined: name -> its index, MAC and address (``.address``).")
    name = delegated(AsyncVM.name)
    pid = delegated(AsyncVM.pid)
    console_log = delegated(AsyncVM.console_log)
    guest_booted = delegated(AsyncVM.guest_booted)

    console_tail = passthrough(AsyncVM.console_tail)
    qemu_output = passthrough(AsyncVM.qemu_output)
    stats = passthrough(AsyncVM.stats)
    follow_console = passthrough(AsyncVM.follow_console)

    detach = blocking(AsyncVM.detach)
    qmp = blocking(AsyncVM.qmp)
    status = blocking(AsyncVM.status)
    gdb_address = blocking(AsyncVM.gdb_address)
    pause = blocking(AsyncVM.pause)
    resume = blocking(AsyncVM.resume)
    unplug = blocking(AsyncVM.unplug)
    devices = blocking(AsyncVM.devices)
    save_state = blocking(AsyncVM.save_state)
    dump_memory = blocking(AsyncVM.dump_memory)
    ssh_address = blocking(AsyncVM.ssh_address)
    ssh_argv = blocking(AsyncVM.ssh_argv)
    wait_ssh = blocking(AsyncVM.wait_ssh)
    wait_ready = blocking(AsyncVM.wait_ready)
    exec = blocking(AsyncVM.exec)
    copy_in = blocking(AsyncVM.copy_in)
    copy_out = blocking(AsyncVM.copy_out)
    wait_exit = blocking(AsyncVM.wait_exit)
    console_events = blocking(AsyncVM.console_events)
    shutdown = blocking(AsyncVM.shutdown)
    succeed = blocking(AsyncVM.succeed)
    fail = blocking(AsyncVM.fail)
    wait_until_succeeds = blocking(AsyncVM.wait_until_succeeds)
    wait_until_fails = blocking(AsyncVM.wait_until_fails)
    wait_for_open_port = blocking(AsyncVM.wait_for_open_port)
    wait_for_unit = blocking(AsyncVM.wait_for_unit)
    wait_for_console_text = blocking(AsyncVM.wait_for_console_text)
    screenshot = blocking(AsyncVM.screenshot)
    send_key = blocking(AsyncVM.send_key)
    send_chars = blocking(AsyncVM.send_chars)
    crash = blocking(AsyncVM.crash)
    block = blocking(AsyncVM.block)
    unblock = blocking(AsyncVM.unblock)
    kill = blocking(AsyncVM.kill)

    def start(self, timeout: float = QMP_TIMEOUT) -> VM:
        """Launch QEMU; returns once QMP answers (see :meth:`AsyncVM.start`)."""
        run_sync(self._aio.start(timeout))
        return self

    @classmethod
    def attach(cls, name: str, *, state_root: Path | None = None,
               timeout: float = QMP_TIMEOUT) -> VM:
        """Take control of a running VM by name (see :meth:`AsyncVM.attach`)."""
        return cls._wrap(run_sync(AsyncVM.attach(name, state_root=state_root, timeout=timeout)))

    @classmethod
    def restore(cls, bundle: str | Path, *, name: str | None = None,
                timeout: float = SAVE_TIMEOUT, die_with_parent: bool = True,
                keep_runtime: bool = False, state_root: Path | None = None,
                boot_timeout: float = BOOT_TIMEOUT, continue_on_oops: bool = False) -> VM:
        """Start a clone from a saved-state bundle, running (see :meth:`AsyncVM.restore`)."""
        return cls._wrap(run_sync(AsyncVM.restore(
            bundle, name=name, timeout=timeout, die_with_parent=die_with_parent,
            keep_runtime=keep_runtime, state_root=state_root, boot_timeout=boot_timeout,
            continue_on_oops=continue_on_oops)))

    def fork(self, n: int, *, timeout: float = SAVE_TIMEOUT,
             die_with_parent: bool | None = None) -> list[VM]:
        """Fork this running VM into ``n`` running clones (see :meth:`AsyncVM.fork`)."""
        return [VM._wrap(clone) for clone in run_sync(
            self._aio.fork(n, timeout=timeout, die_with_parent=die_with_parent))]

    @classmethod
    def _wrap(cls, aio: AsyncVM) -> VM:
        vm = cls.__new__(cls)
        SyncFacade.__init__(vm, aio)
        return vm

    @property
    def hotplug(self) -> Hotplug:
        """Hot-plug disks, NICs, CPUs and memory: ``vm.hotplug.disk("scratch.qcow2")``."""
        return Hotplug(self._aio.hotplug)

    @property
    def snapshots(self) -> SyncSnapshots:
        """Internal and external snapshots: ``vm.snapshots.save("tag")`` (see AsyncVM)."""
        return SyncSnapshots(self._aio.snapshots)

    @property
    def guest(self) -> SyncGuest:
        """The guest agent: ``vm.guest.read_file(path)``, ``with vm.guest.frozen(): ...``."""
        return SyncGuest(self._aio.guest)

    def __enter__(self) -> VM:
        if self._aio.state == VMState.NEW:
            self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._aio.state == VMState.RUNNING:
            self.shutdown()


class VMPool(SyncFacade):
    """A pool of warm clones with a synchronous API (see :class:`AsyncVMPool`).

    ``with VMPool(spec, max_vms=2) as pool: with pool.vm() as vm: vm.exec("true")``;
    :meth:`vm` may be used from several threads at once.
    """

    _aio: AsyncVMPool

    def __init__(self, spec: VMSpec, *, max_vms: int = 2,
                 wait_timeout: float = POOL_WAIT_TIMEOUT, boot_timeout: float = BOOT_TIMEOUT,
                 state_root: Path | None = None) -> None:
        super().__init__(AsyncVMPool(spec, max_vms=max_vms, wait_timeout=wait_timeout,
                                     boot_timeout=boot_timeout, state_root=state_root))

    @property
    def aio(self) -> AsyncVMPool:
        """The underlying :class:`AsyncVMPool`."""
        return self._aio

    spec: delegated[VMSpec] = delegated(lambda pool: pool.spec, "The spec every VM is a clone of.")
    max_vms: delegated[int] = delegated(lambda pool: pool.max_vms,
                                        "At most this many QEMUs at once, the standby included.")
    standby: delegated[bool] = delegated(lambda pool: pool.standby,
                                         "Whether the pool keeps a standby clone when it fits.")
    running = delegated(AsyncVMPool.running)
    closed = delegated(AsyncVMPool.closed)

    close = blocking(AsyncVMPool.close)

    @contextlib.contextmanager
    def vm(self, timeout: float | None = None) -> Iterator[VM]:
        """A running warm clone for the ``with`` block (see :meth:`AsyncVMPool.vm`)."""
        block = self._aio.vm(timeout)
        aio = run_sync(block.__aenter__())
        try:
            yield VM._wrap(aio)
        except BaseException as exc:
            if not run_sync(block.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            run_sync(block.__aexit__(None, None, None))

    def __enter__(self) -> Self:
        if self._aio.closed:
            raise StateError("the VM pool is closed")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
