"""Crash bundles: one directory per kernel panic or oops, with everything needed to diagnose it.

``qemukit run --crash-dir DIR`` (:func:`qemukit.kernel.run_in_vm`'s ``crash_dir``,
the matrix's ``crash_dir``, the pytest plugin's ``--qemukit-crash-dir``) makes,
when the guest kernel panics or oopses, a new directory under ``DIR`` named
``<UTC time>-<outcome>-<VM name>`` (mode 0700: it holds the guest's memory) with:

``verdict.json``
    the run's result as ``--json`` writes it (its ``crash_bundle`` names this directory).
``console.log``
    the guest's whole serial console.
``vmcore``
    the guest's memory as an ELF core (drgn, crash), dumped while the kernel
    waited after its panic (``panic=0``), or after the oops; absent when it
    could not be taken (``triage.txt`` says why) or ``--dump-on-panic`` put it
    elsewhere (``kernel.json``'s ``dump`` names it).
``kernel.json``
    the kernel's identity: release, architecture, image path and SHA-256,
    config path and SHA-256, initrd SHA-256, the kernel command line.
``qemu-argv.json``
    the exact argv QEMU was started with (a JSON list).
``triage.txt``
    a short text to read first: the panic or oops line, the call trace from
    the console, and, when drgn is installed, what it reads from the dump: the
    kernel's release (no vmlinux needed) and, with a vmlinux carrying debug
    info, the kernel log and the crashing task's stack.

Everything is written into a directory this module creates (never into an
existing one), with files created exclusively: a bundle is never overwritten.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import HostError, QemukitError
from .kconfig import ResolvedKernel, bzimage_release
from .results import Outcome
from .spec import VMSpec
from .vm import VM, VMState

__all__ = ["BUNDLE_FILES", "bundle_from_vm", "call_trace", "crash_command", "drgn_triage",
           "find_vmlinux", "finish_run_bundle", "kernel_identity", "kernel_uses_slob",
           "new_bundle", "write_bundle"]

#: The files a crash bundle holds (``vmcore`` only when the dump could be taken).
BUNDLE_FILES = ("verdict.json", "console.log", "vmcore", "kernel.json", "qemu-argv.json",
                "triage.txt")
#: Seconds drgn may take to read a dump (it maps the file; reading debug info is the slow part).
DRGN_TIMEOUT = 300.0
#: Lines of the call trace kept in triage.txt.
TRACE_LINES = 64
#: The console log's end that triage reads (a guest can write without end).
CONSOLE_READ_BYTES = 8 << 20
#: Free space a dump must leave beyond the guest's memory size.
DUMP_MARGIN_BYTES = 256 << 20

_STAMP = re.compile(r"^\[\s*\d+\.\d+\](?:\[\s*[CT]\d+\])? ?")
_TRACE_START = re.compile(r"\b(?:Call Trace|Call trace|Backtrace):")
_TRACE_END = re.compile(r"</TASK>|---\[ end |^\s*Code: |Kernel panic - not syncing|^\s*Modules linked in")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def new_bundle(parent: str | Path, outcome: str, name: str) -> Path:
    """Create the new, empty crash bundle directory under ``parent`` (created if missing).

    Named ``<UTC time>-<outcome>-<name>`` (``-2``, ``-3``... when taken), mode 0700.
    Raises :class:`HostError` when it cannot be created.
    """
    root = Path(parent)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = f"{stamp}-{outcome}-{_UNSAFE.sub('_', name)[:80]}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for n in range(1, 1000):
            path = root / (base if n == 1 else f"{base}-{n}")
            try:
                path.mkdir(mode=0o700)
                return path
            except FileExistsError:
                continue
    except OSError as exc:
        raise HostError(f"cannot create a crash bundle in {root}: {exc.strerror or exc}") from exc
    raise HostError(f"cannot create a crash bundle in {root}: {base} and 998 more are taken")


def dump_space_note(path: str | Path, memory_mib: int) -> str | None:
    """None when the file system of ``path`` (a dump to be) has room for a guest of
    ``memory_mib`` MiB plus :data:`DUMP_MARGIN_BYTES`, else the note saying why no dump.

    A guest decides when it panics or oopses, so without this a guest could fill
    the host's disk with one full memory dump per run.
    """
    need = (memory_mib << 20) + DUMP_MARGIN_BYTES
    try:
        st = os.statvfs(Path(path).parent)
    except OSError as exc:
        return f"no crash dump: cannot check the free space for {path}: {exc.strerror or exc}"
    free = st.f_bavail * st.f_frsize
    if free < need:
        return (f"no crash dump: {free >> 20} MiB free for {path}, it needs {need >> 20} MiB "
                f"(guest memory {memory_mib} MiB plus {DUMP_MARGIN_BYTES >> 20} MiB)")
    return None


def spec_memory_mib(spec: VMSpec) -> int:
    """The most memory ``spec``'s guest can have, in MiB (hotplug included): a dump's size."""
    return max(spec.memory, spec.max_memory or 0)


def _read_tail(path: Path, limit: int = CONSOLE_READ_BYTES) -> str:
    """The last ``limit`` bytes of ``path`` as text (never the whole of a huge file)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        return f.read(limit).decode("utf-8", errors="replace")


