"""The foundation against real QEMU: start, QMP, guest commands, the shutdown ladder,
launch failures, panics, boot timeouts and the async API."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemukit import (
    VM,
    AsyncVM,
    Drive,
    GuestPanic,
    LaunchError,
    ShutdownRung,
    SpecError,
    VMSpec,
    WaitTimeout,
    images,
)
from tests.helpers import qemu_gone

pytestmark = pytest.mark.integration



def test_start_query_status_and_private_runtime_dir(tiny_spec: VMSpec, state_root: Path) -> None:
    start = time.monotonic()
    with VM(tiny_spec.replace(name="basic")) as vm:
        assert vm.status() == "running"
        assert vm.qmp("query-status")["running"] is True
        assert "q35,accel=tcg" in vm.argv
        rd = vm.runtime
        assert rd is not None and rd.path == state_root / "basic"
        assert stat.S_IMODE(rd.path.stat().st_mode) == 0o700
        for sock in (rd.qmp_socket, rd.agent_socket):
            assert stat.S_ISSOCK(sock.stat().st_mode)
            assert stat.S_IMODE(sock.stat().st_mode) & 0o077 == 0, sock
        # The owner reads the console over a connection made before QEMU started: no socket
        # file (a detached VM's QEMU serves console.sock, tests/integration/test_host_state.py).
        assert not rd.console_socket.exists()
        assert rd.read_info() is not None and rd.read_info().pid == vm.pid  # type: ignore[union-attr]
        # QMP is reachable only through the owner's socketpair and a unix socket: no TCP.
        conns = psutil.Process(vm.pid).net_connections(kind="inet")
        assert [c for c in conns if c.status == psutil.CONN_LISTEN] == []
    assert not rd.path.exists()
    assert qemu_gone(vm.pid or 0)
    # Stopped while still booting: the power button is pressed again until the
    # guest's ACPI handler is up, so it ends cleanly instead of waiting out the rung.
    assert vm.last_shutdown is not None and vm.last_shutdown.rung is ShutdownRung.ACPI
    assert time.monotonic() - start < 25


def test_exec_output_and_exit_codes(booted: Any, tiny_image: images.TinyImage) -> None:
    vm = booted()
    result = vm.exec(["uname", "-r"])
    assert result.exit_status == 0
    assert result.stdout_text.strip() == tiny_image.kernel_release
    assert vm.exec(["sh", "-c", "exit 7"]).exit_status == 7
    split = vm.exec("echo out; echo err >&2; exit 3")
    assert (split.stdout, split.stderr, split.exit_status) == (b"out\n", b"err\n", 3)
    # argv is passed exactly: no shell splitting of an argument with spaces and quotes.
    assert vm.exec(["printf", "%s|", "a b", "'c'"]).stdout == b"a b|'c'|"
    big = vm.exec("head -c 1000000 /dev/zero | tr '\\0' x")
    assert big.stdout == b"x" * 1_000_000
    timed_out = vm.exec(["sleep", "30"], timeout=1)
    assert timed_out.exit_status == 137


def test_shutdown_acpi_rung(booted: Any) -> None:
    vm = booted()
    result = vm.shutdown(timeout=30)
    assert result.rung is ShutdownRung.ACPI
    assert result.exit_status == 0
    assert result.tried == (ShutdownRung.ACPI,)


def test_guest_ignoring_acpi_falls_through_to_quit(booted: Any) -> None:
    vm = booted(append=images.TINY_APPEND + " qemukit.noacpi")
    start = time.monotonic()
    result = vm.shutdown(timeout=3)
    assert result.rung is ShutdownRung.QUIT
    assert result.tried == (ShutdownRung.ACPI, ShutdownRung.QUIT)
    assert time.monotonic() - start >= 3  # the ACPI rung really waited its timeout


def test_without_qmp_sigterm_rung(booted: Any) -> None:
    vm = booted()
    from qemukit._sync import run_sync

    run_sync(vm.aio.monitor.close())
    result = vm.shutdown(timeout=5)
    assert result.rung is ShutdownRung.SIGTERM
    assert result.exit_status is not None


def test_stopped_qemu_needs_sigkill(booted: Any) -> None:
    vm = booted()
    pid = vm.pid
    os.kill(pid, signal.SIGSTOP)
    result = vm.shutdown(timeout=1, quit_timeout=1, term_timeout=1)
    assert result.rung is ShutdownRung.SIGKILL
    assert result.exit_status == -signal.SIGKILL
    assert qemu_gone(pid)


def test_guest_poweroff_is_already_exited(booted: Any) -> None:
    vm = booted()
    with pytest.raises(Exception):  # noqa: B017,PT011 - the agent dies with the guest
        vm.exec("poweroff -f", timeout=10)
    assert vm.wait_exit(timeout=30) == 0
    assert vm.shutdown().rung is ShutdownRung.ALREADY_EXITED


def test_launch_failure_carries_qemu_message(tiny_spec: VMSpec, state_root: Path) -> None:
    spec = tiny_spec.replace(name="badlaunch", extra_args=("-device", "no-such-device-model"))
    vm = VM(spec)
    with pytest.raises(LaunchError) as info:
        vm.start()
    err = info.value
    assert "no-such-device-model" in err.stderr
    assert err.returncode == 1
    assert "-device" in err.argv and "no-such-device-model" in err.argv
    assert "no-such-device-model" in str(err)
    assert not (state_root / "badlaunch").exists()
    assert vm.state.value == "failed"


def test_bad_input_fails_before_any_process(tiny_spec: VMSpec, state_root: Path) -> None:
    before = set(state_root.iterdir())
    with pytest.raises(SpecError) as info:
        VM(tiny_spec.replace(name="nokernel", kernel="/nonexistent/vmlinuz")).start()
    assert info.value.field == "kernel"
    with pytest.raises(SpecError) as info:
        VM(tiny_spec.replace(drives=(Drive("/nonexistent.qcow2"),))).start()
    assert info.value.field == "drive.file"
    assert set(state_root.iterdir()) == before


def test_kernel_panic_is_reported_as_panic(booted: Any) -> None:
    vm = booted()
    start = time.monotonic()
    with pytest.raises(GuestPanic) as info:
        vm.exec("echo c > /proc/sysrq-trigger", timeout=60)
    assert time.monotonic() - start < 10
    assert "Kernel panic" in info.value.line or "sysrq" in info.value.console.lower()


def test_boot_that_never_reaches_agent_times_out_with_console(tiny_spec: VMSpec) -> None:
    spec = tiny_spec.replace(append="console=ttyS0 rdinit=/bin/sh")
    with VM(spec) as vm:
        # On a loaded host the kernel may not have printed anything 8 s after the spawn: wait
        # for its first line, so the timeout below is the agent's and its console is not empty.
        vm.wait_for_console_text("Linux version", timeout=180)
        start = time.monotonic()
        with pytest.raises(WaitTimeout) as info:
            vm.wait_ready(timeout=8)
        assert 8 <= time.monotonic() - start < 20
        assert "guest agent" in str(info.value)
        assert info.value.console  # the console tail is in the error
        assert "Linux version" in info.value.console or "#" in info.value.console
        # A bare shell ignores the power button: the ladder falls through to quit.
        assert vm.shutdown(timeout=2).rung is ShutdownRung.QUIT


def test_nonexistent_rdinit_is_a_panic_not_a_timeout(tiny_spec: VMSpec) -> None:
    spec = tiny_spec.replace(append="console=ttyS0 panic=-1 rdinit=/nonexistent")
    with VM(spec) as vm, pytest.raises(GuestPanic) as info:
        vm.wait_ready(timeout=60)
    assert "Kernel panic" in info.value.line


def test_overlay_never_writes_the_base(tiny_spec: VMSpec, tmp_path: Path) -> None:
    base = tmp_path / "base,with comma.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    spec = tiny_spec.replace(drives=(Drive(base, overlay=True),))
    with VM(spec) as vm:
        overlay = vm.runtime.overlay("disk0")  # type: ignore[union-attr]
        assert overlay.exists()
        assert vm.exec("echo marker-xyz | dd of=/dev/vda bs=512 count=1 conv=sync && sync").ok
        assert vm.exec("head -c 10 /dev/vda").stdout == b"marker-xyz"
        files = {b["inserted"]["file"] for b in vm.qmp("query-block") if "inserted" in b}
        assert str(overlay) in files
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest
    assert not overlay.exists()


def test_comma_in_disk_path_opens_exactly_that_file(tiny_spec: VMSpec, tmp_path: Path) -> None:
    real = tmp_path / "a,b.img"
    decoy = tmp_path / "a"
    real.write_bytes(b"REAL-DISK" + b"\0" * (1024 * 1024 - 9))
    decoy.write_bytes(b"DECOY" + b"\0" * (1024 * 1024 - 5))
    spec = tiny_spec.replace(drives=(Drive(real, format="raw", read_only=True),))
    with VM(spec) as vm:
        assert vm.exec("head -c 9 /dev/vda").stdout == b"REAL-DISK"


def test_async_api_and_sync_facade_inside_a_running_loop(tiny_spec: VMSpec) -> None:
    async def main() -> tuple[str, str]:
        async with AsyncVM(tiny_spec) as avm:
            out = (await avm.exec(["echo", "async"])).stdout_text.strip()
        # The sync facade has its own loop, so it works while this loop runs.
        with VM(tiny_spec) as vm:
            sync_out = vm.exec(["echo", "sync"]).stdout_text.strip()
        return out, sync_out

    assert asyncio.run(main()) == ("async", "sync")


def test_killed_parent_leaves_no_qemu(tiny_spec: VMSpec, tmp_path: Path) -> None:
    spec_file = tmp_path / "vm.toml"
    tiny_spec.replace(name="orphan-test").dump(spec_file)
    script = textwrap.dedent(
        f"""
        import sys, time
        from qemukit import VM, VMSpec
        vm = VM(VMSpec.load({str(spec_file)!r})).start()
        print(vm.pid, flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        qemu_pid = int(parent.stdout.readline())
        assert not qemu_gone(qemu_pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 2
    while not qemu_gone(qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert qemu_gone(qemu_pid), "QEMU outlived its killed parent for more than 2 s"
    from qemukit._launch.registry import gc

    assert [a.name for a in gc()] == ["orphan-test"]


def test_ovmf_boots_the_guest_under_uefi(tiny_spec: VMSpec) -> None:
    from qemukit.host import find_ovmf

    found = find_ovmf()
    assert found is not None, "OVMF missing: scripts/setup installs Debian's ovmf package"
    template = Path(found[1])
    before = hashlib.sha256(template.read_bytes()).hexdigest()
    with VM(tiny_spec.replace(firmware="ovmf")) as vm:
        assert vm.exec("test -d /sys/firmware/efi").ok  # the kernel was started by UEFI
        assert vm.runtime is not None
        assert (vm.runtime.path / "ovmf-vars.fd").exists()  # a private copy of the store
    assert hashlib.sha256(template.read_bytes()).hexdigest() == before


def test_microvm_boots_runs_shares_and_powers_off(tiny_spec: VMSpec, tmp_path: Path) -> None:
    from qemukit import Share

    (tmp_path / "in.txt").write_text("via-virtio-mmio\n")
    spec = tiny_spec.replace(machine="microvm", hotplug_ports=0,
                             shares=(Share(tmp_path, "/mnt/h"),))
    with VM(spec) as vm:
        out = vm.exec("cat /mnt/h/in.txt; cat /proc/cmdline").stdout_text
        assert out.startswith("via-virtio-mmio\n")
        assert "tsc_early_khz=" in out  # added for microvm: the kernel cannot calibrate otherwise
    assert vm.last_shutdown is not None and vm.last_shutdown.rung is ShutdownRung.ACPI
