"""How the host reaches into a running guest: ssh, file copies and the gdb stub, as
functions of the target.

:class:`~qemukit.vm.AsyncVM`'s ``ssh_address``, ``ssh_argv``, ``wait_ssh``,
``copy_in``, ``copy_out`` and ``gdb_address`` are one-line calls of these. They depend on
:class:`AccessTarget`, the least a VM offers them (its spec, runtime
directory and monitor, the guarded wait and the guest agent), never on the
VM's private parts, so a unit test passes a small fake.

A copy goes through the guest agent (a virtio-serial port plugged for the
copy, :meth:`qemukit.guest.AsyncGuest.copy_in`) or over ssh (a tar streamed
through the VM's forward with the seed's key, :func:`qemukit.guest.ssh_copy_in`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from ._launch.argv import GDB_CHARDEV
from .errors import SpecError, StateError
from .guest import Progress, ssh_copy_in, ssh_copy_out

if TYPE_CHECKING:
    from ._launch.runtime import RuntimeDir
    from ._wire.agent import ExecResult
    from .guest import AsyncGuest
    from .identity import CloneIdentity
    from .spec import VMSpec

__all__ = ["AccessTarget", "CopyVia", "copy_in", "copy_out", "copy_via", "gdb_address",
           "ssh_address", "ssh_argv", "wait_ssh"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How :func:`copy_in` and :func:`copy_out` move the bytes.
CopyVia = Literal["auto", "agent", "ssh"]

#: ssh options of the commands qemukit runs itself: never a prompt, a bounded connect.
_BATCH = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=30")


class AccessTarget(Protocol):
    """The least a running VM offers ssh and copies."""

    @property
    def spec(self) -> VMSpec:
        """The VM's description (its agent, its cloud-init seed)."""

    @property
    def name(self) -> str:
        """The VM's name, for errors."""

    @property
    def runtime(self) -> RuntimeDir | None:
        """Its runtime directory (the seed's key, ``known_hosts``)."""

    @property
    def identity(self) -> CloneIdentity | None:
        """What a warm clone of a cloud-init guest was given (None otherwise)."""

    @property
    def guest(self) -> AsyncGuest:
        """The guarded guest agent."""

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = ..., **kwargs: Any) -> Any:
        """Run one QMP command."""

    async def guarded(self, aw: Awaitable[T], timeout: float | None, what: str) -> T:
        """Await ``aw``, ending early with the right error if QEMU exits or the guest panics."""

    async def wait_ready(self, timeout: float | None = None) -> float:
        """Wait until the guest agent answers."""

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = 60.0
                   ) -> ExecResult:
        """Run a command in the guest through the agent."""


async def ssh_address(vm: AccessTarget, guest_port: int = 22) -> tuple[str, int]:
    """The host address and port forwarded to the guest's TCP ``guest_port``.

    Asks QEMU (HMP ``info usernet``), so a forward with host port 0 gives
    the port the kernel picked. Raises :class:`StateError` if none.
    """
    from ._launch.seed import parse_usernet

    text = await vm.qmp("human-monitor-command", command_line="info usernet")
    for fw in parse_usernet(str(text)):
        if fw.protocol == "tcp" and fw.guest_port == guest_port:
            addr = "127.0.0.1" if fw.host_addr == "0.0.0.0" else fw.host_addr
            return addr, fw.host_port
    raise StateError(f"VM {vm.name!r} forwards no host port to guest port {guest_port} "
                     f"(add --nic user,hostfwd=0:{guest_port})")


async def ssh_argv(vm: AccessTarget, command: Sequence[str] = (), *, user: str | None = None,
                   options: Sequence[str] = ()) -> list[str]:
    """The ``ssh`` argv reaching the guest through its forward, with the seed's key.

    See :meth:`qemukit.vm.AsyncVM.ssh_argv`.
    """
    from ._launch.seed import host_key_alias, identity_file, known_hosts_file
    from ._launch.seed import ssh_argv as seed_ssh_argv

    runtime = vm.runtime
    if runtime is None:
        raise StateError(f"VM {vm.name!r} has no runtime directory (not started)")
    host_addr, port = await ssh_address(vm)
    ci = vm.spec.cloud_init
    login = user or (ci.ssh_user if ci is not None else None) or os.environ.get("USER", "root")
    argv = seed_ssh_argv(host_addr, port, login, identity_file(ci, runtime.path), command,
                         known_hosts=known_hosts_file(runtime.path),
                         alias=host_key_alias(runtime.name), options=options)
    log.debug("%s: ssh argv %s", vm.name, argv)
    return argv