def _sha256(path: str | Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def trusted_path(path: str | Path) -> bool:
    """True when no other local user can have put ``path`` there or changed it.

    ``path`` (through its symlinks) and every directory above it must be owned
    by this user or root and writable by neither group nor others; a sticky
    directory above (``/tmp``) is allowed, since others cannot rename what is
    ours in it. Code that gdb or drgn would run or read on the user's behalf
    comes only from trusted paths.
    """
    me = os.geteuid()
    p = Path(os.path.abspath(path))
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    chains = [[p, *p.parents], [real, *real.parents]]
    for chain in chains:
        for i, item in enumerate(chain):
            try:
                st = item.stat()
            except OSError:
                return False
            if st.st_uid not in (me, 0):
                return False
            if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                sticky_above = i > 1 and stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
                if not sticky_above:
                    return False
    return True


def _kernel_tree_of(image: Path) -> Path | None:
    """The tree an image was built in: ``<tree>/arch/<arch>/boot/<image>`` with a Kbuild or
    Makefile at ``<tree>``; None for an image anywhere else."""
    parents = image.parents
    if len(parents) <= 3 or parents[0].name != "boot" or parents[2].name != "arch":
        return None
    tree = parents[3]
    return tree if (tree / "Kbuild").is_file() or (tree / "Makefile").is_file() else None


def find_vmlinux(kernel: str | Path | None) -> Path | None:
    """The ``vmlinux`` of a kernel tree, or beside a kernel image (``arch/*/boot/`` of a
    tree with its Kbuild or Makefile, or the image's own directory); None when there is
    none, or when the one found is not :func:`trusted_path` (another user could have
    planted it: gdb and drgn read it, gdb runs the scripts beside it)."""
    if kernel is None:
        return None
    start = Path(os.path.abspath(kernel))
    candidates = [start / "vmlinux"] if start.is_dir() else [start.parent / "vmlinux"]
    tree = None if start.is_dir() else _kernel_tree_of(start)
    if tree is not None:
        candidates.append(tree / "vmlinux")
    return next((c for c in candidates if c.is_file() and trusted_path(c)), None)


def kernel_identity(*, kernel: str | Path | None, initrd: str | Path | None,
                    append: str | None, arch: str, release: str | None,
                    config: str | Path | None, dump: str | Path | None = None,
                    vmlinux: str | Path | None = None) -> dict[str, Any]:
    """The kernel's identity as ``kernel.json`` holds it (digests of the files as they are now)."""
    return {
        "release": release, "arch": arch,
        "image": str(kernel) if kernel is not None else None, "image_sha256": _sha256(kernel),
        "config": str(config) if config is not None else None, "config_sha256": _sha256(config),
        "initrd": str(initrd) if initrd is not None else None, "initrd_sha256": _sha256(initrd),
        "cmdline": append, "vmlinux": str(vmlinux) if vmlinux is not None else None,
        "dump": str(dump) if dump is not None else None,
    }


#: What to say when it is not known whether the kernel uses SLOB.
SLOB_NOTE = ("add --no_kmem_cache if the kernel uses SLOB (CONFIG_SLOB=y, as tinyconfig "
             "kernels do): crash 8.0 cannot read SLOB's caches")


def kernel_uses_slob(config: str | Path | None) -> bool | None:
    """Whether the kernel config file ``config`` says ``CONFIG_SLOB=y`` (None: not known)."""
    if config is None:
        return None
    try:
        with open(config, encoding="utf-8", errors="replace") as fh:
            return any(line.strip() == "CONFIG_SLOB=y" for line in fh)
    except OSError:
        return None


def _tree_config(kernel: str | Path | None) -> Path | None:
    """The ``.config`` of the tree a kernel (a tree, or an image built in one) comes from."""
    if kernel is None:
        return None
    start = Path(os.path.abspath(kernel))
    tree = start if start.is_dir() else _kernel_tree_of(start)
    config = tree / ".config" if tree is not None else None
    return config if config is not None and config.is_file() else None


def crash_command(dump: str | Path, vmlinux: str | Path | None = None,
                  config: str | Path | None = None, *, kernel: str | Path | None = None) -> str:
    """The ``crash`` command line that opens ``dump``, for the kernel whose config is ``config``.

    crash 8.0 (Debian 12's) stops at ``invalid structure member offset:
    kmem_cache_s_num`` on a SLOB kernel unless started with ``--no_kmem_cache``:
    the flag is in the command when the config says ``CONFIG_SLOB=y``; when
    the config is not known the command is followed by when to add it.
    Without ``config``, that of the tree ``kernel`` (a tree, or an image in
    its ``arch/*/boot/``) was built in is read.
    """
    slob = kernel_uses_slob(config if config is not None else _tree_config(kernel))
    flag = "--no_kmem_cache " if slob else ""
    command = f"crash {flag}{vmlinux if vmlinux is not None else 'vmlinux'} {dump}"
    return command if slob is not None else f"{command} ({SLOB_NOTE})"


def call_trace(console: str, line: str | None = None) -> list[str]:
    """The first call trace on ``console`` at or after the report ``line`` (printk stamps removed).

    From its ``Call Trace:`` line to ``</TASK>``, the end-of-trace rule, the
    ``Code:`` line or the panic line; at most :data:`TRACE_LINES` lines. Empty
    when the console shows none.
    """
    lines = [_STAMP.sub("", raw, count=1).rstrip() for raw in console.replace("\r", "").splitlines()]
    start = 0
    if line:
        start = next((i for i, text in enumerate(lines) if line in text), 0)
    for i in range(start, len(lines)):
        if _TRACE_START.search(lines[i]):
            out = [lines[i]]
            for text in lines[i + 1:]:
                out.append(text)
                if _TRACE_END.search(text) or len(out) >= TRACE_LINES:
                    break
            return out
    return []


_DRGN_SCRIPT = r"""
import sys, drgn
core, vmlinux = sys.argv[1], sys.argv[2]
prog = drgn.Program()
prog.set_core_dump(core)
print("release:", prog["UTS_RELEASE"].string_().decode(errors="replace"))
if not vmlinux:
    print("(no vmlinux given: the kernel log and stacks need its debug info)")
    sys.exit(0)
try:
    prog.load_debug_info([vmlinux])
except drgn.MissingDebugInfoError as exc:
    print("debug info:", str(exc).splitlines()[0])
from drgn.helpers.linux.printk import get_dmesg
try:
    thread = prog.crashed_thread()
    print("crashed task: pid", thread.tid, thread.object.comm.string_().decode(errors="replace"))
    print(thread.stack_trace())
except Exception as exc:
    print("crashed task: drgn could not read it:", exc)
try:
    print("--- dmesg (from the dump) ---")
    print(get_dmesg(prog).decode(errors="replace")[-20000:])
except Exception as exc:
    print("dmesg: drgn could not read it:", exc)
"""


def drgn_triage(core: str | Path, vmlinux: str | Path | None, *,
                timeout: float = DRGN_TIMEOUT) -> str:
    """What drgn reads from ``core``: the release; with ``vmlinux``, the crashed task's stack
    and the kernel log. A sentence saying why not when drgn is missing or fails.

    drgn runs in a child process (its own deadline; a broken dump cannot take this
    process down with it).
    """
    if importlib.util.find_spec("drgn") is None:
        return "drgn is not installed (pip install 'qemukit[debug]'): nothing read from the dump"
    try:
        proc = subprocess.run([sys.executable, "-c", _DRGN_SCRIPT, str(core), str(vmlinux or "")],
                              capture_output=True, text=True, errors="replace", timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return f"drgn did not finish reading the dump within {timeout:.0f} s"
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return f"drgn could not read the dump: {err[-1] if err else f'exit {proc.returncode}'}"
    return proc.stdout.rstrip()


def _write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
        f.write(text)


def write_bundle(bundle: str | Path, *, verdict: Mapping[str, Any], argv: Sequence[str],
                 identity: Mapping[str, Any], console_log: str | Path | None,
                 vmlinux: str | Path | None = None, notes: Sequence[str] = ()) -> Path:
    """Fill ``bundle`` (from :func:`new_bundle`; ``vmcore`` may be in it already).

    ``verdict`` is the result's JSON data (strict JSON, as ``--json`` writes);
    ``console_log`` the console log to copy (None: not kept); ``notes`` lines
    for triage.txt (a dump that could not be taken). Returns ``bundle``.
    Raises :class:`HostError` when a file cannot be written.
    """
    path = Path(bundle)
    try:
        console = ""
        if console_log is not None and Path(console_log).is_file():
            if Path(console_log) != path / "console.log":
                shutil.copyfile(console_log, path / "console.log")
            console = _read_tail(path / "console.log")
        _write_new(path / "verdict.json",
                   json.dumps(verdict, indent=2, ensure_ascii=True, allow_nan=False) + "\n")
        _write_new(path / "qemu-argv.json", json.dumps(list(argv), indent=2) + "\n")
        _write_new(path / "kernel.json", json.dumps(dict(identity), indent=2) + "\n")
        _write_new(path / "triage.txt", _triage(path, verdict, identity, console, vmlinux, notes))
    except OSError as exc:
        raise HostError(f"cannot write the crash bundle {path}: {exc.strerror or exc}") from exc
    return path


def _triage(bundle: Path, verdict: Mapping[str, Any], identity: Mapping[str, Any], console: str,
            vmlinux: str | Path | None, notes: Sequence[str]) -> str:
    outcome = verdict.get("outcome")
    line = verdict.get("panic") if outcome == Outcome.PANIC else verdict.get("oops")
    first = verdict.get("oops") or line  # a panic after an oops: the oops has the trace
    out = [f"qemukit crash bundle: kernel {outcome}",
           f"{outcome}: {line}",
           f"kernel: {identity.get('release') or 'release unknown'} ({identity.get('arch')}), "
           f"image sha256 {identity.get('image_sha256') or 'unknown'}",
           f"command: {' '.join(verdict.get('command') or ())}"]
    if verdict.get("oops") and outcome == Outcome.PANIC:
        out.append(f"first oops: {verdict['oops']}")
    out += [f"note: {n}" for n in notes]
    trace = call_trace(console, first)
    out += ["", "--- call trace (console) ---", *(trace or ["(none on the console)"])]
    dump = bundle / "vmcore" if (bundle / "vmcore").is_file() else identity.get("dump")
    out += ["", "--- from the dump (drgn) ---"]
    out.append(drgn_triage(dump, vmlinux) if dump else "no dump was taken")
    vmlinux_name = identity.get("vmlinux") or "vmlinux"
    crash = crash_command("vmcore", vmlinux_name, identity.get("config"),
                          kernel=identity.get("image"))
    out += ["", f"Open the dump: drgn -c vmcore -s {vmlinux_name}; {crash}"]
    return "\n".join(out) + "\n"


def finish_run_bundle(bundle: Path, verdict: Mapping[str, Any], *, about: ResolvedKernel,
                      spec: VMSpec, argv: Sequence[str], console_log: Path | None,
                      vmlinux: str | Path | None, notes: Sequence[str]) -> Path:
    """Fill the bundle of a :func:`~qemukit.kernel.run_in_vm` run (its kernel as resolved,
    ``spec`` as booted, ``verdict`` its result's JSON data)."""
    if vmlinux is None:
        vmlinux = find_vmlinux(about.tree.root if about.tree is not None else spec.kernel)
    kernel = about.spec.kernel
    identity = kernel_identity(
        kernel=kernel, initrd=about.spec.initrd, append=spec.append, arch=spec.arch,
        release=about.release or (bzimage_release(kernel) if kernel else None),
        config=about.config, dump=verdict.get("dump"), vmlinux=vmlinux)
    return write_bundle(bundle, verdict=verdict, argv=argv, identity=identity,
                        console_log=console_log, vmlinux=vmlinux, notes=notes)


def bundle_from_vm(vm: VM, parent: str | Path, *, test: str | None = None,
                   vmlinux: str | Path | None = None) -> Path | None:
    """A crash bundle for ``vm`` when its console shows a panic or an oops, else None.

    For a VM of one's own (the pytest plugin's ``--qemukit-crash-dir``): the
    verdict is the first panic or oops on the console (``test`` names what
    ran); the dump is taken when QEMU still runs (a panicked kernel waits for
    it with ``panic=0`` on its command line). Call it before the VM stops: its
    console log goes with its runtime directory.
    """
    events = vm.console_events()
    crashes = [e for e in events if e.kind in ("panic", "oops")]
    if not crashes:
        return None
    panic = next((e.line for e in crashes if e.kind == "panic"), None)
    oops = next((e.line for e in crashes if e.kind == "oops"), None)
    outcome = Outcome.PANIC if panic is not None else Outcome.OOPS
    bundle = new_bundle(parent, outcome, vm.name)
    notes: list[str] = []
    dump: str | None = None
    running = vm.state is VMState.RUNNING and vm.aio.qemu_alive()
    no_room = dump_space_note(bundle / "vmcore", spec_memory_mib(vm.spec)) if running else None
    if no_room is not None:
        notes.append(no_room)
    elif running:
        try:
            vm.pause()
            dump = str(vm.dump_memory(bundle / "vmcore").path)
        except QemukitError as exc:
            notes.append(f"no crash dump: {exc}")
    else:
        notes.append("no crash dump: QEMU had already exited (boot with panic=0 to keep a "
                     "panicked kernel for its dump)")
    spec, kernel = vm.spec, vm.kernel
    if vmlinux is None:
        vmlinux = find_vmlinux(kernel.tree.root if kernel is not None and kernel.tree is not None
                               else spec.kernel)
    verdict = {"test": test, "vm": vm.name, "outcome": outcome, "panic": panic, "oops": oops,
               "dump": dump, "crash_bundle": str(bundle), "arch": spec.arch,
               "reports": [e.to_dict() for e in events if e.kind != "share"]}
    identity = kernel_identity(
        kernel=kernel.spec.kernel if kernel is not None else spec.kernel,
        initrd=kernel.spec.initrd if kernel is not None else spec.initrd, append=spec.append,
        arch=spec.arch, release=kernel.release if kernel is not None else None,
        config=kernel.config if kernel is not None else None, dump=dump, vmlinux=vmlinux)
    if identity["release"] is None and identity["image"] is not None:
        identity["release"] = bzimage_release(identity["image"])
    return write_bundle(bundle, verdict=verdict, argv=vm.argv, identity=identity,
                        console_log=vm.console_log, vmlinux=vmlinux, notes=notes)
