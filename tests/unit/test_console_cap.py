"""The console log's cap: rotation keeps the latest output, the tail reads across it, and the
watcher rotates as the guest prints (the real flood: tests/integration/test_host_state.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from qemukit._wire.console import ConsoleWatcher, log_tail, rotate_log


def test_rotation_moves_the_log_and_empties_it_in_place(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("old line\n" * 10)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)  # QEMU's descriptor (logappend=on)
    try:
        rotate_log(log)
        os.write(fd, b"new line\n")
    finally:
        os.close(fd)
    assert log.read_text() == "new line\n"  # appended at the start, no hole
    assert Path(f"{log}.1").read_text() == "old line\n" * 10
    assert log_tail(log, 3) == "old line\nold line\nnew line"


def test_the_watcher_rotates_past_its_cap_and_still_sees_a_panic(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_bytes(b"")

    async def flood() -> ConsoleWatcher:
        watcher = ConsoleWatcher(log, max_log_bytes=64 << 10)
        for _ in range(64):
            chunk = b"y" * 8191 + b"\n"
            with open(log, "ab") as fh:  # what QEMU does: log, then the socket
                fh.write(chunk)
            watcher._feed(chunk)
            assert log.stat().st_size <= (64 << 10) + (8 << 10)
        line = b"Kernel panic - not syncing: sysrq triggered crash\n"
        with open(log, "ab") as fh:
            fh.write(line)
        watcher._feed(line)
        return watcher

    watcher = asyncio.run(flood())
    assert watcher.fatal.done() and watcher.fatal.result().kind == "panic"
    assert Path(f"{log}.1").exists()
    assert "Kernel panic" in log_tail(log, 1)
