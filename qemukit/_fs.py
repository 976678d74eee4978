"""Small file-system helpers shared by the modules that keep state on disk."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["locked", "write_atomic"]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the block, blocking.

    flock locks belong to the open file, so threads of one process exclude each
    other as processes do. For waits that need a deadline or run on the event
    loop, see :func:`qemukit._aio.file_lock`.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never half.

    The temporary file is created 0600 next to ``path`` and renamed over it.
    """
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8"
    ) as fh:
        fh.write(text)
    os.replace(fh.name, path)
