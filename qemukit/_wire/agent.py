"""Client for the qemukit agent inside the tiny guest (a virtio-serial port).

The protocol is line based (see images/tiny/README.md): ``PING t`` is
answered ``PONG t``; ``EXEC t TIMEOUT B64SCRIPT`` is answered
``DONE t STATUS B64OUT B64ERR``. Replies carry the request's token, so a
stale reply left over from an earlier client is recognised and skipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import AgentError, WaitTimeout
from .qmp import connect_unix

__all__ = ["Agent", "ExecResult"]

_LINE_LIMIT = 256 * 1024 * 1024


@dataclass(frozen=True)
class ExecResult:
    """A command's outcome in the guest."""

    argv: tuple[str, ...]
    exit_status: int
    stdout: bytes
    stderr: bytes
    duration: float

    @property
    def ok(self) -> bool:
        """True if the command exited with status 0."""
        return self.exit_status == 0

    @property
    def stdout_text(self) -> str:
        """stdout decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", "replace")

    @property
    def stderr_text(self) -> str:
        """stderr decoded as UTF-8 (invalid bytes replaced)."""
        return self.stderr.decode("utf-8", "replace")


def _b64decode(field: str) -> bytes:
    return b"" if field == "-" else base64.b64decode(field, validate=True)


def command_script(command: str | Sequence[str]) -> str:
    """A shell script running ``command``: a string runs as shell code, a list exactly."""
    if isinstance(command, str):
        return command
    return "exec " + shlex.join(command)


class Agent:
    """One connection to the guest agent; requests are serialised."""

    def __init__(self, socket_path: Path, connect_timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self.ready = False

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            sock = await connect_unix(str(self.socket_path), self.connect_timeout)
            self._reader, self._writer = await asyncio.open_unix_connection(
                sock=sock, limit=_LINE_LIMIT
            )
        return self._reader, self._writer

    async def _request(self, line: str, token: str, expect: str) -> list[str]:
        reader, writer = await self._connect()
        try:
            writer.write(line.encode() + b"\n")
            await writer.drain()
            while True:
                raw = await reader.readline()
                if not raw:
                    self._drop()
                    raise AgentError("the guest agent closed the connection")
                fields = self._match(raw, token, expect)
                if fields is not None:
                    return fields
        except (OSError, ValueError) as exc:
            # The connection broke (guest reset, QEMU gone): the next request reconnects.
            self._drop()
            raise AgentError(f"lost the connection to the guest agent: {exc}") from exc

    @staticmethod
    def _match(raw: bytes, token: str, expect: str) -> list[str] | None:
        """The reply's fields if it answers ``token``; None for a stale reply."""
        fields = raw.decode("ascii", "replace").split()
        if len(fields) < 2 or fields[1] != token:
            return None
        if fields[0] == "ERR":
            raise AgentError(f"the guest agent refused the request: {' '.join(fields[2:])}")
        if fields[0] != expect:
            raise AgentError(f"unexpected agent reply {fields[0]!r}")
        return fields

    def _drop(self) -> None:
        """Forget the connection (and readiness): the guest may have been reset."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        self.ready = False

    async def ping(self, timeout: float) -> None:
        """Wait until the agent answers (it comes up with the guest's init)."""
        token = secrets.token_hex(6)
        async with self._lock:
            try:
                await asyncio.wait_for(self._request(f"PING {token}", token, "PONG"), timeout)
            except TimeoutError:
                raise WaitTimeout("the guest agent to answer", timeout) from None
        self.ready = True

    async def exec(self, command: str | Sequence[str], timeout: float | None = 60.0) -> ExecResult:
        """Run ``command`` in the guest; ``timeout`` kills it in the guest too."""
        token = secrets.token_hex(6)
        script = base64.b64encode(command_script(command).encode()).decode()
        guest_timeout = 0 if timeout is None else max(1, int(timeout + 0.999))
        argv = (command,) if isinstance(command, str) else tuple(command)
        start = time.monotonic()
        async with self._lock:
            try:
                fields = await asyncio.wait_for(
                    self._request(f"EXEC {token} {guest_timeout} {script}", token, "DONE"),
                    None if timeout is None else timeout + 5,
                )
            except TimeoutError:
                self._drop()
                raise WaitTimeout(f"the guest command {argv!r} to finish", timeout or 0) from None
        if len(fields) != 5:
            raise AgentError(f"malformed DONE reply with {len(fields)} fields")
        try:
            status = int(fields[2])
            out, err = _b64decode(fields[3]), _b64decode(fields[4])
        except ValueError as exc:
            raise AgentError(f"malformed DONE reply: {exc}") from exc
        return ExecResult(argv, status, out, err, time.monotonic() - start)

    async def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None
