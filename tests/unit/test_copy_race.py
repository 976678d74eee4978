"""The agent copy's race between the guest command and the host side of the transfer port.

The guest's writes to a virtio-serial port return once queued in the port's
virtqueue, so the command that wrote (``head ... > $dev``) can exit 0, and the
agent's reply can reach the host, before the host has read the last bytes. Here
a fake VM serves the hot-plugged port's socket (as QEMU does) and a fake agent
plays the guest: it answers "exit 0" first and sends the rest of the bytes only
afterwards, so that ordering happens every time. The real guest is in
tests/integration/test_devtools.py and test_hostile_copy.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qemukit import guest as guest_module
from qemukit._launch.runtime import RuntimeDir
from qemukit.errors import AgentError, GuestError, WaitTimeout
from qemukit.guest import AsyncGuest, ExecResult, _race, _send_out_script, _Tally

#: What the fake guest does on the transfer port once it runs the transfer command:
#: given the port's two ends and the command's script, it returns the command's result.
GuestPlay = Callable[[asyncio.StreamReader, asyncio.StreamWriter, str], Awaitable[ExecResult]]


def result(exit_status: int = 0, stdout: bytes = b"", stderr: bytes = b"") -> ExecResult:
    return ExecResult(("sh", "-c", "..."), exit_status, stdout, stderr, 0.01)


class FakeListener:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def get(self) -> dict[str, Any]:
        return await self.queue.get()


class FakeMonitor:
    """The QMP connection's event side: listen() and wait_event()."""

    def __init__(self) -> None:
        self.listeners: list[FakeListener] = []

    @contextlib.contextmanager
    def listen(self, *names: str, match: Any = None) -> Iterator[FakeListener]:
        listener = FakeListener()
        self.listeners.append(listener)
        try:
            yield listener
        finally:
            self.listeners.remove(listener)

    async def wait_event(self, listener: FakeListener, timeout: float | None,
                         what: str) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(listener.get(), timeout)
        except TimeoutError:
            raise WaitTimeout(what, timeout or 0.0) from None


class FakeVM:
    """The parts of a VMTarget a copy uses; the transfer port's socket is served as QEMU does."""

    def __init__(self, root: Path) -> None:
        self.name = "fake"
        self.runtime = RuntimeDir(root)
        self.monitor = FakeMonitor()
        self.qmp_log: list[str] = []
        self.port: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] | None = None
        self._servers: dict[str, asyncio.AbstractServer] = {}
        self._guest_ends: list[asyncio.StreamWriter] = []

    async def qmp(self, command: str, arguments: dict[str, Any] | None = None, *,
                  timeout: float = 30.0, **kwargs: Any) -> Any:
        args = {**(arguments or {}), **kwargs}
        self.qmp_log.append(command)
        if command == "chardev-add":
            path = args["backend"]["data"]["addr"]["data"]["path"]
            port: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
                asyncio.get_running_loop().create_future())

            def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                self._guest_ends.append(writer)
                port.set_result((reader, writer))

            self.port = port
            self._servers[args["id"]] = await asyncio.start_unix_server(connected, path=path)
        elif command == "device_del":
            for listener in list(self.monitor.listeners):
                listener.queue.put_nowait({"event": "DEVICE_DELETED",
                                           "data": {"device": args["id"]}})
        elif command == "chardev-remove":
            server = self._servers.pop(args["id"])
            server.close()
            for writer in self._guest_ends:
                writer.close()
        return {}

    def qemu_alive(self) -> bool:
        return True

    async def guarded(self, aw: Awaitable[Any], timeout: float | None, what: str,
                      **kwargs: Any) -> Any:
        return await asyncio.wait_for(aw, timeout)


class FakeAgent:
    """The guest: answers the stat and path scripts, plays ``play`` for the transfer command."""

    def __init__(self, vm: FakeVM, play: GuestPlay, *, stat_answer: str = "",
                 dest: str = "") -> None:
        self.vm = vm
        self.play = play
        self.stat_answer = stat_answer
        self.dest = dest
        self.scripts: list[str] = []

    async def exec(self, command: str, timeout: float | None = 60.0) -> ExecResult:
        self.scripts.append(command)
        if "virtio-ports" in command:  # the transfer command: find the port, then move bytes
            assert self.vm.port is not None
            reader, writer = await self.vm.port
            return await self.play(reader, writer, command)
        if "echo missing" in command:  # the stat of the guest path
            return result(stdout=self.stat_answer.encode())
        if "printf '%s'" in command:  # copy_in's guest destination
            return result(stdout=self.dest.encode())
        return result()  # cleanup (rm -f of a packed tar)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket's path has at most 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="qk-race-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_guest(root: Path, play: GuestPlay, **kwargs: Any) -> tuple[AsyncGuest, FakeVM]:
    vm = FakeVM(root)
    return AsyncGuest(vm, FakeAgent(vm, play, **kwargs)), vm  # type: ignore[arg-type]


