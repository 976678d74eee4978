"""Crash bundles without QEMU: the call trace taken from a real console, the directory's
name and mode, files never overwritten, the vmlinux found beside an image or in a tree."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from qemukit import crashdir
from qemukit.errors import HostError
from tests.helpers import RunInVMFake

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
    assert "-panic-" in first.name
    for bundle in (first, second):  # one directory directly under the given one, nowhere else
        assert ".." not in bundle.relative_to(tmp_path / "c").parts
        assert len(bundle.relative_to(tmp_path / "c").parts) == 1
        assert bundle.resolve().parent == (tmp_path / "c").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    assert sorted((tmp_path / "c").iterdir()) == sorted([first, second])
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
    assert crashdir.find_vmlinux(boot / "bzImage") is None  # no Kbuild/Makefile: not a tree
    (tmp_path / "Makefile").write_text("")
    assert crashdir.find_vmlinux(boot / "bzImage") == tmp_path / "vmlinux"
    assert crashdir.find_vmlinux(tmp_path) == tmp_path / "vmlinux"
    assert crashdir.find_vmlinux(None) is None


def _planted(root: Path) -> Path:
    """vmlinux and vmlinux-gdb.py as another local user would drop them in ``root``."""
    (root / "vmlinux").write_bytes(b"")
    (root / "vmlinux-gdb.py").write_text("import os; os.system('id > /tmp/owned')\n")
    return root


def _foreign(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` belong to someone else: chown it when root, else pretend to be another."""
    if os.geteuid() == 0:
        os.chown(path, 54321, 54321)
    else:
        monkeypatch.setattr("qemukit.crashdir.os.geteuid", lambda: 54321)


def test_gdb_never_trusts_a_vmlinux_three_levels_up_outside_a_tree(tmp_path: Path) -> None:
    """The attack: ``--kernel /tmp/x/y/z/bzImage``, another user drops /tmp/vmlinux and
    /tmp/vmlinux-gdb.py; the old lookup took parents[3] and made it an auto-load safe path."""
    from qemukit.gdbscripts import gdb_argv

    image = tmp_path / "x" / "y" / "z" / "bzImage"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"")
    _planted(tmp_path)
    assert crashdir.find_vmlinux(image) is None
    assert gdb_argv(image, "/s") == ["gdb", "vmlinux", "-ex", "target remote /s"]


def test_gdb_never_trusts_a_directory_others_can_write(tmp_path: Path) -> None:
    from qemukit.gdbscripts import gdb_argv

    tree = tmp_path / "tree"  # a real tree layout, then made writable by others
    boot = tree / "arch" / "x86" / "boot"
    tree.mkdir()
    _planted(tree)
    boot.mkdir(parents=True)
    (boot / "bzImage").write_bytes(b"")
    (tree / "Makefile").write_text("")
    assert gdb_argv(boot / "bzImage", "/s")[:2] == ["gdb", str(tree / "vmlinux")]
    for mode in (0o777, 0o1777, 0o775):
        tree.chmod(mode)
        assert crashdir.find_vmlinux(boot / "bzImage") is None, oct(mode)
        assert gdb_argv(boot / "bzImage", "/s") == ["gdb", "vmlinux", "-ex", "target remote /s"]
    tree.chmod(0o755)
    (tree / "vmlinux-gdb.py").chmod(0o666)  # the script itself writable by others
    assert gdb_argv(boot / "bzImage", "/s") == ["gdb", str(tree / "vmlinux"), "-ex",
                                                 "target remote /s"]


