"""Where a VM's files live, and a console log that cannot fill the disk (tiny guest, TCG).

A guest that prints without end (``yes > /dev/console``) used to grow ``console.log``
without bound, in ``$XDG_RUNTIME_DIR`` (a tmpfs of 10% of RAM) by default. Now the log
is rotated past its cap, keeping the latest output, and a panic after the flood is still
classified; and the big files are on disk, the sockets in the private runtime directory.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, GuestPanic, VMSpec
from qemukit._wire import console
from tests.helpers import QEMUKIT, qemu_gone, qemu_processes_under, run_qemukit, wait_until

pytestmark = [pytest.mark.integration]

CAP = 256 << 10
FLOOD = 3 << 20  # twelve caps' worth


def test_a_flooding_guest_keeps_the_log_under_its_cap_and_a_later_panic_is_seen(
        tiny_spec: VMSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(console, "CONSOLE_LOG_MAX", CAP)
    with VM(tiny_spec.replace(memory=256)) as vm:
        assert vm.runtime is not None
        log = vm.runtime.console_log
        result = vm.exec(f"head -c {FLOOD} /dev/zero | tr '\\0' y > /dev/console; "
                         "printf '\\nflood-done-marker\\n' > /dev/console", timeout=600)
        assert result.exit_status == 0, result.stderr_text
        # The UART drains the tty's buffer at its own pace: wait for the end of the flood.
        wait_until(lambda: "flood-done-marker" in vm.console_tail(5), 300,
                   "the marker after the flood in the console log")
        older = Path(f"{log}.1")
        assert older.exists(), "the log was never rotated"
        # Checked every cap/16 received, so at most that much (plus QEMU's own lag) over.
        limit = CAP + CAP // 16 + 65536
        assert log.stat().st_size <= limit and older.stat().st_size <= limit, (
            log.stat().st_size, older.stat().st_size)
        assert log.stat().st_size + older.stat().st_size < FLOOD // 4
        with pytest.raises(GuestPanic) as info:
            vm.exec("echo c > /proc/sysrq-trigger", timeout=120)
        assert "sysrq triggered crash" in info.value.line or "Kernel panic" in info.value.line
        assert log.stat().st_size <= limit
        assert "sysrq" in console.log_tail(log, 300).lower()  # the panic is in the log too


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_big_files_go_to_disk_and_sockets_stay_in_the_runtime_dir(tmp_path: Path,
                                                                  tiny_image: Any) -> None:
    """The default layout, with ``$XDG_RUNTIME_DIR`` set and no ``QEMUKIT_STATE``."""
    assert QEMUKIT
    runtime, state_home = tmp_path / "run", tmp_path / "state-home"
    runtime.mkdir(mode=0o700)
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("QEMUKIT_STATE", "QEMUKIT_DATA")}
    env.update(XDG_RUNTIME_DIR=str(runtime), XDG_STATE_HOME=str(state_home))

    def qk(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([QEMUKIT, *args], env=env, capture_output=True, text=True,
                              timeout=300, stdin=subprocess.DEVNULL, check=False)

    started = qk("run", "--image", "tiny", "--accel", "tcg", "--name", "placed", "--detach",
                 "--disk", f"{base},overlay")
    try:
        assert started.returncode == 0, started.stderr
        vm_dir = runtime / "qemukit" / "placed"
        data = state_home / "qemukit-data" / "placed"
        assert (vm_dir / "data").is_symlink() and (vm_dir / "data").resolve() == data
        in_runtime = {p.name for p in vm_dir.iterdir()}
        assert {"qmp.sock", "console.sock", "agent.sock", "vm.json"} <= in_runtime
        assert not in_runtime & {"console.log", "qemu.log", "overlay-disk0.qcow2"}
        assert {"console.log", "qemu.log", "overlay-disk0.qcow2"} <= {p.name for p in data.iterdir()}
        assert data.stat().st_mode & 0o077 == 0 and data.parent.stat().st_mode & 0o077 == 0
        assert qk("exec", "placed", "--", "true").returncode == 0
    finally:
        stopped = qk("stop", "placed")
        leaked = qemu_processes_under(runtime)
        for proc in leaked:
            proc.kill()
    assert stopped.returncode == 0, stopped.stderr
    assert not leaked
    assert _tree(runtime / "qemukit") == set()
    assert _tree(state_home / "qemukit-data") == set()


def test_a_detached_vm_flooding_its_console_keeps_the_log_capped(
        tiny_spec: VMSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody reads a detached VM's console: its helper process rotates the log."""
    from qemukit.cli._files import start_port_watcher

    monkeypatch.setattr(console, "CONSOLE_LOG_MAX", CAP)
    vm = VM(tiny_spec.replace(memory=256), die_with_parent=False)
    vm.start()
    helper = None
    try:
        vm.wait_ready(120)
        assert vm.runtime is not None
        log, name = vm.runtime.console_log, vm.name
        vm.detach()
        helper = start_port_watcher(name, forward=False)
        with VM.attach(name) as again:
            result = again.exec(f"head -c {FLOOD} /dev/zero | tr '\\0' y > /dev/console; "
                                "printf '\\nflood-done-marker\\n' > /dev/console", timeout=600)
            assert result.exit_status == 0, result.stderr_text
            again.detach()
        wait_until(lambda: "flood-done-marker" in console.log_tail(log, 5), 300,
                   "the marker after the flood in the console log")
        older = Path(f"{log}.1")
        assert older.exists(), "the detached VM's log was never rotated"
        # The helper looks ten times a second: allow what a TCG UART prints meanwhile.
        wait_until(lambda: log.stat().st_size <= 2 * CAP, 30, "the helper to rotate the log")
        assert older.stat().st_size < FLOOD // 2
        shown = run_qemukit("logs", name)  # both parts, the older first
        assert shown.returncode == 0, shown.stderr
        assert "flood-done-marker" in shown.stdout and len(shown.stdout) <= 4 * CAP
    finally:
        if vm.state.value == "running":
            vm.kill()
        else:
            VM.attach(vm.name).shutdown(timeout=30)
    assert helper is not None
    wait_until(lambda: qemu_gone(helper), 30, "the helper to end with the VM")
