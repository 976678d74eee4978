"""Fixtures shared by unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache directory of the test's own, as ``QEMUKIT_CACHE``."""
    root = tmp_path / "cache"
    root.mkdir()
    monkeypatch.setenv("QEMUKIT_CACHE", str(root))
    return root


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """What a warm key digests, as small distinct files: ``vmlinuz``, ``initrd``, ``qemu`` (the
    binary) and ``disk.raw`` (the warm-cache and warm-start tests' inputs)."""
    out = {}
    for name in ("vmlinuz", "initrd", "qemu", "disk.raw"):
        (tmp_path / name).write_bytes(name.encode() * 100)
        out[name] = tmp_path / name
    return out
