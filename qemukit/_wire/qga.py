"""Client for qemu-guest-agent (QGA) over its virtio-serial port.

QGA speaks JSON: ``{"execute": NAME, "arguments": {...}}`` in, one
``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}`` line out.
Unlike QMP it has no greeting and no session: the channel may hold the tail
of an earlier client's exchange in either direction, and the agent may not
be running yet (it starts late in the guest's boot) or may restart. So each
operation begins with ``guest-sync-delimited``: a 0xFF byte resets the
agent's JSON parser, the agent answers 0xFF followed by ``{"return": ID}``,
and everything up to the last 0xFF is stale.

Waiting for the agent is bounded and driven by QEMU's ``VSERPORT_CHANGE``
event when a QMP connection is at hand: the sync request waits in the
socket until the guest opens the port (QEMU reads nothing from the socket
before that), and each ``open: true`` sends a fresh one, since an agent that
restarted lost whatever it had read.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._aio import cancel_and_wait
from ..errors import AgentError, QemukitError, WaitTimeout
from .agent import Agent, ExecResult

if TYPE_CHECKING:
    from .qmp import QMP

T = TypeVar("T")

__all__ = ["AGENT_PORT_ID", "GuestAgent", "exec_request"]

#: The virtserialport's device id (``argv`` gives the agent port this id).
AGENT_PORT_ID = "agent0-port"
_SENTINEL = 0xFF
#: Without QMP events to say when the agent (re)opened its port, resend the sync this often.
_RESYNC_WITHOUT_EVENTS = 5.0
#: guest-exec-status polling: first delay, growth factor, cap (seconds).
_POLL_FIRST, _POLL_GROWTH, _POLL_CAP = 0.01, 1.5, 0.25
_FILE_CHUNK = 512 * 1024


def exec_request(command: str | Sequence[str], stdin: bytes | None = None) -> dict[str, Any]:
    """The ``guest-exec`` arguments for ``command``: a list runs as argv, a string via ``/bin/sh -c``."""
    if isinstance(command, str):
        argv = ["/bin/sh", "-c", command]
    else:
        argv = list(command)
        if not argv or not all(isinstance(a, str) for a in argv):
            raise AgentError(f"a guest command must be a non-empty list of strings, not {command!r}")
    args: dict[str, Any] = {"path": argv[0], "arg": argv[1:], "capture-output": True}
    if stdin is not None:
        args["input-data"] = base64.b64encode(stdin).decode()
    return args


def _parse_line(line: bytes) -> tuple[bool, Any]:
    """(delimited, message) for one line from the agent; message None if it is not JSON.

    Data before the last 0xFF belongs to an exchange that is over.
    """
    cut = line.rfind(bytes([_SENTINEL]))
    delimited = cut >= 0
    if delimited:
        line = line[cut + 1 :]
    line = line.strip()
    if not line:
        return delimited, None
    try:
        return delimited, json.loads(line)
    except ValueError:
        return delimited, None


class GuestAgent(Agent):
    """One connection to qemu-guest-agent: ping, exec, files, fsfreeze. Requests are serialised.

    ``monitor`` is a QMP connection to the same QEMU, used to learn when the
    guest opens the agent's port (``VSERPORT_CHANGE``); without one, the
    wait for the agent resends its sync request every few seconds.
    """

    def __init__(self, socket_path: Path, connect_timeout: float = 30.0, *,
                 monitor: QMP | None = None, port_id: str = AGENT_PORT_ID) -> None:
        super().__init__(socket_path, connect_timeout)
        self.monitor = monitor
        self.port_id = port_id
        self._budget = 0.0  # the running operation's timeout, for error messages

    # -- the wire ---------------------------------------------------------------

    def _drop(self) -> None:
        super()._drop()
        self.ready = False

    async def _send(self, writer: asyncio.StreamWriter, payload: bytes) -> None:
        writer.write(payload)
        await writer.drain()

    async def _send_sync(self, writer: asyncio.StreamWriter) -> int:
        sync_id = secrets.randbelow(2**31 - 1) + 1
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        await self._send(writer, bytes([_SENTINEL]) + json.dumps(request).encode() + b"\n")
        return sync_id

    def _listen_port(self) -> contextlib.AbstractContextManager[Any]:
        if self.monitor is None or not self.monitor.connected:
            return contextlib.nullcontext(None)
        port_id = self.port_id
        return self.monitor.listen(
            "VSERPORT_CHANGE", match=lambda ev: ev.get("data", {}).get("id") == port_id
        )

    async def _sync(self, timeout: float) -> None:
        """Resynchronise the channel: returns once the agent echoed our latest sync id."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        reader, writer = await self._connect()
        read_task: asyncio.Future[bytes] | None = None
        event_task: asyncio.Future[Any] | None = None
        with self._listen_port() as listener:
            # One small request may sit in the socket until the guest opens the port:
            # QEMU does not read it before, and it is far too small to fill the socket.
            sync_id = await self._send_sync(writer)
            try:
                while True:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise WaitTimeout("the guest agent (qemu-guest-agent) to answer", timeout)
                    if read_task is None:
                        read_task = asyncio.ensure_future(reader.readline())
                    if listener is not None and event_task is None:
                        event_task = asyncio.ensure_future(listener.get())
                    waiters: set[asyncio.Future[Any]] = {read_task}
                    if event_task is not None:
                        waiters.add(event_task)
                    wait = remaining if listener is not None else min(remaining, _RESYNC_WITHOUT_EVENTS)
                    done, _ = await asyncio.wait(waiters, timeout=wait,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if not done:
                        if listener is None and loop.time() < deadline:
                            sync_id = await self._send_sync(writer)
                        continue
                    if event_task is not None and event_task in done:
                        event = event_task.result()
                        event_task = None
                        if event.get("data", {}).get("open"):
                            # The agent (re)opened its port: a request it read before is lost.
                            sync_id = await self._send_sync(writer)
                    if read_task in done:
                        line = read_task.result()
                        read_task = None
                        if not line:
                            self._drop()
                            raise AgentError("QEMU closed the guest agent's socket")
                        delimited, message = _parse_line(line)
                        if delimited and isinstance(message, dict) and message.get("return") == sync_id:
                            return
            finally:
                for task in (read_task, event_task):
                    if task is not None:
                        await cancel_and_wait(task)

    async def _command(self, name: str, arguments: dict[str, Any] | None, deadline: float) -> Any:
        """Send one command on a synced channel and return its ``return`` value."""
        loop = asyncio.get_running_loop()
        reader, writer = await self._connect()
        request: dict[str, Any] = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        await self._send(writer, json.dumps(request).encode() + b"\n")
        while True:
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                line = await asyncio.wait_for(reader.readline(), remaining)
            except TimeoutError:
                # The reply may still come and would be taken for the next one's: start afresh.
                self._drop()
                raise WaitTimeout(f"the guest agent's reply to {name}", self._budget) from None
            if not line:
                self._drop()
                raise AgentError(f"QEMU closed the guest agent's socket during {name}")
            delimited, message = _parse_line(line)
            if delimited or not isinstance(message, dict):
                continue  # a late reply to an earlier sync, or garbage from an earlier client
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                raise AgentError(f"the guest agent refused {name}: {error.get('class', '?')}: "
                                 f"{error.get('desc', message['error'])}")
            if "return" not in message:
                self._drop()
                raise AgentError(f"unexpected reply from the guest agent to {name}: {message!r}")
            return message["return"]

    @contextlib.asynccontextmanager
    async def _session(self, timeout: float | None, what: str) -> AsyncIterator[float]:
        """Hold the lock and a synced channel; yields the deadline (loop time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout if timeout is not None else 1e9)
        async with self._lock:
            self._budget = timeout if timeout is not None else 0.0
            try:
                try:
                    await self._sync(max(deadline - loop.time(), 0.001))
                except WaitTimeout:
                    raise WaitTimeout(what, timeout or 0) from None
                yield deadline
            except QemukitError:
                raise  # (WaitTimeout is also an OSError: it must not be caught below)
            except OSError as exc:
                # The connection broke (QEMU gone, socket reset): the next call reconnects.
                self._drop()
                raise AgentError(f"lost the connection to the guest agent: {exc}") from exc

    async def call(self, command: str, arguments: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> Any:
        """Run one raw QGA command (e.g. ``guest-info``) and return its ``return`` value."""
        async with self._session(timeout, f"the guest agent to run {command}") as deadline:
            return await self._command(command, arguments, deadline)

    # -- the Agent interface ----------------------------------------------------

    async def ping(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until the agent answers: it starts late in the boot."""
        async with self._session(timeout, "the guest agent (qemu-guest-agent) to answer") as deadline:
            await self._command("guest-ping", None, deadline)
        self.ready = True

    async def exec(self, command: str | Sequence[str], timeout: float | None = 60.0, *,
                   stdin: bytes | None = None) -> ExecResult:
        """Run ``command`` in the guest; returns its exit status, stdout and stderr.

        A process killed by signal N reports status 128+N, as a shell would.
        When ``timeout`` passes the process is killed in the guest and
        :class:`WaitTimeout` is raised. The agent keeps at most 16 MiB of
        each output stream.
        """
        argv = (command,) if isinstance(command, str) else tuple(command)
        request = exec_request(command, stdin)
        what = f"the guest command {argv!r} to finish"
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        async with self._session(timeout, what) as deadline:
            pid = (await self._command("guest-exec", request, deadline))["pid"]
            # QGA has no completion event (it only ever answers requests) and QMP never sees
            # guest processes, so guest-exec-status is polled: quickly at first, so a short
            # command returns within milliseconds, then backing off to a cap, so a long one
            # costs a few round trips a second. The deadline bounds it.
            delay = _POLL_FIRST
            while True:
                try:
                    status = await self._command("guest-exec-status", {"pid": pid}, deadline)
                except WaitTimeout:
                    # The deadline ran out inside the status call itself: same as below.
                    await self._kill(pid, loop.time() + 5)
                    raise WaitTimeout(what, timeout or 0) from None
                if status.get("exited"):
                    break
                if loop.time() + delay >= deadline:
                    await self._kill(pid, loop.time() + 5)
                    raise WaitTimeout(what, timeout or 0)
                await asyncio.sleep(delay)
                delay = min(delay * _POLL_GROWTH, _POLL_CAP)
        if "exitcode" in status:
            code = int(status["exitcode"])
        else:
            code = 128 + int(status.get("signal", 0))
        return ExecResult(argv, code, base64.b64decode(status.get("out-data", "")),
                          base64.b64decode(status.get("err-data", "")), time.monotonic() - start)

    async def _kill(self, pid: int, deadline: float) -> None:
        with contextlib.suppress(AgentError, WaitTimeout):
            await self._command("guest-exec", exec_request(["kill", "-KILL", str(pid)]), deadline)

    # -- files ------------------------------------------------------------------

    async def read_file(self, path: str, *, timeout: float = 60.0) -> bytes:
        """The contents of ``path`` in the guest."""
        async with self._session(timeout, f"the guest agent to read {path}") as deadline:
            handle = await self._command("guest-file-open", {"path": path, "mode": "rb"}, deadline)
            chunks = []
            try:
                while True:
                    part = await self._command(
                        "guest-file-read", {"handle": handle, "count": _FILE_CHUNK}, deadline)
                    chunks.append(base64.b64decode(part.get("buf-b64", "")))
                    if part.get("eof") or not part.get("count"):
                        break
            finally:
                await self._command("guest-file-close", {"handle": handle}, deadline)
        return b"".join(chunks)

    async def write_file(self, path: str, data: bytes, *, timeout: float = 60.0,
                         append: bool = False) -> None:
        """Write ``data`` to ``path`` in the guest (created or truncated, unless ``append``)."""
        async with self._session(timeout, f"the guest agent to write {path}") as deadline:
            handle = await self._command(
                "guest-file-open", {"path": path, "mode": "ab" if append else "wb"}, deadline)
            try:
                for offset in range(0, len(data), _FILE_CHUNK):
                    chunk = data[offset : offset + _FILE_CHUNK]
                    await self._command("guest-file-write", {
                        "handle": handle, "buf-b64": base64.b64encode(chunk).decode()}, deadline)
                await self._command("guest-file-flush", {"handle": handle}, deadline)
            finally:
                await self._command("guest-file-close", {"handle": handle}, deadline)

    # -- file system freeze -----------------------------------------------------

    async def freeze(self, *, timeout: float = 60.0) -> int:
        """Flush and freeze the guest's file systems (for a consistent snapshot); returns how many."""
        return int(await self.call("guest-fsfreeze-freeze", timeout=timeout))

    async def thaw(self, *, timeout: float = 60.0) -> int:
        """Thaw the guest's file systems; returns how many were thawed."""
        return int(await self.call("guest-fsfreeze-thaw", timeout=timeout))

    async def fsfreeze_status(self, *, timeout: float = 30.0) -> str:
        """``thawed`` or ``frozen``."""
        return str(await self.call("guest-fsfreeze-status", timeout=timeout))

    @contextlib.asynccontextmanager
    async def frozen(self, *, timeout: float = 60.0) -> AsyncIterator[int]:
        """``async with agent.frozen():`` keeps the file systems frozen inside the block only.

        The thaw runs whatever happens inside, so a failed snapshot never
        leaves the guest with its disks frozen.
        """
        count = await self.freeze(timeout=timeout)
        try:
            yield count
        finally:
            await self.thaw(timeout=timeout)

    async def info(self, *, timeout: float = 30.0) -> dict[str, Any]:
        """``guest-info``: the agent's version and the commands it supports."""
        return dict(await self.call("guest-info", timeout=timeout))
