"""Ports that forward themselves: the guest's listeners, forwarded to 127.0.0.1 as they come and go.

:func:`guest_listeners` reads the guest's ``/proc/net/{tcp,tcp6,udp,udp6}``
through its agent; :func:`sync_forwards` makes the user network's host
forwards match them, one pass (HMP ``hostfwd_add`` on 127.0.0.1 at a port
the host kernel picks; ``hostfwd_remove`` when the guest stopped listening);
:func:`watch_ports` repeats that until QEMU exits.

The guest decides what it listens on, so it decides nothing on the host: the
host port is never the guest's number (a guest listening on 5432 must not
take the host's own 127.0.0.1:5432 while the host's database restarts, nor
any privileged port when qemukit runs as root) but one from the kernel's
ephemeral range, which ``qemukit ports`` shows; and at most ``limit``
(:data:`MAX_AUTO_FORWARDS` by default) listeners are forwarded per VM, the
rest ignored with one log line each, so a guest opening thousands of
sockets cannot make the host bind thousands of ports.

:func:`list_forwards` says which forwards exist and which were added here
(``auto``) or by the spec (``static``). Only loopback is ever bound.
Sockets bound to the guest's loopback are skipped: user networking
reaches the guest on its own address, never on 127.0.0.1.

For a detached VM the CLI leaves a watcher process behind (``qemukit ports
NAME --watch``) that calls :func:`sync_forwards` every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from ._launch.usernet import UsernetForward, parse_usernet
from .errors import QemukitError, SpecError, StateError

if TYPE_CHECKING:
    from .guest import AsyncGuest
    from .target import VMTarget

__all__ = ["MAX_AUTO_FORWARDS", "Forward", "Listener", "guest_listeners", "list_forwards", "parse_proc_net",
           "start_watcher", "watcher_argv",
           "sync_forwards", "wait_pid_exit", "watch_ports"]

log = logging.getLogger(__name__)

Proto = Literal["tcp", "udp"]

#: The file in the runtime directory recording the forwards added automatically.
AUTO_FILE = "forwards-auto.json"

#: The most listeners forwarded automatically per VM (``qemukit ports --watch --max-forwards``).
MAX_AUTO_FORWARDS = 16

#: Seconds between two looks at the guest's listeners.
POLL_INTERVAL = 2.0

#: Guest ports never forwarded automatically: DHCP clients (their sockets are no services).
_IGNORED = {("udp", 68), ("udp", 546)}

_TCP_LISTEN = "0A"
_UDP_UNCONNECTED = "07"

#: Reads all four tables in one agent call, each after a marker line.
_READ_SCRIPT = ("for f in tcp tcp6 udp udp6; do echo \"== $f\"; "
                "cat /proc/net/$f 2>/dev/null; done")


@dataclass(frozen=True, order=True)
class Listener:
    """A socket the guest listens on: protocol and port."""

    proto: Proto
    port: int


@dataclass(frozen=True)
class Forward:
    """One host forward of the VM's user network."""

    proto: str
    guest_port: int
    host_addr: str
    host_port: int
    kind: Literal["auto", "static"]

    def to_json(self) -> dict[str, Any]:
        """The forward as a JSON object."""
        return asdict(self)


def _loopback(hex_addr: str) -> bool:
    """True for a /proc/net address on the loopback (127/8, ::1, ::ffff:127/8)."""
    if len(hex_addr) == 8:
        return hex_addr[6:8] == "7F"  # little-endian: the first octet is printed last
    if len(hex_addr) == 32:
        if hex_addr == "00000000000000000000000001000000":
            return True
        return hex_addr[:24] == "0000000000000000FFFF0000" and hex_addr[30:32] == "7F"
    return False


def parse_proc_net(text: str, proto: Proto) -> set[Listener]:
    """The listening sockets in one ``/proc/net/{tcp,tcp6,udp,udp6}`` table.

    TCP sockets in state LISTEN; UDP sockets bound with no remote end.
    Those bound to a loopback address are left out: a user-network forward
    cannot reach them. Malformed lines are skipped.
    """
    found: set[Listener] = set()
    want = _TCP_LISTEN if proto == "tcp" else _UDP_UNCONNECTED
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 4 or not fields[0].rstrip(":").isdigit():
            continue
        local, remote, state = fields[1], fields[2], fields[3].upper()
        addr, _, port_hex = local.rpartition(":")
        try:
            port = int(port_hex, 16)
        except ValueError:
            continue
        if state != want or port == 0 or _loopback(addr.upper()):
            continue
        if proto == "udp" and not remote.endswith(":0000"):
            continue
        found.add(Listener(proto, port))
    return found


