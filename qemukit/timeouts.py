"""Default deadlines, in seconds, for every kind of wait (one place to read and tune them).

A light module on purpose: the CLI reads these for its option defaults without
importing the asyncio machinery.
"""

from __future__ import annotations

#: A QMP command's reply, and QEMU's monitor greeting at start.
QMP_TIMEOUT = 30.0
#: Boot until the guest agent answers.
BOOT_TIMEOUT = 120.0
#: A hotplug until QEMU has the device; an unplug until DEVICE_DELETED.
PLUG_TIMEOUT = 30.0
UNPLUG_TIMEOUT = 30.0
#: A snapshot job (save/load/delete); a state save to a bundle.
JOB_TIMEOUT = 120.0
SAVE_TIMEOUT = 300.0
#: Waiting for a VM's operation lock held by another operation (hotplug, snapshot,
#: restore), in this process or another: as long as the longest such operation.
LOCK_TIMEOUT = 300.0
