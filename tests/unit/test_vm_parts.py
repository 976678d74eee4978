"""The pieces moved out of ``AsyncVM`` into functions of their parts, tested without QEMU:
the kill rung (``_ladder.kill_at_once``), closing a VM's connections
(``_ladder.close_connections``), raw QMP arguments (``_monitor.qmp_arguments``) and a
command's exit status checked (``_guestagent.checked``). Their behaviour inside a real
VM is covered by tests/integration/test_vm.py.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from qemukit._wire.agent import ExecResult
from qemukit.errors import GuestError, HotplugError, StateError, WaitTimeout
from qemukit.snapshot._bundle import private_ram_args
from qemukit.vm._guestagent import checked
from qemukit.vm._ladder import ShutdownRung, close_connections, kill_at_once
from qemukit.vm._monitor import qmp_arguments


class FakeProc:
    """The part of QemuProcess the kill rung uses; ``survives`` keeps it alive after SIGKILL."""

    def __init__(self, alive: bool, survives: bool = False) -> None:
        self.pid, self._alive, self.survives, self.killed = 4242, alive, survives, 0
        self.returncode: int | None = None if alive else 0

    def alive(self) -> bool:
        return self._alive

    def kill(self) -> None:
        self.killed += 1
        if not self.survives:
            self._alive, self.returncode = False, -9

    async def wait(self, timeout: float | None = None) -> int | None:
        if self._alive:
            raise WaitTimeout("QEMU's exit", timeout or 0, "")
        return self.returncode


def test_kill_at_once_sigkills_a_running_qemu() -> None:
    proc = FakeProc(alive=True)
    result = asyncio.run(kill_at_once(proc, "vm", 1.0))  # type: ignore[arg-type]
    assert (result.rung, result.exit_status, result.tried) == (
        ShutdownRung.SIGKILL, -9, (ShutdownRung.SIGKILL,))
    assert proc.killed == 1


def test_kill_at_once_of_a_gone_qemu_is_already_exited() -> None:
    proc = FakeProc(alive=False)
    result = asyncio.run(kill_at_once(proc, "vm", 1.0))  # type: ignore[arg-type]
    assert (result.rung, result.tried, proc.killed) == (ShutdownRung.ALREADY_EXITED, (), 0)


def test_kill_at_once_says_when_qemu_survives_sigkill() -> None:
    with pytest.raises(StateError, match="pid 4242 survived SIGKILL for 1s"):
        asyncio.run(kill_at_once(FakeProc(alive=True, survives=True), "vm", 1.0))  # type: ignore[arg-type]


class Closer:
    def __init__(self, fails: bool) -> None:
        self.fails, self.closed = fails, False

    async def close(self) -> None:
        self.closed = True
        if self.fails:
            raise OSError("connection reset")


def test_close_connections_goes_on_past_a_failure_and_logs_it(
        caplog: pytest.LogCaptureFixture) -> None:
    first, second = Closer(fails=True), Closer(fails=False)
    with caplog.at_level(logging.DEBUG, logger="qemukit.vm._ladder"):
        asyncio.run(close_connections((first, None, second), "vm", "detach", logging.WARNING))
    assert first.closed and second.closed
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "vm: detach: closing Closer failed" in record.getMessage()


def test_qmp_arguments_spell_keywords_as_qmp_does() -> None:
    args = qmp_arguments("blockdev-del", {"a": 1}, {"node_name": "n0"}, ())
    assert args == {"a": 1, "node-name": "n0"}


def test_qmp_arguments_refuse_a_device_that_discards_a_mapped_template(tmp_path: Path) -> None:
    template = private_ram_args(512, tmp_path / "ram", (7, 2, 0))
    with pytest.raises(HotplugError) as info:
        qmp_arguments("device_add", None, {"driver": "virtio-balloon-pci", "id": "b0"}, template)
    assert (info.value.field, info.value.value, info.value.device) == (
        "driver", "virtio-balloon-pci", "b0")
    assert qmp_arguments("device_add", None, {"driver": "virtio-balloon-pci"}, ()) == {
        "driver": "virtio-balloon-pci"}


def _result(status: int) -> ExecResult:
    return ExecResult(("cmd",), status, b"out", b"it broke\n", 0.1)


def test_checked_raises_only_when_asked() -> None:
    assert checked(["false"], _result(1), check=False).exit_status == 1
    assert checked(["true"], _result(0), check=True).exit_status == 0
    with pytest.raises(GuestError, match=r"\['false'\] exited with 1: it broke"):
        checked(["false"], _result(1), check=True)
