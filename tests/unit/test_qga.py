"""The qemu-guest-agent client against a fake agent socket: the protocol and its error paths.

The fake speaks QGA's wire format (JSON lines in, JSON lines out, 0xFF
before a ``guest-sync-delimited`` reply) and can be told to misbehave:
leftovers from an earlier client, errors, silence, a closed socket, an
agent that lost the first sync and only answers after its port reopened.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qemukit._wire import qga
from qemukit._wire.agent import Agent
from qemukit.errors import AgentError, StateError, WaitTimeout
from qemukit.qga import AsyncGuest, GuestAgent, SyncGuest, exec_request

Handler = Callable[[str, dict[str, Any]], Any]


class FakeAgent:
    """A QGA endpoint on a Unix socket; ``handlers`` answer commands by name."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.handlers: dict[str, Handler] = {"guest-ping": lambda n, a: {}}
        self.files: dict[str, bytes] = {}
        self.handles: dict[int, tuple[str, bytearray]] = {}
        self.prefix = b""  # written once, before the first reply (an earlier client's leftovers)
        self.drop_syncs = 0  # syncs to swallow, as an agent that died after reading them
        self.close_on: str | None = None
        self.server: asyncio.AbstractServer | None = None
        self._add_file_handlers()

    def _add_file_handlers(self) -> None:
        positions: dict[int, int] = {}

        def open_(name: str, a: dict[str, Any]) -> int:
            handle = len(self.handles) + 100
            data = bytearray() if a["mode"] == "wb" else bytearray(self.files.get(a["path"], b""))
            self.handles[handle] = (a["path"], data)
            positions[handle] = 0
            return handle

        def read(name: str, a: dict[str, Any]) -> dict[str, Any]:
            path, data = self.handles[a["handle"]]
            pos = positions[a["handle"]]
            chunk = bytes(data[pos : pos + a["count"]])
            positions[a["handle"]] = pos + len(chunk)
            return {"count": len(chunk), "buf-b64": base64.b64encode(chunk).decode(),
                    "eof": pos + len(chunk) >= len(data)}

        def write(name: str, a: dict[str, Any]) -> dict[str, Any]:
            path, data = self.handles[a["handle"]]
            chunk = base64.b64decode(a["buf-b64"])
            data.extend(chunk)
            return {"count": len(chunk), "eof": False}

        def close(name: str, a: dict[str, Any]) -> dict[str, Any]:
            path, data = self.handles.pop(a["handle"])
            self.files[path] = bytes(data)
            return {}

        self.handlers.update({"guest-file-open": open_, "guest-file-read": read,
                              "guest-file-write": write, "guest-file-close": close,
                              "guest-file-flush": lambda n, a: {}})

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 1)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                request = json.loads(line.replace(b"\xff", b"") or b"{}")
                name, args = request.get("execute", ""), request.get("arguments", {})
                self.requests.append((name, args))
                if name == self.close_on:
                    writer.close()
                    return
                out = self.prefix
                self.prefix = b""
                if name == "guest-sync-delimited":
                    if self.drop_syncs:
                        self.drop_syncs -= 1
                        continue
                    out += b"\xff" + json.dumps({"return": args["id"]}).encode() + b"\n"
                elif name in self.handlers:
                    result = self.handlers[name](name, args)
                    if result is _SILENT:
                        continue
                    reply = result if isinstance(result, dict) and "error" in result else {
                        "return": result}
                    out += json.dumps(reply).encode() + b"\n"
                else:
                    out += json.dumps({"error": {"class": "CommandNotFound",
                                                 "desc": f"The command {name} has not been found"}
                                       }).encode() + b"\n"
                writer.write(out)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


_SILENT = object()


def names(fake: FakeAgent) -> list[str]:
    return [n for n, _ in fake.requests]


@contextlib.asynccontextmanager
async def agent_and_fake(tmp_path: Path, **kwargs: Any) -> AsyncIterator[tuple[GuestAgent, FakeAgent]]:
    fake = FakeAgent(tmp_path / "qga.sock")
    await fake.start()
    agent = GuestAgent(fake.path, connect_timeout=2, **kwargs)
    try:
        yield agent, fake
    finally:
        await agent.close()
        await fake.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- requests -----------------------------------------------------------------------------


def test_exec_request_argv_string_and_stdin() -> None:
    assert exec_request(["ls", "-l", "/"]) == {"path": "ls", "arg": ["-l", "/"], "capture-output": True}
    assert exec_request("echo $HOME")["arg"] == ["-c", "echo $HOME"]
    assert exec_request("x")["path"] == "/bin/sh"
    assert base64.b64decode(exec_request(["cat"], b"\x00in")["input-data"]) == b"\x00in"
    with pytest.raises(AgentError):
        exec_request([])


