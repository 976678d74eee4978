"""Shared test setup: a private state directory and a leak check for the whole run.

Every test session gets its own ``QEMUKIT_STATE`` so runtime files are
counted exactly, and the session fails if any QEMU it started is still alive
at the end, or any runtime directory is left behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

_STATE = Path(tempfile.mkdtemp(prefix="qk-state-", dir="/tmp"))
os.environ["QEMUKIT_STATE"] = str(_STATE)


def qemu_processes_under(root: Path) -> list[psutil.Process]:
    """Live (non-zombie) QEMU processes whose command line mentions ``root``."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "qemu-system" in cmdline and str(root) in cmdline:
                found.append(proc)
        except psutil.Error:
            continue
    return found


QEMUKIT = shutil.which("qemukit", path=str(Path(sys.executable).parent)) or shutil.which("qemukit")


def run_qemukit(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the installed ``qemukit`` command as a user would, in a separate process."""
    assert QEMUKIT, "the qemukit console script is not installed (pip install -e .)"
    return subprocess.run([QEMUKIT, *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy(), stdin=subprocess.DEVNULL, check=False)


def qemu_gone(pid: int) -> bool:
    """True if ``pid`` has exited; a zombie counts (init reaps orphans only every ~1.5 s)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="session")
def state_root() -> Path:
    """The test session's private registry directory (``QEMUKIT_STATE``)."""
    return _STATE


@pytest.fixture(scope="session")
def tiny_image() -> Any:
    """The tiny image, built once if the cache does not have it yet."""
    from qemukit import images

    return images.build("tiny")


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
