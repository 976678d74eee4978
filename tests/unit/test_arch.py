"""Guest architectures: the spec field, per-arch golden argv, the accelerator rule, the
QEMU binary per arch, and the tiny builder's handling of foreign kernels (no QEMU here).

Golden files: ``golden/arch_<arch>.json`` (rewrite with QEMUKIT_UPDATE_GOLDEN=1).
"""

from __future__ import annotations

import platform
import struct
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qemukit import AcceleratorError, Drive, HostError, Nic, Share, SpecError, VMSpec, host, images
from qemukit._launch.argv import Plumbing, build_argv
from qemukit._launch.plan import DiskImage
from qemukit.arch import ARCHES, host_arch_name
from qemukit.cli import main
from qemukit.host import _kvm
from qemukit.images import tiny

from .test_argv import check_golden

FOREIGN = ("aarch64", "riscv64", "s390x", "ppc64le")
RUN = "/run/user/1000/qemukit/g"


def _spec(arch: str, **kw: Any) -> VMSpec:
    return VMSpec(name="g", arch=arch, kernel="/k/Image", initrd="/k/initrd.img",  # type: ignore[arg-type]
                  append=images.tiny_append(arch), no_reboot=True, **kw)


def _plumbing(drives: int = 0) -> Plumbing:
    return Plumbing(qmp_fd=3, qmp_path=f"{RUN}/qmp.sock", console_path=f"{RUN}/console.sock",
                    console_log=f"{RUN}/console.log", agent_path=f"{RUN}/agent.sock",
                    drive_files=tuple(f"{RUN}/overlay-disk{i}.qcow2" for i in range(drives)),
                    drive_formats=("qcow2",) * drives)


# -- the spec ------------------------------------------------------------------------


def test_default_arch_is_x86_64_and_unchanged() -> None:
    spec = VMSpec()
    assert (spec.arch, spec.machine) == ("x86_64", "q35")
    assert "arch" in spec.to_dict() and spec.to_dict()["arch"] == "x86_64"


@pytest.mark.parametrize(("arch", "machine"), [("aarch64", "virt"), ("riscv64", "virt"),
                                                ("s390x", "s390-ccw-virtio"), ("ppc64le", "pseries")])
def test_foreign_arch_gets_its_machine_and_round_trips_through_toml(arch: str, machine: str) -> None:
    spec = _spec(arch, drives=(Drive("/d.qcow2", overlay=True),), nics=(Nic(),),
                 shares=(Share("/src", transport="9p"),))
    assert spec.machine == machine
    assert VMSpec.from_dict(tomllib.loads(spec.dumps())) == spec
    assert f'arch = "{arch}"' in spec.dumps()


@pytest.mark.parametrize(("kwargs", "field", "value"), [
    ({"arch": "arm64"}, "arch", "arm64"),
    ({"arch": "aarch64", "machine": "pc"}, "machine", "pc"),
    ({"arch": "x86_64", "machine": "pseries"}, "machine", "pseries"),
    ({"arch": "aarch64", "firmware": "ovmf"}, "firmware", "ovmf"),
    ({"arch": "s390x", "drives": (Drive("/x.qcow2", interface="nvme"),)}, "drive.interface", "nvme"),
    ({"arch": "aarch64", "cpus": 1, "max_cpus": 2}, "max_cpus", 2),
    ({"arch": "riscv64", "cpus": 1, "max_cpus": 4}, "max_cpus", 4),
    ({"arch": "s390x", "max_memory": "1G"}, "max_memory", 1024),
    ({"arch": "s390x", "shares": (Share("/src"),)}, "share.transport", "virtiofs"),
    ({"arch": "ppc64le", "shares": (Share("/src"),)}, "share.transport", "virtiofs"),
])
def test_bad_arch_input_names_the_field_and_value(kwargs: dict[str, Any], field: str,
                                                  value: Any) -> None:
    kwargs.setdefault("kernel", "/k")
    with pytest.raises(SpecError) as info:
        VMSpec(**kwargs)
    assert (info.value.field, info.value.value) == (field, value)


def test_cpu_hotplug_refusal_names_the_machine() -> None:
    with pytest.raises(SpecError, match=r"CPU hotplug is not supported on virt \(aarch64\)"):
        VMSpec(arch="aarch64", kernel="/k", max_cpus=2)


def test_foreign_guest_needs_a_kernel() -> None:
    with pytest.raises(SpecError) as info:
        VMSpec(arch="ppc64le")
    assert info.value.field == "kernel"


