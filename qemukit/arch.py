"""Per-architecture defaults for guests: one pure table, no I/O.

Each guest architecture qemukit boots has an :class:`ArchInfo` row saying
which QEMU binary runs it (and the Debian package that ships the binary),
the machine and CPU models, the console device the kernel writes to, the
virtio transport, and what the machine can hotplug on QEMU 7.2. The values
were measured on QEMU 7.2 under TCG (see the README's architecture table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["ARCHES", "DEFAULT_ARCH", "ArchInfo", "ArchName", "arch_info", "host_arch_name"]

ArchName = Literal["x86_64", "aarch64", "riscv64", "s390x", "ppc64le"]
Transport = Literal["pci", "ccw"]


@dataclass(frozen=True)
class ArchInfo:
    """What qemukit needs to know to boot a guest of one architecture.

    ``machines`` are the machine types qemukit drives for it (the first is
    the default); ``machine_opts`` are added to ``-machine`` under every
    accelerator. ``tcg_cpu`` is the CPU model under TCG (None: QEMU's
    default); under KVM the guest gets ``host``. ``console`` is the kernel's
    name for the first ``-serial`` device. ``transport`` is how virtio
    devices attach (``ccw`` on s390x; microvm's MMIO is x86-only and is
    decided by the machine). ``hotplug_bus`` is the bus of qemukit's
    ``pcie-root-port`` slots (None: the machine gets none). ``powerdown`` says
    whether ``system_powerdown`` reaches the tiny guest's init (the graceful
    rung of the shutdown ladder). ``debian_arch``/``debian_suite`` name where
    the tiny image's packages come from; ``kernel_package`` is the kernel meta
    package. ``seed_cd`` says a cloud-init seed CD (``scsi-cd`` on virtio-scsi)
    works there: checked in a Debian guest on x86_64 and aarch64.
    """

    name: ArchName
    qemu_binary: str
    qemu_package: str
    machines: tuple[str, ...]
    tcg_cpu: str | None
    console: str
    transport: Transport
    debian_arch: str
    kernel_package: str
    kernel_format: str
    firmware: str
    machine_opts: str = ""
    #: Whether virtiofs shares work (else: 9p), and why not.
    virtiofs: str | None = None
    #: Why QEMU's ``vmcoreinfo`` device (which makes dumps readable by drgn and
    #: crash) cannot be added on this machine; None: it is added.
    no_vmcoreinfo: str | None = None
    #: A firmware file QEMU loads by itself from its data directory, if any.
    firmware_file: str | None = None
    #: Added to ``-machine`` under KVM only.
    kvm_machine_opts: str = ""
    hotplug_bus: str | None = None
    cpu_hotplug: bool = False
    memory_hotplug: bool = False
    powerdown: bool = True
    acpi: bool = False
    seed_cd: bool = False
    debian_suite: str = "bookworm"
    #: Host ``platform.machine()`` values of this architecture.
    host_names: tuple[str, ...] = ()
    #: Whether a guest boots from its disk through firmware (SeaBIOS, OVMF); else it
    #: needs ``-kernel`` (qemukit boots foreign guests that way).
    boots_from_disk: bool = False
    #: Whether the machine can take OVMF (UEFI) firmware.
    ovmf: bool = False
    #: Whether QEMU has a vmgenid device here: a restored clone's kernel reseeds its RNG.
    vmgenid: bool = False
    #: The suffix of this architecture's cache entries (images, probes): "" for the default.
    cache_suffix: str = ""

    @property
    def qemu_env(self) -> str:
        """The environment variable that names this architecture's QEMU binary."""
        return "QEMUKIT_QEMU" + ("" if self.name == DEFAULT_ARCH else f"_{self.name.upper()}")

    @property
    def default_machine(self) -> str:
        """The machine type a spec of this architecture gets by default."""
        return self.machines[0]

    def virtio(self, kind: str, machine: str) -> str:
        """The virtio device model of ``kind`` (``blk``, ``net``...) on ``machine``."""
        return self.device(f"virtio-{kind}", machine)

    def device(self, model: str, machine: str) -> str:
        """``model`` with the suffix of this machine's virtio transport."""
        if machine == "microvm":
            return f"{model}-device"
        return f"{model}-{self.transport}"


#: The architecture a spec, an image or a probe is for when none is named: the one
#: qemukit was made on. The only other place that names it is its row below.
DEFAULT_ARCH: ArchName = "x86_64"

