"""The gdb command line for a guest's gdb stub, with the kernel's own gdb scripts when built.

A kernel tree built with ``CONFIG_GDB_SCRIPTS`` has ``vmlinux-gdb.py`` beside
its ``vmlinux`` (``make scripts_gdb``): gdb loads it by itself when that
directory is an auto-load safe path, and then knows the kernel's ``lx-*``
commands (``lx-dmesg``, ``lx-ps``, ``lx-symbols``...). :func:`gdb_argv` says so
with ``-iex 'add-auto-load-safe-path TREE'``, which acts before gdb reads the
file, so no ``~/.gdbinit`` change is needed.
"""

from __future__ import annotations

import os
from pathlib import Path

from .crashdir import find_vmlinux

__all__ = ["gdb_argv", "gdb_scripts"]


def gdb_scripts(vmlinux: str | os.PathLike[str] | None) -> Path | None:
    """The kernel's ``vmlinux-gdb.py`` beside ``vmlinux``, if it was built (CONFIG_GDB_SCRIPTS)."""
    if vmlinux is None:
        return None
    script = Path(vmlinux).parent / "vmlinux-gdb.py"
    return script if script.exists() else None


def gdb_argv(kernel: str | os.PathLike[str] | None, address: str) -> list[str]:
    """gdb's argv for a stub at ``address`` (a socket path or HOST:PORT).

    With the kernel's vmlinux when it is found (a tree, or beside the image),
    else the word ``vmlinux`` for the user to replace; with the tree's gdb
    scripts loaded when it has them.
    """
    vmlinux = find_vmlinux(os.fspath(kernel) if kernel is not None else None)
    argv = ["gdb", str(vmlinux) if vmlinux is not None else "vmlinux"]
    script = gdb_scripts(vmlinux)
    if script is not None:
        argv += ["-iex", f"add-auto-load-safe-path {script.parent}"]
    return [*argv, "-ex", f"target remote {address}"]
