"""Shared test setup: a private state directory and a leak check for the whole run.

Every test session gets its own ``QEMUKIT_STATE`` so runtime files are
counted exactly, and the session fails if any QEMU it started is still alive
at the end, or any runtime directory is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import qemu_processes_under, run_qemukit

pytest_plugins = ["tests.suite_times"]

_STATE = Path(tempfile.mkdtemp(prefix="qk-state-", dir="/tmp"))
os.environ["QEMUKIT_STATE"] = str(_STATE)


@pytest.fixture(scope="session")
def state_root() -> Path:
    """The test session's private registry directory (``QEMUKIT_STATE``)."""
    return _STATE


@pytest.fixture(scope="session")
def tiny_image() -> Any:
    """The tiny image, built once if the cache does not have it yet."""
    from qemukit import images

    return images.build("tiny")


@pytest.fixture
def qk(tiny_image: Any) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``qk("run", "--image", "tiny", ...)`` runs the installed command (the tiny image built)."""
    return run_qemukit


@pytest.fixture(scope="session", autouse=True)
def _no_leaks_at_end(state_root: Path) -> Iterator[None]:
    yield
    leftovers = qemu_processes_under(state_root)
    entries = list(state_root.iterdir()) if state_root.exists() else []
    for proc in leftovers:
        proc.kill()
    shutil.rmtree(state_root, ignore_errors=True)
    assert not leftovers, f"QEMU processes left running: {[p.pid for p in leftovers]}"
    assert not entries, f"runtime entries left behind: {[e.name for e in entries]}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/integration boots QEMU: mark it, so ``-m "not integration"`` (the
    quick tier) can never pick up a guest-booting test that forgot its module mark."""
    for item in items:
        if "integration" in item.path.parts[-3:-1]:
            item.add_marker(pytest.mark.integration)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the state directory where no test ran (the controller process under ``-n``)."""
    try:
        _STATE.rmdir()
    except OSError:
        pass  # not empty: _no_leaks_at_end already failed the run, or it is gone already
