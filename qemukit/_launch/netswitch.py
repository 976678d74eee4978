"""Private networks between VMs: a switch per network, reached through a Unix socket.

Each named network of a user (per state directory) is one small switch process,
``python -m qemukit._launch.netswitch``, listening on ``<state>/.net/<name>/switch.sock``
in a 0700 directory: only that user can connect, so no other local user (and no
VM of another network) can send or read a frame, unlike a multicast group on the
loopback interface, which anyone on the host can join.

A VM joins by :func:`join`: under the network's lock, qemukit starts the switch
if none runs (binding its socket first and handing it the listening fd, so
nobody waits for the daemon to come up), connects, introduces the VM (its name
and MAC) and receives its index on the network. The connected socket then goes
to QEMU as ``-netdev stream,addr.type=fd`` (a hot-plugged NIC gets it through
QMP ``getfd``). From then on it carries QEMU's stream framing: a 4-byte
big-endian length, then the Ethernet frame.

The switch treats every frame as hostile: a frame longer than
:data:`MAX_FRAME` ends that VM's connection; a frame whose source MAC is not
the one the VM joined with is dropped (no VM can pose as another); frames to a
known MAC go to that VM only, the rest (broadcast, multicast, unknown) to all
others; a VM that does not read is skipped once :data:`MAX_BACKLOG` bytes wait
for it. The host has no interface on the network until a user asks for a port
into one of its VMs (:func:`forward`): then the switch starts the network's
gateway (:mod:`qemukit._launch.netgate`), its child, stopped with the network.

The switch exits, removing its directory, when its last VM has gone: it takes
the network's lock before it decides, and joiners hold that lock from connect
to welcome, so a VM never joins a switch on its way out. Stopped by SIGTERM, it
takes the lock the same way (after any joiner holding it), stops listening and
removes its files.

Every step of a join (the lock, starting the switch, connecting, the welcome)
shares the join's timeout: a switch that stopped accepting costs a joiner its
timeout, then a :class:`~qemukit.errors.WaitTimeout`, and the lock is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ..errors import LaunchError, SpecError, StateError, WaitTimeout
from .netaddr import (
    GATEWAY_INDEX,
    MAX_MEMBERS,
    NetworkMember,
    check_network_name,
    network_address,
    network_dir,
    network_mac,
    network_nic_id,
    network_subnet,
)
from .netgate import PID_NAME, Gateway, GatewayError, check_qemu_path

__all__ = [
    "MAX_FRAME", "MAX_MEMBERS", "NetworkMember", "check_network_name", "forward", "join", "members",
    "network_address", "network_dir", "network_mac", "network_nic_id", "network_subnet",
]

#: The longest frame a VM may send: QEMU's stream backends carry at most 68 KiB.
MAX_FRAME = 69632
#: Bytes waiting for one VM beyond which frames to it are dropped (a VM that stopped reading).
MAX_BACKLOG = 4 * 1024 * 1024
#: A VM's name as a member: what qemukit's VM names allow (it goes into guests' /etc/hosts).
MEMBER_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
#: How long a joiner waits for the network's lock and the switch's welcome.
JOIN_TIMEOUT = 30.0
#: A switch nobody joins within this time (its starter died) exits.
IDLE_START = 60.0
SOCKET_NAME = "switch.sock"
LOG_NAME = "switch.log"
_HELLO_MAX = 4096
_HELD = -1  # the lock is someone else's (not an fd)


# -- joining ------------------------------------------------------------------------------------


def _left(deadline: float) -> float:
    """The time left until ``deadline`` (a socket timeout: never 0, which means non-blocking)."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _lock(root: Path, network: str, deadline: float, timeout: float) -> int:
    """The network's lock, held (an fd); the lock file is re-checked against removal."""
    base = Path(root) / ".net"
    path = base / f"{network}.lock"
    while True:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # the directory went with the last switch: again
            if time.monotonic() > deadline:
                raise WaitTimeout(f"network {network!r}'s lock file {path} to open",
                                  timeout) from None
            time.sleep(0.05)
            continue
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise WaitTimeout(f"network {network!r}'s lock {path} (held by another "
                                      "joiner or its switch)", timeout) from None
                time.sleep(0.05)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # a switch removed that file on its way out: lock the new one


