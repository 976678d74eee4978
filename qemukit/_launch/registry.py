"""The daemonless registry: find, inspect and clean up VMs from any process.

Runtime directories are the registry (see :mod:`qemukit.state`). Listing
reads each ``vm.json``, checks with psutil that the pid is still the same
QEMU (pid and start time), and asks QEMU its run state over the shared QMP
socket with a short, raw exchange: ``qemukit ls`` must stay fast, and
importing qemu.qmp's asyncio stack alone costs more than the whole listing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from ..errors import StateError
from ..paths import state_dir, state_dir_error
from ._pids import is_same_process
from .runtime import RuntimeDir, VMInfo, list_entries
from .standby import MARKER, end_standby, read_marker
from .usernet import parse_usernet

if TYPE_CHECKING:
    from ..spec import PortForward

__all__ = ["GcAction", "VMEntry", "gc", "kill_verified", "list_vms"]

_PEEK_TIMEOUT = 0.5


@dataclass(frozen=True)
class VMEntry:
    """One VM as ``qemukit ls`` shows it."""

    name: str
    path: str
    pid: int | None
    alive: bool
    state: str
    accel: str | None
    uptime: float | None
    cpu_percent: float | None
    rss: int | None
    forwards: tuple[str, ...]
    orphaned: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {**self.__dict__, "forwards": list(self.forwards)}


@dataclass(frozen=True)
class GcAction:
    """What ``gc`` did to one entry."""

    name: str
    action: str
    detail: str


def _peek(path: Path, usernet: bool, timeout: float = _PEEK_TIMEOUT) -> tuple[str, str]:
    """QEMU's run state (and ``info usernet`` if asked) via a minimal QMP exchange.

    The state is 'busy' if another client holds the monitor, 'unreachable'
    if its socket does not answer.
    """
    commands: list[dict[str, Any]] = [{"execute": "qmp_capabilities"},
                                      {"execute": "query-status"}]
    if usernet:
        commands.append({"execute": "human-monitor-command",
                         "arguments": {"command-line": "info usernet"}})
    replies = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            stream = sock.makefile("rwb")
            stream.readline()  # greeting
            for command in commands:
                stream.write(json.dumps(command).encode() + b"\n")
                stream.flush()
                while True:
                    reply = json.loads(stream.readline() or b"{}")
                    if "event" not in reply:
                        break
                replies.append(reply.get("return"))
    except TimeoutError:
        return "busy", ""
    except (OSError, ValueError):
        return "unreachable", ""
    status = replies[1].get("status", "unknown") if isinstance(replies[1], dict) else "unknown"
    text = replies[2] if usernet and isinstance(replies[2], str) else ""
    return str(status), text


def _spec_forwards(rd: RuntimeDir) -> list[PortForward]:
    from ..spec import VMSpec  # only when there is a VM to list

    try:
        spec = VMSpec.load(rd.spec_file)
    except Exception:  # noqa: BLE001 - a damaged spec file only loses this column
        return []
    return [fw for nic in spec.nics for fw in nic.forwards]


def _format_forwards(spec_fwds: list[PortForward], usernet: str) -> tuple[str, ...]:
    """Forwards as bound: a port-0 forward shows the port the kernel picked."""
    bound = parse_usernet(usernet) if usernet else []
    out = []
    for fw in spec_fwds:
        port = fw.host_port
        if port == 0:
            match = next((b for b in bound if b.protocol == fw.protocol
                          and b.guest_port == fw.guest_port and b.host_addr == fw.host_addr), None)
            if match is not None:
                bound.remove(match)
                port = match.host_port
        out.append(f"{fw.host_addr}:{port}->{fw.guest_port}/{fw.protocol}")
    return tuple(out)


def _entry(rd: RuntimeDir, info: VMInfo | None, query: bool) -> VMEntry | None:
    """The row for one runtime directory; None once the directory is gone.

    Another process may stop (or gc) a VM while it is being listed: its entry
    then vanishes between the directory listing and the reads here. Such a VM
    is no longer in the registry, so it gets no row, rather than a bogus
    ``incomplete`` or ``gone`` one.
    """
    if info is None:
        if not rd.path.is_dir():
            return None
        return VMEntry(rd.name, str(rd.path), None, False, "incomplete", None, None, None, None,
                       (), False)
    alive = info.alive()
    cpu = rss = uptime = None
    if alive:
        try:
            proc = psutil.Process(info.pid)
            with proc.oneshot():
                times = proc.cpu_times()
                uptime = max(time.time() - info.start_time, 1e-3)
                cpu = round(100.0 * (times.user + times.system) / uptime, 1)
                rss = proc.memory_info().rss
        except psutil.Error:
            alive = False
    spec_fwds = _spec_forwards(rd)
    state, usernet = "gone", ""
    if alive:
        state, usernet = (
            _peek(rd.qmp_socket, any(fw.host_port == 0 for fw in spec_fwds))
            if query else ("alive", "")
        )
        if (rd.path / MARKER).exists():  # paused, waiting to be taken (qemukit.vm._standby)
            state = "standby"
    if not rd.path.is_dir():
        return None
    return VMEntry(
        name=rd.name, path=str(rd.path), pid=info.pid, alive=alive, state=state,
        accel=info.accel, uptime=None if uptime is None else round(uptime, 1), cpu_percent=cpu,
        rss=rss, forwards=_format_forwards(spec_fwds, usernet), orphaned=alive and info.orphaned(),
    )


def _entries(state_root: Path | None) -> list[tuple[RuntimeDir, VMInfo | None]]:
    """The registry's entries; a state directory that cannot be read is one clear error."""
    try:
        return list_entries(state_root)
    except OSError as exc:
        root = state_root or state_dir()
        if state_root is None:
            raise state_dir_error(root, exc) from exc
        raise StateError(f"cannot read the registry {root}: {exc.strerror or exc}") from exc


