"""The suite kernel's cache hands out only trees ``make`` can still use."""

from __future__ import annotations

from pathlib import Path

from tests.kernel_build import usable


def _entry(root: Path, source: Path) -> Path:
    out = root / "key"
    (out / "build").mkdir(parents=True)
    (out / "build" / "source").symlink_to(source)
    (out / ".qemukit-built").write_text("{}\n")
    return out


def _source(root: Path) -> Path:
    src = root / "src-1" / "linux-source-6.1"
    src.mkdir(parents=True)
    (src / "Makefile").write_text("")
    (src.parent / ".qemukit-extracted").write_text("")
    return src


def test_a_built_tree_whose_source_is_there_is_used(tmp_path: Path) -> None:
    assert usable(_entry(tmp_path, _source(tmp_path)))


def test_a_tree_whose_cache_was_moved_is_built_again(tmp_path: Path) -> None:
    # The tree names its source by absolute path; after the cache moved that path is gone.
    moved_away = tmp_path / "old-cache" / "src-1" / "linux-source-6.1"
    _source(tmp_path)
    assert not usable(_entry(tmp_path, moved_away))


def test_a_half_extracted_source_is_not_trusted(tmp_path: Path) -> None:
    src = _source(tmp_path)
    (src.parent / ".qemukit-extracted").unlink()
    assert not usable(_entry(tmp_path, src))


def test_an_unfinished_build_is_not_used(tmp_path: Path) -> None:
    out = _entry(tmp_path, _source(tmp_path))
    (out / ".qemukit-built").unlink()
    assert not usable(out)
