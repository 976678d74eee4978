"""Hotplug and unplug against real QEMU and the tiny guest (TCG), checked from inside the guest.

Three VMs are shared by the tests of this module: ``vm`` for disks and NICs
(every test leaves it as it found it), ``vm_res`` for CPUs and memory
(hot-added CPUs and DIMMs cannot always be taken back: see the tests), and
``vm_movable`` whose guest onlines hot-added memory as movable, so a DIMM
can be unplugged again.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, HotplugError, images
from qemukit.hotplug import DeviceLedger
from qemukit.images import TINY_APPEND
from tests.helpers import run_qemukit

# The module shares one VM: keep its tests on one xdist worker (--dist loadgroup).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hotplug-vm")]

MiB = 1 << 20


def _boot(**overrides: Any) -> VM:
    vm = VM(images.spec("tiny", accel="tcg", **overrides))
    vm.start()
    try:
        vm.wait_ready(120)
    except BaseException:
        vm.kill()
        raise
    return vm


@pytest.fixture(scope="module")
def vm(tiny_image: images.TinyImage) -> Iterator[VM]:
    """A q35 guest with 4 free pcie-root-ports (hp0..hp3), for disks and NICs."""
    machine = _boot(hotplug_ports=4)
    yield machine
    machine.shutdown(timeout=10)


@pytest.fixture(scope="module")
def vm_res(tiny_image: images.TinyImage) -> Iterator[VM]:
    """1 of max 4 vCPUs, 512 MiB of max 1 GiB in 2 slots; memory onlined as the default zone."""
    machine = _boot(cpus=1, max_cpus=4, memory=512, max_memory="1G", slots=2)
    yield machine
    machine.shutdown(timeout=10)


@pytest.fixture(scope="module")
def vm_movable(tiny_image: images.TinyImage) -> Iterator[VM]:
    """Hot-added memory onlined into ZONE_MOVABLE, which Linux can give back."""
    append = TINY_APPEND.replace("memhp_default_state=online", "memhp_default_state=online_movable")
    machine = _boot(max_memory="2G", slots=2, append=append)
    yield machine
    machine.shutdown(timeout=10)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hotplug-images")


def _raw_with_marker(directory: Path, name: str, marker: bytes, size: int = 8 * MiB) -> Path:
    path = directory / f"{name}.raw"
    with open(path, "wb") as fh:
        fh.truncate(size)
        fh.write(marker)
    return path


def _qcow2_from(raw: Path) -> Path:
    qcow2 = raw.with_suffix(".qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)],
                   check=True)
    return qcow2


def _marker() -> bytes:
    return b"qemukit-hotplug-" + secrets.token_hex(8).encode()


# -- guest and QEMU views ------------------------------------------------------------


def _ls(vm: VM, directory: str) -> set[str]:
    return set(vm.exec(["ls", directory], check=True).stdout_text.split())


def _wait_for_new(vm: VM, directory: str, before: set[str], timeout: float = 10.0) -> str:
    """Wait (bounded, in the guest) for one more entry in ``directory``; return its name."""
    script = (
        f"for i in $(seq {int(timeout / 0.02)}); do "
        f"[ $(ls {directory} | wc -l) -gt {len(before)} ] && break; sleep 0.02; done; ls {directory}"
    )
    new = set(vm.exec(script, check=True).stdout_text.split()) - before
    assert len(new) == 1, f"expected one new entry in {directory}, got {sorted(new)}"
    return new.pop()


def _read_head(vm: VM, dev: str, length: int) -> bytes:
    return vm.exec(f"dd if=/dev/{dev} bs=512 count=1 2>/dev/null | head -c {length}",
                   check=True).stdout


def _qemu_view(vm: VM) -> dict[str, Any]:
    """Everything a hotplug could change, as QEMU reports it."""
    ports = {}
    for bus in vm.qmp("query-pci"):
        for dev in bus["devices"]:
            if "pci_bridge" in dev:
                ports[dev["qdev_id"]] = [d["qdev_id"] for d in dev["pci_bridge"]["devices"]]
    return {
        "nodes": sorted(n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True)),
        "peripheral": sorted(e["name"] for e in vm.qmp("qom-list", path="/machine/peripheral")),
        "objects": sorted(e["name"] for e in vm.qmp("qom-list", path="/objects")),
        "memory": vm.qmp("query-memory-devices"),
        "cpus": vm.qmp("query-hotpluggable-cpus"),
        "ports": ports,
        "netdevs": _netdevs(vm),
        "recorded": [d.id for d in vm.devices()],
    }


def _netdevs(vm: VM) -> str:
    return str(vm.qmp("human-monitor-command", command_line="info network"))


def _node_names(vm: VM) -> set[str]:
    return {n["node-name"] for n in vm.qmp("query-named-block-nodes", flat=True)}


def _peripheral(vm: VM) -> set[str]:
    return {e["name"] for e in vm.qmp("qom-list", path="/machine/peripheral")}


def _qemu_fds(vm: VM) -> int:
    assert vm.pid is not None
    return len(os.listdir(f"/proc/{vm.pid}/fd"))


def _memtotal_kib(vm: VM) -> int:
    text = vm.exec("grep MemTotal /proc/meminfo", check=True).stdout_text
    return int(text.split()[1])


def _assert_gone(vm: VM, dev_id: str, nodes: tuple[str, ...] = ()) -> None:
    assert dev_id not in _peripheral(vm)
    assert not set(nodes) & _node_names(vm)
    assert dev_id not in [d.id for d in vm.devices()]


# -- disks ---------------------------------------------------------------------------


def test_raw_disk_reads_host_data_and_unplug_removes_it(vm: VM, images_dir: Path) -> None:
    marker = _marker()
    raw = _raw_with_marker(images_dir, "plain", marker)
    before = _ls(vm, "/sys/block")
    start = time.monotonic()
    disk = vm.hotplug.disk(raw, format="raw", id="plain")
    dev = _wait_for_new(vm, "/sys/block", before)
    visible = time.monotonic() - start
    assert (disk.id, disk.kind, disk.driver) == ("plain", "disk", "virtio-blk-pci")
    assert disk.backends == ("plain-file", "plain-fmt")
    assert _read_head(vm, dev, len(marker)) == marker
    assert {"plain-file", "plain-fmt"} <= _node_names(vm)
    assert vm.qmp("qom-get", path="/machine/peripheral/plain", property="type") == "virtio-blk-pci"
    # Another process (here: another connection) sees it through devices.json.
    other = VM.attach(vm.name)
    try:
        assert [d.id for d in other.devices()] == ["plain"]
    finally:
        other.detach()
    assert vm.runtime is not None
    recorded = json.loads((vm.runtime.path / "devices.json").read_text())
    assert recorded[0]["device"]["drive"] == "plain-fmt"
    assert [b["command"] for b in recorded[0]["backend"]] == ["blockdev-add", "blockdev-add"]

    start = time.monotonic()
    vm.unplug(disk)
    unplugged = time.monotonic() - start
    assert dev not in _ls(vm, "/sys/block")
    _assert_gone(vm, "plain", disk.backends)
    assert json.loads((vm.runtime.path / "devices.json").read_text()) == []
    print(f"\nvirtio-blk: plug to visible in guest {visible:.3f}s, unplug {unplugged:.3f}s")


def test_qcow2_disk(vm: VM, images_dir: Path) -> None:
    marker = _marker()
    qcow2 = _qcow2_from(_raw_with_marker(images_dir, "q", marker))
    before = _ls(vm, "/sys/block")
    disk = vm.hotplug.disk(qcow2)  # format detected
    dev = _wait_for_new(vm, "/sys/block", before)
    assert _read_head(vm, dev, len(marker)) == marker
    assert vm.qmp("query-named-block-nodes", flat=True)  # sanity
    fmt = {n["node-name"]: n["drv"] for n in vm.qmp("query-named-block-nodes", flat=True)}
    assert fmt[f"{disk.id}-fmt"] == "qcow2"
    vm.unplug(disk.id)
    assert dev not in _ls(vm, "/sys/block")
    _assert_gone(vm, disk.id, disk.backends)


def test_read_only_disk_refuses_writes(vm: VM, images_dir: Path) -> None:
    marker = _marker()
    raw = _raw_with_marker(images_dir, "ro", marker)
    digest = hashlib.sha256(raw.read_bytes()).hexdigest()
    before = _ls(vm, "/sys/block")
    disk = vm.hotplug.disk(raw, read_only=True)
    dev = _wait_for_new(vm, "/sys/block", before)
    assert vm.exec(f"cat /sys/block/{dev}/ro", check=True).stdout_text.strip() == "1"
    assert vm.exec(f"dd if=/dev/zero of=/dev/{dev} bs=512 count=1 conv=fsync").exit_status != 0
    vm.unplug(disk)
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == digest


def test_overlay_disk_never_writes_its_base(vm: VM, images_dir: Path) -> None:
    marker = _marker()
    base = _qcow2_from(_raw_with_marker(images_dir, "base", marker))
    digest = hashlib.sha256(base.read_bytes()).hexdigest()
    before = _ls(vm, "/sys/block")
    disk = vm.hotplug.disk(base, overlay=True)
    assert disk.overlay is not None and vm.runtime is not None
    assert Path(disk.overlay).parent == vm.runtime.path and Path(disk.overlay).is_file()
    dev = _wait_for_new(vm, "/sys/block", before)
    assert _read_head(vm, dev, len(marker)) == marker
    vm.exec(f"dd if=/dev/zero of=/dev/{dev} bs=4096 count=1 conv=fsync", check=True)
    vm.exec("echo 3 > /proc/sys/vm/drop_caches", check=True)
    assert _read_head(vm, dev, len(marker)) == b"\0" * len(marker)
    vm.unplug(disk)
    assert not Path(disk.overlay).exists()
    _assert_gone(vm, disk.id, disk.backends)
    assert hashlib.sha256(base.read_bytes()).hexdigest() == digest


def test_virtio_scsi_disk_adds_a_controller(vm: VM, images_dir: Path) -> None:
    marker = _marker()
    raw = _raw_with_marker(images_dir, "scsi", marker)
    before = _ls(vm, "/sys/block")
    disk = vm.hotplug.disk(raw, interface="virtio-scsi", id="sdisk")
    dev = _wait_for_new(vm, "/sys/block", before)
    assert dev.startswith("sd")
    assert _read_head(vm, dev, len(marker)) == marker
    controllers = [d for d in vm.devices() if d.kind == "controller"]
    assert len(controllers) == 1 and controllers[0].driver == "virtio-scsi-pci"
    assert disk.bus == f"{controllers[0].id}.0"
    with pytest.raises(HotplugError, match="still has disks"):
        vm.unplug(controllers[0])
    vm.unplug(disk)
    assert dev not in _ls(vm, "/sys/block")
    vm.unplug(controllers[0])
    _assert_gone(vm, controllers[0].id)
    _assert_gone(vm, "sdisk", disk.backends)


def test_nvme_disk(vm: VM, images_dir: Path) -> None:
    # The tiny guest has no nvme driver: this checks QEMU's side only.
    raw = _raw_with_marker(images_dir, "nvme", _marker())
    disk = vm.hotplug.disk(raw, interface="nvme", id="nv")
    assert vm.qmp("qom-get", path="/machine/peripheral/nv", property="serial") == "nv"
    vm.unplug(disk)
    _assert_gone(vm, "nv", disk.backends)


# -- NICs ----------------------------------------------------------------------------


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def test_nic_appears_in_guest_and_goes_away(vm: VM) -> None:
    port = _free_tcp_port()
    before = _ls(vm, "/sys/class/net")
    nic = vm.hotplug.nic(forwards=[f"{port}:22"], id="hpnet")
    ifname = _wait_for_new(vm, "/sys/class/net", before)
    mac = vm.exec(f"cat /sys/class/net/{ifname}/address", check=True).stdout_text.strip()
    assert mac == vm.qmp("qom-get", path="/machine/peripheral/hpnet", property="mac")
    assert "hpnet-backend" in _netdevs(vm)
    assert _port_taken(port), "the host forward should be listening"
    vm.unplug(nic)
    assert ifname not in _ls(vm, "/sys/class/net")
    assert "hpnet-backend" not in _netdevs(vm)
    assert not _port_taken(port), "the netdev (and its forward) should be gone"
    _assert_gone(vm, "hpnet")


# -- preflight and rollback ---------------------------------------------------------------


def test_preflight_errors_change_nothing(vm: VM, images_dir: Path) -> None:
    raw = _raw_with_marker(images_dir, "pre", _marker())
    taken = _free_tcp_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", taken))
    cases: list[tuple[str, Any]] = [
        ("path", lambda: vm.hotplug.disk(images_dir / "missing.qcow2")),
        ("format", lambda: vm.hotplug.disk(raw, format="qcow2")),
        ("id", lambda: vm.hotplug.disk(raw, id="vser0")),  # the agent's serial controller
        ("id", lambda: vm.hotplug.disk(raw, id="bad id")),
        ("interface", lambda: vm.hotplug.disk(raw, interface="ide")),  # type: ignore[arg-type]
        ("overlay", lambda: vm.hotplug.disk(raw, read_only=True, overlay=True)),
        ("forwards", lambda: vm.hotplug.nic(forwards=[f"{taken}:22"])),
        ("mac", lambda: vm.hotplug.nic(mac="nonsense")),
        ("id", lambda: vm.unplug("vser0")),
    ]
    before = _qemu_view(vm)
    try:
        for field, call in cases:
            with pytest.raises(HotplugError) as info:
                call()
            assert info.value.field == field, str(info.value)
            assert _qemu_view(vm) == before, f"{field}: {info.value}"
    finally:
        holder.close()


def test_no_free_port(vm: VM, images_dir: Path) -> None:
    raw = _raw_with_marker(images_dir, "fill", _marker())
    plugged = [vm.hotplug.disk(raw, read_only=True) for _ in range(vm.spec.hotplug_ports)]
    try:
        assert sorted(d.bus or "" for d in plugged) == [f"hp{i}" for i in range(4)]
        before = _qemu_view(vm)
        for call in (lambda: vm.hotplug.disk(raw, read_only=True), lambda: vm.hotplug.nic()):
            with pytest.raises(HotplugError, match="no free pcie-root-port") as info:
                call()
            assert info.value.field == "hotplug_ports"
            assert _qemu_view(vm) == before
    finally:
        for disk in plugged:
            vm.unplug(disk)
    assert not vm.devices()


def test_failing_device_add_rolls_back(vm: VM, images_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = _raw_with_marker(images_dir, "rb", _marker())
    before = _qemu_view(vm)
    real_qmp = vm.aio.qmp

    async def broken_device_add(command: str, arguments: Any = None, **kwargs: Any) -> Any:
        if command == "device_add":  # QEMU refuses a property it does not know
            arguments = {**arguments, "no-such-property": 1}
        return await real_qmp(command, arguments, **kwargs)

    monkeypatch.setattr(vm.aio, "qmp", broken_device_add)
    assert vm.runtime is not None
    for call in (lambda: vm.hotplug.disk(raw, overlay=True, id="rbdisk"),
                 lambda: vm.hotplug.nic(id="rbnet")):
        with pytest.raises(HotplugError, match="rolled back") as info:
            call()
        assert info.value.qmp_error and "no-such-property" in info.value.qmp_error
        assert _qemu_view(vm) == before
    assert not list(vm.runtime.path.glob("overlay-*"))
    monkeypatch.undo()
    # The same names work afterwards: nothing was left behind under them.
    disk = vm.hotplug.disk(raw, id="rbdisk")
    vm.unplug(disk)
    assert _qemu_view(vm) == before


def test_unplug_times_out_while_guest_is_paused_then_completes(vm: VM, images_dir: Path) -> None:
    raw = _raw_with_marker(images_dir, "slow", _marker())
    before = _ls(vm, "/sys/block")
    disk = vm.hotplug.disk(raw, id="slow")
    dev = _wait_for_new(vm, "/sys/block", before)
    vm.pause()
    try:
        start = time.monotonic()
        with pytest.raises(HotplugError, match="no DEVICE_DELETED within 1s") as info:
            vm.unplug(disk, timeout=1)
        assert time.monotonic() - start < 5
        assert info.value.device == "slow"
        assert [d.id for d in vm.devices()] == ["slow"]
        assert {"slow-file", "slow-fmt"} <= _node_names(vm)
    finally:
        vm.resume()
    vm.unplug(disk)  # the guest now releases it (or already did): the retry finishes the job
    assert dev not in _ls(vm, "/sys/block")
    _assert_gone(vm, "slow", disk.backends)


def test_twenty_plug_unplug_cycles_leak_nothing(vm: VM, images_dir: Path) -> None:
    raw = _raw_with_marker(images_dir, "cycle", _marker())
    qcow2 = _qcow2_from(raw)
    nodes, fds = _node_names(vm), _qemu_fds(vm)
    start = time.monotonic()
    for i in range(20):
        disk = vm.hotplug.disk(qcow2 if i % 2 else raw, overlay=i % 4 == 3)
        vm.unplug(disk)
    elapsed = time.monotonic() - start
    assert _node_names(vm) == nodes
    assert _qemu_fds(vm) == fds
    assert not vm.devices()
    assert vm.runtime is not None and not list(vm.runtime.path.glob("overlay-*"))
    print(f"\n20 disk plug/unplug cycles: {elapsed:.2f}s")


# -- CPUs and memory -------------------------------------------------------------------


def test_cpu_hotplug_onlines_in_guest(vm_res: VM) -> None:
    vm = vm_res
    assert vm.exec("cat /sys/devices/system/cpu/online", check=True).stdout_text.strip() == "0"
    start = time.monotonic()
    (cpu,) = vm.hotplug.cpu()
    acked = time.monotonic() - start
    assert (cpu.id, cpu.kind) == ("cpu1", "cpu")
    # The guest's uevent helper onlines it after the ACPI acknowledgement: wait, bounded.
    online = vm.exec(
        "for i in $(seq 250); do [ \"$(cat /sys/devices/system/cpu/online)\" = 0-1 ] && break; "
        "sleep 0.02; done; cat /sys/devices/system/cpu/online", check=True,
    ).stdout_text.strip()
    onlined = time.monotonic() - start
    assert online == "0-1"
    assert [d.id for d in vm.devices()] == ["cpu1"]
    print(f"\nCPU hotplug: acknowledged after {acked:.3f}s, online in the guest after {onlined:.3f}s")

    version = vm.qmp("query-version")["qemu"]
    if (version["major"], version["minor"]) < (10, 0):
        before = _qemu_view(vm)
        with pytest.raises(HotplugError, match="corrupts its memory") as info:
            vm.unplug(cpu)
        assert info.value.device == "cpu1"
        assert _qemu_view(vm) == before
    else:
        vm.unplug(cpu)
        assert vm.exec("cat /sys/devices/system/cpu/online", check=True).stdout_text.strip() == "0"
        assert not vm.devices()


def test_cpu_and_memory_preflight_change_nothing(vm_res: VM) -> None:
    vm = vm_res
    free = len([s for s in vm.qmp("query-hotpluggable-cpus") if "qom-path" not in s])
    cases: list[tuple[str, Any]] = [
        ("max_cpus", lambda: vm.hotplug.cpu(free + 1)),
        ("count", lambda: vm.hotplug.cpu(0)),
        ("max_memory", lambda: vm.hotplug.memory("1G")),
        ("size", lambda: vm.hotplug.memory("64M")),
        ("size", lambda: vm.hotplug.memory("lots")),
    ]
    before = _qemu_view(vm)
    for field, call in cases:
        with pytest.raises(HotplugError) as info:
            call()
        assert info.value.field == field, str(info.value)
        assert _qemu_view(vm) == before, f"{field}: {info.value}"


def test_memory_hotplug_raises_memtotal_and_a_busy_guest_keeps_it(vm_res: VM) -> None:
    vm = vm_res
    total = _memtotal_kib(vm)
    start = time.monotonic()
    dimm = vm.hotplug.memory("256M")
    acked = time.monotonic() - start
    # With memhp_default_state=online the guest onlined it before acknowledging.
    grown = _memtotal_kib(vm)
    assert grown - total == 256 * 1024
    assert (dimm.kind, dimm.driver, dimm.backends) == ("memory", "pc-dimm", (f"mem-{dimm.id}",))
    print(f"\nmemory hotplug: 256 MiB acknowledged and online after {acked:.3f}s")

    # Memory onlined into the normal zone holds kernel data: the guest says it is busy.
    with pytest.raises(HotplugError, match="refused to release it") as info:
        vm.unplug(dimm, timeout=20)
    assert info.value.device == dimm.id
    assert dimm.id in [d.id for d in vm.devices()]
    assert [m["data"]["id"] for m in vm.qmp("query-memory-devices")] == [dimm.id]
    assert _memtotal_kib(vm) == grown

    # 512 MiB + 256 MiB of a 1 GiB maximum: 512 MiB more does not fit.
    before = _qemu_view(vm)
    with pytest.raises(HotplugError, match="would exceed") as exc:
        vm.hotplug.memory("512M")
    assert exc.value.field == "max_memory"
    assert _qemu_view(vm) == before


def test_recorded_devices_come_back_on_a_new_qemus_command_line(vm_res: VM, images_dir: Path) -> None:
    """What devices.json records is enough to declare the same devices on a new QEMU (restore)."""
    vm = vm_res
    disk = vm.hotplug.disk(_raw_with_marker(images_dir, "again", _marker()), read_only=True)
    nic = vm.hotplug.nic()
    vm.hotplug.cpu()
    if not any(d.kind == "memory" for d in vm.devices()):
        vm.hotplug.memory("128M")
    assert vm.runtime is not None
    argv = DeviceLedger(vm.runtime).argv()
    recorded = vm.devices()
    clone = VM(images.spec("tiny", accel="tcg", cpus=1, max_cpus=4, memory=512, max_memory="1G",
                           slots=2, extra_args=tuple(argv)))
    clone.start()
    try:
        assert {d.id for d in recorded} <= _peripheral(clone)
        assert set(disk.backends) <= _node_names(clone)
        assert nic.backends[0] in _netdevs(clone)
        for d in recorded:
            assert clone.qmp("qom-get", path=f"/machine/peripheral/{d.id}", property="type") == d.driver
        mac = vm.qmp("qom-get", path=f"/machine/peripheral/{nic.id}", property="mac")
        assert clone.qmp("qom-get", path=f"/machine/peripheral/{nic.id}", property="mac") == mac
        def dimms(machine: VM) -> list[dict[str, Any]]:  # same slots, addresses, sizes
            return [{k: v for k, v in m["data"].items() if k != "hotplugged"}
                    for m in machine.qmp("query-memory-devices")]

        assert dimms(clone) == dimms(vm)
        plugged_cpus = [c["props"] for c in vm.qmp("query-hotpluggable-cpus") if "qom-path" in c]
        assert sorted(map(str, plugged_cpus)) == sorted(
            str(c["props"]) for c in clone.qmp("query-hotpluggable-cpus") if "qom-path" in c)
    finally:
        clone.kill()
        vm.unplug(disk)
        vm.unplug(nic)


def test_memory_unplug_from_movable_zone(vm_movable: VM) -> None:
    vm = vm_movable
    total = _memtotal_kib(vm)
    objects = {e["name"] for e in vm.qmp("qom-list", path="/objects")}
    dimm = vm.hotplug.memory(256)
    assert _memtotal_kib(vm) - total == 256 * 1024
    start = time.monotonic()
    vm.unplug(dimm)
    elapsed = time.monotonic() - start
    assert _memtotal_kib(vm) == total
    assert vm.qmp("query-memory-devices") == []
    assert {e["name"] for e in vm.qmp("qom-list", path="/objects")} == objects
    assert not vm.devices()
    print(f"\nmemory unplug (movable zone): {elapsed:.3f}s")


def test_no_free_memory_slot(vm_movable: VM) -> None:
    vm = vm_movable
    dimms = [vm.hotplug.memory("128M") for _ in range(vm.spec.slots)]
    before = _qemu_view(vm)
    with pytest.raises(HotplugError, match="memory slot") as info:
        vm.hotplug.memory("128M")
    assert info.value.field == "slots"
    assert _qemu_view(vm) == before
    for dimm in dimms:
        vm.unplug(dimm)
    assert vm.qmp("query-memory-devices") == []


def test_memory_rollback_removes_the_backend(vm_movable: VM, monkeypatch: pytest.MonkeyPatch) -> None:
    vm = vm_movable
    before = _qemu_view(vm)
    real_qmp = vm.aio.qmp

    async def broken_device_add(command: str, arguments: Any = None, **kwargs: Any) -> Any:
        if command == "device_add":
            arguments = {**arguments, "node": 7}  # no such NUMA node
        return await real_qmp(command, arguments, **kwargs)

    monkeypatch.setattr(vm.aio, "qmp", broken_device_add)
    with pytest.raises(HotplugError, match="rolled back"):
        vm.hotplug.memory("128M")
    assert _qemu_view(vm) == before


# -- CLI -----------------------------------------------------------------------------------


def test_cli_hotplug_devices_unplug(tiny_image: images.TinyImage, images_dir: Path) -> None:
    name = f"hpcli-{secrets.token_hex(3)}"
    raw = _raw_with_marker(images_dir, "cli", _marker())

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = run_qemukit(*args, timeout=180)
        if check:
            assert proc.returncode == 0, f"{args}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    run("run", "--detach", "--name", name, "--image", "tiny", "--accel", "tcg", "--max-cpus", "4",
        "--max-memory", "2G", "--slots", "4", "--wait", "agent")
    try:
        assert run("hotplug", name, "disk", str(raw), "--id", "clidisk").stdout.strip() == "clidisk"
        listed = json.loads(run("devices", name, "--json").stdout)
        assert [(d["id"], d["kind"], d["backends"]) for d in listed] == [
            ("clidisk", "disk", ["clidisk-file", "clidisk-fmt"])]
        assert "vda" in run("exec", name, "--", "ls", "/sys/block").stdout.split()
        refused = run("hotplug", name, "disk", str(raw) + ".missing", check=False)
        assert refused.returncode == 1 and "no such file" in refused.stderr
        assert run("unplug", name, "clidisk").stdout.strip() == "clidisk: unplugged"
        assert json.loads(run("devices", name, "--json").stdout) == []
        assert run("pause", name).stdout.strip() == f"{name}: paused"
        assert run("resume", name).stdout.strip() == f"{name}: running"
        run("stop", name)
    finally:
        if name in run("ls", "--json").stdout:
            run("kill", name, check=False)

