"""The suite's own kernel: Debian's linux-source-6.1, ``make tinyconfig`` plus ``qemukit kconfig``.

:func:`build_test_kernel` returns a built ``make O=DIR`` tree (``DIR/arch/x86/boot/bzImage``,
``DIR/.config``, one module) under ``<cache>/kernels/<key>/``. The key covers every input: the
source tarball (size and mtime), the fragment qemukit merges plus this file's extra lines, the
compiler's version and qemukit's :data:`~qemukit.kconfig.KCONFIG_VERSION`; so a later run with
the same inputs reuses the build and anything that changes them builds anew. The source is
extracted once per tarball (``kernels/src-<key>/``), and builds run under a file lock so
parallel sessions build once. Nothing is downloaded.

Run it by hand: ``python -m tests.kernel_build`` prints the tree (building it if needed);
``--debug`` the debug-info variant (:func:`build_debug_kernel`), ``--kunit`` the KUnit variant
(:func:`build_kunit_kernel`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from qemukit import kconfig
from qemukit._fs import locked
from qemukit.paths import cache_dir

SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
#: Lines merged after qemukit's fragment: one module, so the tree exercises modules_install
#: (the tiny init modprobes virtio_balloon; /sys/module/virtio_balloon proves it loaded).
EXTRA = "# the suite's extras\nCONFIG_MODULES=y\nCONFIG_MODULE_UNLOAD=y\nCONFIG_VIRTIO_BALLOON=m\n"
#: Bumped when the steps below change what they produce.
RECIPE_VERSION = 1
BUILD_TIMEOUT = 3600.0


def _gcc_version() -> str:
    proc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else "no gcc"


def build_key(tarball: Path = SOURCE_TARBALL) -> str:
    """The hash of every input of the build (see the module docstring)."""
    st = tarball.stat()
    parts = {
        "tarball": [str(tarball), st.st_size, int(st.st_mtime)],
        "fragment": kconfig.fragment("x86_64") + EXTRA,
        "gcc": _gcc_version(),
        "kconfig_version": kconfig.KCONFIG_VERSION,
        "recipe": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _run(argv: list[str], cwd: Path, log: Path) -> None:
    """Run one build step, its output appended to ``log``; fail with the log's tail."""
    with log.open("a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(argv)}  (in {cwd})\n")
        out.flush()
        proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}) in {cwd}:\n{tail}")


