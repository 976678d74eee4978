"""What QEMU shows of a VM's block devices, and the preflight that says why a snapshot cannot be taken."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .. import host
from .._launch.argv import drive_ids
from .._launch.process import run_command
from ..errors import HostError, SnapshotError
from ._records import DEVICES_FILE, EXT_PREFIX, external_records, read_json_list

if TYPE_CHECKING:
    from ..target import VMTarget


#: What a preflight checks for: the kind of snapshot about to be taken.
CheckKind = Literal["internal", "external", "external-memory", "state", "checkpoint"]
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}")


@dataclass(frozen=True)
class BlockDevice:
    """A disk-like device as ``query-block`` shows it: the parts snapshots care about."""

    device: str
    node: str
    driver: str
    read_only: bool
    file: str
    virtual_size: int
    pflash: bool
    snapshots: tuple[Mapping[str, Any], ...] = ()

    def snapshot(self, tag: str) -> Mapping[str, Any] | None:
        """This device's internal snapshot named ``tag``, or None."""
        return next((s for s in self.snapshots if s.get("name") == tag), None)

    def vm_state_size(self, tag: str) -> int:
        """Bytes of RAM state in snapshot ``tag`` on this device (0: none, or no such tag)."""
        snap = self.snapshot(tag)
        return int(snap.get("vm-state-size", 0)) if snap else 0


def _qdev_id(qdev: str) -> str:
    """``/machine/peripheral/disk0/virtio-backend`` -> ``disk0``; other paths stay whole."""
    parts = qdev.split("/")
    if len(parts) >= 4 and parts[1] == "machine" and parts[2] == "peripheral":
        return parts[3]
    return qdev


def block_devices(query_block: Sequence[Mapping[str, Any]]) -> list[BlockDevice]:
    """The devices with a medium from a ``query-block`` reply."""
    found = []
    for entry in query_block:
        inserted = entry.get("inserted")
        if not inserted:
            continue
        qdev = str(entry.get("qdev") or entry.get("device") or inserted.get("node-name", "?"))
        image = inserted.get("image") or {}
        node = str(inserted.get("node-name", ""))
        found.append(
            BlockDevice(
                device=_qdev_id(qdev),
                node=node,
                driver=str(inserted.get("drv", "")),
                read_only=bool(inserted.get("ro", False)),
                file=str(inserted.get("file", "")),
                virtual_size=int(image.get("virtual-size", 0)),
                pflash="pflash" in qdev or "system.flash" in qdev or node == "ovmf-vars",
                snapshots=tuple(image.get("snapshots") or ()),
            )
        )
    return found


def _hotplugged_disks(records: Sequence[Mapping[str, Any]]) -> set[str]:
    """Ids of hot-plugged devices whose backend added a block node."""
    return {
        str(rec.get("id"))
        for rec in records
        if any(cmd.get("command") == "blockdev-add" for cmd in rec.get("backend") or ())
    }


def find_problems(
    kind: CheckKind,
    devices: Sequence[BlockDevice],
    *,
    runstate: str = "running",
    blocked_reasons: Sequence[str] = (),
    spec_drives: Sequence[str] = (),
    hotplugged: Sequence[Mapping[str, Any]] = (),
    external_tags: Sequence[str] = (),
) -> list[str]:
    """Every reason the snapshot ``kind`` cannot be taken, each naming what to do instead.

    Pure: it judges what QEMU reported (``query-block``, ``query-migrate``'s
    ``blocked-reasons``, ``query-status``) and what qemukit recorded. An
    empty list means go ahead.
    """
    problems: list[str] = []
    saves_ram = kind in ("internal", "external-memory", "state", "checkpoint")
    if runstate not in ("running", "paused"):
        problems.append(
            f"the VM is {runstate!r}; snapshots need a running or paused guest"
            + (" (after a state save, 'cont' resumes it)" if runstate == "postmigrate" else "")
        )
    writable = [d for d in devices if not d.read_only]
    hot_disks = _hotplugged_disks(hotplugged)
    for dev in writable:
        if dev.pflash:
            problems.append(
                f"{dev.device} (node {dev.node}) is the UEFI variable store (pflash), a raw "
                "file that can hold no snapshot and is not part of the guest's saved state: "
                "boot with firmware='seabios' (the default) to use snapshots"
            )
        elif kind in ("internal", "checkpoint") and dev.driver != "qcow2":
            problems.append(
                f"disk {dev.device!r} (node {dev.node}, {dev.file}) is a writable {dev.driver} "
                "image, which cannot hold internal snapshots: boot it with overlay=True (a "
                "qcow2 overlay over it), convert it with 'qemu-img convert -O qcow2', or make "
                "it read-only; external snapshots and save_state work with it as it is"
            )
        elif kind == "state" and dev.device not in spec_drives:
            if dev.device in hot_disks:
                problems.append(
                    f"disk {dev.device!r} was hot-plugged, and a state bundle cannot give a "
                    "clone its own copy of it yet: unplug it before saving, or declare it in "
                    "the spec's drives"
                )
            else:
                problems.append(
                    f"writable disk {dev.device!r} ({dev.file}) is not one of the spec's drives "
                    "(extra_args?), so clones would share it: declare it as a Drive, or make "
                    "it read-only"
                )
    usable = [d for d in writable if not d.pflash]
    if kind == "internal" and not any(d.driver == "qcow2" for d in usable):
        problems.append(
            "internal snapshots need a writable qcow2 disk to hold the RAM state and there is "
            "none: add one, e.g. Drive(path, overlay=True), or use save_state instead"
        )
    if kind in ("external", "external-memory") and not usable:
        problems.append("the VM has no writable disk to put an external snapshot on")
    if saves_ram:
        problems += [
            f"QEMU cannot save this VM's state: {reason}; unplug or remove that device first"
            for reason in blocked_reasons
        ]
    if kind == "state" and external_tags:
        problems.append(
            f"external snapshot(s) {', '.join(map(repr, external_tags))} are active and their "
            "frozen layers live in the VM's runtime directory: commit or revert them first"
        )
    return problems


