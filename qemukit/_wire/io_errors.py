"""QEMU's BLOCK_IO_ERROR events (the guest paused on a host disk error) as a future.

QEMU pauses the guest when a write to the host fails for lack of space (its
default ``werror=enospc``: a full host disk under an overlay) and says so
with BLOCK_IO_ERROR. A wait that needs the guest to run would
otherwise hang until its deadline; :class:`IOErrorWatch` lets it end at once
with :class:`~qemukit.errors.GuestIOError` naming the block node.
"""

from __future__ import annotations

import asyncio
import logging

from .._aio import cancel_and_wait
from ..errors import GuestIOError
from .qmp import QMP

__all__ = ["IOErrorWatch"]

log = logging.getLogger(__name__)


class IOErrorWatch:
    """Listens for BLOCK_IO_ERROR on a QMP connection; :attr:`error` completes on the first."""

    def __init__(self, qmp: QMP, name: str) -> None:
        #: Completes with the first I/O error since the start or the last :meth:`rearm`.
        self.error: asyncio.Future[GuestIOError] = asyncio.get_running_loop().create_future()
        self._name = name
        self._task = asyncio.create_task(self._watch(qmp), name=f"io-errors {name}")

    def __repr__(self) -> str:
        return f"<IOErrorWatch {self._name!r} {'I/O error seen' if self.error.done() else 'quiet'}>"

    async def _watch(self, qmp: QMP) -> None:
        with qmp.listen("BLOCK_IO_ERROR") as listener:
            while True:
                event = await qmp.wait_event(listener, None, "BLOCK_IO_ERROR")
                data = event.get("data", {})
                log.debug("%s: BLOCK_IO_ERROR %s", self._name, data)
                if not self.error.done():
                    self.error.set_result(GuestIOError(
                        str(data.get("node-name") or data.get("device") or "?"),
                        str(data.get("operation", "I/O")),
                        str(data.get("reason", "unknown error")),
                    ))

    def rearm(self) -> None:
        """The error was reported: a fresh :attr:`error`, so later waits are not ended by it."""
        self.error = asyncio.get_running_loop().create_future()

    async def stop(self) -> None:
        """Stop listening."""
        await cancel_and_wait(self._task)