def _start_switch(directory: Path, lock_path: Path, network: str, deadline: float) -> None:
    """Bind the switch's socket and start the daemon on it (the caller holds the lock).

    The starter gets the time left until ``deadline``: its
    :class:`subprocess.TimeoutExpired` reaches the caller (:func:`join` translates it).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    path = directory / SOCKET_NAME
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a switch that died without cleaning up
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(64)
        log = os.open(directory / LOG_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                      0o600)
        try:
            # The daemon forks and its first process exits at once: the switch belongs to
            # no VM's process (it outlives any one of them) and is reaped by init.
            starter = subprocess.run(
                [sys.executable, "-m", "qemukit._launch.netswitch", "--fd", str(listener.fileno()),
                 "--dir", str(directory), "--lock", str(lock_path), "--network", network],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=[listener.fileno()],
                umask=0o077, timeout=_left(deadline), check=False, env=_daemon_env(),
            )
        finally:
            os.close(log)
        if starter.returncode != 0:
            raise LaunchError(f"network {network!r}: its switch did not start (exit "
                              f"{starter.returncode}); see {directory / LOG_NAME}")
    finally:
        listener.close()


def _daemon_env() -> dict[str, str]:
    """The daemon imports this package: from wherever the caller imported it."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _recv_line(sock: socket.socket, deadline: float) -> bytes:
    """One welcome line, read without taking any frame that follows it."""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = sock.recv(_HELLO_MAX, socket.MSG_PEEK)
        if not data:
            raise ConnectionError("the switch closed the connection")
        end = data.find(b"\n")
        if end >= 0:
            return sock.recv(end + 1)[:-1]
        if len(data) >= _HELLO_MAX:
            raise ConnectionError("the switch's welcome is too long")
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.01)


def _connect(sock: socket.socket, path: Path, deadline: float) -> None:
    """Connect within the deadline, waiting while the switch's backlog is full.

    With a timeout set, a Unix socket's connect to a listener whose backlog is
    full fails at once (EAGAIN) instead of blocking: tried again until the deadline.
    """
    while True:
        sock.settimeout(_left(deadline))
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            time.sleep(0.05)


def join(root: Path, network: str, name: str, mac: str | None = None,
         timeout: float = JOIN_TIMEOUT) -> tuple[socket.socket, NetworkMember]:
    """Join VM ``name`` to ``network`` (started if none runs); QEMU's socket and the place.

    The socket is blocking and not inheritable; hand its fd to QEMU and close it.
    Every step (the lock, starting the switch, connecting, the welcome) shares
    ``timeout``. Raises :class:`SpecError` for a bad name, a VM of that name
    already on the network or a full network, :class:`WaitTimeout` (naming the
    step) once ``timeout`` has passed, :class:`LaunchError` if the switch
    cannot start or breaks the connection.
    """
    check_network_name(network)
    mac = mac or network_mac(network, name)
    deadline = time.monotonic() + timeout
    directory = network_dir(root, network)
    lock = _lock(root, network, deadline, timeout)
    try:
        path = directory / SOCKET_NAME
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        step = f"network {network!r}'s switch ({path}) to take VM {name!r}"
        try:
            try:
                _connect(sock, path, deadline)
            except (FileNotFoundError, ConnectionRefusedError):
                step = f"network {network!r}'s switch to start (see {directory / LOG_NAME})"
                _start_switch(directory, Path(root) / ".net" / f"{network}.lock", network,
                              deadline)
                step = f"network {network!r}'s new switch ({path}) to take VM {name!r}"
                _connect(sock, path, deadline)
            step = f"network {network!r}'s switch ({path}) to welcome VM {name!r}"
            sock.settimeout(_left(deadline))
            sock.sendall(json.dumps({"name": name, "mac": mac}).encode() + b"\n")
            answer = json.loads(_recv_line(sock, deadline))
        except BaseException as exc:
            sock.close()
            if isinstance(exc, (TimeoutError, subprocess.TimeoutExpired)):
                raise WaitTimeout(step, timeout) from exc
            if isinstance(exc, (OSError, ValueError, subprocess.SubprocessError)):
                raise LaunchError(f"network {network!r}: joining its switch ({path}) failed: "
                                  f"{exc}; see {directory / LOG_NAME}") from exc
            raise
    finally:
        os.close(lock)
    if "error" in answer:
        sock.close()
        raise SpecError("networks", network, str(answer["error"]))
    sock.settimeout(None)
    members = {str(k): int(v) for k, v in answer["members"].items()}
    return sock, NetworkMember(network, name, int(answer["index"]), mac, members)


