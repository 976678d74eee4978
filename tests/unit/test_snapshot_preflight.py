"""The snapshot preflight judges what QEMU reported: no QEMU needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from qemukit import Drive, SnapshotError, VMSpec
from qemukit.snapshot import BlockDevice, Bundle, block_devices, check_tag, find_problems
from qemukit.snapshot._bundle import MANIFEST
from qemukit.snapshot._records import EXT_PREFIX


def entry(qdev: str, node: str, drv: str, *, ro: bool = False, snapshots: Any = None) -> dict[str, Any]:
    image: dict[str, Any] = {"virtual-size": 1 << 25, "filename": f"/img/{node}", "format": drv}
    if snapshots is not None:
        image["snapshots"] = snapshots
    return {"device": "", "qdev": qdev, "inserted": {"node-name": node, "drv": drv, "ro": ro,
                                                     "file": f"/img/{node}", "image": image}}


QCOW2 = entry("/machine/peripheral/disk0/virtio-backend", "disk0-fmt", "qcow2")
RAW = entry("/machine/peripheral/data/virtio-backend", "data-fmt", "raw")
RAW_RO = entry("/machine/peripheral/iso/virtio-backend", "iso-fmt", "raw", ro=True)
PFLASH = entry("/machine/system.flash1", "ovmf-vars", "raw")
EMPTY_CDROM = {"device": "", "qdev": "/machine/peripheral/cd0", "locked": False}


def test_block_devices_reads_query_block() -> None:
    devices = block_devices([QCOW2, RAW_RO, PFLASH, EMPTY_CDROM])
    assert [d.device for d in devices] == ["disk0", "iso", "/machine/system.flash1"]
    assert devices[0] == BlockDevice("disk0", "disk0-fmt", "qcow2", False, "/img/disk0-fmt", 1 << 25,
                                     False, ())
    assert devices[1].read_only and devices[2].pflash


def test_a_qcow2_disk_passes_every_kind() -> None:
    devices = block_devices([QCOW2, RAW_RO])
    for kind in ("internal", "external", "external-memory"):
        assert find_problems(kind, devices) == []
    assert find_problems("state", devices, spec_drives=["disk0", "iso"]) == []


def test_writable_raw_disk_is_named_with_the_fix() -> None:
    problems = find_problems("internal", block_devices([QCOW2, RAW]))
    assert len(problems) == 1
    assert "'data'" in problems[0] and "raw" in problems[0] and "overlay=True" in problems[0]
    # External snapshots and saved state cope with raw disks.
    assert find_problems("external", block_devices([RAW])) == []
    assert find_problems("state", block_devices([RAW]), spec_drives=["data"]) == []


def test_read_only_raw_disk_is_fine() -> None:
    assert find_problems("internal", block_devices([QCOW2, RAW_RO])) == []


def test_pflash_variable_store_is_refused_for_every_kind() -> None:
    for kind in ("internal", "external", "external-memory", "state"):
        problems = find_problems(kind, block_devices([QCOW2, PFLASH]),
                                 spec_drives=["disk0"])
        assert len(problems) == 1, kind
        assert "pflash" in problems[0] and "firmware='seabios'" in problems[0]


def test_internal_needs_a_qcow2_disk() -> None:
    problems = find_problems("internal", [])
    assert problems and "Drive(path, overlay=True)" in problems[0]
    assert "no writable disk" in find_problems("external", block_devices([RAW_RO]))[0]


def test_migration_blockers_are_reported_when_ram_is_saved() -> None:
    reasons = ["The vvfat (rw) format used by node '#block012' does not support live migration"]
    devices = block_devices([QCOW2])
    for kind in ("internal", "external-memory", "state"):
        problems = find_problems(kind, devices, blocked_reasons=reasons,
                                 spec_drives=["disk0"])
        assert any("vvfat" in p for p in problems), kind
    assert find_problems("external", devices, blocked_reasons=reasons) == []


def test_runstate_must_be_running_or_paused() -> None:
    devices = block_devices([QCOW2])
    assert find_problems("internal", devices, runstate="paused") == []
    problems = find_problems("internal", devices, runstate="postmigrate")
    assert len(problems) == 1 and "'cont'" in problems[0]


def test_state_save_refuses_disks_clones_could_not_copy() -> None:
    hot = entry("/machine/peripheral/scratch/virtio-backend", "scratch-fmt", "qcow2")
    extra = entry("/machine/peripheral/other/virtio-backend", "other-fmt", "qcow2")
    records = [{"id": "scratch", "kind": "disk", "device": {},
                "backend": [{"command": "blockdev-add", "arguments": {}}]},
               {"id": "net1", "kind": "nic", "device": {},
                "backend": [{"command": "netdev_add", "arguments": {}}]}]
    problems = find_problems("state", block_devices([QCOW2, hot, extra]), spec_drives=["disk0"],
                             hotplugged=records)
    assert len(problems) == 2
    assert "'scratch' was hot-plugged" in problems[0]
    assert "'other'" in problems[1] and "not one of the spec's drives" in problems[1]


def test_state_save_refuses_active_external_snapshots() -> None:
    problems = find_problems("state", block_devices([QCOW2]), spec_drives=["disk0"],
                             external_tags=["before-upgrade"])
    assert len(problems) == 1 and "'before-upgrade'" in problems[0]


@pytest.mark.parametrize("tag", ["", "1234", "a b", "x" * 65, "tag/../x", EXT_PREFIX + "x"])
def test_bad_tags(tag: str) -> None:
    with pytest.raises(SnapshotError):
        check_tag(tag)


@pytest.mark.parametrize("tag", ["clean", "v1.2", "before:upgrade", "0day", "A_b-c+d"])
def test_good_tags(tag: str) -> None:
    assert check_tag(tag) == tag


def _bundle(tmp_path: Path, spec: VMSpec, disks: list[dict[str, str]]) -> Bundle:
    for name in ["state.bin"] + [d["file"] for d in disks]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "spec.toml").write_text(spec.dumps())
    manifest = {"format": 1, "qemu": "7.2.22", "guest": "running", "disks": disks}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    return Bundle.open(tmp_path)


def test_clone_spec_puts_every_saved_disk_under_an_overlay(tmp_path: Path) -> None:
    spec = VMSpec(name="orig", kernel="/k", accel="tcg",
                  drives=(Drive("/img/base.qcow2", overlay=True),
                          Drive("/img/data.raw", format="raw", id="data"),
                          Drive("/img/iso.raw", read_only=True)))
    bundle = _bundle(tmp_path, spec, [{"id": "disk0", "file": "disk-disk0.qcow2", "format": "qcow2"},
                                      {"id": "data", "file": "disk-data.img", "format": "raw"}])
    clone = bundle.clone_spec("copy")
    assert clone.name == "copy" and clone.accel == "tcg"
    assert clone.drives == (
        Drive(str(tmp_path / "disk-disk0.qcow2"), "qcow2", overlay=True, id="disk0"),
        Drive(str(tmp_path / "disk-data.img"), "raw", overlay=True, id="data"),
        Drive("/img/iso.raw", read_only=True, id="disk2"),
    )
    assert bundle.clone_spec().name is None


def test_bundle_open_explains_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="not a qemukit state bundle"):
        Bundle.open(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": 1, "disks": []}))
    with pytest.raises(SnapshotError, match="state.bin is missing"):
        Bundle.open(tmp_path)
