"""The hotplug operations (:class:`AsyncHotplug`) and their sync face (:class:`Hotplug`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

from .. import host
from .._launch.plan import DiskImage
from .._sync import SyncFacade, blocking
from ..arch import ARCHES
from ..errors import (
    HostError,
    HotplugError,
    QemukitError,
    QMPCommandError,
    SpecError,
    StateError,
    WaitTimeout,
)
from ..snapshot._bundle import discarding_device_refusal
from ..spec import ID_RE, Drive, DriveFormat, DriveInterface, Nic, NicKind, PortForward, parse_size
from ..target import VMTarget
from ..timeouts import PLUG_TIMEOUT, UNPLUG_TIMEOUT
from ._ledger import UNDO, DeviceLedger, DeviceRecord, PluggedDevice, refuse

T = TypeVar("T")
#: Linux onlines hot-added memory in blocks of 128 MiB (x86-64); the rest of
#: a DIMM that is not a multiple is silently ignored by the guest.
MEMORY_BLOCK_MIB = 128
#: First QEMU release measured to survive a vCPU unplug under TCG.
TCG_CPU_UNPLUG_MIN_QEMU = (10, 0)


# ACPI _OST (ACPI 6.x, 6.3.5): the event that caused it, and the status.
_OST_EJECT_REQUEST = 3
_OST_SUCCESS = 0
_OST_EJECT_IN_PROGRESS = 0x84
_OST_STATUS = {
    0x01: "non-specific failure",
    0x02: "unrecognized notify code",
    0x80: "ejection not supported by the guest",
    0x81: "device in use by an application",
    0x82: "device busy",
    0x83: "ejection dependency is busy or not supported",
    0x84: "ejection in progress",
}


_ID_PREFIX: dict[str, str] = {
    "disk": "disk", "nic": "net", "cpu": "cpu", "memory": "dimm", "controller": "scsi",
}




class AsyncHotplug:
    """Hotplug operations on one running VM (``vm.hotplug`` of an :class:`AsyncVM`).

    Operations on the same VM run one at a time, also across processes (the
    VM's operation lock): a port found free stays free until its device is
    added, and ``devices.json`` is read and written by one operation at a time.
    """

    def __init__(self, vm: VMTarget) -> None:
        self._vm = vm

    @property
    def ledger(self) -> DeviceLedger:
        """The VM's ``devices.json``."""
        if self._vm.runtime is None:
            raise StateError("the VM has no runtime directory (not started)")
        return DeviceLedger(self._vm.runtime)

    # -- disks -----------------------------------------------------------------------

    async def disk(
        self,
        path: str | os.PathLike[str],
        *,
        format: DriveFormat | None = None,
        read_only: bool = False,
        overlay: bool = False,
        interface: DriveInterface = "virtio-blk",
        id: str | None = None,
        timeout: float = PLUG_TIMEOUT,
    ) -> PluggedDevice:
        """Plug a qcow2 or raw image as a disk; returns once QEMU has the device.

        ``format=None`` takes the format ``qemu-img info`` reports; a given
        format must match it. ``overlay=True`` plugs a throwaway qcow2 over
        the image (the image itself is never written), created in the runtime
        directory and removed on unplug and with the VM. ``interface`` is
        ``virtio-blk`` (a PCI device on a free port), ``virtio-scsi`` (a
        ``scsi-hd`` on a virtio-scsi controller, added on a free port if the
        VM has none) or ``nvme``.
        """
        try:
            drive = Drive(file=os.fspath(path), format=format, interface=interface,
                          read_only=read_only, overlay=overlay, id=id)
        except SpecError as exc:
            name = exc.field.removeprefix("drive.")
            raise refuse("path" if name == "file" else name, exc.value, exc.reason) from exc
        async with self._vm.operation_lock():
            file = os.path.abspath(drive.file)
            if not os.path.isfile(file):
                raise refuse("path", str(drive.file), "no such file")
            qemu = self._vm.qemu
            try:
                # Not probed again on a disk a guest wrote; a header naming a backing
                # file or a data file is refused (see qemukit.host._img).
                image = await asyncio.to_thread(host.host_probe().resolve_disk, drive, qemu)
            except SpecError as exc:
                name = exc.field.removeprefix("drive.")
                raise refuse("path" if name == "file" else name, exc.value, exc.reason) from exc
            actual = image.format
            self._require_pci()
            if self._ccw and drive.interface != "virtio-blk":
                raise refuse("interface", drive.interface,
                             f"{self._vm.spec.machine} hotplugs virtio-blk disks only (on CCW)")
            used = await self._used_names()
            dev_id = self._pick_id(drive.id, "disk", used, lambda i: (
                f"{i}-file", f"{i}-fmt", *((f"{i}-b0-file", f"{i}-b0-fmt") if drive.overlay else ())))
            controller = None
            if drive.interface == "virtio-scsi":
                controller = await self._scsi_controller()
            port = None
            if not self._ccw and (drive.interface != "virtio-scsi" or controller is None):
                port = await self._free_port()
            overlay_path = None
            # The explicit graph, as at boot: a qcow2's backing is a node added here, or null.
            base_nodes: tuple[tuple[str, dict[str, Any]], ...] = ()
            below: str | None = None
            if drive.overlay:
                overlay_path = await asyncio.to_thread(self._make_overlay, qemu, file, image,
                                                       dev_id)
                below = f"{dev_id}-b0-fmt"
                base_nodes = (
                    ("blockdev-add", {"driver": "file", "node-name": f"{dev_id}-b0-file",
                                      "filename": file, "read-only": True}),
                    ("blockdev-add", {"driver": actual, "node-name": below,
                                      "file": f"{dev_id}-b0-file", "read-only": True,
                                      **({"backing": None} if actual == "qcow2" else {})}),
                )
                file, actual = overlay_path, "qcow2"
            added_controller = None
            try:
                if drive.interface == "virtio-scsi" and controller is None:
                    assert port is not None
                    controller = added_controller = await self._plug_controller(port, used, timeout)
                ro = {"read-only": True} if drive.read_only else {}
                backend = (
                    *base_nodes,
                    ("blockdev-add", {"driver": "file", "node-name": f"{dev_id}-file",
                                      "filename": file, **ro}),
                    ("blockdev-add", {"driver": actual, "node-name": f"{dev_id}-fmt",
                                      "file": f"{dev_id}-file", **ro,
                                      **({"backing": below} if actual == "qcow2" else {})}),
                )
                device: dict[str, Any] = {"id": dev_id, "drive": f"{dev_id}-fmt"}
                if drive.interface == "virtio-blk" and self._ccw:
                    device.update(driver="virtio-blk-ccw")  # the channel subsystem picks its id
                elif drive.interface == "virtio-blk":
                    device.update(driver="virtio-blk-pci", bus=port)
                elif drive.interface == "virtio-scsi":
                    device.update(driver="scsi-hd", bus=f"{controller}.0")
                else:
                    device.update(driver="nvme", bus=port, serial=dev_id[:20])
                record = DeviceRecord(dev_id, "disk", backend, device, overlay_path)
                try:
                    await self._plug(record, timeout)
                except HotplugError as exc:
                    if added_controller is None:
                        raise
                    raise HotplugError(
                        f"{exc}; the virtio-scsi controller {added_controller} added for it stays "
                        "plugged (unplug it if it is not wanted)",
                        field=exc.field, value=exc.value, device=exc.device, qmp_error=exc.qmp_error,
                    ) from exc
            except BaseException:
                if overlay_path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(overlay_path)
                raise
            return record.handle()

    def _make_overlay(self, qemu: host.QemuBinary, base: str, image: DiskImage,
                      dev_id: str) -> str:
        assert self._vm.runtime is not None
        if qemu.qemu_img is None:
            raise HotplugError("overlay=True needs qemu-img; install it with: apt-get install qemu-utils")
        overlay = self._vm.runtime.overlay(dev_id)
        with contextlib.suppress(FileNotFoundError):
            overlay.unlink()  # a leftover of a device with this id that is gone
        try:
            host.host_probe().create_overlay(qemu, base, image.format, overlay, size=image.virtual_size,
                                unsafe=True)
        except HostError as exc:
            raise refuse("overlay", True, str(exc), dev_id) from exc
        return str(overlay)

    async def _scsi_controller(self) -> str | None:
        """The id of a virtio-scsi controller the VM already has (boot or hot-plugged)."""
        for entry in await self._vm.qmp("qom-list", path="/machine/peripheral"):
            if entry["type"] == "child<virtio-scsi-pci>":
                return str(entry["name"])
        return None

    async def _plug_controller(self, port: str, used: set[str], timeout: float) -> str:
        ctrl_id = self._pick_id(None, "controller", used, lambda i: ())
        record = DeviceRecord(ctrl_id, "controller", (),
                         {"driver": "virtio-scsi-pci", "id": ctrl_id, "bus": port})
        await self._plug(record, timeout)
        used.add(ctrl_id)
        return ctrl_id

    # -- NICs --------------------------------------------------------------------------

    async def nic(
        self,
        *,
        forwards: Sequence[PortForward | str] = (),
        kind: NicKind = "user",
        ifname: str | None = None,
        mac: str | None = None,
        id: str | None = None,
        timeout: float = PLUG_TIMEOUT,
    ) -> PluggedDevice:
        """Plug a virtio-net NIC: user-mode networking (with host port forwards) or a tap.

        ``forwards`` are :class:`~qemukit.spec.PortForward` or strings such
        as ``"2222:22"`` (host 127.0.0.1:2222 to guest port 22). Without
        ``mac`` a random locally administered ``52:54:00:...`` address is
        chosen and recorded, so a restore gives the guest the same one.
        """
        try:
            # Nic parses "2222:22" strings into PortForward itself.
            nic = Nic(kind=kind, forwards=cast(Any, tuple(forwards)), ifname=ifname, mac=mac, id=id)
        except SpecError as exc:
            raise refuse(exc.field.removeprefix("nic."), exc.value, exc.reason) from exc
        async with self._vm.operation_lock():
            self._require_pci()
            for fw in nic.forwards:
                await asyncio.to_thread(_check_host_port, fw)
            used = await self._used_names()
            dev_id = self._pick_id(nic.id, "nic", used, lambda i: (f"{i}-backend",))
            port = None if self._ccw else await self._free_port()
            backend_id = f"{dev_id}-backend"
            netdev: dict[str, Any]
            if nic.kind == "tap":
                netdev = {"type": "tap", "id": backend_id, "ifname": nic.ifname,
                          "script": "no", "downscript": "no"}
            else:
                netdev = {"type": "user", "id": backend_id}
                if nic.forwards:
                    netdev["hostfwd"] = [
                        {"str": f"{fw.protocol}:{fw.host_addr}:{fw.host_port}-:{fw.guest_port}"}
                        for fw in nic.forwards
                    ]
            device: dict[str, Any] = {"driver": "virtio-net-pci", "id": dev_id,
                                      "netdev": backend_id, "mac": nic.mac or _random_mac(),
                                      "bus": port}
            if self._ccw:
                device["driver"] = "virtio-net-ccw"
                del device["bus"]
            record = DeviceRecord(dev_id, "nic", (("netdev_add", netdev),), device)
            await self._plug(record, timeout)
            return record.handle()

    # -- CPUs --------------------------------------------------------------------------

    async def cpu(self, count: int = 1, *, timeout: float = PLUG_TIMEOUT) -> tuple[PluggedDevice, ...]:
        """Plug ``count`` vCPUs into the next free slots; one handle per vCPU.

        Returns once the guest acknowledged each one (``ACPI_DEVICE_OST``);
        a Linux guest then onlines it through its hotplug uevent (the tiny
        guest does so by itself). Needs ``max_cpus`` above ``cpus``. A paused
        guest is not waited for; a guest still booting acknowledges nothing,
        so plug after :meth:`~qemukit.vm.AsyncVM.wait_ready`.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise refuse("count", count, "must be a positive integer")
        async with self._vm.operation_lock():
            self._require_acpi()
            spec = self._vm.spec
            slots = await self._vm.qmp("query-hotpluggable-cpus")
            free = sorted((s for s in slots if "qom-path" not in s),
                          key=lambda s: sorted(s["props"].items()))
            if len(free) < count:
                hint = "" if free else f"; start the VM with max_cpus above cpus ({spec.cpus})"
                raise refuse("max_cpus", spec.max_cpus,
                              f"{len(free)} free vCPU slot(s), {count} asked{hint}")
            if self._tcg:
                added = await asyncio.to_thread(self.ledger.vcpus_added)
                limit = (spec.max_cpus or spec.cpus) - spec.cpus
                if added + count > limit:
                    raise refuse(
                        "max_cpus", spec.max_cpus,
                        f"under TCG every vCPU ever hot-added keeps its translation context "
                        f"until QEMU exits: {added} of {limit} already used, {count} more asked",
                    )
            used = await self._used_names()
            plugged: list[PluggedDevice] = []
            for slot in free[:count]:
                # Named from the boot CPUs' count up, as the guest tends to number them.
                cpu_id = self._pick_id(None, "cpu", used, lambda i: (), start=spec.cpus)
                used.add(cpu_id)
                record = DeviceRecord(cpu_id, "cpu", (),
                                 {"driver": slot["type"], "id": cpu_id, **slot["props"]})
                try:
                    await self._plug(record, timeout, acknowledge=True)
                except HotplugError as exc:
                    if plugged:
                        raise HotplugError(
                            f"{exc}; already plugged and kept: {', '.join(p.id for p in plugged)}",
                            field=exc.field, value=exc.value, device=exc.device,
                            qmp_error=exc.qmp_error,
                        ) from exc
                    raise
                plugged.append(record.handle())
            return tuple(plugged)

    # -- memory ----------------------------------------------------------------------

    async def memory(self, size: int | str, *, timeout: float = PLUG_TIMEOUT) -> PluggedDevice:
        """Plug a DIMM of ``size`` (MiB, or ``"256M"``, ``"1G"``) backed by host RAM.

        Needs ``max_memory`` and ``slots`` in the spec; the size must be a
        multiple of 128 MiB (the block size a Linux guest onlines). Returns
        once the guest acknowledged the DIMM (``ACPI_DEVICE_OST``); with
        ``memhp_default_state=online`` the memory is then already usable (a
        Linux guest can give memory back on unplug only if it onlined it as
        movable: ``memhp_default_state=online_movable``). As for :meth:`cpu`,
        a paused guest is not waited for.
        """
        try:
            mib = parse_size(size, "size")
        except SpecError as exc:
            raise refuse("size", size, exc.reason) from exc
        if mib <= 0 or mib % MEMORY_BLOCK_MIB:
            raise refuse("size", size, f"must be a positive multiple of {MEMORY_BLOCK_MIB} MiB "
                          "(Linux guests online memory in 128 MiB blocks)")
        async with self._vm.operation_lock():
            self._require_acpi()
            spec = self._vm.spec
            if spec.max_memory is None:
                raise refuse("max_memory", None, "memory hotplug needs max_memory and slots "
                              "in the spec (e.g. max_memory='2G', slots=4)")
            summary = await self._vm.qmp("query-memory-size-summary")
            in_use = (summary["base-memory"] + summary.get("plugged-memory", 0)) >> 20
            if in_use + mib > spec.max_memory:
                raise refuse("max_memory", spec.max_memory,
                              f"{in_use} MiB in use, {mib} MiB more would exceed "
                              f"{spec.max_memory} MiB")
            dimms = await self._vm.qmp("query-memory-devices")
            if len(dimms) >= spec.slots:
                raise refuse("slots", spec.slots, f"all {spec.slots} memory slot(s) are in use")
            used = await self._used_names()
            dimm_id = self._pick_id(None, "memory", used, lambda i: (f"mem-{i}",))
            backend = (("object-add", {"qom-type": "memory-backend-ram", "id": f"mem-{dimm_id}",
                                       "size": mib << 20}),)
            record = DeviceRecord(dimm_id, "memory", backend,
                             {"driver": "pc-dimm", "id": dimm_id, "memdev": f"mem-{dimm_id}"})
            await self._plug(record, timeout, acknowledge=True)
            return record.handle()

    # -- unplug and listing -------------------------------------------------------

    async def unplug(self, device: PluggedDevice | str, timeout: float = UNPLUG_TIMEOUT) -> None:
        """Remove a hot-plugged device and its backends; returns once both are gone.

        Waits for ``DEVICE_DELETED`` (the guest has to release a PCI device,
        CPU or DIMM), then deletes the block nodes / netdev / memory backend
        and a disk's overlay. Raises :class:`HotplugError` if the guest
        refuses or does not release it within ``timeout``: the device then
        stays plugged and listed, and calling ``unplug`` again retries.
        """
        dev_id = device.id if isinstance(device, PluggedDevice) else device
        async with self._vm.operation_lock():
            records = await asyncio.to_thread(self.ledger.records)
            record = next((r for r in records if r.id == dev_id), None)
            if record is None:
                known = ", ".join(r.id for r in records) or "none"
                raise refuse("id", dev_id, f"not a device qemukit hot-plugged (plugged: {known})")
            if record.kind == "controller":
                bus = f"{dev_id}.0"
                users = [r.id for r in records if r.device.get("bus") == bus]
                if users:
                    raise refuse("id", dev_id, f"the controller still has disks: {', '.join(users)}; "
                                  "unplug them first", dev_id)
            if record.kind == "cpu" and self._tcg:
                version = await self._qemu_version()
                if version < TCG_CPU_UNPLUG_MIN_QEMU:
                    raise refuse(
                        "id", dev_id,
                        f"QEMU {'.'.join(map(str, version))} corrupts its memory when a vCPU is "
                        f"unplugged under TCG (it crashes soon after); that needs QEMU "
                        f"{'.'.join(map(str, TCG_CPU_UNPLUG_MIN_QEMU))} or later, or KVM",
                        dev_id,
                    )
            if dev_id in await self._peripheral():
                await self._guest_booted("unplug", dev_id)
                await self._device_del(record, timeout)
            await self._teardown(record)

    async def devices(self) -> list[PluggedDevice]:
        """The devices qemukit hot-plugged that are still plugged, in plug order.

        A device QEMU deleted after an unplug had timed out (the guest let it
        go later) has its backends removed here and is no longer listed.
        """
        async with self._vm.operation_lock():
            records = await asyncio.to_thread(self.ledger.records)
            if not records:
                return []
            present = await self._peripheral()
            out = []
            for record in records:
                if record.id in present:
                    out.append(record.handle())
                    continue
                try:
                    await self._teardown(record)
                except HotplugError:
                    out.append(record.handle())
            return out

    # -- the common steps -------------------------------------------------------------

    async def _guest_booted(self, action: str, dev_id: str) -> None:
        """Wait, bounded by the VM's boot timeout, until the guest can take part in ``action``.

        A guest still booting has no ACPI hotplug handler yet: it would
        never acknowledge a CPU or DIMM (although it enumerates them once its
        drivers start) nor release a device being unplugged, so the operation
        would report a false failure. Its agent answering is the sign that it
        is up; a VM without an agent, or a paused one, is taken as it is.
        """
        vm = self._vm
        if vm.spec.agent == "none" or vm.guest_booted or await vm.status() != "running":
            return
        try:
            await vm.wait_ready()
        except WaitTimeout as exc:
            raise HotplugError(
                f"{action} {dev_id}: the guest is still booting and did not become ready within "
                f"{exc.timeout:g}s; nothing was changed" + (f"\n{exc.console}" if exc.console else ""),
                device=dev_id,
            ) from exc

    async def _plug(self, record: DeviceRecord, timeout: float, *, acknowledge: bool = False) -> None:
        """Add the backends, then the device; undo the backends if the device fails.

        With ``acknowledge`` (CPUs, DIMMs) wait for the guest's ``_OST``
        report of the insertion, unless the guest is paused; a guest still
        booting is waited for first (see :meth:`_guest_booted`).
        """
        added: list[tuple[str, dict[str, Any]]] = []
        vm = self._vm
        driver = record.device.get("driver")
        refusal = discarding_device_refusal(vm.spec.extra_args, driver)
        if refusal is not None:
            raise refuse("driver", driver, refusal, record.id)
        if acknowledge:
            await self._guest_booted(f"plugging {record.kind}", record.id)

        def ours(event: Mapping[str, Any]) -> bool:
            info = event.get("data", {}).get("info", {})
            return bool(info.get("device") == record.id and info.get("source") != _OST_EJECT_REQUEST)

        with vm.monitor.listen("ACPI_DEVICE_OST", match=ours) as acks:
            try:
                for command, arguments in record.backend:
                    await vm.qmp(command, arguments, timeout=timeout)
                    added.append((command, arguments))
                await vm.qmp("device_add", record.device, timeout=timeout)
            except QMPCommandError as exc:
                leftovers = await self._undo(added)
                what = "QEMU refused " + ("the backend" if exc.command != "device_add" else "the device")
                raise HotplugError(
                    f"{record.kind} {record.id}: {what}: {exc.description}"
                    + (" (rolled back: nothing was left plugged)" if not leftovers else
                       f"; rolling back failed, still present: {'; '.join(leftovers)}"),
                    device=record.id,
                    qmp_error=f"{exc.error_class}: {exc.description}",
                ) from exc
            except QemukitError:
                # QEMU did not answer in time or went away: undo what can be undone.
                with contextlib.suppress(QemukitError):
                    await self._undo(added)
                raise
            await asyncio.to_thread(self.ledger.add, record)
            if not acknowledge or await vm.status() != "running":
                return
            what = f"the guest's ACPI acknowledgement of {record.kind} {record.id}"
            try:
                event = await vm.guarded(vm.monitor.wait_event(acks, timeout, what), timeout + 1, what)
            except WaitTimeout:
                raise HotplugError(
                    f"{record.kind} {record.id}: QEMU plugged it, but the guest did not acknowledge it "
                    f"within {timeout:g}s (no ACPI_DEVICE_OST); it stays plugged and listed",
                    device=record.id,
                ) from None
            status = event["data"]["info"].get("status", 0)
            if status != _OST_SUCCESS:
                raise HotplugError(
                    f"{record.kind} {record.id}: the guest reported failure for it "
                    f"(_OST status {status:#x}: {_OST_STATUS.get(status, 'unknown')}); "
                    "it stays plugged in QEMU and listed",
                    device=record.id,
                )

    async def _undo(self, added: Sequence[tuple[str, Mapping[str, Any]]]) -> list[str]:
        """Remove backends in reverse order; returns a description of each one that stayed."""
        leftovers = []
        for command, arguments in reversed(added):
            undo, key, name_key = UNDO[command]
            try:
                await self._vm.qmp(undo, {key: arguments[name_key]})
            except QMPCommandError as exc:
                if not _is_not_found(exc):
                    leftovers.append(f"{arguments[name_key]} ({exc.description})")
        return leftovers

    async def _device_del(self, record: DeviceRecord, timeout: float) -> None:
        """``device_del`` and wait until QEMU reports the device gone, or the guest refuses."""
        vm, dev_id = self._vm, record.id
        path = f"/machine/peripheral/{dev_id}"

        def relevant(event: Mapping[str, Any]) -> bool:
            data = event.get("data", {})
            if event["event"] == "ACPI_DEVICE_OST":
                info = data.get("info", {})
                return bool(info.get("source") == _OST_EJECT_REQUEST
                            and info.get("device") in (dev_id, None))
            return bool(data.get("device") == dev_id or data.get("path") == path)

        names = ("DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR", "ACPI_DEVICE_OST")
        with vm.monitor.listen(*names, match=relevant) as events:
            try:
                await vm.qmp("device_del", id=dev_id)
            except QMPCommandError as exc:
                if exc.error_class == "DeviceNotFound":
                    return  # deleted meanwhile (e.g. a timed-out unplug completed)
                if "in the process of unplug" not in exc.description:
                    raise HotplugError(
                        f"{record.kind} {dev_id}: QEMU refused to unplug it: {exc.description}",
                        device=dev_id, qmp_error=f"{exc.error_class}: {exc.description}",
                    ) from exc
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            what = f"DEVICE_DELETED for {record.kind} {dev_id}"
            while True:
                remaining = deadline - loop.time()
                try:
                    if remaining <= 0:
                        raise WaitTimeout(what, timeout)
                    event = await vm.guarded(vm.monitor.wait_event(events, remaining, what),
                                            remaining + 1, what)
                except WaitTimeout:
                    raise HotplugError(
                        f"{record.kind} {dev_id}: no DEVICE_DELETED within {timeout:g}s: the guest "
                        "did not release it (busy, paused or not listening); it stays plugged and "
                        "listed; unplug again to retry",
                        device=dev_id,
                    ) from None
                name, data = event["event"], event.get("data", {})
                if name == "DEVICE_DELETED" and data.get("device") == dev_id:
                    return
                if name == "DEVICE_UNPLUG_GUEST_ERROR":
                    raise HotplugError(
                        f"{record.kind} {dev_id}: the guest refused to release it "
                        "(DEVICE_UNPLUG_GUEST_ERROR); it stays plugged and listed",
                        device=dev_id,
                    )
                if name == "ACPI_DEVICE_OST":
                    info = data.get("info", {})
                    status = info.get("status", 0)
                    if info.get("device") == dev_id and status not in (_OST_SUCCESS,
                                                                       _OST_EJECT_IN_PROGRESS):
                        raise HotplugError(
                            f"{record.kind} {dev_id}: the guest refused to release it (_OST status "
                            f"{status:#x}: {_OST_STATUS.get(status, 'unknown')}); it stays plugged "
                            "and listed",
                            device=dev_id,
                        )
                    # QEMU sends no DEVICE_DELETED for an unplugged vCPU, only the
                    # guest's final _OST; whether the device is gone, QOM says.
                    if status == _OST_SUCCESS and dev_id not in await self._peripheral():
                        return
                # A child's DEVICE_DELETED (virtio-backend, lapic) comes before the
                # device's own; the device may have left QOM already, but its
                # backends are released only once its own event is sent.

    async def _teardown(self, record: DeviceRecord) -> None:
        """After the device is gone: delete its backends and overlay, drop its record."""
        leftovers = await self._undo(record.backend)
        if leftovers:
            raise HotplugError(
                f"{record.kind} {record.id}: the device is gone but QEMU kept its backend: "
                + "; ".join(leftovers),
                device=record.id,
            )
        if record.overlay is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record.overlay)
        await asyncio.to_thread(self.ledger.remove, record.id)

    # -- facts from QEMU ---------------------------------------------------------------

    @property
    def _tcg(self) -> bool:
        accel = self._vm.accel
        return accel is not None and accel.accel == "tcg"

    @property
    def _ccw(self) -> bool:
        """Whether devices attach to the channel subsystem (s390x), not to PCI."""
        return self._vm.spec.arch_info.transport == "ccw"

    def _require_pci(self) -> None:
        spec = self._vm.spec
        if self._ccw:
            return  # virtio-ccw devices hotplug without ports
        if spec.arch_info.no_pci_hotplug is not None:
            raise refuse("machine", spec.machine, spec.arch_info.no_pci_hotplug)
        if spec.machine not in ("q35", "virt"):
            raise refuse("machine", spec.machine, "PCI hotplug needs q35 (its pcie-root-ports)")
        if spec.hotplug_ports < 1:
            raise refuse("hotplug_ports", spec.hotplug_ports, "the VM has no hotplug ports")

    def _require_acpi(self) -> None:
        spec = self._vm.spec
        if not spec.arch_info.acpi:
            acpi = " and ".join(a.name for a in ARCHES.values() if a.acpi)
            raise refuse("machine", spec.machine, f"CPU and memory hotplug are wired for ACPI "
                         f"machines ({acpi} q35/pc) only, not {spec.machine} ({spec.arch})")
        if self._vm.spec.machine == "microvm":
            raise refuse("machine", "microvm", "CPU and memory hotplug need ACPI (q35 or pc)")

    async def _peripheral(self) -> dict[str, str]:
        """Device id -> QOM type of every device that has an id."""
        entries = await self._vm.qmp("qom-list", path="/machine/peripheral")
        return {str(e["name"]): str(e["type"]) for e in entries if str(e["type"]).startswith("child<")}

    async def _used_names(self) -> set[str]:
        """Ids and names in use: devices, block nodes, objects, and recorded devices."""
        names = set(await self._peripheral())
        names.update(n["node-name"] for n in await self._vm.qmp("query-named-block-nodes", flat=True))
        names.update(str(e["name"]) for e in await self._vm.qmp("qom-list", path="/objects"))
        names.update(r.id for r in await asyncio.to_thread(self.ledger.records))
        return names

    def _pick_id(self, wanted: str | None, kind: str, used: set[str],
                 derived: Callable[[str], tuple[str, ...]], start: int = 0) -> str:
        if wanted is not None:
            if not ID_RE.fullmatch(wanted):
                raise refuse("id", wanted, f"must match {ID_RE.pattern}")
            clash = [n for n in (wanted, *derived(wanted)) if n in used]
            if clash:
                raise refuse("id", wanted, f"already in use in QEMU ({clash[0]})")
            return wanted
        n = start
        while True:
            candidate = f"{_ID_PREFIX[kind]}{n}"
            if not any(name in used for name in (candidate, *derived(candidate))):
                return candidate
            n += 1

    async def _free_port(self) -> str:
        """The first pcie-root-port (hp0, hp1...) with no device on it."""
        ports = {f"hp{i}" for i in range(self._vm.spec.hotplug_ports)}
        busy: dict[str, list[str]] = {}
        for bus in await self._vm.qmp("query-pci"):
            for dev in bus.get("devices", ()):
                if dev.get("qdev_id") in ports and "pci_bridge" in dev:
                    busy[dev["qdev_id"]] = [
                        d.get("qdev_id") or d.get("class_info", {}).get("desc", "?")
                        for d in dev["pci_bridge"].get("devices", ())
                    ]
        for i in range(self._vm.spec.hotplug_ports):
            if f"hp{i}" in busy and not busy[f"hp{i}"]:
                return f"hp{i}"
        taken = ", ".join(f"{p}: {'/'.join(map(str, d))}" for p, d in sorted(busy.items()))
        raise refuse("hotplug_ports", self._vm.spec.hotplug_ports,
                      f"no free pcie-root-port ({taken or 'none found in QEMU'}); "
                      "unplug a device or start the VM with more hotplug_ports")

    async def _qemu_version(self) -> tuple[int, int]:
        version = (await self._vm.qmp("query-version"))["qemu"]
        return int(version["major"]), int(version["minor"])


def _is_not_found(exc: QMPCommandError) -> bool:
    text = exc.description.lower()
    return exc.error_class == "DeviceNotFound" or "not found" in text or "failed to find" in text


def _random_mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


def _check_host_port(fw: PortForward) -> None:
    """A forward's host port must be free now, or netdev_add would fail later."""
    if fw.host_port == 0:
        return
    kind = socket.SOCK_STREAM if fw.protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind((fw.host_addr, fw.host_port))
        except OSError as exc:
            raise refuse("forwards", str(fw), f"cannot use {fw.host_addr}:{fw.host_port} on the "
                          f"host: {exc.strerror or exc}") from exc


class Hotplug(SyncFacade):
    """The synchronous face of :class:`AsyncHotplug` (``vm.hotplug`` of a :class:`VM`).

    Derived method by method from :class:`AsyncHotplug` (same signatures).
    """

    _aio: AsyncHotplug

    @property
    def aio(self) -> AsyncHotplug:
        """The async operations object."""
        return self._aio

    disk = blocking(AsyncHotplug.disk)
    nic = blocking(AsyncHotplug.nic)
    cpu = blocking(AsyncHotplug.cpu)
    memory = blocking(AsyncHotplug.memory)
    unplug = blocking(AsyncHotplug.unplug)
    devices = blocking(AsyncHotplug.devices)
