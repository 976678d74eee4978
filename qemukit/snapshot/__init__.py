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

from ._bundle import Bundle, restore_vm, save_state, shared_ram_args
from ._ops import Snapshots, SyncSnapshots
from ._preflight import (
    BlockDevice,
    CheckKind,
    SnapshotInfo,
    block_devices,
    check_tag,
    find_problems,
    image_snapshots,
)

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
    "shared_ram_args",
]