def check_tag(tag: str) -> str:
    """Validate a snapshot tag: 1-64 of letters, digits and ``_.:+-``, not all digits."""
    if not isinstance(tag, str) or not TAG_RE.fullmatch(tag) or tag.isdigit():
        raise SnapshotError(
            f"bad snapshot tag {tag!r}: use 1-64 letters, digits or '_.:+-' (not only digits, "
            "which QEMU would take for a snapshot id)"
        )
    if tag.startswith(EXT_PREFIX):
        raise SnapshotError(f"snapshot tags starting with {EXT_PREFIX!r} are qemukit's own")
    return tag


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot: its tag, kind, the devices holding it, RAM size and when it was taken.

    ``vm_state_size`` is 0 for a disk-only snapshot; ``vm_clock`` is the
    guest's run time in seconds at the snapshot (internal snapshots only).
    """

    tag: str
    kind: Literal["internal", "external"]
    devices: tuple[str, ...]
    vm_state_size: int
    created: float
    vm_clock: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {
            "tag": self.tag, "kind": self.kind, "devices": list(self.devices),
            "vm_state_size": self.vm_state_size, "created": self.created,
            "vm_clock": self.vm_clock,
        }


def internal_infos(
    items: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
) -> list[SnapshotInfo]:
    """Group the snapshot tables of several devices by tag."""
    by_tag: dict[str, dict[str, Any]] = {}
    for device, snapshots in items:
        for snap in snapshots:
            tag = str(snap.get("name", ""))
            if not tag or tag.startswith(EXT_PREFIX):
                continue
            info = by_tag.setdefault(
                tag, {"devices": [], "size": 0, "created": 0.0, "clock": 0.0}
            )
            info["devices"].append(device)
            info["size"] += int(snap.get("vm-state-size", 0))
            info["created"] = max(
                info["created"], snap.get("date-sec", 0) + snap.get("date-nsec", 0) / 1e9
            )
            info["clock"] = max(
                info["clock"], snap.get("vm-clock-sec", 0) + snap.get("vm-clock-nsec", 0) / 1e9
            )
    return [
        SnapshotInfo(tag, "internal", tuple(i["devices"]), i["size"], i["created"], i["clock"])
        for tag, i in sorted(by_tag.items(), key=lambda kv: kv[1]["created"])
    ]


def image_snapshots(path: str | Path) -> list[SnapshotInfo]:
    """Internal snapshots stored in a qcow2 image, read with ``qemu-img info -U``.

    Works for a stopped VM's image and, read-only, for a running one's.
    """
    try:
        img = host.find_qemu_img()  # any qemu-img reads an image: no QEMU, no architecture
    except HostError as exc:
        raise SnapshotError(str(exc)) from exc
    out = run_command([img, "info", "-U", "--output=json", "--", str(path)], timeout=30)
    if out.returncode != 0:
        raise SnapshotError(f"qemu-img cannot read {path}: {out.stderr.strip()}")
    data = json.loads(out.stdout)
    return internal_infos([(str(path), data.get("snapshots") or [])])


async def checks(vm: VMTarget, kind: CheckKind) -> list[BlockDevice]:
    """Run the preflight for ``kind``; returns the block devices it looked at."""
    devices = block_devices(await vm.qmp("query-block"))
    runstate = str((await vm.qmp("query-status"))["status"])
    blocked = (await vm.qmp("query-migrate")).get("blocked-reasons") or []
    rd = vm.runtime
    problems = find_problems(
        kind,
        devices,
        runstate=runstate,
        blocked_reasons=blocked,
        spec_drives=drive_ids(vm.spec),
        hotplugged=read_json_list(rd.path / DEVICES_FILE) if rd else [],
        external_tags=[r["tag"] for r in external_records(vm)],
    )
    if problems:
        what = {"internal": "take an internal snapshot of", "state": "save the state of",
                "checkpoint": "checkpoint"}.get(
            kind, "take an external snapshot of"
        )
        raise SnapshotError(f"cannot {what} VM {vm.name!r}; nothing was changed", problems=problems)
    return devices
