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
