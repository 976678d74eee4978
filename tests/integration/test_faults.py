"""Fault injection: QEMU killed or stopped at bad moments, sockets deleted, disks full,
hostile file names. Each case ends in a specific qemukit error within its timeout and
leaves no process and no runtime files behind; base images stay unchanged."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemukit import (
    VM,
    AsyncVM,
    Drive,
    GuestIOError,
    LaunchError,
    QemukitError,
    QMPConnectionError,
    ShutdownRung,
    VMSpec,
    WaitTimeout,
)
from tests.helpers import qemu_processes_under

pytestmark = pytest.mark.integration


def _qcow2(path: Path, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_clean(vm: VM | AsyncVM, state_root: Path) -> None:
    assert vm.runtime is not None and not vm.runtime.path.exists()
    assert qemu_processes_under(state_root) == []


async def _kill_qemu_during(vm: AsyncVM, event: str, operation: Any) -> None:
    """Start ``operation``, SIGKILL QEMU once it emits ``event`` (the operation is under
    way), and check the operation fails with a qemukit error within 5 s."""
    with vm.monitor.listen(event) as events:
        task = asyncio.ensure_future(operation)
        await vm.monitor.wait_event(events, 30, f"{event} from the operation")
        os.kill(vm.pid or 0, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(QemukitError):
        await task
    assert time.monotonic() - start < 5


def test_sigkill_during_boot(tiny_spec: VMSpec, state_root: Path) -> None:
    vm = VM(tiny_spec).start()
    os.kill(vm.pid or 0, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        vm.wait_ready(timeout=60)
    assert time.monotonic() - start < 5
    assert info.value.returncode == -signal.SIGKILL
    assert vm.shutdown().rung is ShutdownRung.ALREADY_EXITED
    _assert_clean(vm, state_root)


def test_sigkill_during_hotplug(tiny_spec: VMSpec, state_root: Path, tmp_path: Path) -> None:
    disk = _qcow2(tmp_path / "hot.qcow2")
    digest = _sha(disk)

    async def scenario() -> None:
        async with AsyncVM(tiny_spec) as vm:
            await vm.wait_ready()
            plugged = await vm.hotplug.disk(disk, overlay=True)
            unplug = asyncio.ensure_future(vm.unplug(plugged, timeout=30))
            await asyncio.sleep(0)  # the device_del is on its way
            os.kill(vm.pid or 0, signal.SIGKILL)
            start = time.monotonic()
            with pytest.raises(QemukitError):
                await unplug
            assert time.monotonic() - start < 5
            assert (await vm.shutdown()).rung is ShutdownRung.ALREADY_EXITED
        _assert_clean(vm, state_root)

    asyncio.run(scenario())
    assert _sha(disk) == digest


def test_sigkill_during_snapshot_save(tiny_spec: VMSpec, state_root: Path,
                                      tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2")
    digest = _sha(base)
    spec = tiny_spec.replace(drives=(Drive(base, overlay=True),), memory=1024)

    async def scenario() -> None:
        async with AsyncVM(spec) as vm:
            await vm.wait_ready()
            await _kill_qemu_during(vm, "JOB_STATUS_CHANGE", vm.snapshots.save("doomed"))
            await vm.shutdown()
        _assert_clean(vm, state_root)

    asyncio.run(scenario())
    assert _sha(base) == digest


def test_sigkill_during_state_save(tiny_spec: VMSpec, state_root: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"

    async def scenario() -> None:
        async with AsyncVM(tiny_spec.replace(memory=1024)) as vm:
            await vm.wait_ready()
            await _kill_qemu_during(vm, "MIGRATION", vm.save_state(bundle))
            await vm.shutdown()
        _assert_clean(vm, state_root)

    asyncio.run(scenario())
    assert not bundle.exists(), "a half-written state bundle was left behind"


def test_sigstop_while_a_qmp_command_waits(booted: Any, state_root: Path) -> None:
    vm = booted()
    os.kill(vm.pid, signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(WaitTimeout) as info:
            vm.qmp("query-status", timeout=2)
        assert 2 <= time.monotonic() - start < 5
        assert "query-status" in str(info.value)
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    assert vm.status() == "running"  # the late reply was dropped; the session still works
    assert vm.shutdown(timeout=10).rung is ShutdownRung.ACPI


def test_deleted_qmp_socket(booted: Any, state_root: Path, qk: Any) -> None:
    vm = booted()
    os.unlink(vm.runtime.qmp_socket)
    listing = json.loads(qk("ls", "--json").stdout)
    assert next(e for e in listing if e["name"] == vm.name)["state"] == "unreachable"
    with pytest.raises(QMPConnectionError) as info:
        VM.attach(vm.name, timeout=5)
    assert "qmp.sock" in str(info.value)
    assert vm.status() == "running"  # the owner's private monitor is unaffected
    assert vm.shutdown(timeout=10).rung is ShutdownRung.ACPI


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_overlay_disk_full(tiny_spec: VMSpec, tmp_path: Path, small_tmpfs: Path) -> None:
    base = _qcow2(tmp_path / "base.qcow2")
    digest = _sha(base)
    spec = tiny_spec.replace(drives=(Drive(base, overlay=True),))
    vm = VM(spec, state_root=small_tmpfs).start()
    try:
        vm.wait_ready()
        start = time.monotonic()
        with pytest.raises(GuestIOError) as info:
            vm.exec("dd if=/dev/urandom of=/dev/vda bs=1M count=16 oflag=direct", timeout=60)
        assert time.monotonic() - start < 30
        assert info.value.node == "disk0-fmt" and "space" in info.value.reason
        assert vm.status() in ("io-error", "paused")
    finally:
        result = vm.shutdown(timeout=2)
    assert result.rung in (ShutdownRung.QUIT, ShutdownRung.ACPI)
    assert list(small_tmpfs.iterdir()) == []
    assert _sha(base) == digest


HOSTILE_NAMES = ["a,b=c.img", "spa ce.img", "ünï😀.img", "-leading.img",
                 "x,,y,file=evil.img", "semi;colon$(id).img"]


def test_hostile_file_names_reach_qemu_exactly(tiny_spec: VMSpec, tmp_path: Path) -> None:
    drives = []
    for i, name in enumerate(HOSTILE_NAMES):
        path = tmp_path / name
        path.write_bytes(f"MARK{i:02d}".encode() + b"\0" * (1024 * 1024 - 6))
        drives.append(Drive(path, format="raw", read_only=True))
    (tmp_path / "evil.img").write_bytes(b"EVIL" + b"\0" * (1024 * 1024 - 4))
    with VM(tiny_spec.replace(drives=tuple(drives))) as vm:
        opened = {b["inserted"]["file"] for b in vm.qmp("query-block") if "inserted" in b}
        assert opened == {str(tmp_path / n) for n in HOSTILE_NAMES}
        seen = vm.exec("for d in /sys/block/vd*; do head -c 6 /dev/${d##*/}; echo; done")
        assert sorted(seen.stdout_text.split()) == [f"MARK{i:02d}" for i in range(len(HOSTILE_NAMES))]
