"""A real panic's dump read WITH the kernel's debug info: the suite's kernel built with DWARF
(the ``debug_kernel`` fixture, shared with test_gdb_scripts.py) panics by sysrq under
``--crash-dir``; drgn with its vmlinux finds the panicking task's stack in the dump, the
bundle's triage.txt carries that stack and the kernel log as drgn read them from the dump, and
Debian's ``crash`` opens the same dump and prints the stack. Slow tier (the debug build)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_qemukit

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PANIC = ("sh", "-c", "echo c > /proc/sysrq-trigger")


@pytest.fixture(scope="module")
def bundle(debug_kernel: Path, tiny_image: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The crash bundle of one sysrq panic of the debug kernel (its dump: ``vmcore``)."""
    crashes = tmp_path_factory.mktemp("debug-crashes")
    out = run_qemukit("run", "--kernel", str(debug_kernel), "--accel", "tcg", "--crash-dir",
                      str(crashes), "--", *PANIC, timeout=900)
    assert out.returncode == 255, out.stderr
    (found,) = list(crashes.iterdir())
    verdict = json.loads((found / "verdict.json").read_text())
    assert verdict["outcome"] == "panic" and "sysrq triggered crash" in verdict["panic"]
    kernel = json.loads((found / "kernel.json").read_text())
    assert kernel["vmlinux"] == str(debug_kernel / "vmlinux")  # found in the tree, trusted
    # The hint names crash's flag for SLOB: the tree's .config says CONFIG_SLOB=y.
    assert f"crash --no_kmem_cache {debug_kernel / 'vmlinux'} " in out.stderr, out.stderr[-3000:]
    return found


def test_drgn_with_the_vmlinux_reads_the_panicking_stack(bundle: Path,
                                                         debug_kernel: Path) -> None:
    import drgn
    from drgn.helpers.linux.printk import get_dmesg

    prog = drgn.Program()
    prog.set_core_dump(str(bundle / "vmcore"))
    prog.load_debug_info([str(debug_kernel / "vmlinux")])
    thread = prog.crashed_thread()
    assert thread.object.comm.string_() == b"sh"  # the shell that wrote to sysrq-trigger
    frames = [frame.name for frame in thread.stack_trace()]
    assert "sysrq_handle_crash" in frames, frames
    assert "panic" in frames and frames.index("panic") < frames.index("sysrq_handle_crash")
    assert b"sysrq triggered crash" in get_dmesg(prog)


def test_triage_holds_the_stack_and_dmesg_read_from_the_dump(bundle: Path) -> None:
    triage = (bundle / "triage.txt").read_text()
    # Only the part drgn read from the dump counts (the console's trace is above it).
    from_dump = triage.split("--- from the dump (drgn) ---", 1)[1]
    assert "crashed task: pid" in from_dump and " sh" in from_dump, from_dump[:3000]
    stack, dmesg = from_dump.split("--- dmesg (from the dump) ---", 1)
    assert "sysrq_handle_crash" in stack, from_dump[:3000]
    assert "Linux version" in dmesg and "sysrq triggered crash" in dmesg, dmesg[-3000:]


def test_crash_opens_the_dump_and_shows_the_stack(bundle: Path, debug_kernel: Path) -> None:
    crash = shutil.which("crash")
    if crash is None:
        pytest.skip("Debian's crash is not installed (apt-get install crash; scripts/setup --test)")
    # The command triage.txt gives, as given: crash 8.0.2 knows SLAB and SLUB, and the suite's
    # tinyconfig kernel has SLOB, so it must carry --no_kmem_cache (without it crash stops at
    # "invalid structure member offset: kmem_cache_s_num").
    triage = (bundle / "triage.txt").read_text()
    command = shlex.split(triage.split("Open the dump: ", 1)[1].splitlines()[0].split("; ")[1])
    assert command == ["crash", "--no_kmem_cache", str(debug_kernel / "vmlinux"), "vmcore"]
    proc = subprocess.run([crash, "-s", *command[1:]], input="bt\nlog\nquit\n", cwd=bundle,
                          capture_output=True, text=True, timeout=600, check=False)
    both = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, both
    bt = proc.stdout.split('COMMAND: "sh"', 1)[1]  # bt's header: the panicking task
    # panic() is sysrq_handle_crash's last call (noreturn), so its return address is the first
    # byte after sysrq_handle_crash and crash names the next function there; the frames below
    # it are the write to /proc/sysrq-trigger.
    frames = re.findall(r"^ #\d+ \[[0-9a-f]+\] (\w+) at ", bt, re.M)
    assert frames[0] == "panic", both
    assert {"__handle_sysrq", "write_sysrq_trigger", "ksys_write"} <= set(frames), both
    assert "sysrq triggered crash" in bt, both  # `log`: the kernel log from the dump
