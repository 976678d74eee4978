"""Hot-plug and unplug disks, NICs, CPUs and memory on a running VM.

Every change goes the same way:

1. **Preflight**, before anything in QEMU changes: the arguments, a free
   pcie-root-port or slot, ``max_cpus``/``max_memory``/``slots`` headroom,
   the file and its real format, an unused id. A change that cannot work
   raises :class:`~qemukit.errors.HotplugError` naming the field and value.
2. **Backend, then device**: ``blockdev-add``/``netdev_add``/``object-add``,
   then ``device_add``. If ``device_add`` fails, the backends added so far
   are removed again, so nothing half-plugged remains.
3. **Record**: what was plugged goes to ``devices.json`` in the VM's runtime
   directory (the backend commands and the ``device_add`` arguments), so
   another process (``qemukit`` commands, :meth:`AsyncVM.attach`) sees it and
   a restore can declare the same devices on a new QEMU's command line.
4. **Completion** comes from QMP events, never from sleeping: CPUs and DIMMs
   return once the guest acknowledged them (``ACPI_DEVICE_OST``); an unplug
   returns once QEMU reports the device gone (``DEVICE_DELETED``) and its
   backends are deleted. A guest that refuses (a failing ``_OST`` status or
   ``DEVICE_UNPLUG_GUEST_ERROR``) or does not answer in time raises
   :class:`HotplugError`; the device then stays listed as plugged.

PCI devices (virtio-blk, virtio-net, nvme, the virtio-scsi controller) go
on the q35 machine's free ``pcie-root-port`` (``hp0``..``hpN-1``, see
``VMSpec.hotplug_ports``). QEMU's ACPI PCI hotplug gives no QMP signal when
the guest has probed a new PCI device, so :meth:`AsyncHotplug.disk` and
:meth:`AsyncHotplug.nic` return once QEMU has the device; a Linux guest sees
it about 0.1 s later under TCG.

Two QEMU limits under TCG (measured, QEMU 7.2 and 10.0) shape the CPU
preflight: QEMU 7.2 corrupts its own heap when a vCPU is unplugged (the next
QMP command or CPU hotplug crashes it), so qemukit refuses CPU unplug there;
and every vCPU thread ever started keeps its TCG context until QEMU exits,
so the number of vCPUs hot-added over the VM's life cannot exceed
``max_cpus - cpus`` (QEMU 10.0 aborts on the next one).
"""

from __future__ import annotations

from ..timeouts import PLUG_TIMEOUT, UNPLUG_TIMEOUT
from ._ledger import DeviceKind, DeviceLedger, PluggedDevice
from ._ops import AsyncHotplug, Hotplug

__all__ = [
    "AsyncHotplug",
    "DeviceKind",
    "DeviceLedger",
    "Hotplug",
    "PLUG_TIMEOUT",
    "PluggedDevice",
    "UNPLUG_TIMEOUT",
]
