"""Errors from the installed command: one line, the exit code from the one table, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import QEMUKIT, qemu_gone

pytestmark = pytest.mark.integration
TCG = ("--image", "tiny", "--accel", "tcg")


def _one_error(out: Any, code: int) -> list[str]:
    """Check the exit code and that stderr holds qemukit's message, not a traceback."""
    assert out.returncode == code, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    lines: list[str] = out.stderr.splitlines()
    assert lines and lines[0].startswith("qemukit: "), out.stderr
    return lines


def test_stop_of_a_vm_that_cannot_be_stopped(qk: Any, state_root: Path) -> None:
    """A QEMU that does not answer QMP (stopped, or its socket deleted): the error with
    the table's code and a hint, no traceback; the VM is left for 'qemukit kill'."""
    # Cold: a warm clone's console carries the saved boot, which the error would quote.
    assert qk("run", "--detach", "--cold", "--name", "stuck", *TCG).returncode == 0
    info = json.loads((state_root / "stuck" / "vm.json").read_text())
    pid = info["pid"]
    try:
        os.kill(pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            hung = qk("stop", "stuck", "--timeout", "5")
            assert time.monotonic() - start < 90
        finally:
            os.kill(pid, signal.SIGCONT)
        first, hint = _one_error(hung, 124)
        assert "timed out" in first and "QMP" in first
        assert "'qemukit kill stuck'" in hint
        assert not qemu_gone(pid)  # a failed stop leaves the VM as it was

        os.unlink(state_root / "stuck" / "qmp.sock")
        gone = qk("stop", "stuck")
        first, hint = _one_error(gone, 125)
        assert "qmp.sock" in first and "'qemukit kill stuck'" in hint
        # Every command reports the same error with the same code.
        (plug,) = _one_error(qk("hotplug", "stuck", "cpu"), 125)
        assert plug == first
    finally:
        killed = qk("kill", "stuck")
    assert killed.returncode == 0, killed.stderr
    deadline = time.monotonic() + 10
    while not qemu_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_gone(pid)
    assert not (state_root / "stuck").exists()


@pytest.fixture
def unwritable_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this user cannot create anything in: read-only tmpfs for root (whom
    permission bits do not stop), mode 0500 for anyone else."""
    path = tmp_path / "locked"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M,mode=0755", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _qemukit_env(**env: str) -> Any:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        assert QEMUKIT
        return subprocess.run([QEMUKIT, *args], capture_output=True, text=True, timeout=120,
                              env={**os.environ, **env}, stdin=subprocess.DEVNULL, check=False)
    return run


def test_unwritable_state_and_cache_dirs(qk: Any, unwritable_dir: Path) -> None:
    state = _qemukit_env(QEMUKIT_STATE=str(unwritable_dir))
    for args in (("run", "--detach", *TCG), ("run", *TCG, "--", "true")):
        (line,) = _one_error(state(*args), 125)
        assert str(unwritable_dir) in line and "set QEMUKIT_STATE" in line, line
    assert os.listdir(unwritable_dir) == []
    cache = _qemukit_env(QEMUKIT_CACHE=str(unwritable_dir / "cache"))
    out = cache("images", "build", "tiny")
    (line,) = _one_error(out, 125)
    assert str(unwritable_dir / "cache") in line and "set QEMUKIT_CACHE" in line, line


def test_launch_failure_is_qemukits_error_without_qmp_noise(qk: Any) -> None:
    for args in (("run", *TCG, "--qemu-arg=-nonexistent-option", "--", "true"),
                 ("run", "--detach", *TCG, "--qemu-arg=-nonexistent-option")):
        for _ in range(3):  # the noise came from a race: try it more than once
            lines = _one_error(qk(*args), 125)
            assert lines[0] == "qemukit: QEMU exited while waiting for QMP (exit status 1)"
            assert "qemu-system-x86_64: -nonexistent-option: invalid option" in lines
            text = "\n".join(lines)
            assert "bug in the QMP library" not in text and "Failed to establish" not in text


def test_result_file_that_cannot_be_written(qk: Any, unwritable_dir: Path, state_root: Path) -> None:
    before = set(state_root.iterdir())
    out = qk("run", *TCG, "--json", str(unwritable_dir / "result.json"), "--", "true")
    lines = _one_error(out, 125)
    assert lines[-1].startswith(f"qemukit: {unwritable_dir / 'result.json'}: "), lines
    assert set(state_root.iterdir()) == before  # the VM was stopped and its entry removed first
