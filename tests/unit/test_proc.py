"""Process groups: a build's timeout, and bisect's error or Ctrl-C, end every process started."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from qemukit import _proc, bisect

# A parent whose child outlives it unless the whole group is killed (make and its cc1).
FORKS = 'sleep 120 & echo $! > "$1"; echo started; wait'


def _gone(pid: int, within: float = 30.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    return True  # dead, waiting for its reaper
        except FileNotFoundError:
            return True
        time.sleep(0.1)
    return False


def test_a_timeout_kills_the_commands_children_too(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        _proc.run_group(["sh", "-c", FORKS, "sh", str(tmp_path / "pid")], timeout=2)
    assert time.monotonic() - started < 60  # not held until the child's own end
    assert _gone(int((tmp_path / "pid").read_text()))


def test_run_group_returns_what_ran() -> None:
    done = _proc.run_group(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_bisect_ends_git_and_its_judge_on_an_error_or_ctrl_c(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while ``git bisect run`` runs: git and the judge it started are ended before
    the tree is reset (the old code left both running and reset under them)."""
    real = subprocess.Popen
    pidfile = tmp_path / "pid"

    def fake_git(argv: Any, **kw: Any) -> Any:
        return real(["sh", "-c", FORKS, "sh", str(pidfile)], **kw)

    def ctrl_c(line: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("qemukit.bisect.subprocess.Popen", fake_git)
    with pytest.raises(KeyboardInterrupt):
        bisect._run_bisect(tmp_path, tmp_path, ctrl_c)
    monkeypatch.undo()
    assert _gone(int(pidfile.read_text()))
