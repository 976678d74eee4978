"""The kernel-testing loop: run_kernel's verdicts, modules, shares and result files."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from qemukit import images
from qemukit.kernel import run_kernel

pytestmark = pytest.mark.integration


def test_command_result_and_boot_time(tiny_image: images.TinyImage, tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    result = run_kernel(tiny_image.kernel, ["sh", "-c", "uname -r; echo oops >&2; exit 3"],
                        accel="tcg", console_log=log)
    assert result.outcome == "failed" and result.exit_status == 3
    assert result.stdout.strip() == tiny_image.kernel_release
    assert result.stderr == "oops\n"
    assert result.boot_time is not None and 0 < result.boot_time < result.duration
    assert "qemukit-init: ready" in log.read_text()
    result.write_json(tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["outcome"] == "failed" and data["exit_status"] == 3
    assert data["console_log"] == str(log)
    result.write_junit(tmp_path / "r.xml")
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "1" and suite.get("errors") == "0"


def test_sysrq_crash_is_a_panic_within_seconds(tiny_image: images.TinyImage) -> None:
    result = run_kernel(tiny_image.kernel, "echo c > /proc/sysrq-trigger", accel="tcg")
    assert result.outcome == "panic"
    assert result.panic is not None and "Kernel panic" in result.panic
    assert result.boot_time is not None
    assert result.duration - result.boot_time < 10


def test_guest_that_never_gets_ready_times_out_with_console(tiny_image: images.TinyImage) -> None:
    # Long enough for a loaded host's TCG guest to reach its shell and print something.
    result = run_kernel(tiny_image.kernel, "true", append="rdinit=/bin/sh", timeout=60,
                        accel="tcg")
    assert result.outcome == "timeout"
    assert 60 <= result.duration < 120  # the deadline ended it: no hang past it
    assert "guest agent" in (result.error or "")
    assert result.console_tail.strip()


def test_missing_init_is_a_panic_not_a_timeout(tiny_image: images.TinyImage) -> None:
    result = run_kernel(tiny_image.kernel, "true", append="rdinit=/nonexistent", timeout=60,
                        accel="tcg")
    assert result.outcome == "panic"
    assert result.duration < 30


def test_modules_are_appended_to_the_initramfs(tiny_image: images.TinyImage,
                                               tmp_path: Path) -> None:
    release_dir = tmp_path / "lib" / "modules" / tiny_image.kernel_release
    (release_dir / "kernel" / "extra").mkdir(parents=True)
    (release_dir / "modules.dep").write_text("")
    (release_dir / "kernel" / "extra" / "marker.txt").write_text("from-the-host\n")
    result = run_kernel(
        tiny_image.kernel,
        ["cat", f"/lib/modules/{tiny_image.kernel_release}/kernel/extra/marker.txt"],
        modules=tmp_path, accel="tcg",
    )
    assert (result.outcome, result.stdout) == ("passed", "from-the-host\n")


def test_host_share_visible_and_writable(tiny_image: images.TinyImage, tmp_path: Path) -> None:
    share = tmp_path / "share, with comma"
    share.mkdir()
    (share / "input.txt").write_text("host-data\n")
    result = run_kernel(
        tiny_image.kernel,
        "cat /mnt/work/input.txt && echo guest-data > /mnt/work/output.txt",
        shares=[f"{share}:/mnt/work"], accel="tcg",
    )
    assert result.outcome == "passed", result.error
    assert result.stdout == "host-data\n"
    assert (share / "output.txt").read_text() == "guest-data\n"
