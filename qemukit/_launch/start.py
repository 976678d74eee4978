"""Carrying out a launch plan: the checks before it, what it needs on disk, the spawn.

:class:`~qemukit.vm.AsyncVM`'s start calls these in order: :func:`prepare`
(everything that can fail on bad input, before any process or file exists),
then, once :func:`~qemukit._launch.plan.plan_launch` has decided the start,
:func:`carry_out` (overlays, the firmware variables, the cloud-init seed,
one virtiofsd per virtiofs share), :func:`spawn_qemu` and :func:`record`.
:func:`stop_helpers` and :func:`output_for_error` serve the shutdown and the
launch errors. The VM supervises what these start; nothing here talks QMP.

This module sits above :mod:`qemukit.host` (it uses the host's probes), unlike
the rest of ``_launch``, which ``host`` itself uses: see ``tests/unit/test_layers.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import host
from ..errors import HostError, LaunchError, SpecError, StateError, WaitTimeout
from ..spec import VMSpec
from .plan import DiskImage, LaunchPlan
from .process import QemuProcess, process_start_time
from .runtime import RuntimeDir, VMInfo

if TYPE_CHECKING:
    from ..spec import Share
    from .seed import Seed

__all__ = ["AdoptedQemu", "Prepared", "adopt", "carry_out", "output_for_error", "prepare",
           "record", "spawn_qemu", "stop_helpers", "warn_exposed"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdoptedQemu:
    """A QEMU that already runs, for an :class:`~qemukit.vm.AsyncVM` made to control it (attach)."""

    runtime: RuntimeDir
    process: QemuProcess
    helpers: tuple[QemuProcess, ...]
    accel: host.AccelChoice


@dataclass(frozen=True)
class Prepared:
    """What :func:`prepare` found: the QEMU binary, each drive's format, the daemons' launch."""

    qemu: host.QemuBinary
    #: Each drive's format and backing chain (:func:`qemukit.host.resolve_disk`), in order.
    formats: list[DiskImage]
    #: Before QEMU's argv when QEMU serves a writable 9p share (the share guard).
    qemu_guard: list[str] = field(default_factory=list)
    #: virtiofsd (path, flavour), when a share needs it.
    virtiofsd: tuple[str, str] | None = None
    #: Before virtiofsd's argv (a user namespace for a normal user).
    virtiofsd_launcher: list[str] = field(default_factory=list)


def warn_exposed(spec: VMSpec, stacklevel: int = 2) -> None:
    """Warn (:mod:`warnings`) about each TCP listener of the spec that any local user can reach."""
    if spec.qmp_tcp_port is not None:
        warnings.warn(
            f"VM {spec.name or ''!r}: QMP also listens on 127.0.0.1:{spec.qmp_tcp_port};"
            " any local user who can connect there controls the VM", stacklevel=stacklevel,
        )
    if spec.gdb_port is not None:
        warnings.warn(
            f"VM {spec.name or ''!r}: the gdb stub listens on TCP ("
            f"{f'127.0.0.1:{spec.gdb_port}' if spec.gdb_port else 'a free port of 127.0.0.1'}"
            "); any local user who can connect there controls the VM (gdb's monitor command "
            "runs QEMU monitor commands)", stacklevel=stacklevel,
        )


def prepare(spec: VMSpec, qemu: host.QemuBinary) -> Prepared:
    """Everything before the spawn that can fail on bad input: no process, no file yet.

    Checks the spec against the host and decides each drive's format and
    backing chain. The format is never probed again on a disk the guest
    wrote, and a backing file is opened only if named: see :mod:`qemukit.host`.
    """
    if spec.machine not in qemu.machines:
        raise SpecError("machine", spec.machine, f"{qemu.path} does not support it")
    for name in ("kernel", "initrd"):
        path = getattr(spec, name)
        if path is not None and not os.path.isfile(path):
            raise SpecError(name, path, "no such file")
    formats = [host.resolve_disk(drive, qemu) for drive in spec.drives]
    for share in spec.all_shares:
        if not os.path.isdir(share.host_path):
            raise SpecError("share.host_path", share.host_path, "no such directory")
    if spec.firmware == "ovmf" and host.find_ovmf() is None:
        raise SpecError("firmware", "ovmf", "OVMF not found; apt-get install ovmf")
    daemon, launcher = None, []
    if any(sh.transport == "virtiofs" for sh in spec.all_shares):
        daemon = host.find_virtiofsd()
        if daemon is None:
            raise HostError("a virtiofs share needs virtiofsd (qemu-system-common's "
                            "/usr/lib/qemu/virtiofsd, or the virtiofsd package)")
        # A normal user runs it in a user namespace, or learns here what is missing.
        launcher = host.virtiofsd_launcher(daemon)
        for share in spec.all_shares:  # a host the share guard does not know: say so now
            if share.transport == "virtiofs":
                host.virtiofsd_argv(daemon, share, 0, launcher)
    return Prepared(qemu, formats, host.qemu_share_guard(spec), daemon, launcher)


def carry_out(plan: LaunchPlan, prepared: Prepared, helpers: list[QemuProcess], *,
              die_with_parent: bool) -> Seed | None:
    """Create what the plan needs before QEMU starts: overlays, firmware copy, seed, daemons.

    Each daemon started is appended to ``helpers`` at once, so the caller's
    cleanup stops it when a later step fails. Returns the cloud-init seed
    written (None without one).
    """
    for step in plan.overlays:
        log.debug("%s: overlay %s over %s", plan.runtime.name, step.overlay, step.base)
        try:
            host.create_overlay(prepared.qemu, step.base, step.base_format, step.overlay,
                                size=step.size, unsafe=step.size is not None)
        except HostError as exc:
            raise LaunchError(str(exc)) from exc
    if plan.firmware_copy is not None:
        template, copy = plan.firmware_copy
        try:
            shutil.copyfile(template, copy)
        except OSError as exc:
            raise LaunchError(f"cannot copy the UEFI variables {template} to {copy}: "
                              f"{exc.strerror}") from exc
    seed = None
    if plan.seed_iso is not None:
        from .seed import build_seed

        assert plan.spec.cloud_init is not None
        seed = build_seed(plan.spec.cloud_init, plan.runtime.path, plan.runtime.name)
        log.debug("%s: cloud-init seed %s", plan.runtime.name, plan.seed_iso)
    for share, sock in plan.virtiofs:
        helpers.append(_start_virtiofsd(prepared, share, sock, plan.runtime,
                                        die_with_parent=die_with_parent))
    return seed


def _start_virtiofsd(prepared: Prepared, share: Share, path: str, runtime: RuntimeDir, *,
                     die_with_parent: bool) -> QemuProcess:
    """Start virtiofsd for ``share`` on a listening socket at ``path`` that we bound.

    Binding the socket here and handing virtiofsd the fd means QEMU can
    connect at once (the kernel queues it) with no wait for the daemon.
    """
    assert prepared.virtiofsd is not None  # checked by prepare, as is the launcher
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)  # like QEMU's own sockets (it runs with umask 077)
        listener.listen(1)
        argv = host.virtiofsd_argv(prepared.virtiofsd, share, listener.fileno(),
                                   prepared.virtiofsd_launcher)
        return QemuProcess.spawn(argv, log_path=runtime.path / f"virtiofsd-{share.tag}.log",
                                 pass_fds=[listener.fileno()], die_with_parent=die_with_parent)
    finally:
        listener.close()


def spawn_qemu(plan: LaunchPlan, prepared: Prepared, links: Sequence[socket.socket] = (),
               inherit: Sequence[int] = (), *, die_with_parent: bool
               ) -> tuple[QemuProcess, list[str], socket.socket, socket.socket | None]:
    """Spawn QEMU for ``plan`` with its monitor on a socket pair we made.

    ``links`` are the VM's connections to its private networks' switches,
    handed to QEMU (it keeps its own copies: they are closed here either way);
    ``inherit`` other descriptors QEMU keeps (a warm entry's hold), left open.
    Returns the process, its argv (without the share guard before it), our
    end of the monitor socket, non-blocking: QEMU is connected from the
    start, so there is no wait for a socket to appear and no race for it; and,
    when the plan's launcher reads the console (:attr:`LaunchPlan.console_reader`),
    our end of its connection, made the same way (see :func:`_console_connection`).
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    console: socket.socket | None = None
    qemu_console: socket.socket | None = None
    try:
        if plan.console_reader and plan.spec.serial:
            qemu_console, console = _console_connection()
        argv = plan.argv(qmp_fd=theirs.fileno(), network_fds=[link.fileno() for link in links],
                         console_fd=qemu_console.fileno() if qemu_console is not None else None)
        passed = [theirs.fileno(), *(link.fileno() for link in links), *inherit]
        if qemu_console is not None:
            passed.append(qemu_console.fileno())
        proc = QemuProcess.spawn([*prepared.qemu_guard, *argv], log_path=plan.runtime.qemu_log,
                                 pass_fds=passed, die_with_parent=die_with_parent)
    except BaseException:
        ours.close()
        if console is not None:
            console.close()
        raise
    finally:
        theirs.close()
        if qemu_console is not None:
            qemu_console.close()
        for link in links:  # QEMU holds its own copies; the VM leaves when QEMU exits
            link.close()
    ours.setblocking(False)
    if console is not None:
        console.setblocking(False)
    return proc, argv, ours, console


def _console_connection() -> tuple[socket.socket, socket.socket]:
    """QEMU's end and ours of a loopback TCP connection for the serial console.

    TCP, not a Unix socket: the UART hands QEMU's chardev one byte per write,
    and a Unix stream socket spends a whole buffer (about 800 bytes of kernel
    memory) on each, so it is full after about 280 bytes of console output
    (measured: 278 one-byte sends before ``EAGAIN``). A reader that misses a
    few milliseconds on a loaded host then fills it, and QEMU's UART drops
    the bytes it cannot send (``serial_xmit`` gives up after
    ``MAX_XMIT_RETRY`` tries, and the guest's driver overwrites the busy
    transmitter after its own timeout): ``    ok 6`` reached the stream as
    ``  6``. TCP appends small writes to its queue: megabytes fit (measured:
    4 million one-byte sends). The connection is made here: the listener is
    bound to 127.0.0.1 for an instant and accepts only our own connection (a
    stranger's that came first is closed), then it is closed.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ours = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    theirs: socket.socket | None = None
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        ours.connect(listener.getsockname())
        mine = ours.getsockname()
        listener.settimeout(5)
        for _ in range(8):
            conn, peer = listener.accept()
            if peer == mine:
                theirs = conn
                break
            conn.close()  # another local process raced for the port: never QEMU's console
        if theirs is None:
            raise LaunchError("cannot connect the console: other local processes kept "
                              "connecting to its loopback port")
        # Each byte goes out at once (no Nagle wait for an ACK): a prompt shows when printed.
        theirs.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        ours.close()
        raise LaunchError(f"cannot connect the console: {exc.strerror or exc}") from exc
    except BaseException:
        ours.close()
        raise
    finally:
        listener.close()
    return theirs, ours


def record(rd: RuntimeDir, proc: QemuProcess, argv: list[str], accel: host.AccelChoice,
           helpers: list[QemuProcess], *, die_with_parent: bool) -> None:
    """Write ``vm.json``: what a later process needs to find and control the VM (attach)."""
    rd.write_info(VMInfo(
        name=rd.name,
        pid=proc.pid,
        start_time=proc.start_time,
        accel=accel.accel,
        accel_reason=accel.reason,
        owner_pid=os.getpid(),
        die_with_parent=die_with_parent,
        created=time.time(),
        argv=tuple(argv),
        owner_start_time=process_start_time(os.getpid()) or 0.0,
        helpers=tuple((h.pid, h.start_time) for h in helpers),
    ))


def output_for_error(proc: QemuProcess, helpers: list[QemuProcess]) -> str:
    """QEMU's last output, plus that of any helper daemon that died (its cause, often)."""
    parts = [proc.output_tail()]
    for helper in helpers:
        if not helper.alive():
            # The daemon's name, not that of a launcher or of the share guard before it.
            argv = helper.argv[helper.argv.index("--") + 1:] if "--" in helper.argv else []
            name = Path((argv or helper.argv)[0]).name
            parts.append(f"[{name} exited]\n{helper.output_tail(10)}")
    return "\n".join(p for p in parts if p)


async def stop_helpers(helpers: list[QemuProcess], name: str) -> None:
    """Stop helper daemons (they normally exit with QEMU's disconnect) and forget them."""
    for helper in helpers:
        with contextlib.suppress(WaitTimeout):
            await helper.wait(2)
        if helper.alive():
            log.debug("%s: helper pid %d still runs after QEMU: SIGKILL", name, helper.pid)
            helper.kill()
            try:
                await helper.wait(5)
            except WaitTimeout:
                log.warning("%s: helper pid %d survived SIGKILL for 5 s; left behind",
                            name, helper.pid)
        helper.close()
    helpers.clear()


def adopt(name: str, state_root: Path | None = None) -> tuple[VMSpec, AdoptedQemu, bool]:
    """The running VM ``name``: its spec, its QEMU and helpers (adopted by pid and start
    time, so never a process that reused the pid), and whether it dies with its owner.

    Raises :class:`StateError` if there is no such VM or its QEMU is gone.
    """
    from ..paths import state_dir

    rd = RuntimeDir((state_root or state_dir()) / name)
    info = rd.read_info()
    if info is None:
        raise StateError(f"no VM named {name!r} in {rd.path.parent}")
    proc = QemuProcess.adopt(info.pid, info.start_time, list(info.argv), rd.qemu_log)
    if proc is None:
        raise StateError(f"VM {name!r} is not running (QEMU pid {info.pid} is gone); "
                         "'qemukit gc' removes its entry")
    helpers = tuple(
        h for pid, start in info.helpers
        if (h := QemuProcess.adopt(pid, start, [], rd.path / "helper.log")) is not None
    )
    accel = host.AccelChoice(info.accel, info.accel_reason)
    return VMSpec.load(rd.spec_file), AdoptedQemu(rd, proc, helpers, accel), info.die_with_parent
