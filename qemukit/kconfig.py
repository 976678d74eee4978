"""Kernel configs and build trees: what a kernel needs to boot under qemukit.

:func:`fragment` is the config fragment (``CONFIG_X=y`` lines) a kernel of one
architecture needs to boot with the tiny initramfs and be driven by qemukit:
the architecture's virtio transport and serial console (from
:mod:`qemukit.arch`), virtio-blk/net/console (the agent's channel), devtmpfs,
the pseudo file systems the tiny init mounts, virtiofs and 9p for shares, the
hotplug the machine offers, initramfs support and the sysrq switch.
:func:`merge_into_tree` merges it into a tree's ``.config`` with the tree's own
``scripts/kconfig/merge_config.sh -m`` and ``make olddefconfig`` and says which
options olddefconfig dropped (their dependencies unmet).

:func:`find_tree` turns a kernel build tree into the image to boot and its
architecture; :func:`kernel_config` finds the config of a kernel (a tree's
``.config``, or ``config-<release>``/``.config`` beside an image file), and
:func:`missing_options` says which options a spec needs that the config lacks.
Subprocesses (``make``, ``merge_config.sh``) run with argv lists, in the tree.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._launch.process import run_command
from .arch import ARCHES, ArchInfo
from .errors import HostError, SpecError
from .spec import VMSpec

__all__ = [
    "KCONFIG_VERSION", "KERNEL_ARCH", "KernelTree", "MergeResult", "check_kernel_config",
    "config_sha256", "find_tree", "fragment", "fragment_options", "install_modules",
    "is_tree", "kernel_config", "merge_into_tree", "missing_error", "missing_options",
    "read_config",
]

log = logging.getLogger(__name__)

#: Bumped whenever the fragment changes (part of the suite's test-kernel cache key).
KCONFIG_VERSION = 2

#: The kernel's ARCH= (and arch/ directory) for each guest architecture.
KERNEL_ARCH: dict[str, str] = {
    "x86_64": "x86_64", "aarch64": "arm64", "riscv64": "riscv", "s390x": "s390",
    "ppc64le": "powerpc",
}
#: The arch/ directory holding each architecture's built image, and the image's path.
_IMAGE_PATHS: dict[str, str] = {
    "x86_64": "arch/x86/boot/bzImage", "aarch64": "arch/arm64/boot/Image",
    "riscv64": "arch/riscv/boot/Image", "s390x": "arch/s390/boot/bzImage",
    # pseries boots the ELF vmlinux at the tree's root (arch.py: "vmlinux (ELF)").
    "ppc64le": "vmlinux",
}

_Group = tuple[str, tuple[tuple[str, str], ...]]


def _common_groups() -> list[_Group]:
    return [
        ("what tinyconfig turns off and busybox, the tiny init and the agent use", (
            ("PRINTK", "y"), ("BUG", "y"), ("MULTIUSER", "y"), ("FUTEX", "y"),
            ("EPOLL", "y"), ("SIGNALFD", "y"), ("TIMERFD", "y"), ("EVENTFD", "y"),
            ("SHMEM", "y"), ("POSIX_TIMERS", "y"), ("FILE_LOCKING", "y"),
            ("BINFMT_ELF", "y"), ("BINFMT_SCRIPT", "y"), ("TTY", "y"), ("UNIX98_PTYS", "y"),
            ("SMP", "y"),
        )),
        ("the tiny initramfs (a gzip-compressed cpio archive)", (
            ("BLK_DEV_INITRD", "y"), ("RD_GZIP", "y"),
        )),
        ("file systems the tiny init mounts", (
            ("DEVTMPFS", "y"), ("DEVTMPFS_MOUNT", "y"), ("PROC_FS", "y"), ("SYSFS", "y"),
            ("TMPFS", "y"),
        )),
        ("networking (udhcpc, the uevent listener)", (
            ("NET", "y"), ("INET", "y"), ("UNIX", "y"), ("PACKET", "y"),
        )),
        ("virtio devices: disks, NICs, and virtio-console (the qemukit agent's channel)", (
            ("VIRTIO_MENU", "y"), ("BLOCK", "y"), ("BLK_DEV", "y"), ("VIRTIO_BLK", "y"),
            ("NETDEVICES", "y"), ("NET_CORE", "y"), ("VIRTIO_NET", "y"),
            ("VIRTIO_CONSOLE", "y"),
        )),
        ("host shares: virtiofs and 9p over virtio", (
            ("FUSE_FS", "y"), ("VIRTIO_FS", "y"), ("NETWORK_FILESYSTEMS", "y"),
            ("NET_9P", "y"), ("NET_9P_VIRTIO", "y"), ("9P_FS", "y"),
        )),
        ("the host's root as the guest's (run --rootfs host): an overlay over it", (
            ("OVERLAY_FS", "y"),
        )),
        ("crash testing (echo c > /proc/sysrq-trigger); PANIC_ON_OOPS is left as it is", (
            ("MAGIC_SYSRQ", "y"),
        )),
    ]


def _console_options(info: ArchInfo) -> tuple[tuple[str, str], ...]:
    if info.console == "ttyS0":
        extra = (("SERIAL_OF_PLATFORM", "y"),) if not info.acpi else ()
        return (("SERIAL_8250", "y"), ("SERIAL_8250_CONSOLE", "y"), *extra)
    if info.console == "ttyAMA0":
        return (("SERIAL_AMBA_PL011", "y"), ("SERIAL_AMBA_PL011_CONSOLE", "y"))
    if info.console == "ttysclp0":
        return (("SCLP_TTY", "y"), ("SCLP_CONSOLE", "y"), ("SCLP_VT220_TTY", "y"),
                ("SCLP_VT220_CONSOLE", "y"))
    if info.console == "hvc0":
        return (("HVC_CONSOLE", "y"),)
    raise SpecError("arch", info.name, f"no kernel config known for console {info.console}")


def _arch_groups(info: ArchInfo) -> list[_Group]:
    groups: list[_Group] = []
    base: tuple[tuple[str, str], ...] = {
        "x86_64": (("64BIT", "y"),),
        "ppc64le": (("PPC64", "y"), ("CPU_LITTLE_ENDIAN", "y"), ("PPC_PSERIES", "y")),
    }.get(info.name, ())
    if base:
        groups.append((f"a {info.name} kernel", base))
    groups.append((f"the serial console ({info.console})", _console_options(info)))
    if info.transport == "ccw":
        transport: tuple[tuple[str, str], ...] = (("S390_GUEST", "y"),)  # virtio-ccw
    else:
        transport = (("PCI", "y"), ("VIRTIO_PCI", "y"))
        if info.name in ("aarch64", "riscv64"):
            transport += (("PCI_HOST_GENERIC", "y"),)
        if info.name != "ppc64le":
            transport += (("VIRTIO_MMIO", "y"),)
        if info.name == "x86_64":  # microvm names its virtio-mmio devices on the command line
            transport += (("VIRTIO_MMIO_CMDLINE_DEVICES", "y"),)
    groups.append((f"the virtio transport ({info.transport})", transport))
    if info.acpi:
        groups.append(("ACPI and its power button (the graceful stop; acpid reads evdev)", (
            ("ACPI", "y"), ("ACPI_BUTTON", "y"), ("INPUT", "y"), ("INPUT_EVDEV", "y"),
        )))
    elif info.name == "aarch64" and info.powerdown:
        groups.append(("the virt machine's power button (gpio-keys on the PL061)", (
            ("INPUT", "y"), ("INPUT_EVDEV", "y"), ("INPUT_KEYBOARD", "y"),
            ("KEYBOARD_GPIO", "y"), ("GPIOLIB", "y"), ("GPIO_PL061", "y"),
        )))
    hotplug: list[tuple[str, str]] = []
    if info.hotplug_bus is not None:
        hotplug += [("PCIEPORTBUS", "y"), ("HOTPLUG_PCI", "y"), ("HOTPLUG_PCI_PCIE", "y")]
        if info.acpi:
            hotplug.append(("HOTPLUG_PCI_ACPI", "y"))
    if info.cpu_hotplug:
        hotplug.append(("HOTPLUG_CPU", "y"))
        if info.acpi:
            hotplug.append(("ACPI_HOTPLUG_CPU", "y"))
    if info.memory_hotplug:
        hotplug.append(("MEMORY_HOTPLUG", "y"))
        if info.acpi:
            hotplug.append(("ACPI_HOTPLUG_MEMORY", "y"))
    if hotplug:
        groups.append(("hotplug this machine offers (PCIe slots, CPUs, memory)", tuple(hotplug)))
    return groups


def _groups(arch: str) -> list[_Group]:
    if arch not in ARCHES:
        raise SpecError("arch", arch, f"must be one of {', '.join(ARCHES)}")
    return _arch_groups(ARCHES[arch]) + _common_groups()


def fragment_options(arch: str = "x86_64") -> dict[str, str]:
    """The fragment as ``{"CONFIG_X": "y"}``, in fragment order."""
    return {f"CONFIG_{name}": value for _, opts in _groups(arch) for name, value in opts}


def fragment(arch: str = "x86_64") -> str:
    """The config fragment for ``arch``: commented ``CONFIG_X=y`` lines, as merge_config.sh reads."""
    lines = [f"# qemukit kconfig fragment v{KCONFIG_VERSION} for {arch} "
             f"(qemukit kconfig --arch {arch} --print)"]
    for title, opts in _groups(arch):
        lines.append(f"# {title}")
        lines += [f"CONFIG_{name}={value}" for name, value in opts]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- configs

_SET = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")


def read_config(path: str | Path) -> dict[str, str]:
    """The options a ``.config`` sets (``# ... is not set`` lines are absent), by name."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise HostError(f"cannot read the kernel config {path}: {exc.strerror or exc}") from exc
    out: dict[str, str] = {}
    for line in text.splitlines():
        m = _SET.match(line.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out


def config_sha256(path: str | Path) -> str:
    """The SHA-256 of a config file's bytes (the result's ``kernel_config_sha256``)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as exc:
        raise HostError(f"cannot read the kernel config {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_into_tree` did: the config written and what olddefconfig dropped.

    ``dropped`` maps each fragment option the final ``.config`` lacks (or has
    with another value) to the value it ended with (``"n"`` when unset).
    """

    config: Path
    dropped: Mapping[str, str]


def _make_argv(arch: str, *targets: str) -> list[str]:
    return ["make", f"ARCH={KERNEL_ARCH[arch]}", *targets]


def merge_into_tree(tree: str | Path, arch: str = "x86_64", *, timeout: float = 600.0,
                    extra: str = "") -> MergeResult:
    """Merge :func:`fragment` (plus ``extra`` lines) into ``tree/.config`` and olddefconfig it.

    Uses the tree's own ``scripts/kconfig/merge_config.sh -m`` (a tree without
    a ``.config`` starts from the fragment alone) and ``make olddefconfig``,
    both run in the tree. Raises :class:`SpecError` if ``tree`` is not a kernel
    tree and :class:`HostError` if a step fails; the dropped options are
    returned, not raised (the caller decides whether they matter).
    """
    root = Path(tree)
    script = _source(root) / "scripts" / "kconfig" / "merge_config.sh"
    if not is_tree(root) or not script.is_file():
        raise SpecError("tree", str(tree), "not a kernel source tree (no Makefile, arch/ and "
                        "scripts/kconfig/merge_config.sh)")
    text = fragment(arch) + extra
    with tempfile.TemporaryDirectory(prefix="qemukit-kconfig-") as tmp:
        frag = Path(tmp) / "qemukit.config"
        frag.write_text(text, encoding="utf-8")
        config = root / ".config"
        if not config.exists():
            config.write_text("", encoding="utf-8")
        # merge_config.sh is a shell script of the tree's own: run it by its interpreter.
        _checked(["sh", str(script), "-m", "-O", str(root), str(config), str(frag)], root,
                 timeout, "merge_config.sh")
    _checked(_make_argv(arch, "olddefconfig"), root, timeout, "make olddefconfig")
    final = read_config(root / ".config")
    wanted = {m.group(1): m.group(2) for m in map(_SET.match, text.splitlines()) if m}
    dropped = {name: final.get(name, "n") for name, value in wanted.items()
               if final.get(name, "n") != value}
    if dropped:
        log.warning("olddefconfig dropped %s", ", ".join(sorted(dropped)))
    return MergeResult(config=root / ".config", dropped=dropped)


def _checked(argv: list[str], cwd: Path, timeout: float, what: str) -> str:
    proc = run_command(argv, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise HostError(f"{what} failed in {cwd} (exit status {proc.returncode}): "
                        f"{' '.join(argv)}\n{tail}")
    return proc.stdout


# --------------------------------------------------------------------------- trees


def _source(root: Path) -> Path:
    """The source tree of ``root``: itself, or what an ``O=`` build directory's ``source`` names."""
    return root / "source" if (root / "source" / "Kconfig").is_file() else root


def is_tree(path: str | Path) -> bool:
    """Whether ``path`` is the root of a kernel tree: a source tree (Makefile, Kconfig,
    arch/) or a ``make O=DIR`` build directory (Makefile and a ``source`` link to one)."""
    root = Path(path)
    src = _source(root)
    return root.is_dir() and (root / "Makefile").is_file() and (src / "Kconfig").is_file() and (
        (src / "arch").is_dir())


@dataclass(frozen=True)
class KernelTree:
    """A built kernel tree: its root, the image to boot, its architecture and config.

    ``modules`` says whether the config has ``CONFIG_MODULES=y`` and modules
    were built (``modules.order`` lists some): then they are to be installed.
    """

    root: Path
    image: Path
    arch: str
    config: Path | None
    modules: bool


def _ppc_tree(root: Path) -> bool:
    config = root / ".config"
    return config.is_file() and read_config(config).get("CONFIG_PPC64") == "y"


def find_tree(path: str | Path, arch: str | None = None) -> KernelTree:
    """The built image of the kernel tree at ``path`` and the architecture it is for.

    The architecture is the one whose ``arch/`` directory holds a built image
    (``arch/x86/boot/bzImage``, ``arch/arm64/boot/Image``...; ppc64le boots
    ``vmlinux``). Raises :class:`SpecError` naming what was looked for if no
    image is built, or if ``arch`` is given and disagrees with the tree's.
    """
    root = Path(path)
    if not is_tree(root):
        raise SpecError("kernel", str(path), "not a file and not a kernel tree "
                        "(a directory with Makefile, Kconfig and arch/, or a make O=DIR build "
                        "directory)")
    found = [name for name, rel in _IMAGE_PATHS.items()
             if name != "ppc64le" and (root / rel).is_file()]
    if not found and (root / "vmlinux").is_file() and _ppc_tree(root):
        found = ["ppc64le"]
    if not found:
        looked = _IMAGE_PATHS[arch] if arch in _IMAGE_PATHS else ", ".join(_IMAGE_PATHS.values())
        raise SpecError("kernel", str(path), f"a kernel tree with no built image (looked for "
                        f"{looked}); build it first (make -j$(nproc))")
    if arch is not None and arch not in found:
        raise SpecError("arch", arch, f"the kernel tree {path} is built for "
                        f"{' and '.join(found)} ({_IMAGE_PATHS[found[0]]}), not {arch}")
    chosen = arch if arch is not None else found[0]
    if arch is None and len(found) > 1:
        raise SpecError("kernel", str(path), f"the tree holds images for {', '.join(found)}; "
                        "say which with arch")
    config = root / ".config"
    settings = read_config(config) if config.is_file() else {}
    order = root / "modules.order"
    built = order.is_file() and order.stat().st_size > 0
    return KernelTree(root=root, image=root / _IMAGE_PATHS[chosen], arch=chosen,
                      config=config if config.is_file() else None,
                      modules=settings.get("CONFIG_MODULES") == "y" and built)


def install_modules(tree: KernelTree, dest: str | Path, *, timeout: float = 900.0) -> Path:
    """``make modules_install INSTALL_MOD_PATH=dest`` in the tree; returns ``dest``."""
    _checked(_make_argv(tree.arch, "-s", "modules_install", f"INSTALL_MOD_PATH={dest}"),
             tree.root, timeout, "make modules_install")
    return Path(dest)


def kernel_config(kernel: str | Path) -> Path | None:
    """The config of a kernel (a tree, or an image file), if one can be found.

    A tree's ``.config``; for an image inside a tree (``arch/*/boot/...``) the
    tree's; else ``config-<release>`` beside a ``vmlinuz-<release>`` (Debian's
    /boot) or a ``.config`` in the image's directory.
    """
    path = Path(kernel)
    if path.is_dir():
        return path / ".config" if (path / ".config").is_file() else None
    candidates: list[Path] = []
    if len(path.parents) > 3 and path.parent.name == "boot" and path.parents[2].name == "arch":
        candidates.append(path.parents[3] / ".config")
    for prefix in ("vmlinuz-", "vmlinux-", "bzImage-", "Image-"):
        if path.name.startswith(prefix):
            candidates.append(path.with_name("config-" + path.name[len(prefix):]))
    candidates.append(path.with_name(".config"))
    return next((c for c in candidates if c.is_file()), None)


def _required(spec: VMSpec) -> list[tuple[str, str]]:
    """(option, why) for each option ``spec`` needs of its kernel."""
    info = ARCHES[spec.arch]
    need: list[tuple[str, str]] = [("CONFIG_DEVTMPFS", "the tiny init mounts devtmpfs on /dev")]
    if spec.initrd is not None:
        need.append(("CONFIG_BLK_DEV_INITRD", "the VM boots an initramfs"))
    if spec.machine == "microvm":
        need.append(("CONFIG_VIRTIO_MMIO", "microvm's virtio devices are virtio-mmio"))
        need.append(("CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
                     "microvm names its virtio-mmio devices on the kernel command line"))
    elif info.transport == "ccw":
        need.append(("CONFIG_S390_GUEST", "virtio devices attach over CCW on s390x"))
    else:
        need.append(("CONFIG_VIRTIO_PCI", f"virtio devices attach over PCI on {spec.machine}"))
    need += [(opt, f"the serial console {info.console}") for opt, _ in
             ((f"CONFIG_{n}", v) for n, v in _console_options(info)) if "CONSOLE" in opt]
    if spec.agent == "qemukit":
        need.append(("CONFIG_VIRTIO_CONSOLE", "the qemukit agent talks over a virtio-console "
                     "port"))
    for share in spec.shares:
        why = f"share {share.tag} ({share.transport})"
        if share.transport == "virtiofs":
            need += [("CONFIG_FUSE_FS", why), ("CONFIG_VIRTIO_FS", why)]
        else:
            need += [("CONFIG_NET_9P", why), ("CONFIG_NET_9P_VIRTIO", why), ("CONFIG_9P_FS", why)]
    if any(arg.startswith("qemukit.rootfs=") for arg in (spec.append or "").split()):
        need.append(("CONFIG_OVERLAY_FS", "--rootfs host lays an overlay over the host's root"))
    if spec.nics:
        need.append(("CONFIG_VIRTIO_NET", "the VM has a virtio NIC"))
    return need


def missing_options(spec: VMSpec, config: Mapping[str, str]) -> list[tuple[str, str]]:
    """(option, why) for each option ``spec`` needs that ``config`` leaves unset.

    A module (``=m``) counts as present: the initramfs may carry it.
    """
    seen: set[str] = set()
    out = []
    for option, why in _required(spec):
        if option not in seen and config.get(option) not in ("y", "m"):
            out.append((option, why))
        seen.add(option)
    return out


def missing_error(kernel: str | Path, config: str | Path, missing: Sequence[tuple[str, str]],
                  hint: str = "qemukit kconfig TREE merges what qemukit needs") -> SpecError:
    """The :class:`SpecError` (field ``kernel``) naming each missing option and why it is needed."""
    names = ", ".join(option for option, _ in missing)
    whys = "; ".join(f"{option}: {why}" for option, why in missing)
    return SpecError("kernel", str(kernel), f"its config {config} lacks {names} ({whys}); {hint}")


def check_kernel_config(spec: VMSpec, config_path: str | Path | None = None) -> Path | None:
    """Raise :class:`SpecError` naming the missing ``CONFIG_`` options if the spec's kernel
    lacks what the spec needs (before anything starts).

    The config is ``config_path`` or :func:`kernel_config` of ``spec.kernel``;
    without a readable one nothing is checked (None is returned). Returns the
    config file checked.
    """
    if spec.kernel is None:
        return None
    path = Path(config_path) if config_path is not None else kernel_config(spec.kernel)
    if path is None:
        return None
    missing = missing_options(spec, read_config(path))
    if missing:
        raise missing_error(spec.kernel, path, missing)
    return path