def test_guest_agent_is_an_agent() -> None:
    # vm.py holds either client as an Agent; the debian image's client must fit there.
    assert issubclass(GuestAgent, Agent)


# -- sync and ping ----------------------------------------------------------------------------


def test_ping_syncs_then_pings(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            assert not agent.ready
            await agent.ping(5)
            assert agent.ready
            assert names(fake) == ["guest-sync-delimited", "guest-ping"]

    run(main())


def test_leftovers_before_the_sync_reply_are_skipped(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            # An earlier client's half reply, a stale sync reply, then garbage on the same line.
            fake.prefix = (b'{"return": {"pid": 7}}\n{"retu' + b'\xff{"return": 12345}\n'
                           + b"not json\n" + b'{"return": 5}\n')
            await agent.ping(5)
            assert agent.ready

    run(main())


def test_a_late_delimited_reply_is_not_taken_for_a_command_reply(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            fake.handlers["guest-info"] = lambda n, a: {"version": "7.2"}
            await agent.ping(5)
            fake.prefix = b'\xff{"return": 999}\n'  # arrives just before the next sync reply
            assert (await agent.info())["version"] == "7.2"

    run(main())


def test_ping_times_out_when_the_agent_never_answers(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            fake.drop_syncs = 10**6
            start = time.monotonic()
            with pytest.raises(WaitTimeout) as info:
                await agent.ping(0.5)
            assert time.monotonic() - start < 3
            assert "guest agent" in str(info.value)
            assert not agent.ready

    run(main())


def test_without_events_the_sync_is_resent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qga, "_RESYNC_WITHOUT_EVENTS", 0.05)

    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            fake.drop_syncs = 2  # an agent that read two syncs and died
            await agent.ping(5)
            assert names(fake).count("guest-sync-delimited") == 3

    run(main())


class FakeListener:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def get(self) -> dict[str, Any]:
        return await self.queue.get()


class FakeMonitor:
    """Stands in for qemukit._wire.qmp.QMP: only ``connected`` and ``listen``."""

    def __init__(self) -> None:
        self.connected = True
        self.listener = FakeListener()
        self.listened: list[tuple[tuple[str, ...], Any]] = []

    @contextlib.contextmanager
    def listen(self, *names: str, match: Any = None) -> Iterator[FakeListener]:
        self.listened.append((names, match))
        yield self.listener


def test_port_open_event_triggers_a_fresh_sync(tmp_path: Path) -> None:
    async def main() -> None:
        monitor = FakeMonitor()
        async with agent_and_fake(tmp_path, monitor=monitor) as (agent, fake):
            fake.drop_syncs = 1  # the first sync is lost with an agent that restarts
            task = asyncio.ensure_future(agent.ping(30))
            await asyncio.sleep(0.3)
            assert not task.done()  # with events there is no blind resend
            assert names(fake) == ["guest-sync-delimited"]
            await monitor.listener.queue.put({"event": "VSERPORT_CHANGE",
                                              "data": {"id": "agent0-port", "open": False}})
            await asyncio.sleep(0.05)
            assert names(fake) == ["guest-sync-delimited"]  # a close sends nothing
            await monitor.listener.queue.put({"event": "VSERPORT_CHANGE",
                                              "data": {"id": "agent0-port", "open": True}})
            await asyncio.wait_for(task, 5)
            assert names(fake) == ["guest-sync-delimited"] * 2 + ["guest-ping"]
            (event_names, match), *_ = monitor.listened
            assert event_names == ("VSERPORT_CHANGE",)
            assert match({"data": {"id": "agent0-port"}}) and not match({"data": {"id": "other"}})

    run(main())


# -- commands and errors ----------------------------------------------------------------------------


def test_error_reply_raises_agent_error_with_class_and_desc(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            with pytest.raises(AgentError, match="CommandNotFound: The command guest-nope"):
                await agent.call("guest-nope")
            fake.handlers["guest-exec"] = lambda n, a: {
                "error": {"class": "GenericError", "desc": "Guest agent command failed"}}
            with pytest.raises(AgentError, match="refused guest-exec: GenericError"):
                await agent.exec(["/nonexistent"])

    run(main())


def test_socket_closed_mid_call(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            fake.close_on = "guest-info"
            with pytest.raises(AgentError, match="closed"):
                await agent.info()
            assert not agent.ready
            fake.close_on = None
            await agent.ping(5)  # reconnects and syncs afresh

    run(main())


def test_silence_after_a_request_times_out_and_drops_the_connection(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            fake.handlers["guest-info"] = lambda n, a: _SILENT
            with pytest.raises(WaitTimeout):
                await agent.call("guest-info", timeout=0.3)
            fake.handlers["guest-info"] = lambda n, a: {"version": "x"}
            assert await agent.call("guest-info") == {"version": "x"}

    run(main())


def test_exec_polls_status_until_exited(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            polls = iter([{"exited": False}, {"exited": False}, {
                "exited": True, "exitcode": 3, "out-data": base64.b64encode(b"out\n").decode(),
                "err-data": base64.b64encode(b"err\n").decode()}])
            fake.handlers["guest-exec"] = lambda n, a: {"pid": 42}
            fake.handlers["guest-exec-status"] = lambda n, a: next(polls)
            result = await agent.exec(["sh", "-c", "exit 3"], timeout=10)
            assert (result.exit_status, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
            assert result.argv == ("sh", "-c", "exit 3")
            # one sync for the whole operation, not one per poll
            assert names(fake) == ["guest-sync-delimited", "guest-exec"] + ["guest-exec-status"] * 3
            assert fake.requests[1][1] == {"path": "sh", "arg": ["-c", "exit 3"],
                                           "capture-output": True}

    run(main())


def test_exec_killed_by_a_signal_reports_128_plus_n(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            fake.handlers["guest-exec"] = lambda n, a: {"pid": 1}
            fake.handlers["guest-exec-status"] = lambda n, a: {"exited": True, "signal": 9}
            assert (await agent.exec("kill -9 $$")).exit_status == 137

    run(main())


def test_exec_timeout_kills_the_guest_process(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            pids = iter([77, 78])
            fake.handlers["guest-exec"] = lambda n, a: {"pid": next(pids)}
            fake.handlers["guest-exec-status"] = lambda n, a: {"exited": False}
            start = time.monotonic()
            with pytest.raises(WaitTimeout, match="sleep"):
                await agent.exec(["sleep", "1000"], timeout=0.5)
            assert time.monotonic() - start < 3
            execs = [a for n, a in fake.requests if n == "guest-exec"]
            assert execs[-1] == {"path": "kill", "arg": ["-KILL", "77"], "capture-output": True}

    run(main())


# -- files and freeze ---------------------------------------------------------------------


def test_write_then_read_a_file_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qga, "_FILE_CHUNK", 1000)
    data = bytes(range(256)) * 20  # 5120 bytes: six chunks, binary-safe

    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            await agent.write_file("/tmp/x", data)
            assert fake.files["/tmp/x"] == data
            assert names(fake).count("guest-file-write") == 6
            assert await agent.read_file("/tmp/x") == data
            assert not fake.handles  # every handle closed

    run(main())


def test_file_handle_closed_when_a_read_fails(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            fake.files["/f"] = b"abc"
            fake.handlers["guest-file-read"] = lambda n, a: {
                "error": {"class": "GenericError", "desc": "Input/output error"}}
            with pytest.raises(AgentError, match="Input/output"):
                await agent.read_file("/f")
            assert names(fake)[-1] == "guest-file-close"

    run(main())


def test_frozen_thaws_even_when_the_block_fails(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            fake.handlers["guest-fsfreeze-freeze"] = lambda n, a: 1
            fake.handlers["guest-fsfreeze-thaw"] = lambda n, a: 1
            with pytest.raises(RuntimeError):
                async with agent.frozen() as count:
                    assert count == 1
                    raise RuntimeError("snapshot failed")
            assert [n for n in names(fake) if "fsfreeze" in n] == [
                "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]

    run(main())


class _NoVM:
    """A VM target whose guard just awaits (these calls are refused before any wait)."""

    async def guarded(self, aw: Any, timeout: float | None, what: str, *,
                      guest_io: bool = False) -> Any:
        return await aw


def test_sync_guest_refuses_file_calls_for_the_qemukit_agent(tmp_path: Path) -> None:
    guest = SyncGuest(AsyncGuest(_NoVM(), Agent(tmp_path / "none.sock")))  # type: ignore[arg-type]
    with pytest.raises(StateError, match="qemu-guest-agent"):
        guest.read_file("/etc/hostname")
    with pytest.raises(StateError):
        guest.freeze()
    with pytest.raises(StateError, match="stdin"):
        guest.exec(["cat"], stdin=b"data")


def test_a_broken_connection_becomes_agent_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with agent_and_fake(tmp_path) as (agent, fake):
            await agent.ping(5)
            assert agent._writer is not None
            agent._writer.transport.abort()  # as if QEMU went away under us
            with pytest.raises(AgentError, match="guest agent"):
                await agent.info()
            assert not agent.ready
            await agent.ping(5)  # and the next call connects again

    run(main())
