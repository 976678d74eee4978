"""The console log written by the watcher from the stream it reads (not QEMU's ``logfile=``).

QEMU 7.2 logs a byte twice when its socket write fails with EAGAIN (a slow reader) and the
UART retries it; the log the watcher writes is the stream byte for byte. The real guest:
tests/integration/test_console_log.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

from qemukit._launch.argv import Plumbing, build_argv
from qemukit._launch.plan import HostFacts, plan_launch
from qemukit._launch.runtime import RuntimeDir
from qemukit._launch.start import _console_connection
from qemukit._wire.console import ConsoleWatcher, log_tail
from qemukit.spec import VMSpec


def _stream(total: int) -> bytes:
    """Known text, each line numbered, about ``total`` bytes (what a guest would print)."""
    lines, size, i = [], 0, 0
    while size < total:
        line = f"{i:07d} the quick brown fox jumps over the lazy dog; skipped list-kunit-test\r\n"
        lines.append(line)
        size += len(line)
        i += 1
    return "".join(lines).encode()


def _send_slowly(sock: socket.socket, data: bytes) -> None:
    """Write ``data`` in odd-sized pieces (QEMU writes the UART's bytes one at a time)."""
    sock.setblocking(True)
    for start in range(0, len(data), 977):
        sock.sendall(data[start:start + 977])
    sock.close()


def _read_through(log: Path, data: bytes, **kw: object) -> ConsoleWatcher:
    async def main() -> ConsoleWatcher:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        watcher = ConsoleWatcher(log, **kw)  # type: ignore[arg-type]
        await watcher.start(log.with_name("console.sock"), sock=ours)
        assert watcher.writes_log
        seen: list[bytes] = []
        watcher.sink = seen.append
        writer = threading.Thread(target=_send_slowly, args=(theirs, data))
        writer.start()
        await watcher.drain(60)
        writer.join(60)
        await watcher.close()
        assert b"".join(seen) == data  # the watcher's stream itself is whole
        return watcher

    return asyncio.run(main())


def test_the_log_is_the_stream_the_watcher_read_byte_for_byte(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    data = _stream(2 << 20)
    _read_through(log, data, max_log_bytes=0)
    assert log.read_bytes() == data


def test_the_log_keeps_output_already_there_and_appends(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"before\n")
    data = _stream(10_000)
    _read_through(log, data)
    assert log.read_bytes() == b"before\n" + data


def test_a_capped_log_is_renamed_whole_and_loses_nothing_of_the_latest_output(
        tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    data = _stream(1 << 20)
    _read_through(log, data, max_log_bytes=256 << 10)
    older, newer = Path(f"{log}.1").read_bytes(), log.read_bytes()
    assert older and newer
    assert data.endswith(older + newer)  # one contiguous tail of the stream: no gap, no double
    assert len(newer) <= (256 << 10) + (64 << 10)
    assert "the lazy dog" in log_tail(log, 1)


def test_a_log_that_cannot_be_written_does_not_stop_the_reading(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    data = b"Kernel panic - not syncing: test\n" + _stream(100_000)

    async def main() -> ConsoleWatcher:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        watcher = ConsoleWatcher(log)
        await watcher.start(log.with_name("console.sock"), sock=ours)
        assert watcher._log_fd is not None
        os.close(watcher._log_fd)
        watcher._log_fd = os.open(os.devnull, os.O_RDONLY)  # every write fails (EBADF)
        writer = threading.Thread(target=_send_slowly, args=(theirs, data))
        writer.start()
        await watcher.drain(60)
        writer.join(60)
        await watcher.close()
        return watcher

    watcher = asyncio.run(main())
    assert watcher.fatal.done() and watcher.fatal.result().kind == "panic"
    assert watcher._received == len(data)


def test_the_console_connection_is_loopback_tcp_between_qemu_and_us() -> None:
    qemu, ours = _console_connection()
    try:
        assert qemu.family == socket.AF_INET and qemu.getsockname()[0] == "127.0.0.1"
        assert qemu.getpeername() == ours.getsockname()
        assert qemu.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        qemu.sendall(b"hello\n")
        assert ours.recv(16) == b"hello\n"
    finally:
        qemu.close()
        ours.close()


def test_the_console_connection_holds_far_more_than_a_unix_socket_of_one_byte_writes() -> None:
    # The UART writes one byte at a time. A Unix stream socket is full after a few
    # hundred of them (each costs a whole buffer), and a reader that misses a few
    # milliseconds then makes QEMU drop console bytes; TCP appends them to its queue.
    def one_byte_sends(sock: socket.socket, limit: int) -> int:
        sock.setblocking(False)
        sent = 0
        try:
            while sent < limit:
                sock.send(b"x")
                sent += 1
        except BlockingIOError:
            pass
        return sent

    unix_a, unix_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu, ours = _console_connection()
    try:
        assert one_byte_sends(unix_a, 100_000) < 10_000
        assert one_byte_sends(qemu, 100_000) == 100_000
    finally:
        for sock in (unix_a, unix_b, qemu, ours):
            sock.close()


def test_a_launcher_that_reads_the_console_gives_qemu_the_listener_and_no_logfile(
        tmp_path: Path) -> None:
    rd = RuntimeDir(tmp_path / "vm")
    facts = HostFacts(qemu="qemu-system-x86_64", accel="tcg")
    owned = plan_launch(VMSpec(), facts, rd, ()).argv(qmp_fd=3, network_fds=(), console_fd=9)
    assert "socket,id=console0,fd=9" in owned
    assert not any("logfile=" in arg for arg in owned)
    detached = plan_launch(VMSpec(), facts, rd, (), console_reader=False).argv()
    console = next(arg for arg in detached if arg.startswith("socket,id=console0"))
    assert f"path={rd.console_socket}" in console
    assert f"logfile={rd.console_log},logappend=on" in console
    # A preview numbers the listener after the monitor's and the networks' descriptors.
    preview = plan_launch(VMSpec(), facts, rd, ()).argv()
    assert "socket,id=console0,fd=4" in preview


def test_no_serial_means_no_console_chardev_either_way(tmp_path: Path) -> None:
    rd = RuntimeDir(tmp_path / "vm")
    facts = HostFacts(qemu="qemu-system-x86_64", accel="tcg")
    argv = plan_launch(VMSpec(serial=False), facts, rd, ()).argv()
    assert not any("console0" in arg for arg in argv)
    argv = build_argv(VMSpec(serial=False), qemu="qemu-system-x86_64", accel="tcg",
                      plumbing=Plumbing(console_fd=7))
    assert not any("console0" in arg for arg in argv)