async def wait_ssh(vm: AccessTarget, timeout: float) -> None:
    """Wait until ssh logs in to the guest, at most ``timeout`` seconds.

    A cloud-init guest with qemu-guest-agent is first asked, through the
    agent, whether cloud-init is done: it restarts sshd after it first comes
    up (new host keys, our key, password settings), so a login that works
    early can be cut off moments later.
    """
    from ._launch.seed import wait_for_ssh

    deadline = time.monotonic() + timeout
    if vm.spec.cloud_init is not None and vm.spec.agent == "qga" and vm.identity is None:
        # (A warm clone's state was saved after cloud-init was done: see the warm build.)
        await vm.wait_ready(timeout)
        await vm.exec(["cloud-init", "status", "--wait"],
                      timeout=max(1.0, deadline - time.monotonic()))
    argv = await ssh_argv(vm, ["true"], options=("-o", "BatchMode=yes", "-o", "ConnectTimeout=5"))
    remaining = max(1.0, deadline - time.monotonic())
    log.debug("%s: waiting up to %.0f s for ssh to log in", vm.name, remaining)
    await vm.guarded(wait_for_ssh(argv, remaining), remaining + 5, "ssh to log in")


async def gdb_address(vm: AccessTarget) -> str:
    """Where QEMU's gdb stub listens, as gdb's ``target remote`` takes it.

    See :meth:`qemukit.vm.AsyncVM.gdb_address`.
    """
    if not vm.spec.gdb:
        raise StateError(f"VM {vm.name!r} has no gdb stub (start it with gdb=True, "
                         "qemukit run --gdb)")
    for chardev in await vm.qmp("query-chardev"):
        if chardev.get("label") != GDB_CHARDEV:
            continue
        # e.g. "disconnected:tcp:127.0.0.1:40937,server=on" (the bound address) or
        # "disconnected:unix:/run/.../gdb.sock,server=on".
        filename = str(chardev.get("filename", ""))
        match = re.search(r"tcp:([\d.]+):(\d+)", filename)
        if match:
            return f"{match.group(1)}:{match.group(2)}"
        if "unix:" in filename and vm.runtime is not None:
            return str(vm.runtime.gdb_socket)
    raise StateError(f"QEMU reports no listening gdb stub for VM {vm.name!r}")


def copy_via(vm: AccessTarget, via: str) -> Literal["agent", "ssh"]:
    """Which way a copy goes: ``via`` checked against what the VM has (``auto``: the agent
    if it has one, else ssh). Raises :class:`SpecError` or :class:`StateError` before
    anything moves."""
    if via not in ("auto", "agent", "ssh"):
        raise SpecError("via", via, "must be auto, agent or ssh")
    has_agent = vm.spec.agent != "none"
    if via == "agent" and not has_agent:
        raise StateError(f"VM {vm.name!r} has no guest agent (spec.agent is 'none'); "
                         "copy over ssh (via='ssh', qemukit cp --via ssh)")
    if via == "ssh" or not has_agent:
        if vm.spec.cloud_init is None:
            raise StateError(f"VM {vm.name!r} has no guest agent and no cloud-init seed "
                             "to log in over ssh with: qemukit cannot copy files to it")
        return "ssh"
    return "agent"


async def copy_in(vm: AccessTarget, host_path: str | os.PathLike[str], guest_path: str, *,
                  recursive: bool = False, progress: Progress | None = None,
                  timeout: float = 600.0, via: CopyVia = "auto") -> str:
    """Copy a host file or directory into the guest; see :meth:`qemukit.vm.AsyncVM.copy_in`."""
    way = copy_via(vm, via)
    log.debug("%s: copy in %s -> %s via %s", vm.name, host_path, guest_path, way)
    if way == "ssh":
        return await vm.guarded(
            ssh_copy_in(functools.partial(ssh_argv, vm, options=_BATCH), host_path, guest_path,
                        recursive=recursive, progress=progress, timeout=timeout),
            timeout + 60.0, f"copying {host_path} in over ssh")
    await vm.wait_ready()
    return await vm.guest.copy_in(host_path, guest_path, recursive=recursive,
                                  progress=progress, timeout=timeout)


async def copy_out(vm: AccessTarget, guest_path: str, host_path: str | os.PathLike[str], *,
                   recursive: bool = False, progress: Progress | None = None,
                   timeout: float = 600.0, via: CopyVia = "auto") -> Path:
    """Copy a guest file or directory to the host; see :meth:`qemukit.vm.AsyncVM.copy_out`."""
    way = copy_via(vm, via)
    log.debug("%s: copy out %s -> %s via %s", vm.name, guest_path, host_path, way)
    if way == "ssh":
        return await vm.guarded(
            ssh_copy_out(functools.partial(ssh_argv, vm, options=_BATCH), guest_path, host_path,
                         recursive=recursive, progress=progress, timeout=timeout),
            timeout + 60.0, f"copying {guest_path} out over ssh")
    await vm.wait_ready()
    return await vm.guest.copy_out(guest_path, host_path, recursive=recursive,
                                   progress=progress, timeout=timeout)