def test_gdb_never_trusts_files_another_user_owns(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit.gdbscripts import gdb_argv

    tree = tmp_path / "tree"
    tree.mkdir()
    _planted(tree)
    _foreign(tree / "vmlinux-gdb.py", monkeypatch)
    if os.geteuid() == 0:
        assert gdb_argv(tree, "/s") == ["gdb", str(tree / "vmlinux"), "-ex", "target remote /s"]
        _foreign(tree / "vmlinux", monkeypatch)
    assert gdb_argv(tree, "/s") == ["gdb", "vmlinux", "-ex", "target remote /s"]
    assert crashdir.find_vmlinux(tree) is None  # drgn triage gets no planted vmlinux either


def test_drgn_triage_says_why_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemukit.crashdir.importlib.util.find_spec", lambda name: None)
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
    (tmp_path / "Kbuild").write_text("")
    assert gdb_argv(tmp_path, "/s") == ["gdb", str(tmp_path / "vmlinux"), "-ex",
                                        "target remote /s"]
    (tmp_path / "vmlinux-gdb.py").symlink_to(tmp_path / "scripts-gdb-vmlinux-gdb.py")
    (tmp_path / "scripts-gdb-vmlinux-gdb.py").write_text("")
    assert gdb_argv(boot / "bzImage", "h:1") == [
        "gdb", str(tmp_path / "vmlinux"), "-iex",
        f"add-auto-load-safe-path {tmp_path / 'vmlinux-gdb.py'}",
        "-ex", "target remote h:1"]


class _PanickingVM(RunInVMFake):
    """A guest whose command panics the kernel (the sysrq crash's console)."""

    panics = True
    tail = SYSRQ


def _panicking_run(crash_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from qemukit import kernel
    from qemukit.kconfig import ResolvedKernel
    from qemukit.spec import VMSpec

    monkeypatch.setattr(kernel, "VM", _PanickingVM)
    spec = VMSpec(kernel="/nonexistent/bzImage")
    about = ResolvedKernel(spec=spec, tree=None, config=None, release="6.1")
    return kernel._run_resolved(spec, "echo c > /proc/sysrq-trigger", about, timeout=30,
                                console_log=None, modules=None, on_started=None,
                                on_starting=None, continue_on_oops=False, dump_on_panic=None,
                                crash_dir=crash_dir)


def test_a_crash_dir_that_cannot_be_made_keeps_the_panic_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    result = _panicking_run(tmp_path / "file" / "crashes", monkeypatch)
    assert result.outcome == "panic" and result.crash_bundle is None
    assert "sysrq triggered crash" in result.panic
    assert "no crash bundle: cannot create a crash bundle" in result.error


def test_a_full_disk_while_writing_the_bundle_keeps_the_panic_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(crashdir, "_write_new", disk_full)
    result = _panicking_run(tmp_path / "crashes", monkeypatch)
    assert result.outcome == "panic" and result.crash_bundle is not None
    assert "crash bundle incomplete: cannot write the crash bundle" in result.error
    assert "No space left on device" in result.error


def test_no_dump_without_room_for_the_guests_memory(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert crashdir.dump_space_note(tmp_path / "vmcore", 1) is None
    free = SimpleNamespace(f_bavail=100, f_frsize=1 << 20)  # 100 MiB free
    monkeypatch.setattr("qemukit.crashdir.os.statvfs", lambda path: free)
    note = crashdir.dump_space_note(tmp_path / "vmcore", 512)
    assert note is not None and note.startswith("no crash dump: 100 MiB free")


def test_triage_reads_only_the_end_of_a_huge_console(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(crashdir, "CONSOLE_READ_BYTES", 4096)
    log = tmp_path / "console"
    log.write_text("x" * 100_000 + "\n" + SYSRQ)
    assert crashdir._read_tail(log, 4096) == ("x" * 100_000 + "\n" + SYSRQ)[-4096:]
    bundle = crashdir.new_bundle(tmp_path / "c", "panic", "vm")
    verdict = {"outcome": "panic", "panic": "Kernel panic - not syncing: sysrq triggered crash",
               "oops": None, "command": ["sh"]}
    crashdir.write_bundle(bundle, verdict=verdict, argv=[], identity={}, console_log=log)
    assert "sysrq_handle_crash" in (bundle / "triage.txt").read_text()


def test_crash_command_adds_no_kmem_cache_for_a_slob_kernel(tmp_path: Path) -> None:
    # Debian 12's crash 8.0.2 stops on SLOB kernels ("invalid structure member offset:
    # kmem_cache_s_num") unless started with --no_kmem_cache; tinyconfig kernels use SLOB.
    slob, slub = tmp_path / "slob.config", tmp_path / "slub.config"
    slob.write_text("CONFIG_SLOB=y\nCONFIG_FW_CFG_SYSFS=y\n")
    slub.write_text("# CONFIG_SLOB is not set\nCONFIG_SLUB=y\n")
    assert crashdir.kernel_uses_slob(slob) is True
    assert crashdir.kernel_uses_slob(slub) is False
    assert crashdir.kernel_uses_slob(tmp_path / "missing") is None
    assert crashdir.crash_command("c.core", "/k/vmlinux", slob) == (
        "crash --no_kmem_cache /k/vmlinux c.core")
    assert crashdir.crash_command("c.core", "/k/vmlinux", slub) == "crash /k/vmlinux c.core"
    unknown = crashdir.crash_command("c.core")
    assert unknown.startswith("crash vmlinux c.core (") and "--no_kmem_cache" in unknown
    assert "CONFIG_SLOB=y" in unknown


def test_crash_command_reads_the_config_of_the_tree_an_image_was_built_in(
        tmp_path: Path) -> None:
    boot = tmp_path / "arch" / "x86" / "boot"
    boot.mkdir(parents=True)
    (tmp_path / "Makefile").write_text("")
    (boot / "bzImage").write_bytes(b"")
    (tmp_path / ".config").write_text("CONFIG_SLOB=y\n")
    assert crashdir.crash_command("v", "vmlinux", kernel=boot / "bzImage") == (
        "crash --no_kmem_cache vmlinux v")
    assert crashdir.crash_command("v", "vmlinux", kernel=tmp_path) == (
        "crash --no_kmem_cache vmlinux v")


def test_triage_gives_the_crash_command_for_the_bundles_kernel(tmp_path: Path) -> None:
    config = tmp_path / "config"
    config.write_text("CONFIG_SLOB=y\n")
    log = tmp_path / "console"
    log.write_text(SYSRQ)
    verdict = {"outcome": "panic", "panic": "Kernel panic - not syncing: sysrq triggered crash",
               "oops": None, "command": ["true"]}
    for cfg, want in ((config, "crash --no_kmem_cache vmlinux vmcore"),
                      (None, "crash vmlinux vmcore (add --no_kmem_cache if")):
        bundle = crashdir.new_bundle(tmp_path / "b", "panic", "vm")
        identity = crashdir.kernel_identity(kernel=None, initrd=None, append=None,
                                            arch="x86_64", release="6.1", config=cfg)
        crashdir.write_bundle(bundle, verdict=verdict, argv=[], identity=identity,
                              console_log=log)
        assert want in (bundle / "triage.txt").read_text()
