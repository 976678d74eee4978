"""Run the installed ``qemukit`` command as a separate process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qemukit import images

QEMUKIT = shutil.which("qemukit", path=str(Path(sys.executable).parent)) or shutil.which("qemukit")


@pytest.fixture(scope="session")
def tiny_image() -> images.TinyImage:
    """The tiny image, built once if missing."""
    return images.build("tiny")


@pytest.fixture
def qk(tiny_image: images.TinyImage) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``qk("run", "--image", "tiny", ...)`` runs the console script and captures output."""
    assert QEMUKIT, "the qemukit console script is not installed (pip install -e .)"

    def run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [QEMUKIT, *args], capture_output=True, text=True, timeout=timeout,
            env=os.environ.copy(), stdin=subprocess.DEVNULL, check=False,
        )

    return run