# -- copy out: the guest writes, the host reads ----------------------------------------------


def test_copy_out_finishes_when_exit_0_arrives_before_the_last_bytes(short_dir: Path,
                                                                      tmp_path: Path) -> None:
    """The flaky failure, made certain: the reply (exit 0) comes while data is still queued.

    Before the fix this raised "copying ... out failed in the guest (exit 0): no output".
    """
    data = os.urandom(3 * 1024 * 1024 + 5)
    later: list[asyncio.Task[None]] = []

    async def play(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   script: str) -> ExecResult:
        writer.write(data[:1000])
        await writer.drain()

        async def rest_still_in_the_virtqueue() -> None:
            await asyncio.sleep(0.3)  # only after the host has the command's result
            writer.write(data[1000:])
            await writer.drain()

        later.append(asyncio.ensure_future(rest_still_in_the_virtqueue()))
        return result(0)

    async def main() -> Path:
        guest, vm = make_guest(short_dir, play, stat_answer=f"f 640 {len(data)}\n")
        seen: list[tuple[int, int]] = []
        back = await guest.copy_out("/data.bin", tmp_path / "back.bin",
                                    progress=lambda done, total: seen.append((done, total)))
        assert seen[-1] == (len(data), len(data))
        assert vm.qmp_log == ["chardev-add", "device_add", "device_del", "chardev-remove"]
        await asyncio.gather(*later)
        return back

    back = asyncio.run(main())
    assert back.read_bytes() == data
    assert back.stat().st_mode & 0o777 == 0o640 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.bin"]  # no temporary left


def test_copy_out_that_exits_0_but_never_sends_the_rest_times_out_naming_the_bytes(
        short_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_module, "_DRAIN_TIMEOUT", 0.5)

    async def play(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   script: str) -> ExecResult:
        writer.write(b"x" * 1000)
        await writer.drain()
        return result(0)

    async def main() -> None:
        guest, vm = make_guest(short_dir, play, stat_answer="f 644 4096\n")
        with pytest.raises(WaitTimeout) as err:
            await guest.copy_out("/data.bin", tmp_path / "back.bin")
        assert "1000 of 4096 bytes received" in str(err.value)
        assert "exited 0" in str(err.value) and "copying /data.bin out" in str(err.value)
        assert err.value.timeout == 0.5
        assert vm.qmp_log[-2:] == ["device_del", "chardev-remove"]  # the port is unplugged

    asyncio.run(main())
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_copy_out_whose_guest_command_fails_ends_at_once_with_the_guests_error(
        short_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_module, "_DRAIN_TIMEOUT", 3600.0)  # not waited for

    async def play(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   script: str) -> ExecResult:
        writer.write(b"x" * 100)
        await writer.drain()
        return result(94, stderr=b"qemukit: the file is 100 bytes now, fewer than the 4096 to "
                      b"send (it shrank while it was copied)\n")

    async def main() -> None:
        guest, _ = make_guest(short_dir, play, stat_answer="f 644 4096\n")
        with pytest.raises(GuestError) as err:
            await asyncio.wait_for(guest.copy_out("/data.bin", tmp_path / "back.bin"), 60.0)
        message = str(err.value)
        assert re.search(r"failed in the guest \(exit 94, \d+ of 4096 bytes received\)", message)
        assert "is 100 bytes now, fewer than the 4096 to send" in message

    asyncio.run(main())
    assert list(tmp_path.iterdir()) == []


def test_copy_out_asks_the_guest_to_check_it_sent_every_byte(short_dir: Path,
                                                            tmp_path: Path) -> None:
    async def play(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   script: str) -> ExecResult:
        writer.write(b"abc")
        await writer.drain()
        return result(0)

    async def main() -> list[str]:
        guest, _ = make_guest(short_dir, play, stat_answer="f 644 3\n")
        await guest.copy_out("/a file", tmp_path)
        return guest.agent.scripts  # type: ignore[attr-defined,no-any-return]

    scripts = asyncio.run(main())
    assert scripts[-1].endswith(_send_out_script("/a file", 3))
    assert (tmp_path / "a file").read_bytes() == b"abc"


# -- copy in: the host writes, the guest reads ----------------------------------------------


def test_copy_in_finishes_when_exit_0_arrives_before_the_host_wrote_everything(
        short_dir: Path, tmp_path: Path) -> None:
    """The symmetric order: the reply comes while the host's writes still wait for room.

    A real guest's ``head -c N $dev`` exits only after reading N bytes, so there
    this is at most a matter of which wake-up the event loop runs first; it must
    not fail either way.
    """
    data = os.urandom(4 * 1024 * 1024 + 3)  # more than the socket buffers hold
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    got: list[bytes] = []
    later: list[asyncio.Task[None]] = []

    async def play(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   script: str) -> ExecResult:
        async def read_after_the_reply() -> None:
            await asyncio.sleep(0.3)
            got.append(await reader.readexactly(len(data)))

        later.append(asyncio.ensure_future(read_after_the_reply()))
        return result(0)

    async def main() -> str:
        guest, _ = make_guest(short_dir, play, dest="/root/blob.bin")
        dest = await guest.copy_in(src, "/root/")
        await asyncio.gather(*later)
        return dest

    assert asyncio.run(main()) == "/root/blob.bin"
    assert got == [data]


