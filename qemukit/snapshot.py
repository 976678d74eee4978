"""Snapshots of live VMs: internal, external, and saved state that clones restore from.

One API over three kinds (``vm.snapshots``, ``vm.save_state``, ``VM.restore``):

- **internal** (``save``/``load``/``delete``/``list``): QEMU's
  ``snapshot-save``, ``snapshot-load`` and ``snapshot-delete`` jobs store
  the disks and the RAM inside the VM's writable qcow2 images (the RAM in
  the first one). A drive booted with ``overlay=True`` keeps them in its
  throwaway overlay, so they last as long as the VM.
- **external** (``external``/``revert``/``commit``): ``blockdev-snapshot``
  puts a new qcow2 overlay on every writable disk in one transaction; the
  old top layers are frozen from then on. With ``memory=True`` the RAM is
  written into the first new overlay's vmstate area (an internal snapshot of
  the still-empty overlays). That keeps a snapshot one set of files and is
  what lets ``revert`` bring back RAM and disks inside the running QEMU
  (``snapshot-load``), with no restart. A disk-only snapshot is reverted by
  switching each disk to a fresh overlay over its frozen layer (a
  ``blockdev-mirror`` with ``sync=none``, which copies nothing) and then
  resetting the guest, whose RAM no longer matches its disks. ``commit``
  merges the overlays back into the frozen layers (``block-commit``).
  Revert and commit apply to the latest external snapshot (they nest).
- **saved state** (:func:`save_state`, :func:`restore_vm`): the guest is
  paused and its state migrated into a file through a descriptor passed
  over QMP (an ``exec:`` URI needs a shell, which QEMU's sandbox forbids).
  The file, the spec, the hot-plugged devices and a copy of each writable
  disk's top layer make a *bundle* directory. A restore starts a new QEMU
  with ``-incoming defer`` on its own qcow2 overlay over the bundle's disk
  copies, replays the hot-plugged devices and feeds it the state: the guest
  carries on where it was, without booting. Clones never write to the
  bundle, to each other's disks or to the original base images.

Before anything changes, :func:`find_problems` checks the VM: a writable raw
disk, a UEFI variable store (pflash), a device that blocks migration, a
disk a clone could not get its own copy of... each raises
:class:`~qemukit.errors.SnapshotError` naming the device and what to do
instead. Every wait is bounded and waits on the QMP event that proves the
step finished (``JOB_STATUS_CHANGE``, ``MIGRATION``, ``RESET``).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar

from . import host
from ._fs import write_atomic
from ._sync import SyncFacade, blocking
from .argv import drive_ids
from .errors import HostError, LaunchError, QemukitError, QMPCommandError, SnapshotError, WaitTimeout
from .process import run_command
from .qmp import EventListener
from .spec import Drive, VMSpec
from .timeouts import JOB_TIMEOUT, SAVE_TIMEOUT

if TYPE_CHECKING:
    from .target import VMTarget

__all__ = [
    "BlockDevice",
    "Bundle",
    "CheckKind",
    "SnapshotInfo",
    "Snapshots",
    "SyncSnapshots",
    "block_devices",
    "check_tag",
    "find_problems",
    "image_snapshots",
    "restore_vm",
    "save_state",
]

#: What a preflight checks for: the kind of snapshot about to be taken.
CheckKind = Literal["internal", "external", "external-memory", "state"]

TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:+-]{0,63}")
#: Internal snapshots holding an external snapshot's RAM are named with this prefix.
EXT_PREFIX = "qemukit-ext-"
BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.bin"
SPEC_FILE = "spec.toml"
#: Hot-plugged devices, as qemukit.hotplug records them in the runtime directory.
DEVICES_FILE = "devices.json"
#: External snapshots of a running VM, in its runtime directory (oldest first).
EXTERNAL_FILE = "external-snapshots.json"
_BANDWIDTH = 1 << 40  # bytes/s: no throttling while the guest is paused anyway


# -- what QEMU shows ------------------------------------------------------------------


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
    saves_ram = kind in ("internal", "external-memory", "state")
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
        elif kind == "internal" and dev.driver != "qcow2":
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


def _internal_infos(
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
    qemu = host.find_qemu()
    if qemu.qemu_img is None:
        raise SnapshotError("qemu-img not found; install it with: apt-get install qemu-utils")
    out = run_command([qemu.qemu_img, "info", "-U", "--output=json", "--", str(path)], timeout=30)
    if out.returncode != 0:
        raise SnapshotError(f"qemu-img cannot read {path}: {out.stderr.strip()}")
    data = json.loads(out.stdout)
    return _internal_infos([(str(path), data.get("snapshots") or [])])


# -- waiting on QEMU -----------------------------------------------------------------------


class _Deadline:
    """One time budget shared by the steps of an operation."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout

    def remaining(self, what: str) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise WaitTimeout(what, self.timeout)
        return left


