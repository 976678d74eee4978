"""Small file-system helpers shared by the modules that keep state on disk."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so readers see the old or the new file, never half.

    The temporary file is created 0600 next to ``path`` and renamed over it.
    """
    with tempfile.NamedTemporaryFile(
        "w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8"
    ) as fh:
        fh.write(text)
    os.replace(fh.name, path)