def test_copy_in_whose_guest_command_fails_ends_at_once_with_the_guests_error(
        short_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guest_module, "_DRAIN_TIMEOUT", 3600.0)  # not waited for
    src = tmp_path / "blob.bin"
    src.write_bytes(os.urandom(4 * 1024 * 1024))  # the host blocks on a full socket

    async def play(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   script: str) -> ExecResult:
        return result(92, stderr=b"head: write error: No space left on device\n")

    async def main() -> None:
        guest, _ = make_guest(short_dir, play, dest="/root/blob.bin")
        with pytest.raises(GuestError) as err:
            await asyncio.wait_for(guest.copy_in(src, "/root/"), 60.0)
        assert "failed in the guest (exit 92" in str(err.value)
        assert "No space left on device" in str(err.value)

    asyncio.run(main())


# -- _race itself ---------------------------------------------------------------------------


def test_race_lets_the_host_side_finish_after_exit_0() -> None:
    async def main() -> ExecResult:
        tally = _Tally(10)
        release = asyncio.Event()

        async def host_side() -> None:
            tally.done = 4
            await release.wait()
            tally.done = 10

        async def command() -> ExecResult:
            return result(0, stdout=b"ok")

        task = asyncio.ensure_future(command())
        asyncio.get_running_loop().call_later(0.2, release.set)
        out = await _race(host_side(), task, "copying x", tally, "received", drain_timeout=30.0)
        assert tally.done == 10
        return out

    assert asyncio.run(main()).stdout == b"ok"


def test_race_after_exit_0_reports_the_host_sides_own_error() -> None:
    async def main() -> None:
        tally = _Tally(10)

        async def host_side() -> None:
            await asyncio.sleep(0.2)
            raise AgentError("the transfer port closed after 4 of 10 bytes were received")

        async def command() -> ExecResult:
            return result(0)

        with pytest.raises(AgentError, match="4 of 10 bytes"):
            await _race(host_side(), asyncio.ensure_future(command()), "copying x", tally,
                        "received", drain_timeout=30.0)

    asyncio.run(main())


def test_race_cancels_the_host_side_when_the_command_fails() -> None:
    async def main() -> None:
        tally = _Tally(10)
        cancelled = asyncio.Event()

        async def host_side() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        async def command() -> ExecResult:
            await asyncio.sleep(0.05)
            return result(2, stderr=b"no such port\n")

        with pytest.raises(GuestError, match=r"exit 2, 0 of 10 bytes sent\): no such port"):
            await _race(host_side(), asyncio.ensure_future(command()), "copying x", tally,
                        "sent", drain_timeout=3600.0)
        assert cancelled.is_set()

    asyncio.run(main())


def test_race_passes_the_guards_error_through_and_cancels_the_host_side() -> None:
    async def main() -> None:
        host = asyncio.Event()

        async def host_side() -> None:
            await host.wait()

        async def command() -> ExecResult:
            raise WaitTimeout("the guest command", 1.0)

        with pytest.raises(WaitTimeout, match="the guest command"):
            await _race(host_side(), asyncio.ensure_future(command()), "copying x", _Tally(1),
                        "sent", drain_timeout=3600.0)

    asyncio.run(main())


# -- the guest side's script, run by the local shell --------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3 * 1024 * 1024 + 1])
def test_send_out_script_sends_exactly_size_bytes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size + 100)  # longer than size: only size bytes go
    src = tmp_path / "src file"
    src.write_bytes(data)
    port = tmp_path / "port"
    port.touch()
    run = subprocess.run(["sh", "-c", f"dev={port}\n" + _send_out_script(str(src), size)],
                         capture_output=True, timeout=60)
    assert (run.returncode, run.stderr) == (0, b"")
    assert port.read_bytes() == data[:size]


def test_send_out_script_fails_when_the_file_shrank(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x" * 10)
    port = tmp_path / "port"
    port.touch()
    run = subprocess.run(["sh", "-c", f"dev={port}\n" + _send_out_script(str(src), 4096)],
                         capture_output=True, timeout=60)
    assert run.returncode == 94
    assert b"the file is 10 bytes now, fewer than the 4096 to send" in run.stderr
    assert port.read_bytes() == b"x" * 10


def test_send_out_script_passes_heads_error_and_status_on(tmp_path: Path) -> None:
    port = tmp_path / "port"
    port.touch()
    run = subprocess.run(["sh", "-c", f"dev={port}\n" + _send_out_script(str(tmp_path / "nope"), 5)],
                         capture_output=True, timeout=60)
    assert run.returncode == 1 and b"nope" in run.stderr


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
