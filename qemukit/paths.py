"""Where qemukit keeps things: the image cache and the runtime registry."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "state_dir"]


def cache_dir() -> Path:
    """Built images and probe results: ``$QEMUKIT_CACHE``, else ``~/.cache/qemukit``."""
    env = os.environ.get("QEMUKIT_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qemukit"


def state_dir() -> Path:
    """Per-VM runtime directories: ``$QEMUKIT_STATE``, else ``$XDG_RUNTIME_DIR/qemukit``,
    else ``~/.local/state/qemukit``."""
    env = os.environ.get("QEMUKIT_STATE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "qemukit"
    return Path.home() / ".local" / "state" / "qemukit"
