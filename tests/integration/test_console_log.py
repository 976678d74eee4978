"""The console log is what the guest printed, byte for byte, even when the reader falls behind.

QEMU 7.2's ``logfile=`` logs a byte twice when its write to the console socket fails with
EAGAIN (the reader is slow) and the UART retries it: the suite's KUnit log read
``skiipped`` in one run of three. The launcher now writes the log from the stream it reads.
Here the reader stalls for seconds while the guest prints far more than a socket holds.
"""

from __future__ import annotations

import threading
import time

from qemukit import VM, VMSpec

LINE = ("console-log-check 0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ "
        "skipped list-kunit-test")
COUNT = 6000  # ~ 700 KB, several times a Unix socket's buffer


def test_the_console_log_is_exactly_what_the_guest_printed(tiny_spec: VMSpec) -> None:
    vm = VM(tiny_spec, keep_runtime=True)  # the log is read after QEMU is gone
    try:
        _check(vm)
    finally:
        if vm.state.value == "running":
            vm.kill()
        if vm.runtime is not None:
            vm.runtime.remove()


def _check(vm: VM) -> None:
    vm.start()
    vm.wait_ready(120)
    seen: list[bytes] = []
    stalled = threading.Event()
    tail = bytearray()

    def sink(chunk: bytes) -> None:
        seen.append(chunk)
        tail[:] = (bytes(tail) + chunk)[-64:]  # the marker may come in many small reads
        if not stalled.is_set() and b"console-log-begin" in tail:
            stalled.set()
            time.sleep(8)  # the reader falls behind: QEMU's socket fills, its writes fail EAGAIN

    vm.follow_console(sink)
    result = vm.exec(f"echo console-log-begin > /dev/console; "
                     f"yes '{LINE}' | head -n {COUNT} > /dev/console; "
                     f"echo console-log-end > /dev/console", timeout=600)
    assert result.exit_status == 0, result.stderr_text
    vm.wait_for_console_text("console-log-end", timeout=300, since="start")
    assert stalled.is_set(), (b"console-log-begin" in b"".join(seen), len(seen), b"".join(seen)[:300])
    log_path = vm.console_log
    assert log_path is not None
    vm.shutdown(timeout=60)  # QEMU gone: the watcher read the socket to its end
    log = log_path.read_bytes() if log_path.exists() else b""
    stream = b"".join(seen)

    text = log.decode("utf-8", "replace").replace("\r", "")
    section = text.split("console-log-begin\n", 1)[1].split("console-log-end", 1)[0]
    lines = section.splitlines()
    wrong = [line for line in lines if line != LINE]
    assert not wrong, f"{len(wrong)} lines differ from what the guest printed, e.g. {wrong[:3]}"
    assert len(lines) == COUNT
    # Everything read after the sink was set is the log's end, byte for byte.
    assert stream and log.endswith(stream)
