"""State and cache directories that cannot be written: one error naming the directory and
the variable that moves it (no QEMU is started; a path under a regular file gives ENOTDIR
even for root, for whom permission bits do not stop writes)."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qemukit import HostError, StateError, images
from qemukit._launch.runtime import RuntimeDir
from qemukit.cli import EXIT_ERROR, main

needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    """A regular file: nothing can be created below it."""
    path = tmp_path / "a-file"
    path.write_text("")
    return path


def _one_line(text: str) -> str:
    assert "\n" not in text.rstrip("\n"), text
    return text


def test_state_dir_under_a_file(blocker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMUKIT_STATE", str(blocker / "state"))
    with pytest.raises(StateError) as info:
        RuntimeDir.create("vm1")
    message = _one_line(str(info.value))
    assert str(blocker / "state") in message and "QEMUKIT_STATE" in message
    assert "Not a directory" in message
    assert isinstance(info.value.__cause__, NotADirectoryError)


def test_state_dir_that_is_a_file(blocker: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMUKIT_STATE", str(blocker))
    with pytest.raises(StateError, match="exists and is not a directory; set QEMUKIT_STATE"):
        RuntimeDir.create("vm1")


def test_default_state_dir_says_where_it_came_from(blocker: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QEMUKIT_STATE", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(blocker))
    with pytest.raises(StateError) as info:
        RuntimeDir.create(None)
    message = str(info.value)
    assert str(blocker / "qemukit") in message and "$XDG_RUNTIME_DIR" in message
    assert "set QEMUKIT_STATE" in message


def test_state_dir_refusing_the_vm_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "state"
    root.mkdir()
    monkeypatch.setenv("QEMUKIT_STATE", str(root))
    real_mkdir = Path.mkdir

    def refuse(self: Path, *args: Any, **kwargs: Any) -> None:
        if self.parent == root:  # what a directory owned by another user does (root ignores 0500)
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(StateError) as info:
        RuntimeDir.create("vm1")
    assert _one_line(str(info.value)) == (
        f"cannot use qemukit's state directory {root} (from QEMUKIT_STATE): {root}/vm1: "
        "Permission denied; set QEMUKIT_STATE to a directory you can write")


def test_explicit_root_is_named_without_the_variable(blocker: Path) -> None:
    with pytest.raises(StateError) as info:
        RuntimeDir.create("vm1", root=blocker / "state")
    assert str(blocker / "state") in str(info.value) and "QEMUKIT_STATE" not in str(info.value)


def test_unreadable_cache_while_looking_for_an_image(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMUKIT_CACHE", str(tmp_path / "cache"))

    def denied(cache: Path, recipe: Path | None = None, arch: str = "x86_64") -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(cache / "tiny"))

    monkeypatch.setattr(images, "find_tiny", denied)
    with pytest.raises(HostError) as info:
        images.find_image("tiny")
    message = _one_line(str(info.value))
    assert str(tmp_path / "cache") in message and "set QEMUKIT_CACHE" in message


# -- through the command: exit 125, one line, no traceback ---------------------------


def _qemukit(*args: str, **env: str) -> Any:
    result = CliRunner().invoke(main, list(args), env=env)
    assert result.exit_code == EXIT_ERROR, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemukit: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["ls"], ["gc"]])
def test_listing_an_unusable_state_dir(command: list[str], blocker: Path) -> None:
    line = _qemukit(*command, QEMUKIT_STATE=str(blocker / "state"))
    assert str(blocker / "state") in line and "QEMUKIT_STATE" in line


@needs_qemu
@pytest.mark.parametrize("mode", [["--detach"], ["--", "true"]], ids=["detach", "command"])
def test_run_with_an_unusable_state_dir(mode: list[str], blocker: Path, tmp_path: Path) -> None:
    line = _qemukit("run", "--accel", "tcg", *mode, QEMUKIT_STATE=str(blocker / "state"),
                    QEMUKIT_CACHE=str(tmp_path / "cache"))
    assert str(blocker / "state") in line and "QEMUKIT_STATE" in line


def test_build_into_an_unusable_cache(blocker: Path) -> None:
    line = _qemukit("images", "build", "tiny", QEMUKIT_CACHE=str(blocker / "cache"))
    assert str(blocker / "cache") in line and "QEMUKIT_CACHE" in line


def test_keep_with_an_unusable_data_dir(blocker: Path, tmp_path: Path) -> None:
    line = _qemukit("run", "--accel", "tcg", "--keep", "--name", "k1", "--", "true",
                    XDG_DATA_HOME=str(blocker), QEMUKIT_STATE=str(tmp_path / "state"))
    assert str(blocker / "qemukit") in line and "XDG_DATA_HOME" in line
