"""QEMU dying during launch: qemukit's LaunchError says what happened, and qemu.qmp's
"This is a bug in the QMP library" never reaches an application's log output."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

pytestmark = pytest.mark.integration

LAUNCHES = """
from qemukit import VM, LaunchError, images
for i in range({n}):
    try:
        VM(images.spec("tiny", accel="tcg", extra_args=("-nonexistent-option",))).start()
    except LaunchError as exc:
        assert "-nonexistent-option: invalid option" in str(exc), exc
        print("LaunchError")
    else:
        raise AssertionError("QEMU started with a bad option")
"""


def _run(setup: str, n: int, tiny_image: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-c", setup + LAUNCHES.format(n=n)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["LaunchError"] * n
    return proc


def test_launch_failures_log_no_qmp_bug_where_warnings_show(tiny_image: Any) -> None:
    # QEMU exits while the connect is cancelled: qemu.qmp then logs CRITICAL "bug in the
    # QMP library" (most launches here did before). An application showing warnings
    # (basicConfig, pytest's log capture) must not be told so.
    proc = _run("import logging\nlogging.basicConfig()\n", 8, tiny_image)
    assert "bug in the QMP library" not in proc.stderr
    assert "Failed to establish" not in proc.stderr
    assert proc.stderr == ""


def test_the_records_are_there_under_qemukit_when_asked_for(tiny_image: Any) -> None:
    proc = _run("import logging\n"
                "logging.basicConfig(format='%(levelname)s %(name)s %(message)s')\n"
                "logging.getLogger('qemukit').setLevel(logging.DEBUG)\n", 2, tiny_image)
    lines = proc.stderr.splitlines()
    assert any(line.startswith("DEBUG qemukit.qmp qemukit-vm-") and "Failed to" in line
               for line in lines), proc.stderr
    assert not [line for line in lines if " qemu.qmp" in line and not line.startswith("DEBUG")]
