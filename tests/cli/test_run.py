"""``qemukit run``: the kernel-testing loop as a user runs it from a shell."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qemukit import images

pytestmark = pytest.mark.integration
TCG = ("--image", "tiny", "--accel", "tcg")


def test_run_prints_guest_output_and_exits_0(qk: Any, tiny_image: images.TinyImage) -> None:
    out = qk("run", *TCG, "--", "uname", "-r")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == tiny_image.kernel_release


def test_run_propagates_exit_code(qk: Any) -> None:
    out = qk("run", *TCG, "--", "sh", "-c", "echo to-stderr >&2; exit 7")
    assert out.returncode == 7
    assert "to-stderr" in out.stderr


def test_run_json_result(qk: Any) -> None:
    out = qk("run", *TCG, "--json", "--", "sh", "-c", "echo hi; exit 3")
    assert out.returncode == 3
    data = json.loads(out.stdout)
    assert data["exit_status"] == 3 and data["stdout"] == "hi\n"
    assert data["accel"] == "tcg" and data["boot_time"] > 0


def test_run_panic_exits_255_with_panic_line(qk: Any) -> None:
    out = qk("run", *TCG, "--", "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert out.returncode == 255
    assert "Kernel panic" in out.stderr


def test_run_boot_timeout_exits_124_with_console_tail(qk: Any) -> None:
    out = qk("run", *TCG, "--append", "console=ttyS0 rdinit=/bin/sh", "--timeout", "10",
             "--", "true")
    assert out.returncode == 124
    assert "timed out" in out.stderr and "--- console ---" in out.stderr


def test_run_bad_option_exits_125_naming_the_field(qk: Any) -> None:
    out = qk("run", *TCG, "--memory", "lots", "--", "true")
    assert out.returncode == 125
    assert "memory" in out.stderr and "lots" in out.stderr


def test_run_from_toml_file(qk: Any, tmp_path: Any) -> None:
    spec = images.spec("tiny", accel="tcg", cpus=2)
    path = tmp_path / "vm.toml"
    spec.dump(path)
    out = qk("run", "-f", str(path), "--", "nproc")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "2"


def test_accelerator_negotiation_is_honest(qk: Any) -> None:
    """doctor's probe verdict decides: --accel kvm boots where KVM really works and is a
    clear error naming the reason where it does not; auto falls back to TCG and says so."""
    report = json.loads(qk("doctor", "--json").stdout)
    kvm = report["kvm"]
    assert report["accel_auto"] == ("kvm" if kvm.get("usable") else "tcg")
    forced = qk("run", "--image", "tiny", "--accel", "kvm", "--timeout", "60", "--", "true")
    auto = qk("run", "--image", "tiny", "--timeout", "120", "--", "true")
    assert auto.returncode == 0, auto.stderr
    if kvm.get("usable"):
        assert forced.returncode == 0, forced.stderr
        assert "KVM" in auto.stderr
    else:
        assert forced.returncode == 125
        assert "accelerator 'kvm' is not usable" in forced.stderr
        assert kvm["reason"] in forced.stderr
        # One short line by default; the probe's whole reason with -v (and in doctor).
        (line,) = [ln for ln in auto.stderr.splitlines() if ": TCG: " in ln]
        assert line.endswith("(qemukit doctor)") and len(line) < 100, line
        assert kvm["reason"] not in auto.stderr
        verbose = qk("run", "-v", "--image", "tiny", "--timeout", "120", "--", "true")
        assert verbose.returncode == 0, verbose.stderr
        assert "TCG (software emulation)" in verbose.stderr and kvm["reason"] in verbose.stderr