def parse_proc_net_tables(text: str) -> set[Listener]:
    """Listeners from the output of the agent script (``== tcp`` etc. before each table)."""
    found: set[Listener] = set()
    proto: Proto | None = None
    block: list[str] = []

    def flush() -> None:
        if proto is not None:
            found.update(parse_proc_net("\n".join(block), proto))

    for line in text.splitlines():
        if line.startswith("== "):
            flush()
            proto = "udp" if line[3:].startswith("udp") else "tcp"
            block = []
        else:
            block.append(line)
    flush()
    return found


async def guest_listeners(guest: AsyncGuest, timeout: float = 30.0) -> set[Listener]:
    """The guest's listening TCP and UDP sockets, read through its agent (``vm.guest``)."""
    result = await guest.exec(_READ_SCRIPT, timeout)
    return {lst for lst in parse_proc_net_tables(result.stdout_text)
            if (lst.proto, lst.port) not in _IGNORED}


async def _usernet(vm: VMTarget) -> tuple[str | None, list[UsernetForward]]:
    text = str(await vm.qmp("human-monitor-command", command_line="info usernet"))
    netdev = None
    for line in text.splitlines():
        if line.startswith("Hub") and "(" in line:
            netdev = line[line.index("(") + 1 : line.rindex(")")]
            break
    return netdev, parse_usernet(text)


def _auto_path(vm: VMTarget) -> Any:
    if vm.runtime is None:
        raise StateError(f"VM {vm.name!r} has no runtime directory")
    return vm.runtime.path / AUTO_FILE


def _read_auto(vm: VMTarget) -> dict[str, int]:
    """``{"tcp/8123": host_port}`` for each automatic forward."""
    try:
        data = json.loads(_auto_path(vm).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()}


def _write_auto(vm: VMTarget, auto: dict[str, int]) -> None:
    path = _auto_path(vm)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(auto, f)
    os.replace(tmp, path)


async def list_forwards(vm: VMTarget) -> list[Forward]:
    """Every host forward of the VM's user network, automatic ones marked ``auto``."""
    _, forwards = await _usernet(vm)
    auto = _read_auto(vm)
    out = []
    for fw in forwards:
        key = f"{fw.protocol}/{fw.guest_port}"
        kind: Literal["auto", "static"] = "auto" if auto.get(key) == fw.host_port else "static"
        out.append(Forward(fw.protocol, fw.guest_port, fw.host_addr, fw.host_port, kind))
    return sorted(out, key=lambda f: (f.proto, f.guest_port))


async def _hmp(vm: VMTarget, line: str) -> str:
    return str(await vm.qmp("human-monitor-command", command_line=line)).strip()


async def sync_forwards(vm: VMTarget, listeners: set[Listener],
                        limit: int = MAX_AUTO_FORWARDS) -> list[Forward]:
    """One pass: forward each listener not yet forwarded, drop automatic forwards of gone ones.

    The host side is always 127.0.0.1 at a port the host kernel picks (never
    the guest's number: see the module's docstring). At most ``limit``
    automatic forwards exist after the pass: those already made are kept,
    new listeners are taken lowest port first, and each one left over is
    logged once (not at every pass). Static forwards (from the spec) are
    never touched, and a port they already forward is not added twice.
    Returns the automatic forwards after the pass.
    """
    if limit < 0:
        raise SpecError("max_forwards", limit, "must be 0 or more")
    netdev, existing = await _usernet(vm)
    if netdev is None:
        raise StateError(f"VM {vm.name!r} has no user network (add --nic user)")
    auto = _read_auto(vm)
    static = {(fw.protocol, fw.guest_port) for fw in existing
              if auto.get(f"{fw.protocol}/{fw.guest_port}") != fw.host_port}
    live = {(fw.protocol, fw.host_port) for fw in existing}
    wanted = {(lst.proto, lst.port) for lst in listeners}
    for key, host_port in list(auto.items()):
        fproto, _, gport = key.partition("/")
        if (fproto, int(gport)) in wanted and (fproto, host_port) in live:
            continue
        out = await _hmp(vm, f"hostfwd_remove {netdev} {fproto}:127.0.0.1:{host_port}")
        log.info("%s: guest %s port %s gone: removed forward 127.0.0.1:%d (%s)",
                 vm.name, fproto, gport, host_port, out or "ok")
        del auto[key]
    ignored = _IGNORED_LOGGED.setdefault(str(_auto_path(vm)), set())
    ignored &= wanted
    for proto, port in sorted(wanted):
        key = f"{proto}/{port}"
        if key in auto or (proto, port) in static:
            continue
        if len(auto) >= limit:
            if (proto, port) not in ignored:
                ignored.add((proto, port))
                log.warning("%s: guest %s port %d not forwarded: the VM already has %d "
                            "automatic forwards, the most allowed (--max-forwards)",
                            vm.name, proto, port, limit)
            continue
        out = await _hmp(vm, f"hostfwd_add {netdev} {proto}:127.0.0.1:0-:{port}")
        if out:
            log.warning("%s: cannot forward guest %s port %d: %s", vm.name, proto, port, out)
            continue
        _, now = await _usernet(vm)
        taken = {(fw.protocol, fw.host_port) for fw in existing}
        added = next((fw.host_port for fw in now if fw.protocol == proto
                      and fw.guest_port == port and (fw.protocol, fw.host_port) not in taken),
                     None)
        if added is None:
            log.warning("%s: guest %s port %d: QEMU took the forward but does not list it",
                        vm.name, proto, port)
            continue
        existing = now
        auto[key] = added
        ignored.discard((proto, port))
        log.info("%s: guest %s port %d forwarded from 127.0.0.1:%d", vm.name, proto, port, added)
    _write_auto(vm, auto)
    return [fw for fw in await list_forwards(vm) if fw.kind == "auto"]