def forward(root: Path, network: str, member: str, port: int, qemu: str,
            timeout: float = JOIN_TIMEOUT) -> int:
    """Ask ``network``'s switch for a port of 127.0.0.1 into member ``member``'s ``port``.

    The switch starts the network's gateway (:mod:`qemukit._launch.netgate`) with
    ``qemu`` if it has none yet. Returns the host port. Raises :class:`SpecError`
    for a bad network name or port, :class:`StateError` if no VM runs on the
    network, or the switch refused (no such member, the gateway failed: its
    reason), :class:`WaitTimeout` once ``timeout`` has passed.
    """
    check_network_name(network)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SpecError("port", port, "a TCP port is 1 to 65535")
    deadline = time.monotonic() + timeout
    directory = network_dir(root, network)
    path = directory / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            _connect(sock, path, deadline)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise StateError(f"network {network!r} has no VM running (no switch at {path})") from exc
        except TimeoutError as exc:
            raise WaitTimeout(f"network {network!r}'s switch ({path}) to take the request",
                              timeout) from exc
        try:
            sock.settimeout(_left(deadline))
            sock.sendall(json.dumps({"op": "forward", "vm": member, "port": port,
                                     "qemu": qemu}).encode() + b"\n")
            answer = json.loads(_recv_line(sock, deadline))
        except TimeoutError as exc:
            raise WaitTimeout(f"network {network!r}'s switch to forward a port to {member!r}'s "
                              f"port {port}", timeout) from exc
        except (OSError, ValueError) as exc:
            raise StateError(f"network {network!r}: asking its switch for a forward failed: "
                             f"{exc}; see {directory / LOG_NAME}") from exc
    if not isinstance(answer, dict) or "error" in answer or not isinstance(answer.get("port"), int):
        reason = answer.get("error") if isinstance(answer, dict) else answer
        raise StateError(f"network {network!r}: no forward to {member!r}'s port {port}: {reason}")
    return int(answer["port"])


