"""gdb with the kernel's own scripts against a running guest: the suite's kernel built again
with debug info and CONFIG_GDB_SCRIPTS, booted with --gdb, and the printed gdb command run as
printed, with the kernel's lx-ps and lx-dmesg. Slow tier: the debug build takes many minutes
on an empty cache (it is cached by its inputs, beside the suite's kernel)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from qemukit._fs import locked
from qemukit.paths import cache_dir
from tests.kernel_build import BUILD_TIMEOUT, build_key, build_test_kernel

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: What the debug build turns on (scripts/config) over the suite kernel's .config.
DEBUG_OPTIONS = ["-e", "DEBUG_KERNEL", "-e", "DEBUG_INFO", "-d", "DEBUG_INFO_NONE", "-e",
                 "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT", "-e", "GDB_SCRIPTS", "-d",
                 "DEBUG_INFO_REDUCED", "-d", "DEBUG_INFO_BTF"]


def debug_kernel() -> Path:
    """The suite's kernel with debug info and the gdb scripts (a ``make O=`` tree), cached."""
    suite = build_test_kernel()
    root = cache_dir() / "kernels"
    key = "gdb-" + build_key()
    out = root / key
    with locked(root / f"{key}.lock"):
        if (out / ".qemukit-built").exists() and (out / "build" / "vmlinux-gdb.py").exists():
            return out / "build"
        shutil.rmtree(out, ignore_errors=True)
        build = out / "build"
        build.mkdir(parents=True, mode=0o700)
        shutil.copyfile(suite / ".config", build / ".config")
        src = (suite / "source").resolve()
        start = time.monotonic()
        for argv in ([str(src / "scripts" / "config"), "--file", str(build / ".config"),
                      *DEBUG_OPTIONS],
                     ["make", "-s", f"O={build}", "ARCH=x86_64", "olddefconfig"],
                     ["make", "-s", f"O={build}", "ARCH=x86_64", f"-j{os.cpu_count() or 1}",
                      "bzImage", "modules", "scripts_gdb"]):
            proc = subprocess.run(argv, cwd=src, capture_output=True, text=True,
                                  timeout=BUILD_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
            assert proc.returncode == 0, f"{argv}: {proc.stderr[-3000:]}"
        (out / ".qemukit-built").write_text(json.dumps(
            {"seconds": round(time.monotonic() - start, 1)}) + "\n")
        return build


def test_gdb_command_runs_the_kernels_lx_commands(qk: Any) -> None:
    tree = debug_kernel()
    out = qk("run", "--detach", "--name", "lxgdb", "--kernel", str(tree), "--accel", "tcg",
             "--gdb", "--wait", "agent", timeout=600)
    assert out.returncode == 0, out.stderr
    try:
        m = re.search(r"gdb stub: (gdb .*)$", out.stderr, re.M)
        assert m, out.stderr
        argv = shlex.split(m.group(1))
        assert argv[1] == str(tree / "vmlinux")
        assert ["-iex", f"add-auto-load-safe-path {tree}"] == argv[2:4]
        gdb = subprocess.run([argv[0], "-batch", "-nx", *argv[1:], "-ex", "lx-ps", "-ex",
                              "lx-dmesg", "-ex", "detach"], capture_output=True, text=True,
                             timeout=600, check=False, stdin=subprocess.DEVNULL)
        assert "qemukit-agent" in gdb.stdout or "init" in gdb.stdout, gdb.stdout + gdb.stderr
        assert "Linux version" in gdb.stdout, gdb.stdout[-3000:] + gdb.stderr[-3000:]
    finally:
        assert qk("stop", "lxgdb").returncode == 0
