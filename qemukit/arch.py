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

__all__ = ["ARCHES", "DEFAULT_ARCH", "ArchInfo", "ArchName", "arch_info", "arch_option",
           "host_arch_name"]

ArchName = Literal["x86_64", "aarch64", "riscv64", "s390x", "ppc64le"]
Transport = Literal["pci", "ccw"]
#: Kernel config options, as (name without ``CONFIG_``, value) pairs.
KconfigOptions = tuple[tuple[str, str], ...]


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
    #: The kernel's ``ARCH=`` (the name of its ``arch/`` directory).
    kernel_arch: str
    #: Where a built kernel tree holds the image this architecture boots.
    kernel_image: str
    #: The qemu-user binary for its programs (also the binfmt_misc entry qemu-user-static
    #: registers), which runs a foreign image's package scripts at build time.
    qemu_user: str
    #: The kernel options that make the virtio transport work (qemukit's kconfig fragment).
    kconfig_transport: KconfigOptions
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
    #: Kernel options that make a kernel of this architecture, beyond console and transport;
    #: the first names it (a tree whose image is not under ``arch/`` is recognized by it).
    kconfig_base: KconfigOptions = ()
    #: The kernel options for the power button the guest hears without ACPI (with the
    #: fragment's comment for them); None: ACPI's, or none.
    kconfig_power_button: tuple[str, KconfigOptions] | None = None
    #: The kexec option that selects CRASH_CORE (the VMCOREINFO note dumps need) here.
    kexec_option: str = "KEXEC"
    #: CPU models tried under KVM, in order. Some hosts (nested, paravirtual) reject an
    #: MSR that ``host`` passes through and QEMU aborts at start; the next model is
    #: tried only when QEMU exited, never after a hang.
    kvm_cpus: tuple[str, ...] = ("host",)
    #: Why PCI devices cannot be hot-plugged into this machine's guest; None: they can.
    no_pci_hotplug: str | None = None
    #: Whether qemukit's image recipes (tiny, debian) are written for this architecture:
    #: its kernel package (ext4 built in) and package list. Another adds its own files
    #: (``images/debian/<debian_arch>/``, the tiny init's foreign steps) and unpacks its
    #: packages under qemu-user.
    images_native: bool = False
    #: Whether the debian image recipe builds for this architecture.
    debian_image: bool = False
    #: The GRUB platform of a bootable debian disk (``--bootable``); None: none is built.
    grub_platform: str | None = None
    #: Whether the tiny agent's reseed program (:func:`qemukit.identity.reseed_program`, a
    #: static ELF of this architecture's instructions) runs in its guests: a restored
    #: clone's clock and RNG reseed.
    reseed_program: bool = False

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
        kernel_arch="x86_64", kernel_image="arch/x86/boot/bzImage", qemu_user="qemu-x86_64",
        kconfig_base=(("64BIT", "y"),),
        # microvm names its virtio-mmio devices on the command line.
        kconfig_transport=(("PCI", "y"), ("VIRTIO_PCI", "y"), ("VIRTIO_MMIO", "y"),
                           ("VIRTIO_MMIO_CMDLINE_DEVICES", "y")),
        kvm_cpus=("host", "host,-arch-capabilities", "kvm64"),
        images_native=True, debian_image=True, grub_platform="x86_64-efi", reseed_program=True,
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
        kernel_arch="arm64", kernel_image="arch/arm64/boot/Image", qemu_user="qemu-aarch64",
        kconfig_transport=(("PCI", "y"), ("VIRTIO_PCI", "y"), ("PCI_HOST_GENERIC", "y"),
                           ("VIRTIO_MMIO", "y")),
        kconfig_power_button=("the virt machine's power button (gpio-keys on the PL061)", (
            ("INPUT", "y"), ("INPUT_EVDEV", "y"), ("INPUT_KEYBOARD", "y"),
            ("KEYBOARD_GPIO", "y"), ("GPIOLIB", "y"), ("GPIO_PL061", "y"),
        )),
        # arm64's KEXEC needs suspend support (PM_SLEEP_SMP); KEXEC_FILE selects the same.
        kexec_option="KEXEC_FILE",
        debian_image=True,
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
        kernel_arch="riscv", kernel_image="arch/riscv/boot/Image", qemu_user="qemu-riscv64",
        kconfig_transport=(("PCI", "y"), ("VIRTIO_PCI", "y"), ("PCI_HOST_GENERIC", "y"),
                           ("VIRTIO_MMIO", "y")),
        no_pci_hotplug="riscv64 virt cannot hotplug: Debian's riscv64 kernel has no PCI "
                       "hotplug driver",
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
        kernel_arch="s390", kernel_image="arch/s390/boot/bzImage", qemu_user="qemu-s390x",
        kconfig_transport=(("S390_GUEST", "y"),),  # virtio-ccw
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
        # pseries boots the ELF vmlinux at the tree's root ("vmlinux (ELF)" above).
        kernel_arch="powerpc", kernel_image="vmlinux", qemu_user="qemu-ppc64le",
        kconfig_base=(("PPC64", "y"), ("CPU_LITTLE_ENDIAN", "y"), ("PPC_PSERIES", "y")),
        kconfig_transport=(("PCI", "y"), ("VIRTIO_PCI", "y")),
        no_pci_hotplug="pseries PCI hotplug needs powerpc-utils' drmgr in the guest (the tiny "
                       "guest has none)",
    ),
}


def arch_info(name: str) -> ArchInfo:
    """The row for architecture ``name`` (KeyError for an unknown one)."""
    return ARCHES[name]


def arch_option(arch: str) -> str:
    """The `` --arch NAME`` a qemukit command line needs for ``arch`` ("" for the default)."""
    return "" if arch == DEFAULT_ARCH else f" --arch {arch}"


def host_arch_name(machine: str) -> str | None:
    """The guest architecture matching a host's ``platform.machine()``, or None."""
    for info in ARCHES.values():
        if machine in info.host_names:
            return info.name
    return None
