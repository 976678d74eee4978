"""qemukit bisect's checks before any VM or git bisect starts, and reading git's answer."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from qemukit import VMSpec
from qemukit.bisect import _conclude, bisect, default_build
from qemukit.errors import SpecError


def _repo(path: Path) -> str:
    for args in (["init", "-q"], ["-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                                  "--allow-empty", "-m", "one"]):
        subprocess.run(["git", "-C", str(path), *args], check=True, timeout=60)
    return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], check=True, timeout=60,
                          capture_output=True, text=True).stdout.strip()


def test_bad_input_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="not a git work tree"):
        bisect(tmp_path, "a", "b", VMSpec(), ["true"])
    head = _repo(tmp_path)
    with pytest.raises(SpecError, match="good.*not a commit"):
        bisect(tmp_path, "nosuch", head, VMSpec(), ["true"])
    with pytest.raises(SpecError, match="command"):
        bisect(tmp_path, head, head, VMSpec(), [])


def test_skipped_candidates_are_listed(tmp_path: Path) -> None:
    a, b = "a" * 40, "b" * 40
    text = ("There are only 'skip'ped commits left to test.\n"
            f"The first bad commit could be any of:\n{a}\n{b}\n")
    result = _conclude(tmp_path, text.splitlines(), (), "")
    assert result.first_bad is None and result.candidates == (a, b)


def test_default_build_only_for_a_configured_kernel_tree(tmp_path: Path) -> None:
    assert default_build(tmp_path) is None
    for name in ("Kbuild", "Makefile", ".config"):
        (tmp_path / name).write_text("")
    assert default_build(tmp_path)[0] == "make"  # type: ignore[index]
