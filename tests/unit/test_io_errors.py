"""IOErrorWatch: QEMU's BLOCK_IO_ERROR events as a future, against qemukit.testing's monitor."""

from __future__ import annotations

import asyncio

from qemukit._wire.io_errors import IOErrorWatch
from qemukit.errors import GuestIOError
from qemukit.testing import FakeMonitor


def test_an_error_completes_the_future_and_rearm_forgets_it() -> None:
    async def scenario() -> None:
        monitor = FakeMonitor()
        watch = IOErrorWatch(monitor, "vm1")  # type: ignore[arg-type]  # (a QMP's event side)
        await asyncio.sleep(0)  # the watch task starts listening
        assert not watch.error.done()
        monitor.emit("BLOCK_IO_ERROR", {"node-name": "drive0", "operation": "write",
                                        "reason": "No space left on device"})
        error = await asyncio.wait_for(watch.error, 10)
        assert isinstance(error, GuestIOError)
        assert (error.node, error.operation) == ("drive0", "write")
        watch.rearm()
        assert not watch.error.done()
        monitor.emit("BLOCK_IO_ERROR", {"device": "virtio0"})
        error = await asyncio.wait_for(watch.error, 10)
        assert (error.node, error.operation, error.reason) == ("virtio0", "I/O", "unknown error")
        await watch.stop()
        assert monitor.listeners == []
        assert "vm1" in repr(watch)

    asyncio.run(scenario())