#: Per VM (its auto file), the listeners already logged as over the cap.
_IGNORED_LOGGED: dict[str, set[tuple[str, int]]] = {}


def wait_pid_exit(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for process ``pid`` to exit; True if it did."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(timeout * 1000))
    finally:
        os.close(fd)


async def watch_ports(vm: VMTarget, guest: AsyncGuest, interval: float = POLL_INTERVAL,
                      stop: asyncio.Event | None = None,
                      limit: int = MAX_AUTO_FORWARDS) -> None:
    """Keep the automatic forwards in step with the guest until QEMU exits (or ``stop`` is set).

    Each look waits ``interval`` seconds on QEMU's disconnect (an event,
    with the interval as its deadline), so the watcher ends as soon as
    QEMU does. A failing look is logged and retried at the next one.
    """
    stop = stop or asyncio.Event()
    while not stop.is_set() and vm.qemu_alive():
        try:
            await sync_forwards(vm, await guest_listeners(guest), limit)
        except QemukitError as exc:
            log.warning("%s: port watch: %s", vm.name, exc)
        stopped = asyncio.ensure_future(stop.wait())
        gone = asyncio.ensure_future(vm.monitor.wait_disconnected())
        try:
            await asyncio.wait({stopped, gone}, timeout=interval,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopped, gone):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if gone.done() and not gone.cancelled():
            return


def watcher_argv(name: str, limit: int = MAX_AUTO_FORWARDS, forward: bool = True) -> list[str]:
    """The command line of the watcher of detached VM ``name`` (see :func:`start_watcher`).

    ``-P``: Python puts neither the current directory nor a script's directory
    first on ``sys.path``, so a ``qemukit.py`` or ``click.py`` lying where the
    user started the VM is never imported in place of the real ones (the watcher
    lives on after the command, in the user's name).
    """
    import sys

    from ._wire.console import CONSOLE_LOG_MAX

    return [sys.executable, "-P", "-c", "from qemukit.cli import main; main()", "ports", name,
            "--watch", "--max-forwards", str(limit), "--forward" if forward else "--no-forward",
            "--log-max", str(CONSOLE_LOG_MAX)]


def start_watcher(name: str, *, forward: bool, limit: int = MAX_AUTO_FORWARDS) -> int:
    """Start the watcher of detached VM ``name``, recorded among its helpers; its pid.

    It keeps the console log capped and, with ``forward`` (the spec's
    ``forward_auto``), forwards at most ``limit`` guest listeners from
    127.0.0.1. ``stop``, ``kill`` and ``gc`` end the VM's helpers with it; the
    watcher also ends by itself once QEMU exits. It runs in the VM's runtime
    directory, not the caller's. :func:`qemukit.resolve.start_detached` starts it
    for every VM it leaves running.
    """
    import dataclasses

    from ._launch.process import QemuProcess
    from ._launch.runtime import RuntimeDir
    from .paths import state_dir

    rd = RuntimeDir(state_dir() / name)
    info = rd.read_info()
    if info is None:
        raise StateError(f"no VM named {name!r}")
    proc = QemuProcess.spawn(watcher_argv(name, limit, forward), log_path=rd.path / "ports.log",
                             die_with_parent=False, cwd=rd.path)
    rd.write_info(dataclasses.replace(info, helpers=(*info.helpers,
                                                     (proc.pid, proc.start_time))))
    log.debug("%s: watcher started, pid %d (forward: %s)", name, proc.pid, forward)
    return proc.pid
