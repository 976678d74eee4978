"""Helpers shared by the test modules (import them from here, not from a conftest)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from qemukit import VM, Drive, images
from qemukit.arch import ARCHES, DEFAULT_ARCH

__all__ = ["FOREIGN_ARCHES", "QEMUKIT", "foreign_tiny_vm", "private_warm_cache", "qemu_gone",
           "qemu_processes_under", "run_qemukit"]


def qemu_processes_under(root: Path) -> list[psutil.Process]:
    """Live (non-zombie) QEMU processes whose command line mentions ``root``."""
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if "qemu-system" in cmdline and str(root) in cmdline:
                found.append(proc)
        except psutil.Error:
            continue
    return found


QEMUKIT = shutil.which("qemukit", path=str(Path(sys.executable).parent)) or shutil.which("qemukit")


def run_qemukit(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """Run the installed ``qemukit`` command as a user would, in a separate process."""
    assert QEMUKIT, "the qemukit console script is not installed (pip install -e .)"
    return subprocess.run([QEMUKIT, *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy(), stdin=subprocess.DEVNULL, check=False)


def qemu_gone(pid: int) -> bool:
    """True if ``pid`` has exited; a zombie counts (init reaps orphans only every ~1.5 s)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@contextmanager
def attached(name: str) -> Iterator[Any]:
    """Take VM ``name`` over for a moment; the shared QMP socket serves one client at a time."""
    from qemukit import VM

    vm = VM.attach(name)
    try:
        yield vm
    finally:
        vm.detach()


def wait_until(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """``check()``'s first truthy value within ``timeout`` s (each look is a bounded command)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


@contextmanager
def private_warm_cache(root: Path) -> Iterator[Path]:
    """``QEMUKIT_CACHE`` set to ``root`` for the block: the shared tiny image linked in and the
    probe facts copied, so warm states made there are the block's own."""
    import pytest

    from qemukit.paths import cache_dir

    shared = cache_dir()
    (root / "tiny").symlink_to(shared / "tiny")
    for facts in shared.glob("*.json"):
        shutil.copy(facts, root / facts.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QEMUKIT_CACHE", str(root))
        yield root


#: The guest architectures other than the default one, in ARCHES' order: the ``[aarch64]``,
#: ``[riscv64]``, ``[s390x]`` and ``[ppc64le]`` parameters of the per-architecture tests.
FOREIGN_ARCHES: tuple[str, ...] = tuple(a for a in ARCHES if a != DEFAULT_ARCH)


@contextmanager
def foreign_tiny_vm(arch: str, work: Path, **changes: Any) -> Iterator[VM]:
    """A started tiny guest of ``arch`` under TCG whose agent answers, with a 16 MiB qcow2
    disk (``work/root.qcow2``, under an overlay); ``changes`` override the spec's fields.
    The tiny image is built first (cached). Killed after the block, not stopped: after a
    snapshot load the block I/O of some guests may hang, and a power-off syncs the disks
    first; a kept runtime directory (``keep_runtime=True``) is removed."""
    keep_runtime = bool(changes.pop("keep_runtime", False))
    images.build("tiny", arch=arch)
    disk = work / "root.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    vm = VM(images.spec("tiny", arch=arch, drives=(Drive(disk, overlay=True),), **changes),
            keep_runtime=keep_runtime)
    try:
        vm.start()
        vm.wait_ready(180)
        yield vm
    finally:
        if vm.state.value == "running":
            vm.kill()
        if keep_runtime and vm.runtime is not None:
            shutil.rmtree(vm.runtime.path, ignore_errors=True)


class RunInVMFake:
    """What :func:`qemukit.kernel.run_in_vm` uses of a VM, booting nothing: its command
    passes, or panics the kernel when ``panics``; ``log`` is its console log (None: none),
    ``tail`` what its console ends with. Subclass (or ``type(...)``) to set them."""

    panics = False
    log: Path | None = None
    tail = "ready"

    def __init__(self, spec: Any, **_: Any) -> None:
        from qemukit.vm import VMState

        self.spec, self.name, self.argv = spec, "vm-1", ["qemu-system-x86_64"]
        self.warm_start = self.accel = None
        self.console_log: Path | None = self.log
        self.state = VMState.STOPPED

    def start(self) -> None:
        pass

    def wait_ready(self, timeout: float) -> float:
        return 0.5

    def exec(self, command: Any, timeout: float) -> Any:
        from types import SimpleNamespace

        from qemukit.errors import GuestPanic

        if self.panics:
            raise GuestPanic("Kernel panic - not syncing: sysrq triggered crash")
        return SimpleNamespace(exit_status=0, stdout_text="ok\n", stderr_text="")

    def console_events(self) -> list[Any]:
        return []

    def console_tail(self, lines: int) -> str:
        return self.tail