def _source_tree(root: Path, tarball: Path, progress: Callable[[str], None]) -> Path:
    """The tarball extracted once (shared by every build of it), under its own lock."""
    st = tarball.stat()
    digest = hashlib.sha256(f"{tarball}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()
    src = root / f"src-{digest[:12]}"
    with locked(root / f"{src.name}.lock"):
        done = src / ".qemukit-extracted"
        if done.exists():
            return src / "linux-source-6.1"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(mode=0o700)
        progress(f"extracting {tarball}")
        _run(["tar", "-xJf", str(tarball), "-C", str(src)], src, root / f"{src.name}.log")
        done.write_text("")
        return src / "linux-source-6.1"


def usable(out: Path) -> bool:
    """Whether the cached build ``out`` can still be used.

    A ``make O=`` tree names its source by absolute path (``build/source``, ``build/Makefile``),
    so a cache that was moved or whose extracted source was removed holds a tree that ``make``
    and ``qemukit run --kernel`` refuse. Such an entry is built again instead of handed out.
    """
    if not (out / ".qemukit-built").exists():
        return False
    source = out / "build" / "source"
    return (source / "Makefile").is_file() and (source.resolve().parent
                                                / ".qemukit-extracted").exists()


def build_test_kernel(progress: Callable[[str], None] = lambda _: None,
                      tarball: Path = SOURCE_TARBALL) -> Path:
    """The built tree (``make O=`` directory) of the suite's kernel, built if not cached."""
    root = cache_dir() / "kernels"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = build_key(tarball)
    out = root / key
    with locked(root / f"{key}.lock"):
        if usable(out):
            return out / "build"
        src = _source_tree(root, tarball, progress)
        shutil.rmtree(out, ignore_errors=True)
        build = out / "build"
        build.mkdir(parents=True, mode=0o700)
        log = out / "build.log"
        start = time.monotonic()
        progress("make tinyconfig")
        _run(["make", "-s", f"O={build}", "ARCH=x86_64", "tinyconfig"], src, log)
        progress("qemukit kconfig (merge_config.sh -m, make olddefconfig)")
        merged = kconfig.merge_into_tree(build, "x86_64", extra=EXTRA)
        if merged.dropped:
            raise RuntimeError(f"olddefconfig dropped {sorted(merged.dropped)} from the fragment")
        progress(f"make -j{os.cpu_count() or 1} bzImage modules (a few minutes)")
        _run(["make", "-s", f"-j{os.cpu_count() or 1}", "ARCH=x86_64", "bzImage", "modules"],
             build, log)
        _prune(build)
        seconds = time.monotonic() - start
        (out / ".qemukit-built").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
        progress(f"built in {seconds:.0f}s: {build}")
        return build


def _prune(build: Path) -> None:
    """Drop the object files: a booted tree needs its image, vmlinux, .config and modules."""
    for path in build.rglob("*.o"):
        path.unlink()


#: What the debug build turns on (``scripts/config``) over the suite kernel's ``.config``: DWARF
#: debug info (drgn, crash and gdb read it), the kernel's gdb scripts (``vmlinux-gdb.py``, its
#: ``lx-*`` commands) and kallsyms (symbolic Call Traces on the console, so triage shows them).
DEBUG_OPTIONS = ["-e", "DEBUG_KERNEL", "-e", "DEBUG_INFO", "-d", "DEBUG_INFO_NONE", "-e",
                 "DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT", "-e", "GDB_SCRIPTS", "-d",
                 "DEBUG_INFO_REDUCED", "-d", "DEBUG_INFO_BTF", "-e", "KALLSYMS"]


def _variant_key(prefix: str, options: list[str], tarball: Path) -> str:
    """A variant's key: the suite kernel's inputs plus the options it adds."""
    extra = hashlib.sha256(json.dumps(options).encode()).hexdigest()[:8]
    return f"{prefix}-{build_key(tarball)}-{extra}"


def _build_variant(prefix: str, options: list[str], targets: list[str], what: str,
                   progress: Callable[[str], None], tarball: Path, *,
                   needs: str | None = None, all_kept: bool = False) -> Path:
    """The suite kernel's ``.config`` with ``options`` (``scripts/config``), built and cached.

    Built beside the suite's kernel (``<cache>/kernels/<prefix>-<key>/build``), object files
    pruned. ``needs``: a file of the tree a cached build must have too. ``all_kept``: fail if
    ``olddefconfig`` drops an option the variant turns on.
    """
    suite = build_test_kernel(progress, tarball)
    root = cache_dir() / "kernels"
    key = _variant_key(prefix, options, tarball)
    out = root / key
    with locked(root / f"{key}.lock"):
        if usable(out) and (needs is None or (out / "build" / needs).exists()):
            return out / "build"
        shutil.rmtree(out, ignore_errors=True)
        build = out / "build"
        build.mkdir(parents=True, mode=0o700)
        log = out / "build.log"
        shutil.copyfile(suite / ".config", build / ".config")
        src = (suite / "source").resolve()
        start = time.monotonic()
        _run([str(src / "scripts" / "config"), "--file", str(build / ".config"), *options],
             src, log)
        _run(["make", "-s", f"O={build}", "ARCH=x86_64", "olddefconfig"], src, log)
        if all_kept:
            config = (build / ".config").read_text().splitlines()
            pairs = zip(options[::2], options[1::2], strict=True)
            missing = [o for flag, o in pairs if flag == "-e" and f"CONFIG_{o}=y" not in config]
            if missing:
                raise RuntimeError(f"olddefconfig dropped {missing} from the {prefix} build")
        progress(f"make -j{os.cpu_count() or 1} {' '.join(targets)} ({what})")
        _run(["make", "-s", f"O={build}", "ARCH=x86_64", f"-j{os.cpu_count() or 1}", *targets],
             src, log)
        _prune(build)
        seconds = time.monotonic() - start
        (out / ".qemukit-built").write_text(json.dumps({"seconds": round(seconds, 1)}) + "\n")
        progress(f"built in {seconds:.0f}s: {build}")
        return build


def debug_key(tarball: Path = SOURCE_TARBALL) -> str:
    """The debug build's key: the suite kernel's inputs plus :data:`DEBUG_OPTIONS`."""
    return _variant_key("gdb", DEBUG_OPTIONS, tarball)


def build_debug_kernel(progress: Callable[[str], None] = lambda _: None,
                       tarball: Path = SOURCE_TARBALL) -> Path:
    """The suite's kernel with debug info and the gdb scripts (a ``make O=`` tree), cached.

    Built beside the suite's kernel (``<cache>/kernels/gdb-<key>/build``) from its ``.config``
    with :data:`DEBUG_OPTIONS`, object files pruned (``vmlinux`` carries the debug info).
    Takes many minutes on an empty cache.
    """
    return _build_variant("gdb", DEBUG_OPTIONS, ["bzImage", "modules", "scripts_gdb"],
                          "debug info: long", progress, tarball, needs="vmlinux-gdb.py")


#: What the KUnit build turns on over the suite kernel's ``.config``: KUnit and its example suite
#: (passing, skipped and parameterized cases) plus the linked-list suite, run at boot and
#: reported as KTAP on the console (the list suite sits behind ``RUNTIME_TESTING_MENU``, which
#: tinyconfig turns off). ``KUNIT_ALL_TESTS`` would build every suite the config allows: more
#: build and boot time than the test needs.
KUNIT_OPTIONS = ["-e", "KUNIT", "-e", "KUNIT_EXAMPLE_TEST", "-e", "RUNTIME_TESTING_MENU",
                 "-e", "LIST_KUNIT_TEST", "-d", "KUNIT_ALL_TESTS", "-d", "KUNIT_DEBUGFS"]


def kunit_key(tarball: Path = SOURCE_TARBALL) -> str:
    """The KUnit build's key: the suite kernel's inputs plus :data:`KUNIT_OPTIONS`."""
    return _variant_key("kunit", KUNIT_OPTIONS, tarball)


def build_kunit_kernel(progress: Callable[[str], None] = lambda _: None,
                       tarball: Path = SOURCE_TARBALL) -> Path:
    """The suite's kernel with KUnit's example and list suites built in (a ``make O=`` tree).

    Built beside the suite's kernel (``<cache>/kernels/kunit-<key>/build``) from its ``.config``
    with :data:`KUNIT_OPTIONS`, cached by its inputs. Takes minutes on an empty cache.
    """
    return _build_variant("kunit", KUNIT_OPTIONS, ["bzImage", "modules"],
                          "KUnit suites built in", progress, tarball, all_kept=True)


def main() -> int:
    def progress(line: str) -> None:
        print(f"kernel_build: {line}", file=sys.stderr)

    args = sys.argv[1:]
    if "--debug" in args:
        tree = build_debug_kernel(progress)
    elif "--kunit" in args:
        tree = build_kunit_kernel(progress)
    else:
        tree = build_test_kernel(progress)
    print(tree)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