async def _next_event(
    vm: VMTarget, listener: EventListener, deadline: _Deadline, what: str
) -> dict[str, Any]:
    """The next event from ``listener``; stops early if QEMU exits or the guest panics."""
    wait = vm.monitor.wait_event(listener, deadline.remaining(what), what)
    try:
        return await vm.guarded(wait, None, what)
    except WaitTimeout as exc:
        raise WaitTimeout(what, deadline.timeout, exc.console) from None


async def _run_job(
    vm: VMTarget,
    command: str,
    arguments: Mapping[str, Any],
    *,
    what: str,
    deadline: _Deadline,
    on_ready: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Run a QMP job to its end and raise :class:`SnapshotError` with its error if it failed.

    The JOB_STATUS_CHANGE listener is registered before the command, so no
    status change can slip by; ``on_ready`` is called when the job reports
    ``ready`` (block jobs that wait for ``job-complete``).
    """
    job_id = f"qemukit-{command}-{secrets.token_hex(3)}"
    with vm.monitor.listen(
        "JOB_STATUS_CHANGE", match=lambda ev: ev.get("data", {}).get("id") == job_id
    ) as listener:
        await vm.qmp(command, {**arguments, "job-id": job_id})
        status = ""
        while status not in ("concluded", "null"):
            event = await _next_event(
                vm, listener, deadline,
                f"job {job_id} ({what}) to conclude (last status: {status or 'created'})",
            )
            status = str(event["data"]["status"])
            if status == "ready" and on_ready is not None:
                await on_ready(job_id)
    jobs = await vm.qmp("query-jobs")
    error = next((j.get("error") for j in jobs if j.get("id") == job_id), None)
    if status == "concluded":
        await vm.qmp("job-dismiss", id=job_id)
    if error:
        raise SnapshotError(f"{what} failed: {error}", job_error=str(error))


async def _complete_job(vm: VMTarget, job_id: str) -> None:
    await vm.qmp("job-complete", id=job_id)


async def _checks(vm: VMTarget, kind: CheckKind) -> list[BlockDevice]:
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
        hotplugged=_read_json_list(rd.path / DEVICES_FILE) if rd else [],
        external_tags=[r["tag"] for r in _external_records(vm)],
    )
    if problems:
        what = {"internal": "take an internal snapshot of", "state": "save the state of"}.get(
            kind, "take an external snapshot of"
        )
        raise SnapshotError(f"cannot {what} VM {vm.name!r}; nothing was changed", problems=problems)
    return devices


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, list):
        raise SnapshotError(f"{path} does not hold a list")
    return data


def _write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=1))


def _external_records(vm: VMTarget) -> list[dict[str, Any]]:
    return _read_json_list(vm.runtime.path / EXTERNAL_FILE) if vm.runtime else []


def _qemu_img() -> str:
    qemu = host.find_qemu()
    if qemu.qemu_img is None:
        raise SnapshotError("qemu-img not found; install it with: apt-get install qemu-utils")
    return qemu.qemu_img


def _create_overlay(backing: str, backing_fmt: str, size: int, path: Path) -> None:
    """A qcow2 over ``backing``, without opening it (QEMU holds its write lock)."""
    try:
        host.create_overlay(backing, backing_fmt, path, size=size, unsafe=True)
    except HostError as exc:
        raise SnapshotError(str(exc)) from exc


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


# -- the snapshots API --------------------------------------------------------------------------

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _under_operation_lock(
    method: Callable[Concatenate[Snapshots, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[Snapshots, _P], Coroutine[Any, Any, _R]]:
    """Run a snapshot operation under the VM's operation lock (one at a time, any process)."""

    @functools.wraps(method)
    async def locked(self: Snapshots, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        async with self.vm.operation_lock():
            return await method(self, *args, **kwargs)

    return locked



class Snapshots:
    """Internal and external snapshots of one running VM (``vm.snapshots``), async.

    Every method checks first and raises :class:`SnapshotError` naming the
    device and the fix when the VM cannot be snapshotted; a failed QEMU job
    raises :class:`SnapshotError` carrying QEMU's error.
    """

    def __init__(self, vm: VMTarget) -> None:
        self.vm = vm

    async def preflight(self, kind: CheckKind = "internal") -> None:
        """Raise :class:`SnapshotError` if a snapshot of ``kind`` cannot be taken now."""
        await _checks(self.vm, kind)

    async def list(self) -> builtins.list[SnapshotInfo]:
        """Every snapshot: internal ones (from the block layer), then external ones."""
        devices = block_devices(await self.vm.qmp("query-block"))
        infos = _internal_infos([(d.device, d.snapshots) for d in devices if not d.pflash])
        for rec in _external_records(self.vm):
            size = 0
            if rec.get("memory"):
                size = sum(dev.vm_state_size(EXT_PREFIX + rec["tag"]) for dev in devices)
            infos.append(
                SnapshotInfo(rec["tag"], "external", tuple(d["device"] for d in rec["disks"]),
                             size, float(rec["created"]))
            )
        return infos

    @_under_operation_lock
    async def save(self, tag: str, *, replace: bool = False,
                   timeout: float = JOB_TIMEOUT) -> SnapshotInfo:
        """Save disks and RAM as internal snapshot ``tag`` (``replace`` overwrites one).

        The guest keeps running; QEMU pauses it for the moment of the save.
        """
        check_tag(tag)
        devices = await _checks(self.vm, "internal")
        if any(r["tag"] == tag for r in _external_records(self.vm)):
            raise SnapshotError(f"{tag!r} is already the tag of an external snapshot")
        nodes = [d for d in devices if not d.read_only and d.driver == "qcow2"]
        if any(d.snapshot(tag) for d in devices):
            if not replace:
                raise SnapshotError(
                    f"snapshot {tag!r} already exists on VM {self.vm.name!r}; delete it first "
                    "or pass replace=True"
                )
            await self.delete(tag, timeout=timeout)
        await _run_job(
            self.vm, "snapshot-save",
            {"tag": tag, "vmstate": nodes[0].node, "devices": [d.node for d in nodes]},
            what=f"snapshot-save of {tag!r}", deadline=_Deadline(timeout),
        )
        return next(i for i in await self.list() if i.tag == tag)

    @_under_operation_lock
    async def load(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Bring back disks and RAM as they were at internal snapshot ``tag``.

        A guest that was running runs on from the snapshot; a paused one stays paused.
        """
        devices = await _checks(self.vm, "internal")
        if any(r["tag"] == tag for r in _external_records(self.vm)):
            raise SnapshotError(f"{tag!r} is an external snapshot: use revert({tag!r})")
        nodes = [d for d in devices if not d.read_only and d.driver == "qcow2"]
        having = [d for d in nodes if d.snapshot(tag)]
        if not having:
            tags = sorted({str(s.get("name")) for d in nodes for s in d.snapshots})
            records = _external_records(self.vm)
            frozen = (
                f"; internal snapshots taken before external snapshot {records[-1]['tag']!r} "
                "are in the layers it froze: commit or revert it first" if records else ""
            )
            raise SnapshotError(
                f"VM {self.vm.name!r} has no snapshot {tag!r} (it has: "
                f"{', '.join(t for t in tags if not t.startswith(EXT_PREFIX)) or 'none'}){frozen}"
            )
        missing = [d.device for d in nodes if d not in having]
        if missing:
            raise SnapshotError(
                f"snapshot {tag!r} is missing on disk(s) {', '.join(missing)} (added after it "
                "was taken?): loading it would leave them out of step with the rest"
            )
        vmstate = next((d for d in having if d.vm_state_size(tag) > 0), None)
        if vmstate is None:
            raise SnapshotError(f"snapshot {tag!r} holds no RAM state, so it cannot be loaded live")
        await _run_job(
            self.vm, "snapshot-load",
            {"tag": tag, "vmstate": vmstate.node, "devices": [d.node for d in nodes]},
            what=f"snapshot-load of {tag!r}", deadline=_Deadline(timeout),
        )

    @_under_operation_lock
    async def delete(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Delete snapshot ``tag``: an internal one from every disk holding it.

        Deleting an external snapshot commits it (its data is kept, the point
        in time is forgotten), as :meth:`commit` does.
        """
        if any(r["tag"] == tag for r in _external_records(self.vm)):
            await self.commit(tag, timeout=timeout)
            return
        devices = block_devices(await self.vm.qmp("query-block"))
        having = [d for d in devices if d.snapshot(tag) and not d.read_only]
        if not having:
            raise SnapshotError(f"VM {self.vm.name!r} has no snapshot {tag!r}")
        await _run_job(
            self.vm, "snapshot-delete", {"tag": tag, "devices": [d.node for d in having]},
            what=f"snapshot-delete of {tag!r}", deadline=_Deadline(timeout),
        )

    # -- external ---------------------------------------------------------------------------

    @_under_operation_lock
    async def external(self, tag: str, *, memory: bool = False,
                       timeout: float = JOB_TIMEOUT) -> SnapshotInfo:
        """Freeze every writable disk under a new qcow2 overlay (one ``blockdev-snapshot``
        transaction); with ``memory=True`` also save the RAM, into the first overlay.

        The overlays live in the VM's runtime directory; the frozen layers are
        the files that were on top before (never written again until
        :meth:`commit`). Works with raw disks too.
        """
        vm = self.vm
        check_tag(tag)
        devices = await _checks(vm, "external-memory" if memory else "external")
        records = _external_records(vm)
        if any(r["tag"] == tag for r in records) or any(d.snapshot(tag) for d in devices):
            raise SnapshotError(f"snapshot {tag!r} already exists on VM {vm.name!r}")
        assert vm.runtime is not None
        disks: builtins.list[dict[str, Any]] = []
        for dev in (d for d in devices if not d.read_only and not d.pflash):
            path = vm.runtime.path / f"ext-{_safe_name(tag)}-{_safe_name(dev.device)}.qcow2"
            disks.append({"device": dev.device, "frozen_node": dev.node, "frozen_file": dev.file,
                          "frozen_format": dev.driver, "size": dev.virtual_size,
                          "overlay_node": f"qk-ext-{secrets.token_hex(4)}",
                          "overlay_file": str(path)})
        added: builtins.list[dict[str, Any]] = []
        try:
            for disk in disks:
                await asyncio.to_thread(_create_overlay, disk["frozen_file"],
                                        disk["frozen_format"], disk["size"],
                                        Path(disk["overlay_file"]))
                await vm.qmp("blockdev-add", {
                    "driver": "qcow2", "node-name": disk["overlay_node"],
                    "file": {"driver": "file", "filename": disk["overlay_file"]},
                    "backing": None,
                })
                added.append(disk)
            await vm.qmp("transaction", actions=[
                {"type": "blockdev-snapshot",
                 "data": {"node": d["frozen_node"], "overlay": d["overlay_node"]}}
                for d in disks
            ])
        except BaseException:
            for disk in added:
                with contextlib.suppress(QemukitError):  # undoing; the first error is raised
                    await vm.qmp("blockdev-del", node_name=disk["overlay_node"])
            for disk in disks:
                Path(disk["overlay_file"]).unlink(missing_ok=True)
            raise
        record = {"tag": tag, "created": time.time(), "memory": False, "disks": disks}
        _write_json(vm.runtime.path / EXTERNAL_FILE, [*records, record])
        if memory:
            try:
                await _run_job(
                    vm, "snapshot-save",
                    {"tag": EXT_PREFIX + tag, "vmstate": disks[0]["overlay_node"],
                     "devices": [d["overlay_node"] for d in disks]},
                    what=f"saving the RAM of external snapshot {tag!r}",
                    deadline=_Deadline(timeout),
                )
            except SnapshotError as exc:
                raise SnapshotError(
                    f"{exc} (the disk part of external snapshot {tag!r} was taken: "
                    f"commit({tag!r}) or revert({tag!r}) it)", job_error=exc.job_error
                ) from exc
            record["memory"] = True
            _write_json(vm.runtime.path / EXTERNAL_FILE, [*records, record])
        return next(i for i in await self.list() if i.tag == tag)

    async def _held_in_overlays(self, record: Mapping[str, Any], action: str) -> None:
        """Refuse to drop overlays that hold internal snapshots taken since (they would be lost)."""
        overlays = {d["overlay_node"] for d in record["disks"]}
        devices = block_devices(await self.vm.qmp("query-block"))
        held = sorted({str(s.get("name")) for d in devices if d.node in overlays
                       for s in d.snapshots if not str(s.get("name")).startswith(EXT_PREFIX)})
        if held:
            raise SnapshotError(
                f"cannot {action} external snapshot {record['tag']!r}: internal snapshot(s) "
                f"{', '.join(map(repr, held))} were taken since and live in its overlays, which "
                f"{action} removes; delete them first"
            )

    def _latest(self, tag: str, action: str) -> tuple[builtins.list[dict[str, Any]], dict[str, Any]]:
        records = _external_records(self.vm)
        tags = [r["tag"] for r in records]
        if tag not in tags:
            raise SnapshotError(
                f"VM {self.vm.name!r} has no external snapshot {tag!r} "
                f"(it has: {', '.join(tags) or 'none'})"
            )
        if tags[-1] != tag:
            raise SnapshotError(
                f"cannot {action} external snapshot {tag!r}: later ones exist "
                f"({', '.join(tags[tags.index(tag) + 1:])}); {action} those first"
            )
        return records, records[-1]

    @_under_operation_lock
    async def revert(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Go back to external snapshot ``tag`` (the latest), dropping what was written since.

        With RAM (``memory=True``) the guest carries on from the snapshot
        (paused if it was paused). A disk-only snapshot has no RAM to go back
        to, so the guest is reset and boots again on the reverted disks; this
        returns once its agent is up. The snapshot stays, to revert again.
        """
        vm = self.vm
        records, record = self._latest(tag, "revert")
        deadline = _Deadline(timeout)
        if record["memory"]:
            nodes = [d["overlay_node"] for d in record["disks"]]
            await _run_job(vm, "snapshot-load",
                           {"tag": EXT_PREFIX + tag, "vmstate": nodes[0], "devices": nodes},
                           what=f"revert to external snapshot {tag!r}", deadline=deadline)
            return
        await self._held_in_overlays(record, "revert")
        await vm.pause()
        assert vm.runtime is not None
        for disk in record["disks"]:
            path = Path(disk["overlay_file"]).with_suffix(f".{secrets.token_hex(3)}.qcow2")
            node = f"qk-ext-{secrets.token_hex(4)}"
            await asyncio.to_thread(_create_overlay, disk["frozen_file"], disk["frozen_format"],
                                    disk["size"], path)
            await vm.qmp("blockdev-add", {"driver": "qcow2", "node-name": node,
                                          "file": {"driver": "file", "filename": str(path)},
                                          "backing": disk["frozen_node"]})
            # sync=none copies nothing: on completion the device simply reads the new,
            # empty overlay, i.e. the frozen layer as it was at the snapshot.
            await _run_job(vm, "blockdev-mirror",
                           {"device": disk["overlay_node"], "target": node, "sync": "none",
                            "auto-dismiss": False},
                           what=f"switching {disk['device']} back to snapshot {tag!r}",
                           deadline=deadline, on_ready=lambda job: _complete_job(vm, job))
            await vm.qmp("blockdev-del", node_name=disk["overlay_node"])
            Path(disk["overlay_file"]).unlink(missing_ok=True)
            disk["overlay_node"], disk["overlay_file"] = node, str(path)
            _write_json(vm.runtime.path / EXTERNAL_FILE, records)
        await _reboot_guest(vm, deadline)

    @_under_operation_lock
    async def commit(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Merge external snapshot ``tag`` (the latest) back into the layers it froze.

        What the guest wrote since stays; the snapshot and its overlay files are gone.
        """
        vm = self.vm
        records, record = self._latest(tag, "commit")
        await self._held_in_overlays(record, "commit")
        deadline = _Deadline(timeout)
        assert vm.runtime is not None
        for disk in list(record["disks"]):
            # base-node must be named: QEMU's default base is the bottom of the chain,
            # which would write into the base image under an overlay=True drive.
            await _run_job(vm, "block-commit",
                           {"device": disk["overlay_node"], "top-node": disk["overlay_node"],
                            "base-node": disk["frozen_node"], "auto-dismiss": False},
                           what=f"committing {disk['device']} of snapshot {tag!r}",
                           deadline=deadline, on_ready=lambda job: _complete_job(vm, job))
            await vm.qmp("blockdev-del", node_name=disk["overlay_node"])
            Path(disk["overlay_file"]).unlink(missing_ok=True)
            record["disks"].remove(disk)
            remaining = records if record["disks"] else records[:-1]
            if remaining:
                _write_json(vm.runtime.path / EXTERNAL_FILE, remaining)
            else:
                (vm.runtime.path / EXTERNAL_FILE).unlink(missing_ok=True)


async def _reboot_guest(vm: VMTarget, deadline: _Deadline) -> None:
    """Reset the (paused) guest and let it boot; returns once its agent port is open again.

    Under ``no_reboot`` a reset ends QEMU, and the firmware resets once more
    by itself right after a host reset, so the reboot action is ``reset``
    until the new guest has come up (its agent opened the port).
    """
    if not vm.has_agent and vm.spec.no_reboot:
        raise SnapshotError(
            "reverting a disk-only snapshot reboots the guest, and without an agent qemukit "
            "cannot tell when a no_reboot guest is up again: take it with memory=True"
        )
    # Drop the connection to the old agent: the next command waits for the new one.
    await vm.reset_agent()
    if vm.spec.no_reboot:
        await vm.qmp("set-action", reboot="reset")
    try:
        with vm.monitor.listen("RESET") as resets, vm.monitor.listen(
            "VSERPORT_CHANGE",
            match=lambda ev: ev.get("data", {}).get("id") == "agent0-port"
            and ev["data"].get("open") is True,
        ) as port:
            await vm.qmp("system_reset")
            await _next_event(vm, resets, deadline, "the RESET event after 'system_reset'")
            await vm.resume()
            if vm.has_agent:
                await _next_event(vm, port, deadline,
                                  "the rebooted guest's agent to open its port (VSERPORT_CHANGE)")
    finally:
        if vm.spec.no_reboot and vm.qemu_alive():
            await vm.qmp("set-action", reboot="shutdown")


class SyncSnapshots(SyncFacade):
    """The synchronous face of :class:`Snapshots` (``vm.snapshots`` of a :class:`~qemukit.VM`).

    Derived method by method from :class:`Snapshots` (same signatures).
    """

    _aio: Snapshots

    @property
    def aio(self) -> Snapshots:
        """The async snapshots object."""
        return self._aio

    preflight = blocking(Snapshots.preflight)
    list = blocking(Snapshots.list)
    save = blocking(Snapshots.save)
    load = blocking(Snapshots.load)
    delete = blocking(Snapshots.delete)
    external = blocking(Snapshots.external)
    revert = blocking(Snapshots.revert)
    commit = blocking(Snapshots.commit)


@dataclass(frozen=True)
class Bundle:
    """A saved VM state on disk (a directory): restore starts clones from it.

    It holds ``manifest.json``, ``spec.toml`` (the VM as saved, accelerator
    pinned), ``state.bin`` (QEMU's migration stream), ``disk-<id>.*`` (each
    writable drive's top layer at save time, read-only) and, if devices were
    hot-plugged, ``devices.json``.
    """

    path: Path
    manifest: Mapping[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Read and check the bundle at ``path``."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise SnapshotError(f"{path} is not a qemukit state bundle (no {MANIFEST})") from None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"cannot read {path / MANIFEST}: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            raise SnapshotError(f"{path}: unknown bundle format {manifest.get('format')!r}")
        for name in [STATE_FILE, SPEC_FILE] + [d["file"] for d in manifest.get("disks", [])]:
            if not (path / name).is_file():
                raise SnapshotError(f"{path} is incomplete: {name} is missing")
        return cls(path, manifest)

    @property
    def state_file(self) -> Path:
        """QEMU's migration stream."""
        return self.path / STATE_FILE

    @property
    def spec(self) -> VMSpec:
        """The VM's spec as saved (drives pointing at the original files)."""
        return VMSpec.load(self.path / SPEC_FILE)

    def clone_spec(self, name: str | None = None) -> VMSpec:
        """The spec a clone runs: each saved disk becomes an overlay over its bundle copy."""
        spec = self.spec
        copies = {d["id"]: d for d in self.manifest.get("disks", [])}
        drives = []
        for drive, drive_id in zip(spec.drives, drive_ids(spec), strict=True):
            copy = copies.get(drive_id)
            if copy is None:
                drives.append(Drive(drive.file, drive.format, drive.interface, drive.read_only,
                                    drive.overlay, drive_id))
            else:
                drives.append(Drive(str(self.path / copy["file"]), copy["format"],
                                    drive.interface, False, True, drive_id))
        return spec.replace(name=name, drives=tuple(drives))

    def hotplugged(self) -> list[dict[str, Any]]:
        """The hot-plugged devices to recreate before the state is loaded."""
        return _read_json_list(self.path / DEVICES_FILE)

    def check_qemu(self, qemu: host.QemuBinary) -> None:
        """Refuse a QEMU whose machine types differ from the one that saved the state."""
        saved = str(self.manifest.get("qemu", ""))
        if saved.split(".")[:2] != qemu.version_string.split(".")[:2]:
            raise SnapshotError(
                f"{self.path} was saved by QEMU {saved} and this is {qemu.version_string} "
                f"({qemu.path}): the machine types differ, so the state cannot be loaded; "
                "set QEMUKIT_QEMU to a QEMU of the same major.minor version"
            )


def _copy_top_layer(src: str, dst: Path) -> str:
    """Copy one image file (sparse); keep its backing reference absolute. Returns its format."""
    qemu_img = _qemu_img()
    out = run_command([qemu_img, "info", "-U", "--output=json", "--", src], timeout=30)
    if out.returncode != 0:
        raise SnapshotError(f"qemu-img cannot read {src}: {out.stderr.strip()}")
    info = json.loads(out.stdout)
    copied = run_command(["cp", "--sparse=always", "--", src, str(dst)], timeout=600)
    if copied.returncode != 0:
        raise SnapshotError(f"cannot copy {src} to {dst}: {copied.stderr.strip()}")
    backing, full = info.get("backing-filename"), info.get("full-backing-filename")
    if backing and full and backing != full:
        rebased = run_command(
            [qemu_img, "rebase", "-u", "-b", full, "-F", info.get("backing-filename-format", "raw"),
             str(dst)],
            timeout=60,
        )
        if rebased.returncode != 0:
            raise SnapshotError(f"cannot point {dst} at {full}: {rebased.stderr.strip()}")
    os.chmod(dst, 0o444)
    return str(info["format"])


async def _migrate_out(vm: VMTarget, path: Path, deadline: _Deadline) -> None:
    """Migrate the (paused) guest's state into ``path`` through a passed fd."""
    caps = await vm.qmp("query-migrate-capabilities")
    events_were = bool(next((c["state"] for c in caps if c["capability"] == "events"), False))
    bandwidth_was = int((await vm.qmp("query-migrate-parameters")).get("max-bandwidth", 0))
    await vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    await vm.qmp("migrate-set-parameters", max_bandwidth=_BANDWIDTH)
    fdname = f"qemukit-save-{secrets.token_hex(3)}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            vm.monitor.send_fd(fd)
            await vm.qmp("getfd", fdname=fdname)
        finally:
            os.close(fd)  # QEMU holds its own copy now
        with vm.monitor.listen("MIGRATION") as listener:
            try:
                await vm.qmp("migrate", uri=f"fd:{fdname}")
            except QMPCommandError:
                with contextlib.suppress(QMPCommandError):  # QEMU may have dropped it already
                    await vm.qmp("closefd", fdname=fdname)
                raise
            await _wait_migration(vm, listener, deadline, f"saving the guest's state to {path}")
    except BaseException:
        if vm.qemu_alive():
            with contextlib.suppress(QemukitError):  # the migration's own error is raised
                await _set_migration(vm, events_were, bandwidth_was)
        raise
    await _set_migration(vm, events_were, bandwidth_was)


async def _set_migration(vm: VMTarget, events: bool, bandwidth: int) -> None:
    await vm.qmp("migrate-set-parameters", max_bandwidth=bandwidth)
    await vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": events}])


async def _wait_migration(
    vm: VMTarget, listener: EventListener, deadline: _Deadline, what: str
) -> None:
    status = "setup"
    while status != "completed":
        event = await _next_event(
            vm, listener, deadline,
            f"the MIGRATION event 'completed' ({what}; last status: {status})",
        )
        status = str(event["data"]["status"])
        if status in ("failed", "cancelled"):
            info = await vm.qmp("query-migrate")
            raise SnapshotError(
                f"{what}: the migration {status}: {info.get('error-desc', 'QEMU gave no reason')}"
            )


async def save_state(vm: VMTarget, path: Path, *, stop: bool = False,
                     timeout: float = SAVE_TIMEOUT) -> Bundle:
    """Save ``vm``'s state to a new bundle (see :func:`_save_state`), under its operation lock."""
    async with vm.operation_lock():
        return await _save_state(vm, path, stop=stop, timeout=timeout)


async def _save_state(vm: VMTarget, path: Path, *, stop: bool = False,
                      timeout: float = SAVE_TIMEOUT) -> Bundle:
    """Save ``vm``'s state to a new bundle directory at ``path`` (see :class:`Bundle`).

    The guest is paused while its state is written and its disks copied,
    then resumed (left paused if it was paused); with ``stop=True`` QEMU
    quits instead, as ``virsh save`` does. Nothing is left at ``path`` if
    the save fails.
    """
    deadline = _Deadline(timeout)
    devices = await _checks(vm, "state")
    assert vm.runtime is not None and vm.accel is not None
    path = Path(path).absolute()
    if path.exists():
        raise SnapshotError(f"{path} already exists; choose a new path or remove it")
    if not path.parent.is_dir():
        raise SnapshotError(f"{path.parent} is not a directory")
    partial = path.parent / f".{path.name}.partial-{secrets.token_hex(3)}"
    try:
        partial.mkdir(mode=0o700)
    except OSError as exc:
        raise SnapshotError(f"cannot write a bundle in {path.parent}: {exc}") from exc
    was_running = await vm.status() == "running"
    migrated = False
    try:
        await vm.pause()
        await _migrate_out(vm, partial / STATE_FILE, deadline)
        migrated = True
        try:
            manifest = await _fill_bundle(vm, devices, partial, was_running)
            os.rename(partial, path)
        except OSError as exc:
            raise SnapshotError(f"cannot write the bundle {path}: {exc}") from exc
    except BaseException:
        # Nothing was saved: remove the partial bundle and let the guest go on as before.
        shutil.rmtree(partial, ignore_errors=True)
        if vm.qemu_alive():
            with contextlib.suppress(QemukitError):  # the save's own error is raised
                await _resume_after(vm, was_running, migrated)
        raise
    if stop:
        await vm.shutdown(0)
    else:
        await _resume_after(vm, was_running, migrated)
    return Bundle(path, manifest)


async def _fill_bundle(vm: VMTarget, devices: Sequence[BlockDevice], partial: Path,
                       was_running: bool) -> dict[str, Any]:
    """Copy the disks' top layers, write the spec, devices and manifest; returns the manifest."""
    assert vm.runtime is not None and vm.accel is not None
    ids = drive_ids(vm.spec)
    disks = []
    for dev in devices:
        if dev.read_only or dev.pflash or dev.device not in ids:
            continue
        name = f"disk-{_safe_name(dev.device)}.{'qcow2' if dev.driver == 'qcow2' else 'img'}"
        fmt = await asyncio.to_thread(_copy_top_layer, dev.file, partial / name)
        disks.append({"id": dev.device, "file": name, "format": fmt})
    # The accelerator and CPU model are pinned: the state only loads into the same ones.
    spec = vm.spec.replace(accel=vm.accel.accel, cpu=vm.spec.cpu or vm.accel.cpu)
    spec.dump(partial / SPEC_FILE)
    hotplugged = _read_json_list(vm.runtime.path / DEVICES_FILE)
    if hotplugged:
        _write_json(partial / DEVICES_FILE, hotplugged)
    qemu = await asyncio.to_thread(host.find_qemu)
    manifest = {
        "format": BUNDLE_FORMAT, "created": time.time(), "source": vm.name,
        "qemu": qemu.version_string, "accel": vm.accel.accel,
        "guest": "running" if was_running else "paused",
        "state_size": (partial / STATE_FILE).stat().st_size, "disks": disks,
    }
    _write_json(partial / MANIFEST, manifest)
    return manifest


async def _resume_after(vm: VMTarget, was_running: bool, migrated: bool) -> None:
    """After an outgoing migration QEMU has let go of the disks; 'cont' takes them back."""
    if was_running:
        await vm.resume()
    elif migrated:
        await vm.resume()
        await vm.pause()


async def restore_vm(vm: VMTarget, bundle: Bundle, timeout: float = SAVE_TIMEOUT) -> None:
    """Restore ``bundle`` into ``vm`` (see :func:`_restore_vm`), under the clone's operation lock."""
    async with vm.operation_lock():
        await _restore_vm(vm, bundle, timeout)


async def _restore_vm(vm: VMTarget, bundle: Bundle, timeout: float = SAVE_TIMEOUT) -> None:
    """Feed ``bundle``'s state to ``vm``, just started with ``-incoming defer``; resume it.

    The hot-plugged devices are recreated first (same ids and arguments), so
    the state finds the devices it describes.
    """
    deadline = _Deadline(timeout)
    try:
        records = bundle.hotplugged()
        for rec in records:
            for cmd in rec.get("backend") or ():
                await vm.qmp(cmd["command"], cmd.get("arguments") or {})
            await vm.qmp("device_add", rec["device"])
        if records and vm.runtime is not None:
            _write_json(vm.runtime.path / DEVICES_FILE, records)
        await vm.qmp("migrate-set-capabilities",
                     capabilities=[{"capability": "events", "state": True}])
        fdname = f"qemukit-restore-{secrets.token_hex(3)}"
        fd = os.open(bundle.state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            vm.monitor.send_fd(fd)
            await vm.qmp("getfd", fdname=fdname)
        finally:
            os.close(fd)
        with vm.monitor.listen("MIGRATION") as listener:
            await vm.qmp("migrate-incoming", uri=f"fd:{fdname}")
            await _wait_migration(vm, listener, deadline, f"loading the state in {bundle.path}")
    except LaunchError as exc:
        raise SnapshotError(
            f"QEMU could not load the state in {bundle.path} (were devices added or changed "
            f"since it was saved?): {exc}"
        ) from exc
    if bundle.manifest.get("guest") == "running":
        await vm.resume()