# -- golden argv ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", FOREIGN)
def test_golden_argv_per_arch(arch: str) -> None:
    spec = _spec(arch, drives=(Drive("/img/root.qcow2", overlay=True),), nics=(Nic(),),
                 shares=(Share("/src", transport="9p"),), hotplug_ports=2)
    argv = build_argv(spec, qemu=f"/usr/bin/{ARCHES[arch].qemu_binary}", accel="tcg",
                      plumbing=_plumbing(1), sandbox=True)
    check_golden(f"arch_{arch}", argv)


def test_argv_per_arch_essentials() -> None:
    def argv(arch: str, accel: str = "tcg") -> list[str]:
        return build_argv(_spec(arch, drives=(Drive("/r.qcow2", overlay=True),)), accel=accel,
                          qemu="q", plumbing=_plumbing(1))

    a = argv("aarch64")
    assert a[a.index("-machine") + 1] == "virt,accel=tcg"
    assert a[a.index("-cpu") + 1] == "cortex-a57"
    assert "console=ttyAMA0" in a[a.index("-append") + 1]
    assert "pcie-root-port,id=hp0,bus=pcie.0,chassis=1" in a
    s = argv("s390x")
    assert any(x.startswith("virtio-blk-ccw,") for x in s)
    assert not any("-pci" in x or "pcie-root-port" in x for x in s)
    assert "console=ttysclp0" in s[s.index("-append") + 1]
    r = argv("riscv64")
    assert not any("pcie-root-port" in x for x in r)  # no hotplug driver in the guest kernel
    p = argv("ppc64le")
    assert p[p.index("-machine") + 1].startswith("pseries,accel=tcg,x-vof=on,cap-cfpc=broken")
    assert "console=hvc0" in p[p.index("-append") + 1]
    # Under KVM (an aarch64 host): -cpu host and the host's GIC.
    k = argv("aarch64", "kvm")
    assert k[k.index("-cpu") + 1] == "host"
    assert k[k.index("-machine") + 1] == "virt,accel=kvm,gic-version=host"


# -- the accelerator -----------------------------------------------------------------


def _fake_host(monkeypatch: pytest.MonkeyPatch, machine: str, usable: bool) -> list[str]:
    probed: list[str] = []

    def status(qemu: Any, probe: Any, **kw: Any) -> host.KvmStatus:
        probed.append(kw.get("arch", "x86_64"))
        if usable:
            return host.KvmStatus(True, "a probe boot under KVM (-cpu host) reached the guest's init",
                                  True, cpu="host")
        return host.KvmStatus(False, "/dev/kvm does not exist", probed=False)

    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(_kvm, "kvm_status", status)
    return probed


def test_aarch64_host_with_working_kvm_runs_aarch64_guests_under_kvm(
        monkeypatch: pytest.MonkeyPatch) -> None:
    probed = _fake_host(monkeypatch, "aarch64", usable=True)
    choice = host.resolve_accel("auto", object(), ("Image", "initrd"), arch="aarch64")  # type: ignore[arg-type]
    assert (choice.accel, choice.cpu) == ("kvm", "host")
    assert probed == ["aarch64"]  # the probe boot was of an aarch64 guest
    # ...but an x86_64 guest on that host is emulated, and no probe runs for it.
    other = host.resolve_accel("auto", object(), ("bzImage", "initrd"))  # type: ignore[arg-type]
    assert other.accel == "tcg" and "x86_64" in other.summary and "aarch64" in other.summary
    assert probed == ["aarch64"]


