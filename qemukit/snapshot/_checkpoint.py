"""Checkpoints: RAM and disks saved inside the running QEMU, rolled back in a fraction of a second.

A checkpoint is an internal snapshot (``snapshot-save``) whose RAM state goes
into a qcow2 file of qemukit's own in the VM's runtime directory
(:data:`CHECKPOINT_FILE`), opened by QEMU as a block node no guest device
uses (``blockdev-add``, node :data:`CHECKPOINT_NODE`). So a VM with no disk at
all (the tiny image) can be checkpointed, and the guest never sees a new
device. Every writable qcow2 disk of the VM takes part too, so a rollback
(``snapshot-load``) brings back its RAM and its disks as they were together.
The file goes with the runtime directory when the VM ends.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from .._launch.process import run_command
from ..errors import SnapshotError
from ..timeouts import JOB_TIMEOUT
from ._jobs import Deadline, run_job
from ._preflight import check_tag, checks
from ._records import qemu_img

if TYPE_CHECKING:
    from ..target import VMTarget

log = logging.getLogger(__name__)

#: The qcow2 file (in the runtime directory) that holds the checkpoints' RAM states.
CHECKPOINT_FILE = "checkpoints.qcow2"
#: The block node QEMU opens it as (no guest device is attached to it).
CHECKPOINT_NODE = "qemukit-checkpoints"


async def _store(vm: VMTarget, create: bool) -> tuple[str, set[str]] | None:
    """The checkpoint node's name and the tags it holds, opened (and its file made) first if
    ``create``; None if it is not open and ``create`` is False."""
    nodes = await vm.qmp("query-named-block-nodes", flat=True)
    for node in nodes:
        if node.get("node-name") == CHECKPOINT_NODE:
            snaps = (node.get("image") or {}).get("snapshots") or []
            return CHECKPOINT_NODE, {str(s.get("name")) for s in snaps}
    if not create:
        return None
    if vm.runtime is None:
        raise SnapshotError(f"VM {vm.name!r} has no runtime directory to keep checkpoints in")
    path = vm.runtime.path / CHECKPOINT_FILE
    img = qemu_img(vm)
    # Its virtual size is irrelevant: a snapshot's RAM state lies beyond the disk's end.
    made = await asyncio.to_thread(
        run_command, [img, "create", "-q", "-f", "qcow2", "--", str(path), "1M"], timeout=60)
    if made.returncode != 0:
        raise SnapshotError(f"cannot create {path}: {made.stderr.strip()}")
    await vm.qmp("blockdev-add", {"driver": "qcow2", "node-name": CHECKPOINT_NODE,
                                  "file": {"driver": "file", "filename": str(path)}})
    return CHECKPOINT_NODE, set()


async def _held(vm: VMTarget, tag: str, action: str) -> tuple[str, list[str]]:
    """The checkpoint node and the disks' nodes, once it is sure that each holds ``tag``.

    Checked first because QEMU 7.2 leaves the guest stopped after a
    ``snapshot-load`` that fails.
    """
    devices = await checks(vm, "checkpoint")
    disks = [d for d in devices if not d.read_only and d.driver == "qcow2"]
    found = await _store(vm, create=False)
    if found is None or tag not in found[1]:
        have = ", ".join(sorted(found[1])) if found else ""
        raise SnapshotError(f"VM {vm.name!r} has no checkpoint {tag!r} to {action} "
                            f"(it has: {have or 'none'})")
    missing = [d.device for d in disks if d.snapshot(tag) is None]
    if missing:
        raise SnapshotError(f"checkpoint {tag!r} is missing on disk(s) {', '.join(missing)} "
                            "(added after it was taken?): it cannot be used any more")
    return found[0], [d.node for d in disks]


async def checkpoint(vm: VMTarget, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
    """Save the running ``vm``'s RAM and writable disks as checkpoint ``tag`` (see the module).

    The guest is paused for the moment of the save, then runs on. A tag in
    use is refused (:class:`SnapshotError`); drop it first.
    """
    check_tag(tag)
    async with vm.operation_lock():
        devices = await checks(vm, "checkpoint")
        disks = [d for d in devices if not d.read_only and d.driver == "qcow2"]
        store, tags = await _store(vm, create=True) or (CHECKPOINT_NODE, set())
        if tag in tags or any(d.snapshot(tag) for d in disks):
            raise SnapshotError(f"VM {vm.name!r} has a checkpoint or snapshot {tag!r} already")
        await run_job(vm, "snapshot-save",
                      {"tag": tag, "vmstate": store, "devices": [store, *(d.node for d in disks)]},
                      what=f"checkpoint {tag!r}", deadline=Deadline(timeout))
        log.debug("%s: checkpoint %r saved", vm.name, tag)


async def rollback(vm: VMTarget, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
    """Bring the running ``vm`` back to checkpoint ``tag``: its RAM and disks as they were.

    A disk added since the checkpoint has no part in it, so the rollback is
    refused before anything changes (:class:`SnapshotError`).
    """
    check_tag(tag)
    async with vm.operation_lock():
        store, disks = await _held(vm, tag, "roll back to")
        # The guest comes back as it was at the checkpoint: a panic or oops since is not its.
        vm.forget_guest_faults()
        was_running = await vm.status() == "running"
        try:
            await run_job(vm, "snapshot-load",
                          {"tag": tag, "vmstate": store, "devices": [store, *disks]},
                          what=f"rollback to checkpoint {tag!r}", deadline=Deadline(timeout))
        finally:
            # QEMU 7.2 leaves the guest stopped when the load fails.
            if was_running and vm.qemu_alive() and await vm.status() != "running":
                await vm.resume()
        log.debug("%s: rolled back to checkpoint %r", vm.name, tag)


async def drop_checkpoint(vm: VMTarget, tag: str, *, timeout: float = JOB_TIMEOUT) -> None:
    """Delete checkpoint ``tag`` (from the checkpoint file and every disk holding it)."""
    check_tag(tag)
    async with vm.operation_lock():
        store, disks = await _held(vm, tag, "drop")
        args: dict[str, Any] = {"tag": tag, "devices": [store, *disks]}
        await run_job(vm, "snapshot-delete", args, what=f"deleting checkpoint {tag!r}",
                      deadline=Deadline(timeout))
