"""The debugging tools' reports in real runs: a kind, the tool and the report's first lines in
the result; KASAN ends the run like an oops, a hung task is a warning.

Debian's cloud kernel has no KASAN: its report is written to /dev/kmsg line by line at the
kernel's error level, in the format of mm/kasan/report.c (the way test_verdicts.py writes an
oops). The hung task is real: a writer blocked on a frozen file system.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qemukit import Drive, images
from qemukit.kernel import run_kernel

pytestmark = pytest.mark.integration

KASAN = [
    "==================================================================",
    "BUG: KASAN: slab-out-of-bounds in kmalloc_oob_right+0x9c/0x1c0 [test_mod]",
    "Write of size 1 at addr ffff888104a3b073 by task insmod/231",
    "Allocated by task 231:",
    " __kasan_kmalloc+0x7f/0x90",
    "The buggy address belongs to the object at ffff888104a3b000",
    "==================================================================",
]


def kmsg_lines(lines: list[str], level: int = 3) -> str:
    """Shell code printing each line as one kernel message of ``level``."""
    return "; ".join(f"echo '<{level}>{line}' > /dev/kmsg" for line in lines)


def test_kasan_ends_the_run_as_an_oops_with_the_report(tiny_image: images.TinyImage) -> None:
    result = run_kernel(tiny_image.kernel, f"{kmsg_lines(KASAN)}; sleep 300; echo never",
                        accel="tcg")
    assert result.outcome == "oops", result.error
    assert result.oops == KASAN[1] and "never" not in result.stdout
    (report,) = result.reports
    assert report["kind"] == "oops" and report["report"] == "kasan" and report["line"] == KASAN[1]
    assert report["lines"] == [line.strip() for line in KASAN[1:-1]]
    assert result.to_dict()["reports"] == [report]


def test_continue_on_oops_runs_past_kasan(tiny_image: images.TinyImage) -> None:
    result = run_kernel(tiny_image.kernel, f"{kmsg_lines(KASAN)}; echo after", accel="tcg",
                        continue_on_oops=True)
    assert (result.outcome, result.stdout) == ("passed", "after\n"), result.error
    assert result.warnings == (KASAN[1],)
    assert [r["report"] for r in result.reports] == ["kasan"]


def test_a_real_hung_task_is_a_warning_report(tiny_image: images.TinyImage, tmp_path: Path) -> None:
    disk = tmp_path / "d.img"
    with open(disk, "wb") as fh:
        fh.truncate(64 << 20)
    script = (
        "mke2fs -q /dev/vda >/dev/null && mkdir -p /mnt/d && mount /dev/vda /mnt/d"
        " && echo 5 > /proc/sys/kernel/hung_task_timeout_secs"
        " && fsfreeze --freeze /mnt/d && { echo x > /mnt/d/f & }"
        # Bounded: khungtaskd looks every 5 s; a loaded host may run it late.
        " && for i in $(seq 240); do dmesg | grep -q 'blocked for more than' && break; sleep 1;"
        " done; fsfreeze --unfreeze /mnt/d; wait; cat /mnt/d/f")
    result = run_kernel(tiny_image.kernel, script, accel="tcg",
                        drives=(Drive(disk, format="raw"),))
    assert (result.outcome, result.stdout) == ("passed", "x\n"), (result.error, result.stderr)
    hung = [r for r in result.reports if r["report"] == "hung_task"]
    assert hung and hung[0]["kind"] == "warning"
    assert hung[0]["line"].startswith("INFO: task sh:") and "blocked for more than" in hung[0]["line"]
    assert hung[0]["lines"][1].startswith("Not tainted " + tiny_image.kernel_release)
    assert hung[0]["line"] in result.warnings