def sweep_stale(root: Path) -> list[str]:
    """Remove the files of networks whose switch is gone (killed with SIGKILL: a clean
    switch removes its own); the names of the networks removed.

    A network counts as gone only while its lock is free (no joiner, no switch on its
    way out) and nothing accepts on its socket; the lock is held while its files go.
    """
    base = Path(root) / ".net"
    try:
        names = sorted(p.name for p in base.iterdir() if p.is_dir())
    except FileNotFoundError:
        return []
    removed = []
    for network in names:
        path = base / f"{network}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a joiner or the switch itself: in use
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.settimeout(2.0)
                probe.connect(str(base / network / SOCKET_NAME))
                continue  # a live switch
            except (FileNotFoundError, ConnectionRefusedError):
                pass
            except OSError:
                continue  # anything else: leave it, never remove what may be in use
            finally:
                probe.close()
            shutil.rmtree(base / network, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # joiners re-check the inode (see _lock)
            removed.append(network)
        finally:
            os.close(fd)
    with contextlib.suppress(OSError):
        base.rmdir()  # only if empty
    return removed


def members(root: Path, network: str, timeout: float = 10.0) -> dict[str, int]:
    """Who is on ``network`` now: member name -> index ({} if no switch runs).

    Raises :class:`WaitTimeout` or :class:`StateError` if the switch does not answer.
    """
    check_network_name(network)
    deadline = time.monotonic() + timeout
    path = network_dir(root, network) / SOCKET_NAME
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            _connect(sock, path, deadline)
            sock.settimeout(_left(deadline))
            sock.sendall(b'{"op": "members"}\n')
            answer = json.loads(_recv_line(sock, deadline))
        except (FileNotFoundError, ConnectionRefusedError):
            return {}
        except TimeoutError as exc:
            raise WaitTimeout(f"network {network!r}'s switch ({path}) to list its members",
                              timeout) from exc
        except (OSError, ValueError) as exc:
            raise StateError(f"network {network!r}: listing its members failed: {exc}") from exc
    if not isinstance(answer, dict) or not isinstance(answer.get("members"), dict):
        raise StateError(f"network {network!r}: its switch answered {answer!r} for its members")
    return {str(k): int(v) for k, v in answer["members"].items()}


# -- the switch ---------------------------------------------------------------------------------


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """Whether the peer of this connection runs as the switch's own user (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    _pid, uid, _gid = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return bool(uid == os.geteuid())


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


class _Port:
    def __init__(self, name: str, mac: bytes, index: int, writer: asyncio.StreamWriter,
                 macs: frozenset[bytes] = frozenset()) -> None:
        self.name, self.mac, self.index, self.writer = name, mac, index, writer
        #: The source MACs this port may send from (a VM: its own; the gateway: its two).
        self.macs = macs or frozenset({mac})


class Switch:
    """The daemon's state: its ports by MAC, and the exit once the last one has gone."""

    def __init__(self, directory: Path, lock_path: Path, network: str) -> None:
        self.directory, self.lock_path, self.network = directory, lock_path, network
        self.ports: dict[bytes, _Port] = {}
        #: The host's gateway, once asked for (not a member: it does not keep the network up).
        self.gateway: Gateway | None = None
        self.gateway_port: _Port | None = None
        self._gateway_lock = asyncio.Lock()
        self._gateway_task: asyncio.Future[None] | None = None
        self.started = time.monotonic()
        self.had_members = False
        self.done = asyncio.Event()
        #: Set once this switch's files are gone (they may then be another switch's).
        self.removed = False

    def _welcome(self, hello: Mapping[str, object]) -> dict[str, object] | tuple[str, bytes]:
        name, mac = hello.get("name"), hello.get("mac")
        if not isinstance(name, str) or not isinstance(mac, str) or not re.fullmatch(
                r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac) or not MEMBER_NAME_RE.fullmatch(name):
            return {"error": "bad introduction"}
        raw = _mac_bytes(mac)
        if raw[0] & 1:
            return {"error": f"MAC {mac} is a multicast address"}
        if any(p.name == name for p in self.ports.values()):
            return {"error": f"a VM named {name!r} is already on network {self.network!r}"}
        if raw in self.ports:
            return {"error": f"MAC {mac} is already on network {self.network!r}"}
        used = {p.index for p in self.ports.values()}
        free = [i for i in range(1, MAX_MEMBERS + 1) if i not in used]
        if not free:
            return {"error": f"network {self.network!r} is full ({MAX_MEMBERS} VMs)"}
        return name, raw

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = None
        try:
            if not _same_user(writer):
                return  # the directory's mode keeps others out; this holds if it is loosened
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), JOIN_TIMEOUT)
                hello = json.loads(line)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ValueError):
                return
            if not isinstance(hello, dict):
                return
            if hello.get("op") in ("forward", "members"):
                answer = (await self._forward_request(hello) if hello["op"] == "forward" else
                          {"members": {p.name: p.index for p in self.ports.values()}})
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
                return
            verdict = self._welcome(hello)
            if isinstance(verdict, dict):
                writer.write(json.dumps(verdict).encode() + b"\n")
                await writer.drain()
                return
            name, mac = verdict
            used = {p.index for p in self.ports.values()}
            index = min(i for i in range(1, MAX_MEMBERS + 1) if i not in used)
            port = self.ports[mac] = _Port(name, mac, index, writer)
            self.had_members = True
            members = {p.name: p.index for p in self.ports.values()}
            writer.write(json.dumps({"index": index, "members": members}).encode() + b"\n")
            await self._forward(port, reader)
        except (ConnectionError, OSError):
            pass
        finally:
            if port is not None and self.ports.get(port.mac) is port:
                del self.ports[port.mac]
            writer.close()

    async def _forward_request(self, hello: Mapping[str, object]) -> dict[str, object]:
        """A host port into a member's TCP port, through the gateway (started if none runs)."""
        member, port = hello.get("vm"), hello.get("port")
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            return {"error": f"bad port {port!r}"}
        target = next((p for p in self.ports.values() if p.name == member), None)
        if target is None:
            names = ", ".join(sorted(p.name for p in self.ports.values())) or "none"
            return {"error": f"no VM named {member!r} is on network {self.network!r} "
                             f"(its VMs: {names})"}
        try:
            async with self._gateway_lock:
                if self.gateway is None or not self.gateway.alive():
                    await self._start_gateway(check_qemu_path(hello.get("qemu")))
                assert self.gateway is not None
            host_port = await self.gateway.forward(network_address(self.network, target.index),
                                                   port)
        except (GatewayError, OSError, TimeoutError, ValueError) as exc:
            return {"error": f"{exc or type(exc).__name__}; see {self.directory / LOG_NAME}"}
        return {"port": host_port}

    async def _start_gateway(self, qemu: str) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        gateway = Gateway(self.network, self.directory, qemu)
        reader, writer = await gateway.start()
        self.gateway = gateway
        port = self.gateway_port = _Port("(host)", min(gateway.macs), GATEWAY_INDEX, writer,
                                         gateway.macs)

        async def carry() -> None:
            try:
                await self._forward(port, reader)
            except (ConnectionError, OSError):
                pass
            finally:
                if self.gateway_port is port:
                    self.gateway_port = None
                writer.close()

        self._gateway_task = asyncio.ensure_future(carry())

    async def stop_gateway(self) -> None:
        """Stop the host's gateway, if one runs (the network is going)."""
        gateway, self.gateway = self.gateway, None
        if self.gateway_port is not None:
            self.gateway_port.writer.close()
            self.gateway_port = None
        if gateway is not None:
            await gateway.stop()

    async def _forward(self, port: _Port, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                header = await reader.readexactly(4)
                (size,) = struct.unpack(">I", header)
                if size > MAX_FRAME:
                    return  # not QEMU's framing, or a hostile sender: end this VM's link
                frame = await reader.readexactly(size)
            except asyncio.IncompleteReadError:
                return
            if size < 14 or frame[6:12] not in port.macs:
                continue  # too short for Ethernet, or posing as another VM
            dest = frame[0:6]
            packet = header + frame
            gateway = self.gateway_port
            target = self.ports.get(dest)
            if target is None and gateway is not None and dest in gateway.macs:
                target = gateway
            # A known MAC gets the frame alone; broadcast, multicast and unknown go to all.
            targets = [target] if target is not None else [
                *self.ports.values(), *([gateway] if gateway is not None else [])]
            for other in targets:
                if other is port or other.writer.is_closing():
                    continue
                if other.writer.transport.get_write_buffer_size() > MAX_BACKLOG:
                    continue
                other.writer.write(packet)

    def _try_lock(self) -> int | None:
        """The network's lock if free (an fd), None if its file is gone, :data:`_HELD` if held."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _HELD
        return fd

    async def watch_idle(self) -> None:
        """Exit (under the lock) once every VM has gone, or nobody came."""
        while True:
            await asyncio.sleep(0.2)
            if self.ports or (not self.had_members and time.monotonic() - self.started < IDLE_START):
                continue
            fd = self._try_lock()
            if fd == _HELD:
                continue  # someone is joining: look again
            try:
                if self.ports:  # joined while we took the lock
                    continue
                await self.stop_gateway()
                self._remove_files()
                self.done.set()
                return
            finally:
                if fd is not None:
                    os.close(fd)

    async def close_down(self, server: asyncio.AbstractServer) -> None:
        """Stop serving and remove the files, under the lock (a stop by a signal).

        Waits (at most :data:`JOIN_TIMEOUT`) for a joiner holding the lock; it is
        welcomed, then disconnected. Without the lock the files stay: once this
        switch stops listening, a joiner may start another one in their place.
        """
        deadline = time.monotonic() + JOIN_TIMEOUT
        fd = self._try_lock()
        while fd == _HELD and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            fd = self._try_lock()
        try:
            server.close()
            for port in list(self.ports.values()):
                port.writer.close()
            await self.stop_gateway()
            if fd != _HELD:
                self._remove_files()
        finally:
            if fd is not None and fd != _HELD:
                os.close(fd)

    def _remove_files(self) -> None:
        self.removed = True
        for leftover in (self.directory / SOCKET_NAME, self.directory / LOG_NAME,
                         self.directory / PID_NAME, self.lock_path):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        for directory in (self.directory, self.directory.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()


async def _run(listen_fd: int, switch: Switch) -> None:
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    server = await asyncio.start_unix_server(switch.serve, sock=listener, limit=_HELLO_MAX)
    idle = asyncio.ensure_future(switch.watch_idle())
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, switch.done.set)
    await switch.done.wait()
    idle.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await idle
    if switch.removed:  # the last VM went: the files went with it, under the lock
        server.close()
        await switch.stop_gateway()
        for port in list(switch.ports.values()):
            port.writer.close()
    else:  # stopped by a signal: the files go now, under the lock
        await switch.close_down(server)


def main(argv: list[str] | None = None) -> int:
    """The daemon: ``--fd N --dir DIR --lock FILE --network NAME``; forks into the background."""
    import argparse

    parser = argparse.ArgumentParser(prog="qemukit-netswitch")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--lock", type=Path, required=True)
    parser.add_argument("--network", required=True)
    args = parser.parse_args(argv)
    if os.fork() != 0:
        return 0  # the starter returns; the switch lives on, a child of init
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    switch = Switch(args.dir, args.lock, args.network)
    try:
        asyncio.run(_run(args.fd, switch))
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
