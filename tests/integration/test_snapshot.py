"""Snapshots against real QEMU and the tiny guest (TCG): internal, external, saved state.

Markers are written both to the guest's disk (raw bytes at the start of
/dev/vda, read back with the page cache dropped, so they come from the disk)
and to its RAM (a file on the tmpfs /tmp).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, Drive, SnapshotError, images

# The module shares one VM: keep its tests on one xdist worker (--dist loadgroup).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("snapshot-vm")]

READ_DISK = (
    "sync; blockdev --flushbufs /dev/vda; echo 3 > /proc/sys/vm/drop_caches; head -c 8 /dev/vda"
)
COUNTER = (
    "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done' "
    "</dev/null >/dev/null 2>&1 &"
)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_qcow2(path: Path, size: str = "32M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def write_markers(vm: VM, marker: str) -> None:
    assert len(marker) == 8
    vm.exec(f"printf %s {marker} > /dev/vda && echo {marker} > /tmp/marker && sync", check=True)


def disk_marker(vm: VM) -> str:
    return vm.exec(READ_DISK, check=True).stdout_text


def ram_marker(vm: VM) -> str:
    return vm.exec("cat /tmp/marker 2>/dev/null || echo none").stdout_text.strip()


def guest_facts(vm: VM) -> tuple[int, str, float]:
    out = vm.exec("cat /tmp/counter /proc/sys/kernel/random/boot_id /proc/uptime", check=True)
    counter, boot_id, uptime = out.stdout_text.split("\n")[:3]
    return int(counter), boot_id, float(uptime.split()[0])


def test_internal_save_load_delete(booted: Any, tmp_path: Path) -> None:
    base = make_qcow2(tmp_path / "base.qcow2")
    digest = sha256(base)
    vm = booted(drives=(Drive(base, overlay=True),))
    write_markers(vm, "MARKER-A")
    info = vm.snapshots.save("clean")
    assert info.tag == "clean" and info.kind == "internal" and info.vm_state_size > 0
    assert [i.tag for i in vm.snapshots.list()] == ["clean"]

    write_markers(vm, "MARKER-B")
    assert (disk_marker(vm), ram_marker(vm)) == ("MARKER-B", "MARKER-B")
    vm.snapshots.load("clean")
    assert vm.status() == "running"
    assert (disk_marker(vm), ram_marker(vm)) == ("MARKER-A", "MARKER-A")

    with pytest.raises(SnapshotError, match="already exists"):
        vm.snapshots.save("clean")
    vm.snapshots.delete("clean")
    assert vm.snapshots.list() == []
    with pytest.raises(SnapshotError, match="has no snapshot 'clean'"):
        vm.snapshots.load("clean")
    assert vm.qmp("query-jobs") == []
    assert sha256(base) == digest


def test_preflight_refuses_a_raw_disk_and_changes_nothing(booted: Any, tmp_path: Path) -> None:
    raw = tmp_path / "data.img"
    raw.write_bytes(b"\0" * (8 << 20))
    vm = booted(drives=(Drive(raw, format="raw", id="data"),))
    write_markers(vm, "RAWDISK1")
    digest = sha256(raw)
    with pytest.raises(SnapshotError) as caught:
        vm.snapshots.save("nope")
    message = str(caught.value)
    assert "'data'" in message and "raw" in message and "overlay=True" in message
    assert "nothing was changed" in message
    assert vm.qmp("query-jobs") == []
    assert vm.snapshots.list() == []
    assert vm.status() == "running"
    assert sha256(raw) == digest
    assert disk_marker(vm) == "RAWDISK1"


def test_external_snapshots_revert_and_commit(booted: Any, tmp_path: Path) -> None:
    base = make_qcow2(tmp_path / "base.qcow2")
    digest = sha256(base)
    vm = booted(drives=(Drive(base, overlay=True),))
    write_markers(vm, "MARKER-A")
    info = vm.snapshots.external("with-ram", memory=True)
    assert info.kind == "external" and info.vm_state_size > 0
    write_markers(vm, "MARKER-B")
    vm.snapshots.revert("with-ram")
    assert (disk_marker(vm), ram_marker(vm)) == ("MARKER-A", "MARKER-A")

    write_markers(vm, "MARKER-C")
    vm.snapshots.save("inner")  # lands in the overlay, which commit would remove
    with pytest.raises(SnapshotError, match="'inner' were taken since"):
        vm.snapshots.commit("with-ram")
    vm.snapshots.delete("inner")
    vm.snapshots.commit("with-ram")
    assert vm.snapshots.list() == []
    assert (disk_marker(vm), ram_marker(vm)) == ("MARKER-C", "MARKER-C")

    # Disk only: the RAM cannot go back, so the guest boots again on the old disk.
    boot_id = vm.exec("cat /proc/sys/kernel/random/boot_id").stdout_text
    vm.snapshots.external("disk-only")
    write_markers(vm, "MARKER-D")
    vm.snapshots.revert("disk-only")
    assert vm.exec("cat /proc/sys/kernel/random/boot_id").stdout_text != boot_id
    assert (disk_marker(vm), ram_marker(vm)) == ("MARKER-C", "none")
    vm.snapshots.commit("disk-only")
    assert vm.qmp("query-block")[0]["inserted"]["node-name"] == "disk0-fmt"
    assert vm.runtime is not None and not list(vm.runtime.path.glob("ext-*"))
    assert sha256(base) == digest


# -- saved state: one save, several restores ------------------------------------------------


@dataclass(frozen=True)
class Saved:
    bundle: Path
    base: Path
    base_digest: str
    counter: int
    boot_id: str
    uptime: float


@pytest.fixture(scope="module")
def saved(tiny_image: images.TinyImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    """A tiny guest with a counter running in RAM and a marker on its disk, saved once."""
    work = tmp_path_factory.mktemp("saved")
    base = make_qcow2(work / "base.qcow2")
    digest = sha256(base)
    vm = VM(images.spec("tiny", accel="tcg", drives=(Drive(base, overlay=True),)))
    try:
        vm.start()
        vm.wait_ready(120)
        vm.exec(COUNTER, check=True)
        vm.exec("while [ ! -s /tmp/counter ]; do sleep 0.1; done", check=True, timeout=30)
        write_markers(vm, "SAVED-01")
        counter, boot_id, uptime = guest_facts(vm)
        bundle = vm.save_state(work / "bundle", stop=True)
        assert vm.state.value == "stopped"
    finally:
        if vm.state.value == "running":
            vm.kill()
    assert bundle.manifest["guest"] == "running"
    yield Saved(bundle.path, base, digest, counter, boot_id, uptime)


def test_restore_resumes_without_booting(saved: Saved) -> None:
    with VM.restore(saved.bundle) as clone:
        assert clone.status() == "running"
        counter, boot_id, uptime = guest_facts(clone)
        assert boot_id == saved.boot_id  # the same boot, not a new one
        assert saved.uptime <= uptime < saved.uptime + 10
        assert saved.counter <= counter < saved.counter + 50  # from where it was, not from 1
        clone.exec("sleep 1", check=True)
        assert guest_facts(clone)[0] > counter  # and still counting
        assert (disk_marker(clone), ram_marker(clone)) == ("SAVED-01", "SAVED-01")


def test_two_clones_side_by_side(saved: Saved) -> None:
    disk_copy = next(saved.bundle.glob("disk-*"))
    copy_digest = sha256(disk_copy)
    first = VM.restore(saved.bundle, name="clone-a")
    try:
        second = VM.restore(saved.bundle, name="clone-b")
        try:
            assert first.pid != second.pid
            assert first.status() == second.status() == "running"
            write_markers(first, "CLONE-AA")
            write_markers(second, "CLONE-BB")
            assert (disk_marker(first), ram_marker(first)) == ("CLONE-AA", "CLONE-AA")
            assert (disk_marker(second), ram_marker(second)) == ("CLONE-BB", "CLONE-BB")
            assert guest_facts(first)[1] == guest_facts(second)[1] == saved.boot_id
        finally:
            second.shutdown(timeout=10)
    finally:
        first.shutdown(timeout=10)
    assert sha256(saved.base) == saved.base_digest
    assert sha256(disk_copy) == copy_digest
    # A clone started after the others wrote still sees the disk as it was saved.
    with VM.restore(saved.bundle) as third:
        assert disk_marker(third) == "SAVED-01"


def test_save_state_refuses_an_occupied_path(booted: Any, tmp_path: Path) -> None:
    vm = booted()
    (tmp_path / "taken").mkdir()
    with pytest.raises(SnapshotError, match="already exists"):
        vm.save_state(tmp_path / "taken")
    assert vm.status() == "running"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
