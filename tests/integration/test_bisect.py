"""qemukit bisect on a small git tree whose commits change what the guest runs (no kernel
build per commit): the first bad commit found, an infrastructure failure taken as skip."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

COMMITS = 8
FIRST_BAD = 6  # commits 0..5 pass, 6 and 7 fail


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()


def make_repo(repo: Path, infra_at: int | None) -> list[str]:
    """Commits 0..7 of guest/test.sh (exit 0 before FIRST_BAD, exit 1 from it on); at
    ``infra_at`` the shared directory is gone, so the VM cannot start as described."""
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.invalid")
    git(repo, "config", "user.name", "t")
    shas = []
    for n in range(COMMITS):
        guest = repo / "guest"
        if n == infra_at:
            git(repo, "rm", "-q", "-r", "guest")
        else:
            guest.mkdir(exist_ok=True)
            (guest / "test.sh").write_text(f"echo commit {n}\nexit {int(n >= FIRST_BAD)}\n")
            git(repo, "add", "guest")
        git(repo, "commit", "-q", "--allow-empty", "-m", f"commit {n}")
        shas.append(git(repo, "rev-parse", "HEAD"))
    return shas


def first_pick(tmp_path: Path) -> int:
    """The commit git bisect tests first on this history's shape (it depends on nothing else)."""
    shas = make_repo(tmp_path / "probe", None)
    git(tmp_path / "probe", "bisect", "start", shas[-1], shas[0])
    try:
        return shas.index(git(tmp_path / "probe", "rev-parse", "HEAD"))
    finally:
        git(tmp_path / "probe", "bisect", "reset")


def test_bisect_finds_the_first_bad_commit_and_skips_infrastructure_failures(
        qk: Any, tmp_path: Path) -> None:
    infra = first_pick(tmp_path)
    assert 0 < infra < FIRST_BAD - 1, "the skipped commit must not hide the answer"
    repo = tmp_path / "repo"
    shas = make_repo(repo, infra)
    out = qk("bisect", "--repo", str(repo), "--good", shas[0], "--bad", shas[-1],
             "--image", "tiny", "--accel", "tcg", "--share", f"{repo / 'guest'}:/t,ro",
             "--crash-dir", str(tmp_path / "crashes"), "--json", str(tmp_path / "b.json"),
             "--", "sh", "/t/test.sh", timeout=1800)
    assert out.returncode == 0, out.stderr
    assert f"first bad commit: {shas[FIRST_BAD]} commit {FIRST_BAD}" in out.stdout
    assert "verdict: bad (exit status 1)" in out.stdout
    data = json.loads((tmp_path / "b.json").read_text())
    answers = {shas.index(s["commit"]): s["answer"] for s in data["steps"]}
    assert answers[infra] == "skip" and answers[FIRST_BAD] == "bad"
    assert all(a == ("good" if n < FIRST_BAD else "bad") for n, a in answers.items() if n != infra)
    skipped = next(s for s in data["steps"] if s["answer"] == "skip")
    assert "qemukit could not run the test" in skipped["reason"] or "infrastructure" in skipped["reason"]
    assert git(repo, "rev-parse", "HEAD") == shas[-1]  # the tree is left as it was
    assert subprocess.run(["git", "-C", str(repo), "bisect", "log"], capture_output=True,
                          check=False).returncode != 0  # no bisection left under way
