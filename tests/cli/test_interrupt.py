"""Ctrl-C on a foreground ``qemukit run``: the VM is stopped and the exit status is 130."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from qemukit import images
from qemukit.warm import TMP_PREFIX, WarmCache
from tests.helpers import QEMUKIT, qemu_gone, qemu_processes_under

pytestmark = pytest.mark.integration
TCG = ("--image", "tiny", "--accel", "tcg")
MARKER = "qk-command-started"


def _wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    """Poll ``check`` (a file appearing, a log line) until it holds, at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no console log)"
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; console:\n{tail}")
        time.sleep(0.1)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def start_run(
    tiny_image: images.TinyImage, tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``start_run(*args)`` starts ``qemukit run --image tiny --accel tcg *args``."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        assert QEMUKIT
        out = (tmp_path / f"out{len(procs)}").open("wb")  # a file: the console may be long
        # SIGINT as a terminal would deliver it: a suite started in the background of a
        # non-interactive shell inherits SIGINT ignored, and so would the command.
        proc = subprocess.Popen([QEMUKIT, "run", *TCG, *args], stdout=out,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                preexec_fn=_default_sigint)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _interrupt_once_running(proc: subprocess.Popen[bytes], entry: Path, marker: str) -> int:
    """Wait for the VM's entry and ``marker`` on its console, send SIGINT; return QEMU's pid."""
    console = entry / "console.log"
    _wait_for(lambda: (entry / "vm.json").exists(), 60, f"{entry}/vm.json", console)
    pid = int(json.loads((entry / "vm.json").read_text())["pid"])
    _wait_for(lambda: console.exists() and marker in console.read_text(errors="replace"), 180,
              f"{marker!r} on the console", console)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGINT)
    return pid


def _only_qemukit_lines(stderr: str) -> None:
    """stderr holds qemukit's own messages only: no traceback, no asyncio noise
    ("Task was destroyed but it is pending!", "exception was never retrieved")."""
    stray = [line for line in stderr.splitlines() if line and not line.startswith("qemukit: ")]
    assert stray == [], stderr


def test_ctrl_c_during_the_command_stops_the_vm_and_exits_130(
    start_run: Callable[..., subprocess.Popen[bytes]], state_root: Path
) -> None:
    proc = start_run("--name", "sigint-cmd", "--",
                     "sh", "-c", f"echo {MARKER} > /dev/console; sleep 100")
    pid = _interrupt_once_running(proc, state_root / "sigint-cmd", MARKER)
    start = time.monotonic()
    status = proc.wait(timeout=60)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert status == 130, stderr
    assert time.monotonic() - start < 30, "stopping the VM took the whole ladder"
    assert "qemukit: interrupted" in stderr and "Traceback" not in stderr
    assert qemu_gone(pid)
    assert not (state_root / "sigint-cmd").exists()
    assert qemu_processes_under(state_root / "sigint-cmd") == []


def test_ctrl_c_in_console_mode_stops_the_vm_and_exits_130(
    start_run: Callable[..., subprocess.Popen[bytes]], state_root: Path
) -> None:
    proc = start_run("--name", "sigint-fg")
    pid = _interrupt_once_running(proc, state_root / "sigint-fg", "qemukit-init: ready")
    status = proc.wait(timeout=60)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert status == 130, stderr
    assert "sigint-fg stopped (" in stderr
    _only_qemukit_lines(stderr)
    assert qemu_gone(pid)
    assert not (state_root / "sigint-fg").exists()
    assert os.path.exists(state_root)  # only the VM's own entry went away


@pytest.mark.parametrize("moment", ["qemu-spawned", "booting"])
def test_ctrl_c_while_starting_stops_everything_it_began(
    start_run: Callable[..., subprocess.Popen[bytes]], state_root: Path,
    tiny_image: images.TinyImage, moment: str,
) -> None:
    """Ctrl-C before the VM is up: QEMU just spawned, or the first warm start's boot.

    A first warm start boots a builder VM inside ``start`` and saves its state:
    a kernel argument no other start uses makes the warm state new, so the
    interrupt lands in that boot. The builder, its half-written state and every
    asyncio task go: nothing is left in the cache or complains at exit.
    """
    token = secrets.token_hex(4)
    append = f"{images.spec('tiny').append} qk.interrupt={token}"
    warm = WarmCache()
    before = {e.key for e in warm.entries()}
    proc = start_run("--name", f"sigint-start-{moment}", "--append", append)
    entries = lambda: list(state_root.iterdir()) if state_root.exists() else []  # noqa: E731
    _wait_for(lambda: any((e / "vm.json").exists() for e in entries()), 60, "a VM's vm.json",
              state_root / "none")
    entry = next(e for e in entries() if (e / "vm.json").exists())
    pid = int(json.loads((entry / "vm.json").read_text())["pid"])
    if moment == "booting":
        log = entry / "console.log"  # QEMU creates it once it runs: absent a moment before
        _wait_for(lambda: log.exists() and "qemukit-init:" in log.read_text(errors="replace"),
                  120, "the tiny init on the builder's console", log)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGINT)
    status = proc.wait(timeout=60)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert status == 130, stderr
    assert f"sigint-start-{moment} stopped (interrupted while starting)" in stderr
    _only_qemukit_lines(stderr)
    assert qemu_gone(pid)
    assert entries() == []
    assert {e.key for e in warm.entries()} == before, "a half-built warm state was kept"
    partial = [p.name for p in warm.root.glob(f"{TMP_PREFIX}*-{proc.pid}")]
    assert partial == [], "the interrupted build's directory was left behind"
