"""run_in_vm's copy of the console log: a copy that cannot be written never takes the verdict's
place (it used to raise HostError, and a bisection lost the commit's verdict)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from qemukit import kernel
from qemukit.kconfig import ResolvedKernel
from qemukit.spec import VMSpec
from tests.helpers import RunInVMFake


def _run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: Path, *,
         panics: bool = False) -> kernel.KernelTestResult:
    log = tmp_path / "console.log"
    log.write_text("booted\nready\n")
    fake = type("VM", (RunInVMFake,), {"panics": panics, "log": log})
    monkeypatch.setattr(kernel, "VM", fake)
    spec = VMSpec(kernel="/nonexistent/bzImage")
    about = ResolvedKernel(spec=spec, tree=None, config=None, release="6.1")
    return kernel._run_resolved(spec, "true", about, timeout=30, console_log=target,
                                modules=None, on_started=None, on_starting=None,
                                continue_on_oops=False, dump_on_panic=None)


def test_a_console_log_that_cannot_be_written_keeps_the_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "no-such-dir" / "console.log"
    with caplog.at_level(logging.WARNING, logger="qemukit.kernel"):
        result = _run(tmp_path, monkeypatch, target)
    assert result.outcome == "passed" and result.exit_status == 0 and result.stdout == "ok\n"
    assert result.console_log is None  # nothing there to point at
    assert result.console_log_error is not None
    assert f"cannot write the console log to {target}" in result.console_log_error
    assert "No such file or directory" in result.console_log_error
    assert result.error is None  # the run itself did not fail
    assert any("cannot write the console log" in r.getMessage() for r in caplog.records)
    # Said beside the verdict wherever the verdict goes.
    assert json.loads(json.dumps(result.to_dict()))["console_log_error"] == result.console_log_error
    xml = tmp_path / "r.xml"
    result.write_junit(xml)
    assert "console_log_error" in xml.read_text() and 'failures="0"' in xml.read_text()


def test_a_panic_verdict_survives_a_console_log_that_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    result = _run(tmp_path, monkeypatch, tmp_path / "file" / "console.log", panics=True)
    assert result.outcome == "panic" and "sysrq triggered crash" in (result.panic or "")
    assert result.console_log_error is not None and "Not a directory" in result.console_log_error


def test_a_written_console_log_has_no_error(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "kept.log"
    result = _run(tmp_path, monkeypatch, target)
    assert result.console_log == str(target) and result.console_log_error is None
    assert target.read_text() == "booted\nready\n"
