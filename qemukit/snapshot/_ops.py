"""Internal and external snapshots of a running VM (:class:`Snapshots`) and their sync face."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from .._sync import SyncFacade, blocking
from ..errors import QemukitError, SnapshotError
from ..timeouts import JOB_TIMEOUT
from ._checkpoint import checkpoint, drop_checkpoint, rollback
from ._jobs import Deadline, complete_job, next_event, run_job
from ._preflight import CheckKind, SnapshotInfo, block_devices, check_tag, checks, internal_infos
from ._records import EXT_PREFIX, EXTERNAL_FILE, create_overlay, external_records, safe_name, write_json

if TYPE_CHECKING:
    from ..target import VMTarget


log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _under_operation_lock(
    method: Callable[Concatenate[Snapshots, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[Snapshots, _P], Coroutine[Any, Any, _R]]:
    """Run a snapshot operation under the VM's operation lock (one at a time, any process)."""

    @functools.wraps(method)
    async def locked(self: Snapshots, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        async with self.vm.operation_lock():
            log.debug("%s: snapshot %s %s %s", self.vm.name, method.__name__,
                      " ".join(map(repr, args)), kwargs or "")
            result = await method(self, *args, **kwargs)
            log.debug("%s: snapshot %s done", self.vm.name, method.__name__)
            return result

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
        await checks(self.vm, kind)

    async def list(self) -> builtins.list[SnapshotInfo]:
        """Every snapshot: internal ones (from the block layer), then external ones."""
        devices = block_devices(await self.vm.qmp("query-block"))
        infos = internal_infos([(d.device, d.snapshots) for d in devices if not d.pflash])
        for rec in external_records(self.vm):
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
        devices = await checks(self.vm, "internal")
        if any(r["tag"] == tag for r in external_records(self.vm)):
            raise SnapshotError(f"{tag!r} is already the tag of an external snapshot")
        nodes = [d for d in devices if not d.read_only and d.driver == "qcow2"]
        if any(d.snapshot(tag) for d in devices):
            if not replace:
                raise SnapshotError(
                    f"snapshot {tag!r} already exists on VM {self.vm.name!r}; delete it first "
                    "or pass replace=True"
                )
            await self.delete(tag, timeout=timeout)
        await run_job(
            self.vm, "snapshot-save",
            {"tag": tag, "vmstate": nodes[0].node, "devices": [d.node for d in nodes]},
            what=f"snapshot-save of {tag!r}", deadline=Deadline(timeout),
        )
        return next(i for i in await self.list() if i.tag == tag)

    @_under_operation_lock
    async def load(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Bring back disks and RAM as they were at internal snapshot ``tag``.

        A guest that was running runs on from the snapshot; a paused one stays paused.
        """
        devices = await checks(self.vm, "internal")
        if any(r["tag"] == tag for r in external_records(self.vm)):
            raise SnapshotError(f"{tag!r} is an external snapshot: use revert({tag!r})")
        nodes = [d for d in devices if not d.read_only and d.driver == "qcow2"]
        having = [d for d in nodes if d.snapshot(tag)]
        if not having:
            tags = sorted({str(s.get("name")) for d in nodes for s in d.snapshots})
            records = external_records(self.vm)
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
        # The guest comes back as it was at the snapshot: a panic or oops since is not its.
        self.vm.forget_guest_faults()
        await run_job(
            self.vm, "snapshot-load",
            {"tag": tag, "vmstate": vmstate.node, "devices": [d.node for d in nodes]},
            what=f"snapshot-load of {tag!r}", deadline=Deadline(timeout),
        )

    async def checkpoint(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Save RAM and disks as checkpoint ``tag``, also on a VM with no disk; the guest
        runs on. See :mod:`qemukit.snapshot._checkpoint`."""
        await checkpoint(self.vm, tag, timeout=timeout)

    async def rollback(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Bring RAM and disks back to checkpoint ``tag`` (a fraction of a second for a small
        guest); the guest runs on from there."""
        await rollback(self.vm, tag, timeout=timeout)

    async def drop_checkpoint(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Delete checkpoint ``tag``."""
        await drop_checkpoint(self.vm, tag, timeout=timeout)

    @_under_operation_lock
    async def delete(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Delete snapshot ``tag``: an internal one from every disk holding it.

        Deleting an external snapshot commits it (its data is kept, the point
        in time is forgotten), as :meth:`commit` does.
        """
        if any(r["tag"] == tag for r in external_records(self.vm)):
            await self.commit(tag, timeout=timeout)
            return
        devices = block_devices(await self.vm.qmp("query-block"))
        having = [d for d in devices if d.snapshot(tag) and not d.read_only]
        if not having:
            raise SnapshotError(f"VM {self.vm.name!r} has no snapshot {tag!r}")
        await run_job(
            self.vm, "snapshot-delete", {"tag": tag, "devices": [d.node for d in having]},
            what=f"snapshot-delete of {tag!r}", deadline=Deadline(timeout),
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
        devices = await checks(vm, "external-memory" if memory else "external")
        records = external_records(vm)
        if any(r["tag"] == tag for r in records) or any(d.snapshot(tag) for d in devices):
            raise SnapshotError(f"snapshot {tag!r} already exists on VM {vm.name!r}")
        assert vm.runtime is not None
        disks: builtins.list[dict[str, Any]] = []
        for dev in (d for d in devices if not d.read_only and not d.pflash):
            path = vm.runtime.path / f"ext-{safe_name(tag)}-{safe_name(dev.device)}.qcow2"
            disks.append({"device": dev.device, "frozen_node": dev.node, "frozen_file": dev.file,
                          "frozen_format": dev.driver, "size": dev.virtual_size,
                          "overlay_node": f"qk-ext-{secrets.token_hex(4)}",
                          "overlay_file": str(path)})
        added: builtins.list[dict[str, Any]] = []
        try:
            for disk in disks:
                await asyncio.to_thread(create_overlay, vm, disk["frozen_file"],
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
        write_json(vm.runtime.path / EXTERNAL_FILE, [*records, record])
        if memory:
            try:
                await run_job(
                    vm, "snapshot-save",
                    {"tag": EXT_PREFIX + tag, "vmstate": disks[0]["overlay_node"],
                     "devices": [d["overlay_node"] for d in disks]},
                    what=f"saving the RAM of external snapshot {tag!r}",
                    deadline=Deadline(timeout),
                )
            except SnapshotError as exc:
                raise SnapshotError(
                    f"{exc} (the disk part of external snapshot {tag!r} was taken: "
                    f"commit({tag!r}) or revert({tag!r}) it)", job_error=exc.job_error
                ) from exc
            record["memory"] = True
            write_json(vm.runtime.path / EXTERNAL_FILE, [*records, record])
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
        records = external_records(self.vm)
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
        deadline = Deadline(timeout)
        vm.forget_guest_faults()  # the guest is put back (or rebooted) from before them
        if record["memory"]:
            nodes = [d["overlay_node"] for d in record["disks"]]
            await run_job(vm, "snapshot-load",
                           {"tag": EXT_PREFIX + tag, "vmstate": nodes[0], "devices": nodes},
                           what=f"revert to external snapshot {tag!r}", deadline=deadline)
            return
        await self._held_in_overlays(record, "revert")
        await vm.pause()
        assert vm.runtime is not None
        for disk in record["disks"]:
            path = Path(disk["overlay_file"]).with_suffix(f".{secrets.token_hex(3)}.qcow2")
            node = f"qk-ext-{secrets.token_hex(4)}"
            await asyncio.to_thread(create_overlay, vm, disk["frozen_file"],
                                    disk["frozen_format"], disk["size"], path)
            await vm.qmp("blockdev-add", {"driver": "qcow2", "node-name": node,
                                          "file": {"driver": "file", "filename": str(path)},
                                          "backing": disk["frozen_node"]})
            # sync=none copies nothing: on completion the device simply reads the new,
            # empty overlay, i.e. the frozen layer as it was at the snapshot.
            await run_job(vm, "blockdev-mirror",
                           {"device": disk["overlay_node"], "target": node, "sync": "none",
                            "auto-dismiss": False},
                           what=f"switching {disk['device']} back to snapshot {tag!r}",
                           deadline=deadline, on_ready=lambda job: complete_job(vm, job))
            await vm.qmp("blockdev-del", node_name=disk["overlay_node"])
            Path(disk["overlay_file"]).unlink(missing_ok=True)
            disk["overlay_node"], disk["overlay_file"] = node, str(path)
            write_json(vm.runtime.path / EXTERNAL_FILE, records)
        await _reboot_guest(vm, deadline)

    @_under_operation_lock
    async def commit(self, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
        """Merge external snapshot ``tag`` (the latest) back into the layers it froze.

        What the guest wrote since stays; the snapshot and its overlay files are gone.
        """
        vm = self.vm
        records, record = self._latest(tag, "commit")
        await self._held_in_overlays(record, "commit")
        deadline = Deadline(timeout)
        assert vm.runtime is not None
        for disk in list(record["disks"]):
            # base-node must be named: QEMU's default base is the bottom of the chain,
            # which would write into the base image under an overlay=True drive.
            await run_job(vm, "block-commit",
                           {"device": disk["overlay_node"], "top-node": disk["overlay_node"],
                            "base-node": disk["frozen_node"], "auto-dismiss": False},
                           what=f"committing {disk['device']} of snapshot {tag!r}",
                           deadline=deadline, on_ready=lambda job: complete_job(vm, job))
            await vm.qmp("blockdev-del", node_name=disk["overlay_node"])
            Path(disk["overlay_file"]).unlink(missing_ok=True)
            record["disks"].remove(disk)
            remaining = records if record["disks"] else records[:-1]
            if remaining:
                write_json(vm.runtime.path / EXTERNAL_FILE, remaining)
            else:
                (vm.runtime.path / EXTERNAL_FILE).unlink(missing_ok=True)


async def _reboot_guest(vm: VMTarget, deadline: Deadline) -> None:
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
            await next_event(vm, resets, deadline, "the RESET event after 'system_reset'")
            await vm.resume()
            if vm.has_agent:
                await next_event(vm, port, deadline,
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
    checkpoint = blocking(Snapshots.checkpoint)
    rollback = blocking(Snapshots.rollback)
    drop_checkpoint = blocking(Snapshots.drop_checkpoint)
