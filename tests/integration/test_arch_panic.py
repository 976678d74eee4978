"""A kernel panic on each foreign architecture is reported as a panic, not a timeout.

After a panic QEMU exits 0 on these machines (``-no-reboot``), and only s390x
and pseries send GUEST_PANICKED: the console's ``Kernel panic`` line is what
qemukit goes by. One boot per architecture.
"""

from __future__ import annotations

import pytest

from qemukit import images
from qemukit.kernel import run_in_vm
from tests.helpers import FOREIGN_ARCHES

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("arch-panic")]


@pytest.mark.parametrize("arch", FOREIGN_ARCHES)
def test_sysrq_crash_is_a_panic(arch: str) -> None:
    images.build("tiny", arch=arch)
    result = run_in_vm(images.spec("tiny", arch=arch, accel="tcg"),
                       "echo c > /proc/sysrq-trigger", timeout=180)
    assert result.outcome == "panic", (result.outcome, result.error, result.console_tail)
    assert result.panic is not None and "sysrq triggered crash" in result.panic
    assert result.boot_time is not None and result.duration - result.boot_time < 30
