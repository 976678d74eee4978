"""IOErrorWatch: QEMU's BLOCK_IO_ERROR events as a future, against a fake monitor."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

from qemu.qmp import EventListener

from qemukit._wire.io_errors import IOErrorWatch
from qemukit.errors import GuestIOError


class FakeMonitor:
    """listen() and wait_event() as qemukit's QMP has them; send() plays QEMU's side."""

    def __init__(self) -> None:
        self.listeners: list[EventListener] = []

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        listener = EventListener(names or None)
        self.listeners.append(listener)
        try:
            yield listener
        finally:
            self.listeners.remove(listener)

    async def wait_event(self, listener: EventListener, timeout: float | None,
                         what: str) -> dict[str, Any]:
        return dict(await listener.get())

    async def send(self, data: dict[str, Any]) -> None:
        for listener in self.listeners:
            await listener.put({"event": "BLOCK_IO_ERROR", "data": data,
                                "timestamp": {"seconds": 0, "microseconds": 0}})


def test_the_first_error_completes_the_future_and_rearm_forgets_it() -> None:
    async def scenario() -> None:
        monitor = FakeMonitor()
        watch = IOErrorWatch(monitor, "vm1")  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the watch task starts listening
        assert not watch.error.done()
        await monitor.send({"node-name": "drive0", "operation": "write", "reason": "No space"})
        await monitor.send({"node-name": "drive1", "operation": "read", "reason": "later"})
        error = await asyncio.wait_for(watch.error, 5)
        assert isinstance(error, GuestIOError)
        assert ("drive0", "write") == (error.node, error.operation)
        watch.rearm()
        assert not watch.error.done()
        await monitor.send({"device": "virtio0"})
        error = await asyncio.wait_for(watch.error, 5)
        assert (error.node, error.operation) == ("virtio0", "I/O")
        await watch.stop()
        assert monitor.listeners == []
        assert "vm1" in repr(watch)

    asyncio.run(scenario())
