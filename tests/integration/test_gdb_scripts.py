"""gdb with the kernel's own scripts against a running guest: the suite's kernel built again
with debug info and CONFIG_GDB_SCRIPTS (the ``debug_kernel`` fixture), booted with --gdb, and
the printed gdb command run as printed, with the kernel's lx-ps and lx-dmesg. Slow tier: the
debug build takes many minutes on an empty cache (it is cached by its inputs, beside the
suite's kernel)."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_gdb_command_runs_the_kernels_lx_commands(qk: Any, debug_kernel: Path) -> None:
    tree = debug_kernel
    out = qk("run", "--detach", "--name", "lxgdb", "--kernel", str(tree), "--accel", "tcg",
             "--gdb", "--wait", "agent", timeout=600)
    assert out.returncode == 0, out.stderr
    try:
        m = re.search(r"gdb stub: (gdb .*)$", out.stderr, re.M)
        assert m, out.stderr
        argv = shlex.split(m.group(1))
        assert argv[1] == str(tree / "vmlinux")
        # The one script file is made safe, not the tree (it lives under ~/.cache/qemukit).
        assert ["-iex", f"add-auto-load-safe-path {tree / 'vmlinux-gdb.py'}"] == argv[2:4]
        gdb = subprocess.run([argv[0], "-batch", "-nx", *argv[1:], "-ex", "lx-ps", "-ex",
                              "lx-dmesg", "-ex", "detach"], capture_output=True, text=True,
                             timeout=600, check=False, stdin=subprocess.DEVNULL)
        both = gdb.stdout[-3000:] + gdb.stderr[-3000:]
        assert "Undefined command" not in gdb.stderr, both  # the scripts were auto-loaded
        # lx-ps: the task list, the guest's agent among it; lx-dmesg: the kernel log.
        assert re.search(r"^\s*0x[0-9a-f]+\s+1\s+\S+", gdb.stdout, re.M), both
        assert "qemukit-agent" in gdb.stdout or "init" in gdb.stdout, both
        assert "Linux version" in gdb.stdout, both
    finally:
        assert qk("stop", "lxgdb").returncode == 0