ARCHES: dict[str, ArchInfo] = {
    "x86_64": ArchInfo(
        name="x86_64", qemu_binary="qemu-system-x86_64", qemu_package="qemu-system-x86",
        machines=("q35", "pc", "microvm"), tcg_cpu=None, console="ttyS0", transport="pci",
        debian_arch="amd64", kernel_package="linux-image-cloud-amd64",
        kernel_format="bzImage", firmware="SeaBIOS (or OVMF)", hotplug_bus="pcie.0",
        cpu_hotplug=True, memory_hotplug=True, acpi=True, seed_cd=True,
        host_names=("x86_64", "amd64"), boots_from_disk=True, ovmf=True, vmgenid=True,
    ),
    "aarch64": ArchInfo(
        # cortex-a57, not max: max's pointer authentication makes TCG ~4x slower.
        name="aarch64", qemu_binary="qemu-system-aarch64", qemu_package="qemu-system-arm",
        machines=("virt",), tcg_cpu="cortex-a57", console="ttyAMA0", transport="pci",
        # The generic kernel, not cloud-arm64: its gpio_keys driver is what hears the
        # virt machine's power button on a device-tree boot (the graceful stop rung).
        debian_arch="arm64", kernel_package="linux-image-arm64",
        kernel_format="Image (arch/arm64/boot/Image)", firmware="none (device tree)",
        hotplug_bus="pcie.0",
        # Under KVM the guest gets the host's interrupt controller (GICv2 is rare).
        kvm_machine_opts="gic-version=host",
        powerdown=True, seed_cd=True, host_names=("aarch64", "arm64"),
        cache_suffix="-aarch64",
    ),
    "riscv64": ArchInfo(
        name="riscv64", qemu_binary="qemu-system-riscv64", qemu_package="qemu-system-misc",
        machines=("virt",), tcg_cpu="rv64", console="ttyS0", transport="pci",
        debian_arch="riscv64", kernel_package="linux-image-riscv64",
        kernel_format="Image (arch/riscv/boot/Image)", firmware="OpenSBI (QEMU's built-in)",
        firmware_file="opensbi-riscv64-generic-fw_dynamic.bin",
        # Debian's riscv64 kernel has no PCI hotplug driver: no root ports.
        hotplug_bus=None, powerdown=False, debian_suite="trixie",
        host_names=("riscv64",),
        # virt makes its fw_cfg after -device is realized (QEMU 7.2 refuses the device).
        no_vmcoreinfo="QEMU's riscv virt machine has no fw_cfg with DMA when devices are "
                      "added (\"vmcoreinfo device requires fw_cfg with DMA\")",
        cache_suffix="-riscv64",
    ),
    "s390x": ArchInfo(
        name="s390x", qemu_binary="qemu-system-s390x", qemu_package="qemu-system-s390x",
        machines=("s390-ccw-virtio",), tcg_cpu="qemu", console="ttysclp0", transport="ccw",
        debian_arch="s390x", kernel_package="linux-image-s390x",
        kernel_format="bzImage (arch/s390/boot/bzImage)", firmware="none",
        cpu_hotplug=True, host_names=("s390x",),
        no_vmcoreinfo="s390x has no fw_cfg: QEMU has no vmcoreinfo device there",
        virtiofs="file reads fail in the guest (ECONNREFUSED here: FUSE "
                 "messages are in a big-endian guest's byte order)",
        cache_suffix="-s390x",
    ),
    "ppc64le": ArchInfo(
        # VOF instead of SLOF saves ~3.5 s and boots -kernel fine; the cap-* settings
        # are the ones TCG implements (else QEMU warns about each).
        name="ppc64le", qemu_binary="qemu-system-ppc64", qemu_package="qemu-system-ppc",
        machines=("pseries",), tcg_cpu="power9", console="hvc0", transport="pci",
        debian_arch="ppc64el", kernel_package="linux-image-powerpc64le",
        kernel_format="vmlinux (ELF)", firmware="VOF (x-vof=on)", firmware_file="vof.bin",
        machine_opts="x-vof=on,cap-cfpc=broken,cap-sbbc=broken,cap-ibs=broken,"
                     "cap-ccf-assist=off",
        cpu_hotplug=True, memory_hotplug=True, host_names=("ppc64le",),
        no_vmcoreinfo="pseries has no fw_cfg: QEMU has no vmcoreinfo device there",
        virtiofs="reads through QEMU 7.2's virtiofsd fail with EINVAL in the pseries guest",
        cache_suffix="-ppc64le",
    ),
}


def arch_info(name: str) -> ArchInfo:
    """The row for architecture ``name`` (KeyError for an unknown one)."""
    return ARCHES[name]


def host_arch_name(machine: str) -> str | None:
    """The guest architecture matching a host's ``platform.machine()``, or None."""
    for info in ARCHES.values():
        if machine in info.host_names:
            return info.name
    return None
