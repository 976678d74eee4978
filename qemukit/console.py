"""The guest's serial console: drained continuously, scanned for panics.

A connected console socket that nobody reads fills up and stalls the guest's
UART, so once connected the watcher keeps reading. QEMU also writes every
byte to the console log, which is what error messages quote.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["PANIC_RE", "ConsoleWatcher", "log_tail"]

# Lines that mean the guest kernel is done for: a panic, an oops, a BUG.
PANIC_RE = re.compile(
    r"(Kernel panic - not syncing.*|BUG: .*|Oops: .*|general protection fault.*)"
)


def log_tail(path: Path, max_lines: int = 30) -> str:
    """The last ``max_lines`` lines of a log file ('' if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            data = fh.read()
    except OSError:
        return ""
    lines = data.decode("utf-8", "replace").replace("\r", "").splitlines()
    return "\n".join(lines[-max_lines:])


class ConsoleWatcher:
    """Reads a console socket until it closes; resolves :attr:`panic` on a panic line."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.panic: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._partial = b""
        #: Called with every chunk the guest prints (e.g. to show the console live).
        self.sink: Callable[[bytes], None] | None = None

    async def start(self, socket_path: Path) -> None:
        """Connect to the console socket and start draining it in the background."""
        reader, self._writer = await asyncio.open_unix_connection(str(socket_path))
        # Output that arrived before we connected is only in the log: scan it once.
        for line in log_tail(self.log_path, 200).splitlines():
            self._scan(line)
        self._task = asyncio.create_task(self._drain(reader), name=f"console {socket_path}")

    async def _drain(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if self.sink is not None:
                    self.sink(chunk)
                data = self._partial + chunk
                *lines, self._partial = data.split(b"\n")
                for raw in lines:
                    self._scan(raw.decode("utf-8", "replace").rstrip("\r"))

    def _scan(self, line: str) -> None:
        if self.panic.done():
            return
        m = PANIC_RE.search(line)
        if m:
            self.panic.set_result(m.group(1).strip())

    def tail(self, max_lines: int = 30) -> str:
        """The console's last lines, from QEMU's log of it."""
        return log_tail(self.log_path, max_lines)

    async def close(self) -> None:
        """Stop draining and disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        if not self.panic.done():
            self.panic.cancel()
