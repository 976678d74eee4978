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
for it. The host has no interface on the network.

The switch exits, removing its directory, when its last VM has gone: it takes
the network's lock before it decides, and joiners hold that lock from connect
to welcome, so a VM never joins a switch on its way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from ..errors import LaunchError, SpecError
from .netaddr import (
    NetworkMember,
    check_network_name,
    network_address,
    network_dir,
    network_mac,
    network_nic_id,
    network_subnet,
)

__all__ = [
    "MAX_FRAME", "NetworkMember", "check_network_name", "join", "network_address", "network_dir",
    "network_mac", "network_nic_id", "network_subnet",
]

#: The longest frame a VM may send: QEMU's stream backends carry at most 68 KiB.
MAX_FRAME = 69632
#: Bytes waiting for one VM beyond which frames to it are dropped (a VM that stopped reading).
MAX_BACKLOG = 4 * 1024 * 1024
#: The highest index on a network (addresses .1 to .254 of its /24).
MAX_MEMBERS = 254
#: How long a joiner waits for the network's lock and the switch's welcome.
JOIN_TIMEOUT = 30.0
#: A switch nobody joins within this time (its starter died) exits.
IDLE_START = 60.0
SOCKET_NAME = "switch.sock"
LOG_NAME = "switch.log"
_HELLO_MAX = 4096


# -- joining ------------------------------------------------------------------------------------


def _lock(root: Path, network: str, deadline: float) -> int:
    """The network's lock, held (an fd); the lock file is re-checked against removal."""
    base = Path(root) / ".net"
    path = base / f"{network}.lock"
    while True:
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # the directory went with the last switch: again
            continue
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LaunchError(f"network {network!r}: its lock {path} stayed held for "
                                      f"{JOIN_TIMEOUT:.0f} s") from None
                time.sleep(0.05)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # a switch removed that file on its way out: lock the new one


def _start_switch(directory: Path, lock_path: Path, network: str) -> None:
    """Bind the switch's socket and start the daemon on it (the caller holds the lock)."""
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
                umask=0o077, timeout=JOIN_TIMEOUT, check=False, env=_daemon_env(),
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


def join(root: Path, network: str, name: str, mac: str | None = None,
         timeout: float = JOIN_TIMEOUT) -> tuple[socket.socket, NetworkMember]:
    """Join VM ``name`` to ``network`` (started if none runs); QEMU's socket and the place.

    The socket is blocking and not inheritable; hand its fd to QEMU and close it.
    Raises :class:`SpecError` for a bad name, a VM of that name already on the
    network or a full network, :class:`LaunchError` if the switch cannot start.
    """
    check_network_name(network)
    mac = mac or network_mac(network, name)
    deadline = time.monotonic() + timeout
    directory = network_dir(root, network)
    lock = _lock(root, network, deadline)
    try:
        path = directory / SOCKET_NAME
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                _start_switch(directory, Path(root) / ".net" / f"{network}.lock", network)
                sock.connect(str(path))
            sock.sendall(json.dumps({"name": name, "mac": mac}).encode() + b"\n")
            answer = json.loads(_recv_line(sock, deadline))
        except BaseException as exc:
            sock.close()
            if isinstance(exc, (OSError, ValueError)):
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


# -- the switch ---------------------------------------------------------------------------------


def _mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


class _Port:
    def __init__(self, name: str, mac: bytes, index: int, writer: asyncio.StreamWriter) -> None:
        self.name, self.mac, self.index, self.writer = name, mac, index, writer


class Switch:
    """The daemon's state: its ports by MAC, and the exit once the last one has gone."""

    def __init__(self, directory: Path, lock_path: Path, network: str) -> None:
        self.directory, self.lock_path, self.network = directory, lock_path, network
        self.ports: dict[bytes, _Port] = {}
        self.started = time.monotonic()
        self.had_members = False
        self.done = asyncio.Event()

    def _welcome(self, hello: Mapping[str, object]) -> dict[str, object] | tuple[str, bytes]:
        name, mac = hello.get("name"), hello.get("mac")
        if not isinstance(name, str) or not isinstance(mac, str) or not re.fullmatch(
                r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac):
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
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), JOIN_TIMEOUT)
                hello = json.loads(line)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    ValueError):
                return
            if not isinstance(hello, dict):
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
            if size < 14 or frame[6:12] != port.mac:
                continue  # too short for Ethernet, or posing as another VM
            dest = frame[0:6]
            packet = header + frame
            target = self.ports.get(dest)
            # A known MAC gets the frame alone; broadcast, multicast and unknown go to all.
            targets = [target] if target is not None else list(self.ports.values())
            for other in targets:
                if other is port or other.writer.is_closing():
                    continue
                if other.writer.transport.get_write_buffer_size() > MAX_BACKLOG:
                    continue
                other.writer.write(packet)

    async def watch_idle(self) -> None:
        """Exit (under the lock) once every VM has gone, or nobody came."""
        while True:
            await asyncio.sleep(0.2)
            if self.ports or (not self.had_members and time.monotonic() - self.started < IDLE_START):
                continue
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = None
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue  # someone is joining: look again
            try:
                if self.ports:  # joined while we took the lock
                    continue
                self._remove_files()
                self.done.set()
                return
            finally:
                if fd is not None:
                    os.close(fd)

    def _remove_files(self) -> None:
        for leftover in (self.directory / SOCKET_NAME, self.directory / LOG_NAME, self.lock_path):
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
    server.close()
    for port in list(switch.ports.values()):
        port.writer.close()
    if not idle.done() or idle.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await idle


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
