"""Crash bundles without QEMU: the call trace taken from a real console, the directory's
name and mode, files never overwritten, the vmlinux found beside an image or in a tree."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from qemukit import crashdir
from qemukit.errors import HostError

SAMPLES = Path(__file__).parent / "console_samples"

# The tiny image's kernel on `echo c > /proc/sysrq-trigger` (Debian 6.1, q35, TCG).
SYSRQ = """\
[   14.121580] sysrq: Trigger a crash
[   14.127032] Kernel panic - not syncing: sysrq triggered crash
[   14.129282] CPU: 0 PID: 218 Comm: sh Not tainted 6.1.0-57-cloud-amd64 #1  Debian 6.1.192-3
[   14.140259] Call Trace:
[   14.140990]  <TASK>
[   14.141351]  dump_stack_lvl+0x44/0x5c
[   14.141702]  panic+0x118/0x2f4
[   14.142400]  sysrq_handle_crash+0x16/0x20
[   14.169160]  </TASK>
[   14.169633] Kernel Offset: 0x3400000 from 0xffffffff81000000
"""


def test_call_trace_from_the_report_line_to_the_task_end() -> None:
    trace = crashdir.call_trace("noise\nCall Trace:\n old\n</TASK>\n" + SYSRQ,
                                "Kernel panic - not syncing: sysrq triggered crash")
    assert trace[0] == "Call Trace:" and trace[-1] == " </TASK>"
    assert " sysrq_handle_crash+0x16/0x20" in trace and " old" not in trace
    assert crashdir.call_trace("no trace here\n") == []


def test_call_trace_is_bounded() -> None:
    console = "Call Trace:\n" + "".join(f" f{i}+0x1/0x2\n" for i in range(500))
    assert len(crashdir.call_trace(console)) == crashdir.TRACE_LINES


def test_new_bundle_is_private_and_never_reused(tmp_path: Path) -> None:
    first = crashdir.new_bundle(tmp_path / "c", "panic", "vm/../x y")
    second = crashdir.new_bundle(tmp_path / "c", "panic", "vm/../x y")
    assert first != second and first.parent == second.parent == tmp_path / "c"
    assert "/" not in first.name[len("20261207T000000Z-panic-"):] and "-panic-" in first.name
    assert stat.S_IMODE(first.stat().st_mode) == 0o700
    (tmp_path / "file").write_text("")
    with pytest.raises(HostError, match="cannot create a crash bundle"):
        crashdir.new_bundle(tmp_path / "file", "oops", "vm")


def test_write_bundle_never_overwrites_and_writes_strict_files(tmp_path: Path) -> None:
    bundle = crashdir.new_bundle(tmp_path, "panic", "vm")
    log = tmp_path / "console"
    log.write_text(SYSRQ)
    verdict = {"outcome": "panic", "panic": "Kernel panic - not syncing: sysrq triggered crash",
               "oops": None, "command": ["sh", "-c", "echo c > /proc/sysrq-trigger"]}
    identity = crashdir.kernel_identity(kernel=log, initrd=None, append="panic=0",
                                        arch="x86_64", release="6.1", config=None)
    crashdir.write_bundle(bundle, verdict=verdict, argv=["qemu-system-x86_64", "-m", "512"],
                          identity=identity, console_log=log)
    assert json.loads((bundle / "qemu-argv.json").read_text()) == ["qemu-system-x86_64", "-m",
                                                                    "512"]
    assert json.loads((bundle / "kernel.json").read_text())["image_sha256"] == identity[
        "image_sha256"] and len(identity["image_sha256"]) == 64
    triage = (bundle / "triage.txt").read_text()
    assert "sysrq_handle_crash" in triage and "no dump was taken" in triage
    with pytest.raises(HostError, match="cannot write the crash bundle"):
        crashdir.write_bundle(bundle, verdict=verdict, argv=[], identity=identity,
                              console_log=None)


def test_find_vmlinux_in_a_tree_and_beside_its_image(tmp_path: Path) -> None:
    boot = tmp_path / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    (boot / "bzImage").write_bytes(b"")
    assert crashdir.find_vmlinux(boot / "bzImage") is None
    (tmp_path / "vmlinux").write_bytes(b"")
    assert crashdir.find_vmlinux(boot / "bzImage") == tmp_path / "vmlinux"
    assert crashdir.find_vmlinux(tmp_path) == tmp_path / "vmlinux"
    assert crashdir.find_vmlinux(None) is None


def test_drgn_triage_says_why_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crashdir.importlib.util, "find_spec", lambda name: None)
    assert "drgn is not installed" in crashdir.drgn_triage(tmp_path / "core", None)
    monkeypatch.undo()
    (tmp_path / "core").write_bytes(b"not a core")
    assert crashdir.drgn_triage(tmp_path / "core", None).startswith("drgn could not read the dump")


def test_gdb_command_loads_the_kernels_scripts_when_built(tmp_path: Path) -> None:
    from qemukit.gdbscripts import gdb_argv

    boot = tmp_path / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    (boot / "bzImage").write_bytes(b"")
    assert gdb_argv(boot / "bzImage", "/s") == ["gdb", "vmlinux", "-ex", "target remote /s"]
    (tmp_path / "vmlinux").write_bytes(b"")
    assert gdb_argv(tmp_path, "/s") == ["gdb", str(tmp_path / "vmlinux"), "-ex",
                                        "target remote /s"]
    (tmp_path / "vmlinux-gdb.py").symlink_to(tmp_path / "scripts-gdb-vmlinux-gdb.py")
    (tmp_path / "scripts-gdb-vmlinux-gdb.py").write_text("")
    assert gdb_argv(boot / "bzImage", "h:1") == [
        "gdb", str(tmp_path / "vmlinux"), "-iex", f"add-auto-load-safe-path {tmp_path}",
        "-ex", "target remote h:1"]
