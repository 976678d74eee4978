"""Run the installed ``qemukit`` command as a separate process."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from qemukit import images
from tests.conftest import run_qemukit


@pytest.fixture
def qk(tiny_image: images.TinyImage) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``qk("run", "--image", "tiny", ...)`` runs the console script and captures output."""
    return run_qemukit
