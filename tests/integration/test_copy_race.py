"""The agent copy when the guest command's exit 0 reaches the host before the bytes do (real guest).

The guest's writes to the transfer port return once queued in the port's
virtqueue, so ``head ... > $dev`` can exit, and the agent's reply arrive, while
the data is still in QEMU or in the socket. Here the host's sink holds its
first write until the guest command has answered, which makes that order
certain (a slow host disk or a descheduled worker thread did it by chance:
once in 9 runs of test_mcp.py). Before the fix every copy here failed with
"failed in the guest (exit 0): no output". The unit tests with fakes are in
tests/unit/test_copy_race.py.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import IO, Any

import pytest

from qemukit import guest as guest_module
from qemukit.errors import GuestError
from qemukit.guest import ExecResult

pytestmark = pytest.mark.integration


class _HeldSink:
    """A sink whose first write waits (in the worker thread) until ``gate`` is set."""

    def __init__(self, sink: IO[bytes], gate: threading.Event) -> None:
        self._sink = sink
        self._gate = gate

    def write(self, data: bytes) -> int:
        # Bounded: if the command cannot finish while the host holds (more data than the
        # virtqueue and socket buffers hold), the copy goes on after 60 s rather than hang.
        self._gate.wait(60)
        return self._sink.write(data)


# 300 kB: more than the socket buffers hold, so QEMU still has some in the port's
# virtqueue when the guest's head exits and closes the port; less than the ~1 MB the
# guest can queue in all, or head could not exit while the host holds.
@pytest.mark.parametrize("size", [5, 300_001])
def test_copy_out_finishes_when_the_guest_command_answers_before_the_host_stored_a_byte(
        booted: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, size: int) -> None:
    vm = booted()
    made = vm.exec(f"head -c {size} /dev/urandom > /tmp/blob && md5sum /tmp/blob", timeout=120)
    assert made.exit_status == 0, made.stderr_text
    gate = threading.Event()
    answered: list[ExecResult] = []
    guest = vm.guest  # one object: vm.guest makes a new one each time
    aio = guest.aio
    real_exec = aio.exec

    async def exec_then_open_the_gate(command: Any, timeout: float | None = 60.0,
                                      **kwargs: Any) -> ExecResult:
        result: ExecResult = await real_exec(command, timeout, **kwargs)
        if "virtio-ports" in str(command):  # the transfer command has answered
            answered.append(result)
            gate.set()
        return result

    real_receive = guest_module._receive_file

    async def held_receive(port: Any, sink: IO[bytes], *rest: Any) -> None:
        await real_receive(port, _HeldSink(sink, gate), *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(aio, "exec", exec_then_open_the_gate)
    monkeypatch.setattr(guest_module, "_receive_file", held_receive)
    caplog.set_level(logging.DEBUG, logger="qemukit.guest")
    back = guest.copy_out("/tmp/blob", tmp_path / "back", timeout=120)
    assert hashlib.md5(back.read_bytes()).hexdigest() == made.stdout_text.split()[0]
    assert back.stat().st_size == size
    assert [r.exit_status for r in answered] == [0]
    # The order this test is about did happen: exit 0 first, then the host read the rest.
    assert any("exited 0" in r.getMessage() and "waiting for the rest" in r.getMessage()
               for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back"]  # no temporary left


def test_copy_out_of_a_file_that_shrinks_fails_at_once_naming_the_bytes(booted: Any,
                                                                        tmp_path: Path) -> None:
    """The guest side checks it sent every byte: exit 0 then means the rest is on its way."""
    vm = booted()
    size = 300_000
    made = vm.exec(f"head -c {size} /dev/zero > /tmp/shrinks", timeout=60)
    assert made.exit_status == 0
    guest = vm.guest
    aio = guest.aio
    real_exec = aio.exec

    async def shrink_before_the_transfer(command: Any, timeout: float | None = 60.0,
                                         **kwargs: Any) -> ExecResult:
        if "virtio-ports" in str(command):  # between the stat and the transfer
            cut = await real_exec("head -c 1000 /dev/zero > /tmp/shrinks", 60.0)
            assert cut.exit_status == 0
        result: ExecResult = await real_exec(command, timeout, **kwargs)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(aio, "exec", shrink_before_the_transfer)
        mp.setattr(guest_module, "_DRAIN_TIMEOUT", 3600.0)  # must not be what ends it
        with pytest.raises(GuestError) as err:
            guest.copy_out("/tmp/shrinks", tmp_path / "back", timeout=120)
    message = str(err.value)
    assert "exit 94" in message
    assert f"the file is 1000 bytes now, fewer than the {size} to send" in message
    assert list(tmp_path.iterdir()) == []
