"""Where qemukit keeps things: the image cache and the runtime registry.

Both can be moved with an environment variable (``QEMUKIT_CACHE``,
``QEMUKIT_STATE``); when one cannot be written, :func:`state_dir_error` and
:func:`cache_dir_error` make the one-line error that says which directory,
why, and which variable moves it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import HostError, StateError

__all__ = ["cache_dir", "cache_dir_error", "state_dir", "state_dir_error"]


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


def _problem(kind: str, root: Path, exc: OSError, variable: str, fallback: tuple[str, ...]) -> str:
    reason = "exists and is not a directory" if isinstance(exc, FileExistsError) else (
        exc.strerror or str(exc))
    where = str(root)
    if exc.filename is not None and os.fsdecode(exc.filename) != str(root):
        reason = f"{os.fsdecode(exc.filename)}: {reason}"
    if os.environ.get(variable):
        origin = f"from {variable}"
    else:
        chosen = next((v for v in fallback if os.environ.get(v)), None)
        origin = f"the default under ${chosen}" if chosen else "the default under your home"
    return (f"cannot use qemukit's {kind} directory {where} ({origin}): {reason}; "
            f"set {variable} to a directory you can write")


def state_dir_error(root: Path, exc: OSError) -> StateError:
    """The error for a state directory (or a file in it) that cannot be created or written."""
    return StateError(_problem("state", root, exc, "QEMUKIT_STATE", ("XDG_RUNTIME_DIR",)))


def cache_dir_error(root: Path, exc: OSError) -> HostError:
    """The error for a cache directory (or a file in it) that cannot be created or written."""
    return HostError(_problem("cache", root, exc, "QEMUKIT_CACHE", ("XDG_CACHE_HOME",)))
