"""--modules handling: every failure is a QemukitError naming the path, before QEMU starts."""

from __future__ import annotations

import errno
import gzip
import os
from pathlib import Path

import pytest

from qemukit import HostError, SpecError, VMSpec
from qemukit.images import tiny
from qemukit.kconfig import append_modules as _with_modules
from qemukit.kernel import run_in_vm

RELEASE = "6.1.0-test"


@pytest.fixture
def initrd(tmp_path: Path) -> Path:
    path = tmp_path / "initrd.img"
    path.write_bytes(gzip.compress(b"070701" + b"0" * 100))
    return path


def release_dir(root: Path) -> Path:
    d = root / "mods" / "lib" / "modules" / RELEASE
    (d / "kernel").mkdir(parents=True)
    (d / "modules.dep").write_text("")
    (d / "kernel" / "a.ko").write_bytes(b"\x7fELF")
    return d


def test_good_tree_is_appended(tmp_path: Path, initrd: Path) -> None:
    release_dir(tmp_path)
    out = _with_modules(initrd, tmp_path / "mods", tmp_path / "work")
    assert out.read_bytes().startswith(initrd.read_bytes())
    assert out.stat().st_size > initrd.stat().st_size


def test_a_named_pipe_in_the_tree_is_a_spec_error(tmp_path: Path, initrd: Path) -> None:
    d = release_dir(tmp_path)
    os.mkfifo(d / "kernel" / "pipe")
    with pytest.raises(SpecError) as info:
        _with_modules(initrd, tmp_path / "mods", tmp_path / "work")
    assert info.value.field == "modules"
    assert str(d / "kernel" / "pipe") in str(info.value)
    assert "named pipe" in str(info.value)


def test_a_missing_directory_is_a_spec_error(tmp_path: Path, initrd: Path) -> None:
    with pytest.raises(SpecError, match="no such directory"):
        _with_modules(initrd, tmp_path / "nope", tmp_path / "work")
    (tmp_path / "file").write_text("")
    with pytest.raises(SpecError, match="no such directory"):
        _with_modules(initrd, tmp_path / "file", tmp_path / "work")


def test_a_tree_without_modules_is_a_spec_error(tmp_path: Path, initrd: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="modules.dep"):
        _with_modules(initrd, tmp_path / "empty", tmp_path / "work")


def test_an_unreadable_base_initrd_is_a_host_error(tmp_path: Path) -> None:
    release_dir(tmp_path)
    missing = tmp_path / "gone.img"
    with pytest.raises(HostError) as info:
        _with_modules(missing, tmp_path / "mods", tmp_path / "work")
    assert str(missing) in str(info.value) and str(tmp_path / "mods") in str(info.value)


def test_a_full_disk_while_appending_is_a_host_error(tmp_path: Path, initrd: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    release_dir(tmp_path)

    def full(base: Path, tree: Path, target: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    monkeypatch.setattr(tiny, "append_to_initrd", full)
    with pytest.raises(HostError) as info:
        _with_modules(initrd, tmp_path / "mods", tmp_path / "work")
    assert "No space left on device" in str(info.value) and str(initrd) in str(info.value)


def test_run_in_vm_raises_before_starting_anything(tmp_path: Path, initrd: Path) -> None:
    d = release_dir(tmp_path)
    os.mkfifo(d / "pipe")
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"not started")
    spec = VMSpec(kernel=str(kernel), initrd=str(initrd))
    with pytest.raises(SpecError) as info:
        run_in_vm(spec, "true", modules=tmp_path / "mods")
    assert str(d / "pipe") in str(info.value)