def list_vms(state_root: Path | None = None, *, query: bool = True) -> list[VMEntry]:
    """Every VM in the registry, live or stale, with its state from QMP if ``query``.

    An entry removed while the listing runs (its VM stopped meanwhile) is left out.
    """
    entries = _entries(state_root)
    if not entries:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(entries))) as pool:
        rows = list(pool.map(lambda e: _entry(e[0], e[1], query), entries))
    return [row for row in rows if row is not None]


def gc(state_root: Path | None = None, *, incomplete_age: float = 60.0) -> list[GcAction]:
    """Clean the registry.

    Removes entries whose QEMU is gone; kills (SIGKILL, through a pidfd so a
    reused pid is never hit) QEMUs that were meant to die with an owner that
    is gone, and standby clones whose warm state is gone, then removes their
    entries; removes entries left half-created by a launch that died more
    than ``incomplete_age`` seconds ago.
    """
    actions = []
    for rd, info in _entries(state_root):
        if info is None:
            try:
                age = time.time() - rd.path.stat().st_mtime
            except OSError:
                continue
            if age > incomplete_age:
                rd.remove()
                actions.append(GcAction(rd.name, "removed", "incomplete entry of a failed launch"))
            continue
        if not info.alive():
            kill_verified(info)  # a helper daemon (virtiofsd) may have outlived QEMU
            rd.remove()
            actions.append(GcAction(rd.name, "removed", f"QEMU pid {info.pid} is gone"))
        elif info.orphaned():
            kill_verified(info)
            rd.remove()
            actions.append(
                GcAction(rd.name, "killed", f"QEMU pid {info.pid} outlived its owner {info.owner_pid}")
            )
        elif (marker := read_marker(rd)) is not None and marker.outdated():
            if end_standby(rd, info):
                actions.append(GcAction(rd.name, "killed", f"standby clone of the warm state "
                                        f"{marker.key}, which is gone"))
    from .netswitch import sweep_stale

    for network in sweep_stale(state_root or state_dir()):
        actions.append(GcAction(f".net/{network}", "removed",
                                "files of a network whose switch is gone"))
    return actions


def kill_verified(info: VMInfo) -> None:
    """SIGKILL the VM's QEMU and its helper daemons, each only if it is still that process.

    Each pid is opened as a pidfd first and its start time checked afterwards,
    so the signal can never reach a process that merely reused the pid.
    """
    for pid, start_time in ((info.pid, info.start_time), *info.helpers):
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if is_same_process(pid, start_time):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
