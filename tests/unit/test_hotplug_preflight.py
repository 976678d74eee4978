"""Hotplug preflight, rollback and unplug outcomes against a fake QEMU (no processes).

The fake (qemukit.testing.FakeVM, which users test their own code with too)
answers the few QMP commands qemukit.hotplug uses from a small model of
QEMU's state and sends the events a guest would cause. Real QEMU
is exercised in tests/integration/test_hotplug.py; these cover the paths a
real guest rarely takes (DEVICE_UNPLUG_GUEST_ERROR, a failing blockdev-del)
and check that a refused change sends no command that changes anything.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from qemukit import Drive, HotplugError, SpecError, VMSpec, host
from qemukit._launch.plan import DiskImage
from qemukit._launch.runtime import RuntimeDir
from qemukit.errors import QMPCommandError
from qemukit.hotplug import AsyncHotplug, DeviceLedger, PluggedDevice
from qemukit.testing import MUTATING, FakeVM, Unplug

SPEC = VMSpec(kernel="/vmlinuz", cpus=1, max_cpus=3, memory=512, max_memory=1024, slots=2,
              hotplug_ports=2)


def _resolve_disk(drive: Drive, qemu: host.QemuBinary) -> DiskImage:
    """host.resolve_disk without qemu-img: the format by name; a raw file is no qcow2."""
    actual = "qcow2" if str(drive.file).endswith(".qcow2") else "raw"
    if drive.format == "qcow2" and actual == "raw":
        raise SpecError("drive.format", "qcow2", f"{drive.file} has no qcow2 header")
    return DiskImage(drive.format or actual, (), 4096)


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeVM]:
    with host.using_host_probe(replace(host.HostProbe(), resolve_disk=_resolve_disk)):
        yield FakeVM(tmp_path, SPEC)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\0" * 4096)
    return path


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- preflight ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "call"),
    [
        ("path", lambda ops, img: ops.disk(img.parent / "missing.raw")),
        ("format", lambda ops, img: ops.disk(img, format="qcow2")),
        ("interface", lambda ops, img: ops.disk(img, interface="ide")),
        ("overlay", lambda ops, img: ops.disk(img, read_only=True, overlay=True)),
        ("id", lambda ops, img: ops.disk(img, id="vser0")),
        ("id", lambda ops, img: ops.disk(img, id="2bad")),
        ("mac", lambda ops, img: ops.nic(mac="xx")),
        ("max_cpus", lambda ops, img: ops.cpu(3)),
        ("count", lambda ops, img: ops.cpu(0)),
        ("size", lambda ops, img: ops.memory("100M")),
        ("size", lambda ops, img: ops.memory("-1")),
        ("max_memory", lambda ops, img: ops.memory("1G")),
        ("id", lambda ops, img: ops.unplug("never-plugged")),
    ],
)
def test_refused_changes_touch_nothing(fake: FakeVM, image: Path, field: str, call: Any) -> None:
    ops = AsyncHotplug(fake)
    with pytest.raises(HotplugError) as info:
        run(call(ops, image))
    assert info.value.field == field, str(info.value)
    assert field in str(info.value)
    assert fake.mutations == []


def test_no_free_port(fake: FakeVM, image: Path) -> None:
    fake.ports = {"hp0": "a", "hp1": "b"}
    with pytest.raises(HotplugError, match="no free pcie-root-port .*hp0: a") as info:
        run(AsyncHotplug(fake).disk(image))
    assert (info.value.field, info.value.value) == ("hotplug_ports", 2)
    assert fake.mutations == []


def test_memory_needs_max_memory_and_a_slot(tmp_path: Path, fake: FakeVM) -> None:
    plain = FakeVM(tmp_path, VMSpec(kernel="/vmlinuz"))
    with pytest.raises(HotplugError, match="max_memory and slots") as info:
        run(AsyncHotplug(plain).memory(128))
    assert info.value.field == "max_memory"
    fake.dimms = [{"type": "dimm", "data": {"id": f"d{i}", "size": 0}} for i in range(2)]
    with pytest.raises(HotplugError, match="2 memory slot") as info:
        run(AsyncHotplug(fake).memory(128))
    assert info.value.field == "slots"
    assert fake.mutations == []


def test_tcg_limits_vcpus_added_over_the_vm_life(fake: FakeVM) -> None:
    ops = AsyncHotplug(fake)
    (first,) = run(ops.cpu())
    assert first.id == "cpu1"
    # QEMU 10 could unplug it; the slot is free again, but its TCG context is not.
    fake.version = (10, 0)
    run(ops.unplug(first))
    (second,) = run(ops.cpu())
    run(ops.unplug(second))
    before = list(fake.log)
    with pytest.raises(HotplugError, match="2 of 2 already used") as info:
        run(ops.cpu())
    assert info.value.field == "max_cpus"
    assert [c for c, _ in fake.log[len(before):] if c in MUTATING] == []


def test_cpu_unplug_refused_on_qemu_7_2_under_tcg(fake: FakeVM) -> None:
    ops = AsyncHotplug(fake)
    (cpu,) = run(ops.cpu())
    with pytest.raises(HotplugError, match="corrupts its memory"):
        run(ops.unplug(cpu))
    assert "device_del" not in fake.mutations
    assert [d.id for d in run(ops.devices())] == ["cpu1"]


# -- plug, rollback, record ------------------------------------------------------------------


def test_disk_plugs_backend_then_device_and_records_it(fake: FakeVM, image: Path) -> None:
    ops = AsyncHotplug(fake)
    disk = run(ops.disk(image, id="scratch"))
    assert disk == PluggedDevice("scratch", "disk", "virtio-blk-pci", "hp0",
                                 ("scratch-file", "scratch-fmt"))
    assert fake.mutations == ["blockdev-add", "blockdev-add", "device_add"]
    saved = json.loads((fake.runtime.path / "devices.json").read_text())
    assert saved == [{
        "id": "scratch", "kind": "disk",
        "backend": [
            {"command": "blockdev-add", "arguments": {"driver": "file", "node-name": "scratch-file",
                                                      "filename": str(image)}},
            {"command": "blockdev-add", "arguments": {"driver": "raw", "node-name": "scratch-fmt",
                                                      "file": "scratch-file"}},
        ],
        "device": {"id": "scratch", "drive": "scratch-fmt", "driver": "virtio-blk-pci", "bus": "hp0"},
    }]
    # A second disk goes on the next port with the next generated id.
    assert run(ops.disk(image)).bus == "hp1"


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img (the overlay)")
def test_an_overlay_disk_names_its_base_as_an_explicit_read_only_node(fake: FakeVM,
                                                                      image: Path) -> None:
    disk = run(AsyncHotplug(fake).disk(image, id="ov", overlay=True))
    assert disk.backends == ("ov-b0-file", "ov-b0-fmt", "ov-file", "ov-fmt")
    added = [a for c, a in fake.log if c == "blockdev-add"]
    assert added[0] == {"driver": "file", "node-name": "ov-b0-file", "filename": str(image),
                        "read-only": True}
    assert added[1] == {"driver": "raw", "node-name": "ov-b0-fmt", "file": "ov-b0-file",
                        "read-only": True}
    assert added[3] == {"driver": "qcow2", "node-name": "ov-fmt", "file": "ov-file",
                        "backing": "ov-b0-fmt"}


def test_a_qcow2_disk_opens_no_backing_file(fake: FakeVM, tmp_path: Path) -> None:
    qcow2 = tmp_path / "d.qcow2"
    qcow2.write_bytes(b"QFI\xfb" + b"\0" * 4092)
    run(AsyncHotplug(fake).disk(qcow2, id="q"))
    fmt = [a for c, a in fake.log if c == "blockdev-add"][1]
    assert fmt["backing"] is None


def test_failed_device_add_removes_the_backends_in_reverse(fake: FakeVM, image: Path) -> None:
    fake.fail["device_add"] = "Bus 'hp0' is full"
    with pytest.raises(HotplugError, match="rolled back") as info:
        run(AsyncHotplug(fake).disk(image, id="d"))
    assert info.value.qmp_error == "GenericError: Bus 'hp0' is full"
    assert info.value.device == "d"
    assert fake.mutations == ["blockdev-add", "blockdev-add", "device_add", "blockdev-del",
                              "blockdev-del"]
    assert [a["node-name"] for c, a in fake.log if c == "blockdev-del"] == ["d-fmt", "d-file"]
    assert fake.nodes == set()
    assert not (fake.runtime.path / "devices.json").exists()


def test_failed_format_node_removes_the_file_node(fake: FakeVM, image: Path) -> None:
    def second_fails(args: dict[str, Any]) -> Any:
        if args["node-name"].endswith("-fmt"):
            raise QMPCommandError("blockdev-add", "GenericError", "Failed to get \"write\" lock")
        return fake.model("blockdev-add", args)

    fake.on_command("blockdev-add", second_fails)
    with pytest.raises(HotplugError, match="QEMU refused the backend: .*lock"):
        run(AsyncHotplug(fake).disk(image, id="d"))
    assert fake.nodes == set()
    assert "device_add" not in fake.mutations


def test_nic_and_memory_roll_back_their_backend(fake: FakeVM) -> None:
    fake.fail["device_add"] = "nope"
    ops = AsyncHotplug(fake)
    with pytest.raises(HotplugError, match="rolled back"):
        run(ops.nic(forwards=["0:22"]))
    with pytest.raises(HotplugError, match="rolled back"):
        run(ops.memory("128M"))
    assert fake.netdevs == set() and fake.objects == set()
    assert [c for c in fake.mutations if c.endswith(("del", "_del"))] == ["netdev_del", "object-del"]


def test_nic_records_forwards_and_a_mac(fake: FakeVM) -> None:
    nic = run(AsyncHotplug(fake).nic(forwards=["0:22", "udp:0:53"], id="n"))
    (record,) = json.loads((fake.runtime.path / "devices.json").read_text())
    assert record["backend"] == [{"command": "netdev_add", "arguments": {
        "type": "user", "id": "n-backend",
        "hostfwd": [{"str": "tcp:127.0.0.1:0-:22"}, {"str": "udp:127.0.0.1:0-:53"}]}}]
    assert record["device"]["mac"].startswith("52:54:00:")
    assert nic.backends == ("n-backend",)


# -- unplug outcomes ----------------------------------------------------------------------------


def test_unplug_waits_for_the_device_then_deletes_backends(fake: FakeVM, image: Path) -> None:
    ops = AsyncHotplug(fake)
    disk = run(ops.disk(image, id="d"))
    run(ops.unplug("d"))
    assert fake.mutations[-3:] == ["device_del", "blockdev-del", "blockdev-del"]
    assert fake.nodes == set() and run(ops.devices()) == []
    assert disk.id == "d"


@pytest.mark.parametrize(("behaviour", "message"), [
    ("guest-error", "DEVICE_UNPLUG_GUEST_ERROR"),
    ("ost-busy", r"_OST status 0x82: device busy"),
    ("nothing", "no DEVICE_DELETED within 0.2s"),
])
def test_unplug_the_guest_does_not_allow(fake: FakeVM, behaviour: Unplug, message: str) -> None:
    ops = AsyncHotplug(fake)
    dimm = run(ops.memory(128))
    fake.on_unplug = behaviour
    with pytest.raises(HotplugError, match=message) as info:
        run(ops.unplug(dimm, timeout=0.2))
    assert info.value.device == dimm.id
    assert "object-del" not in fake.mutations
    assert [d.id for d in run(ops.devices())] == [dimm.id]


def test_a_late_deletion_is_finished_by_devices_and_unplug(fake: FakeVM, image: Path) -> None:
    ops = AsyncHotplug(fake)
    run(ops.disk(image, id="a"))
    run(ops.disk(image, id="b"))
    fake.on_unplug = "nothing"
    with pytest.raises(HotplugError):
        run(ops.unplug("a", timeout=0.05))
    with pytest.raises(HotplugError):
        run(ops.unplug("b", timeout=0.05))
    # The guest lets both go later, while nobody listens.
    fake.remove_device("a")
    fake.remove_device("b")
    assert [d.id for d in run(ops.devices())] == []  # devices() finished a's and b's teardown
    assert fake.nodes == set()


def test_a_backend_that_stays_keeps_the_record(fake: FakeVM, image: Path) -> None:
    ops = AsyncHotplug(fake)
    run(ops.disk(image, id="d"))
    fake.fail["blockdev-del"] = "Node d-fmt is in use"
    with pytest.raises(HotplugError, match="kept its backend: d-fmt"):
        run(ops.unplug("d"))
    assert [d.id for d in run(ops.devices())] == ["d"]
    del fake.fail["blockdev-del"]
    run(ops.unplug("d"))
    assert run(ops.devices()) == [] and fake.nodes == set()


# -- the ledger --------------------------------------------------------------------------------


def test_ledger_writes_atomically_and_keeps_order(tmp_path: Path) -> None:
    from qemukit.hotplug._ledger import DeviceRecord

    ledger = DeviceLedger(RuntimeDir(tmp_path))
    assert ledger.records() == []
    for name in ("x", "y", "z"):
        ledger.add(DeviceRecord(name, "nic", (), {"driver": "virtio-net-pci", "id": name}))
    ledger.remove("y")
    assert [r.id for r in ledger.records()] == ["x", "z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["devices.json", "devices.lock"]
    (tmp_path / "devices.json").write_text("{not json")
    with pytest.raises(HotplugError, match="unreadable"):
        ledger.records()


# -- a mapped clone's RAM template (QEMU < 8.2 opens it read-write) -----------------


@pytest.mark.parametrize("driver", ["virtio-balloon-pci", "virtio-balloon-device", "virtio-mem-pci"])
def test_no_discarding_device_on_a_writable_ram_template(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          driver: str) -> None:
    """QEMU 7.2 punches holes in the template for what a balloon or virtio-mem gives back."""
    from qemukit.hotplug._ledger import DeviceRecord
    from qemukit.snapshot._bundle import private_ram_args

    ram = tmp_path / "cache" / "ram"
    clone = SPEC.replace(extra_args=private_ram_args(512, ram, (7, 2, 0)))
    vm = FakeVM(tmp_path / "run", clone)
    record = DeviceRecord("b0", "nic", (), {"driver": driver, "id": "b0"})
    with pytest.raises(HotplugError) as info:
        run(AsyncHotplug(vm)._plug(record, 5.0))
    assert (info.value.field, info.value.value, info.value.device) == ("driver", driver, "b0")
    assert driver in str(info.value) and str(ram) in str(info.value)
    assert "punching holes" in str(info.value)
    assert vm.mutations == []


def test_discarding_devices_are_plugged_where_the_template_is_safe(tmp_path: Path) -> None:
    """Read-only (QEMU >= 8.2), no template at all, or another driver: nothing is refused."""
    from qemukit.snapshot._bundle import discarding_device_refusal, private_ram_args

    ram = tmp_path / "ram"
    old = private_ram_args(512, ram, (7, 2, 0))
    assert discarding_device_refusal(private_ram_args(512, ram, (8, 2, 0)), "virtio-balloon-pci") is None
    assert discarding_device_refusal((), "virtio-balloon-pci") is None
    assert discarding_device_refusal(old, "virtio-net-pci") is None
    assert discarding_device_refusal(old, "VIRTIO-MEM-PCI") is not None
    quoted = private_ram_args(512, Path("/a,b/ram"), (7, 2, 0))
    assert "/a,b/ram" in (discarding_device_refusal(quoted, "virtio-balloon-pci") or "")


def test_raw_qmp_device_add_of_a_balloon_is_refused_on_a_writable_template(tmp_path: Path) -> None:
    """vm.qmp("device_add", ...) cannot get around it (checked before QEMU is asked)."""
    from qemukit import AsyncVM
    from qemukit.snapshot._bundle import private_ram_args

    vm = AsyncVM(VMSpec(extra_args=private_ram_args(128, tmp_path / "ram", (7, 2, 0))))
    with pytest.raises(HotplugError, match="virtio-balloon-pci.*punching holes") as info:
        run(vm.qmp("device_add", driver="virtio-balloon-pci", id="b0"))
    assert (info.value.field, info.value.device) == ("driver", "b0")
    with pytest.raises(HotplugError):
        run(vm.qmp("device_add", {"driver": "virtio-mem-pci", "memdev": "m0"}))