def test_aarch64_host_without_working_kvm_falls_back_to_tcg(
        monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_host(monkeypatch, "aarch64", usable=False)
    choice = host.resolve_accel("auto", object(), ("Image", "initrd"), arch="aarch64")  # type: ignore[arg-type]
    assert choice.accel == "tcg" and "/dev/kvm does not exist" in choice.reason
    with pytest.raises(AcceleratorError):
        host.resolve_accel("kvm", object(), ("Image", "initrd"), arch="aarch64")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", FOREIGN)
def test_foreign_guest_on_x86_host_is_tcg_in_one_line_without_a_probe(
        monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    probed = _fake_host(monkeypatch, "x86_64", usable=True)
    choice = host.resolve_accel("auto", object(), None, arch=arch)  # type: ignore[arg-type]
    assert choice.accel == "tcg" and probed == []
    assert choice.summary == f"TCG: {arch} guest emulated on this x86_64 host"
    assert "\n" not in choice.summary
    with pytest.raises(AcceleratorError, match="only the host's architecture"):
        host.resolve_accel("kvm", object(), None, arch=arch)  # type: ignore[arg-type]


def test_host_arch_names() -> None:
    assert host_arch_name("x86_64") == "x86_64" and host_arch_name("arm64") == "aarch64"
    assert host_arch_name("ppc64le") == "ppc64le" and host_arch_name("mips") is None


# -- the QEMU binary -------------------------------------------------------------------


@pytest.mark.parametrize("arch", FOREIGN)
def test_missing_binary_names_the_debian_package(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv(host.qemu_env_var(arch), raising=False)
    with pytest.raises(HostError) as info:
        host.find_qemu(arch)
    assert f"apt-get install {ARCHES[arch].qemu_package}" in str(info.value)
    assert ARCHES[arch].qemu_binary in str(info.value)


def test_per_arch_override_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert host.qemu_env_var() == "QEMUKIT_QEMU"
    assert host.qemu_env_var("aarch64") == "QEMUKIT_QEMU_AARCH64"
    fake = tmp_path / "my-qemu-aarch64"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("QEMUKIT_QEMU_AARCH64", str(fake))
    monkeypatch.setenv("QEMUKIT_QEMU", "/nonexistent/qemu")  # x86_64's does not apply
    assert host.qemu_path("aarch64") == str(fake)
    assert host.qemu_path("x86_64") is None


def test_packages_per_arch() -> None:
    assert {a: i.qemu_package for a, i in ARCHES.items()} == {
        "x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm", "riscv64": "qemu-system-misc",
        "s390x": "qemu-system-s390x", "ppc64le": "qemu-system-ppc"}


# -- the tiny builder with foreign kernels ------------------------------------------------


def _elf_with_modinfo(order: str, modinfo: bytes) -> bytes:
    """A minimal 64-bit ELF (byte order ``<`` or ``>``) with a .modinfo section."""
    shstrtab = b"\0.shstrtab\0.modinfo\0"
    body_off = 64
    mod_off = body_off
    str_off = mod_off + len(modinfo)
    shoff = str_off + len(shstrtab)
    shoff += -shoff % 8
    header = b"\x7fELF" + bytes([2, 1 if order == "<" else 2, 1]) + b"\0" * 9
    header += struct.pack(f"{order}HHIQQQIHHHHHH", 1, 0, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)

    def shdr(name: int, offset: int, size: int) -> bytes:
        return struct.pack(f"{order}IIQQQQIIQQ", name, 1, 0, 0, offset, size, 0, 0, 1, 0)

    data = header + modinfo + shstrtab
    data += b"\0" * (shoff - len(data))
    data += b"\0" * 64 + shdr(11, mod_off, len(modinfo)) + shdr(1, str_off, len(shstrtab))
    return data


@pytest.mark.parametrize("order", ["<", ">"])
def test_modinfo_reads_both_byte_orders(order: str) -> None:
    # s390x modules are big-endian: the parser used to refuse them.
    elf = _elf_with_modinfo(order, b"license=GPL\0depends=virtio,virtio_ring\0name=virtio_blk\0")
    assert tiny._modinfo(elf)["depends"] == "virtio,virtio_ring"


def test_builtin_and_absent_modules_are_skipped(tmp_path: Path) -> None:
    # Like riscv64: virtio, virtio_ring, virtio_pci*, virtio_console built in; no button.
    moddir = tmp_path / "6.12.0-riscv64"
    (moddir / "kernel").mkdir(parents=True)
    builtin = {"virtio", "virtio_ring", "virtio_pci", "virtio_pci_legacy_dev",
               "virtio_pci_modern_dev", "virtio_console"}
    (moddir / "modules.builtin").write_text(
        "".join(f"kernel/drivers/virtio/{m}.ko\n" for m in sorted(builtin)))
    import lzma

    for name in tiny.REQUIRED_MODULES:
        if name in builtin or name in tiny.FOREIGN_OPTIONAL:
            continue
        deps = {"virtio_net": "net_failover,virtio,virtio_ring",
                "net_failover": "failover"}.get(name, "virtio,virtio_ring")
        elf = _elf_with_modinfo(">", f"depends={deps}\0".encode())
        (moddir / "kernel" / f"{name}.ko.xz").write_bytes(lzma.compress(elf))
    # 9p is loaded where the kernel has it (not required).
    for name, deps in (("9pnet", ""), ("9p", "9pnet")):
        (moddir / "kernel" / f"{name}.ko.xz").write_bytes(
            lzma.compress(_elf_with_modinfo(">", f"depends={deps}\0".encode())))
    order = [m.name for m in tiny._resolve_modules(moddir, tiny.FOREIGN_OPTIONAL)]
    assert not set(order) & builtin and "button" not in order
    assert order.index("9pnet") < order.index("9p") and "9pnet_virtio" not in order
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    # Without the foreign allowance a missing required module is still an error.
    with pytest.raises(RuntimeError, match="not found in the kernel package"):
        tiny._resolve_modules(moddir)


def test_foreign_apt_options_leave_the_host_config_alone(tmp_path: Path) -> None:
    opts = tiny._foreign_apt_options(ARCHES["riscv64"], tmp_path / "apt")
    assert "-oAPT::Architecture=riscv64" in opts
    assert f"-oDir::State::Lists={tmp_path / 'apt' / 'lists'}" in opts
    assert (tmp_path / "apt" / "lists" / "partial").is_dir()
    sources = (tmp_path / "apt" / "etc" / "trixie.sources").read_text()
    assert "Suites: trixie trixie-updates" in sources and "trixie-security" in sources
    assert not any("/etc/apt" in o for o in opts)
    arm = tiny._foreign_apt_options(ARCHES["aarch64"], tmp_path / "arm")
    assert "-oAPT::Architecture=arm64" in arm and not any("SourceList" in o for o in arm)


def test_foreign_images_are_cached_per_arch(tmp_path: Path) -> None:
    assert tiny._image_root(tmp_path) == tmp_path / "tiny"
    assert tiny._image_root(tmp_path, "s390x") == tmp_path / "tiny-s390x"
    recipe = images.recipe_dir("tiny")
    # x86_64's digest is what it was; each foreign arch has its own.
    assert tiny.recipe_digest(recipe) == tiny.recipe_digest(recipe, "x86_64")
    assert len({tiny.recipe_digest(recipe, a) for a in ARCHES}) == len(ARCHES)


# -- the CLI ---------------------------------------------------------------------------


def test_cmdline_arch_refuses_an_unknown_arch() -> None:
    result = CliRunner().invoke(main, ["cmdline", "--arch", "mips", "--kernel", "/k"])
    assert result.exit_code == 2 and "mips" in result.output


def test_tiny_append_per_arch() -> None:
    assert images.tiny_append() == images.TINY_APPEND
    assert images.tiny_append("s390x").startswith("console=ttysclp0 ")
    with pytest.raises(SpecError):
        images.tiny_append("mips")


def test_arch_table_is_pure() -> None:
    source = (Path(tiny.__file__).parent.parent / "arch.py").read_text()
    assert not any(f"import {m}" in source for m in ("os", "subprocess", "socket", "platform"))


# -- hotplug per arch (refusals before QEMU is touched; CCW disks) ------------------------


@pytest.fixture
def raw_disks() -> Iterator[None]:
    """Disks resolve as raw without qemu-img: the host probe's resolve_disk answers."""
    probe = replace(host.HostProbe(), resolve_disk=lambda drive, q: DiskImage("raw", (), 4096))
    with host.using_host_probe(probe):
        yield


def _fake_vm(tmp_path: Path, arch: str, **kw: Any) -> Any:
    from qemukit.testing import FakeVM

    qemu = host.QemuBinary(f"/usr/bin/{ARCHES[arch].qemu_binary}", (7, 2, 0), "7.2",
                           frozenset(ARCHES[arch].machines), True, "/usr/bin/qemu-img")
    (tmp_path / "run").mkdir()
    return FakeVM(tmp_path / "run", _spec(arch, **kw), qemu=qemu)


@pytest.mark.usefixtures("raw_disks")
@pytest.mark.parametrize(("arch", "why"), [
    ("riscv64", "no PCI hotplug driver"), ("ppc64le", "drmgr")])
def test_disk_hotplug_is_refused_where_the_guest_cannot_see_it(
        tmp_path: Path, arch: str, why: str) -> None:
    import asyncio

    from qemukit import HotplugError
    from qemukit.hotplug import AsyncHotplug

    vm = _fake_vm(tmp_path, arch)
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * 4096)
    with pytest.raises(HotplugError, match=why) as info:
        asyncio.run(AsyncHotplug(vm).disk(raw))
    assert info.value.field == "machine" and info.value.value == vm.spec.machine
    assert not [c for c, _ in vm.log if c in ("blockdev-add", "device_add")]


@pytest.mark.parametrize("arch", ["s390x", "ppc64le"])
def test_cpu_hotplug_is_refused_on_machines_without_acpi(tmp_path: Path, arch: str) -> None:
    import asyncio

    from qemukit import HotplugError
    from qemukit.hotplug import AsyncHotplug

    vm = _fake_vm(tmp_path, arch, max_cpus=2)
    with pytest.raises(HotplugError, match=vm.spec.machine):
        asyncio.run(AsyncHotplug(vm).cpu(1))
    assert vm.log == []


@pytest.mark.usefixtures("raw_disks")
def test_s390x_disk_hotplug_uses_ccw_without_a_port(tmp_path: Path) -> None:
    import asyncio

    from qemukit.hotplug import AsyncHotplug

    vm = _fake_vm(tmp_path, "s390x", hotplug_ports=0)
    raw = tmp_path / "d.raw"
    raw.write_bytes(b"\0" * 4096)
    handle = asyncio.run(AsyncHotplug(vm).disk(raw, id="hpd"))
    assert handle.driver == "virtio-blk-ccw"
    device = [a for c, a in vm.log if c == "device_add"][0]
    assert device["driver"] == "virtio-blk-ccw" and "bus" not in device


def test_pytest_option_picks_the_fixture_vms_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit import pytest_plugin
    from qemukit.resolve import Request

    class Config:
        def __init__(self, arch: str, cold: bool = False) -> None:
            self.opts = {"--qemukit-image": "tiny", "--qemukit-arch": arch,
                         "--qemukit-accel": "tcg", "--qemukit-cold": cold,
                         "--qemukit-crash-dir": None}

        def getoption(self, name: str) -> Any:
            return self.opts[name]

    # The fixture's request, resolved (and its image built on first use) by qemukit.resolve.
    got = pytest_plugin._request(Config("riscv64"), cpus=1)  # type: ignore[arg-type]
    assert got == Request(image="tiny", arch="riscv64", overrides={"cpus": 1, "accel": "tcg"},
                          purpose="interactive", build=True)
    cold = pytest_plugin._request(Config("x86_64", cold=True))  # type: ignore[arg-type]
    assert (cold.arch, cold.warm) == ("x86_64", False)


def test_doctor_json_reports_every_architecture(tmp_path: Path) -> None:
    # A private PATH where only the aarch64 binary exists: the others name their package.
    binaries = tmp_path / "bin"
    binaries.mkdir()
    fake = binaries / "qemu-system-aarch64"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    env = {"QEMUKIT_CACHE": str(tmp_path / "cache"), "QEMUKIT_STATE": str(tmp_path / "state"),
           "QEMUKIT_QEMU": str(tmp_path / "no-qemu"), "PATH": str(binaries)}
    result = CliRunner().invoke(main, ["doctor", "--json"], env=env)
    import json

    report = json.loads(result.stdout)["architectures"]
    assert sorted(report) == sorted(ARCHES)
    assert report["aarch64"]["qemu"] == str(fake)
    assert report["riscv64"]["qemu"] is None and report["riscv64"]["package"] == "qemu-system-misc"
    assert report["ppc64le"]["package"] == "qemu-system-ppc"
    assert report["s390x"]["machine"] == "s390-ccw-virtio" and report["s390x"]["transport"] == "ccw"
    assert report["aarch64"]["image"] is None
    assert report["riscv64"]["accel"].startswith("tcg")
    assert report["aarch64"]["cpu_hotplug"] is False and report["ppc64le"]["cpu_hotplug"] is True


def test_vmcoreinfo_only_where_qemu_has_fw_cfg_with_dma_and_doctor_says_so(tmp_path: Path) -> None:
    # Measured on QEMU 7.2: x86_64 (q35, pc, microvm) and aarch64 virt take -device
    # vmcoreinfo; riscv64 virt refuses it (no fw_cfg with DMA yet), s390x and ppc64 lack it.
    with_it = {name for name, info in ARCHES.items() if info.no_vmcoreinfo is None}
    assert with_it == {"x86_64", "aarch64"}
    for name in ARCHES:
        for machine in ARCHES[name].machines:
            spec = VMSpec(arch=name, machine=machine, kernel="/k")  # type: ignore[arg-type]
            argv = build_argv(spec, qemu="q", accel="tcg", plumbing=Plumbing())
            assert (argv.count("vmcoreinfo") == 1) == (name in with_it), (name, machine)
    env = {"QEMUKIT_CACHE": str(tmp_path / "cache"), "QEMUKIT_STATE": str(tmp_path / "state"),
           "QEMUKIT_QEMU": str(tmp_path / "no-qemu"), "PATH": str(tmp_path)}
    import json

    report = json.loads(CliRunner().invoke(main, ["doctor", "--json"], env=env).stdout)
    rows = report["architectures"]
    assert rows["x86_64"]["vmcoreinfo"] is True and "drgn" in rows["x86_64"]["dumps"]
    assert rows["s390x"]["vmcoreinfo"] is False
    assert "no VMCOREINFO" in rows["riscv64"]["dumps"] and "fw_cfg" in rows["riscv64"]["dumps"]
