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
:func:`resolve_kernel` is the one step every start takes for a spec's kernel (a
tree or an image, plus modules): it checks everything and writes nothing;
:meth:`ResolvedKernel.materialize` then installs the tree's modules and
appends them to the initramfs, in a directory the VM owns.
Subprocesses (``make``, ``merge_config.sh``) run with argv lists, in the tree.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ._launch.process import run_command
from .arch import ARCHES, DEFAULT_ARCH, ArchInfo
from .errors import HostError, SpecError
from .spec import VMSpec

__all__ = [
    "KCONFIG_VERSION", "KERNEL_ARCH", "KernelTree", "MergeResult", "ResolvedKernel",
    "append_modules", "bzimage_release", "check_kernel_config", "config_sha256", "find_tree",
    "fragment", "fragment_options", "install_modules", "is_tree", "kernel_config",
    "merge_into_tree", "missing_error", "missing_options", "read_config", "resolve_kernel",
]

log = logging.getLogger(__name__)

#: Bumped whenever the fragment changes (part of the suite's test-kernel cache key).
KCONFIG_VERSION = 3

#: The kernel's ARCH= (and arch/ directory) for each guest architecture.
KERNEL_ARCH: dict[str, str] = {name: info.kernel_arch for name, info in ARCHES.items()}
#: Where a built tree holds each architecture's image.
_IMAGE_PATHS: dict[str, str] = {name: info.kernel_image for name, info in ARCHES.items()}

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
    if info.kconfig_base:
        groups.append((f"a {info.name} kernel", info.kconfig_base))
    groups.append((f"the serial console ({info.console})", _console_options(info)))
    transport = info.kconfig_transport
    groups.append((f"the virtio transport ({info.transport})", transport))
    if info.acpi:
        groups.append(("ACPI and its power button (the graceful stop; acpid reads evdev)", (
            ("ACPI", "y"), ("ACPI_BUTTON", "y"), ("INPUT", "y"), ("INPUT_EVDEV", "y"),
        )))
    elif info.kconfig_power_button is not None and info.powerdown:
        groups.append(info.kconfig_power_button)
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
    if info.no_vmcoreinfo is None:
        # qemu_fw_cfg hands the VMCOREINFO note (CRASH_CORE, selected through KEXEC_CORE) to
        # QEMU's vmcoreinfo device, which writes it into dumps: drgn and crash need it.
        kexec = info.kexec_option  # arm64's KEXEC needs PM_SLEEP_SMP; KEXEC_FILE does not
        groups.append(("crash dumps drgn and crash can open (qemukit dump, --dump-on-panic)", (
            ("FW_CFG_SYSFS", "y"), (kexec, "y"), ("CRASH_CORE", "y"),
        )))
    return groups


def _groups(arch: str) -> list[_Group]:
    if arch not in ARCHES:
        raise SpecError("arch", arch, f"must be one of {', '.join(ARCHES)}")
    return _arch_groups(ARCHES[arch]) + _common_groups()


def fragment_options(arch: str = DEFAULT_ARCH) -> dict[str, str]:
    """The fragment as ``{"CONFIG_X": "y"}``, in fragment order."""
    return {f"CONFIG_{name}": value for _, opts in _groups(arch) for name, value in opts}


def fragment(arch: str = DEFAULT_ARCH) -> str:
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


def merge_into_tree(tree: str | Path, arch: str = DEFAULT_ARCH, *, timeout: float = 600.0,
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


def _configured_for(root: Path, info: ArchInfo) -> bool:
    """Whether the tree's .config sets the option that names ``info``'s architecture
    (its image, ``vmlinux`` at the root, is in every built tree)."""
    config = root / ".config"
    if not info.kconfig_base or not config.is_file():
        return False
    name, value = info.kconfig_base[0]
    return read_config(config).get(f"CONFIG_{name}") == value


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
             if rel.startswith("arch/") and (root / rel).is_file()]
    if not found:
        found = [name for name, rel in _IMAGE_PATHS.items() if not rel.startswith("arch/")
                 and (root / rel).is_file() and _configured_for(root, ARCHES[name])]
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


def _depmod() -> str | None:
    """depmod's path (make modules_install looks for it on PATH; Debian keeps it in sbin)."""
    return shutil.which("depmod", path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def install_modules(tree: KernelTree, dest: str | Path, *, timeout: float = 900.0) -> Path:
    """``make modules_install INSTALL_MOD_PATH=dest`` in the tree; returns ``dest``.

    Raises :class:`HostError` if make fails or left no ``modules.dep`` (the
    guest's modprobe needs it; make skips depmod, with a warning, when it is
    missing).
    """
    argv = _make_argv(tree.arch, "-s", "modules_install", f"INSTALL_MOD_PATH={dest}")
    depmod = _depmod()
    if depmod is not None:
        argv.append(f"DEPMOD={depmod}")
    out = _checked(argv, tree.root, timeout, "make modules_install")
    installed = sorted(Path(dest).glob("lib/modules/*/modules.dep"))
    if not installed and list(Path(dest).glob("lib/modules/*")):
        said = f": {out.strip()[-300:]}" if out.strip() else ""
        raise HostError(f"make modules_install in {tree.root} wrote no modules.dep (depmod did "
                        f"not run: apt-get install kmod){said}")
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
    info = spec.arch_info
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
    for share in spec.all_shares:
        why = f"share {share.tag} ({share.transport})"
        if share.transport == "virtiofs":
            need += [("CONFIG_FUSE_FS", why), ("CONFIG_VIRTIO_FS", why)]
        else:
            need += [("CONFIG_NET_9P", why), ("CONFIG_NET_9P_VIRTIO", why), ("CONFIG_9P_FS", why)]
    if spec.host_root is not None:
        need.append(("CONFIG_OVERLAY_FS", "host_root (--rootfs host) lays an overlay over the "
                     "host's root"))
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


# --------------------------------------------------------------------------- a spec's kernel, resolved


def bzimage_release(kernel: str | Path) -> str | None:
    """The release an x86 bzImage names in its setup header (None for other images)."""
    try:
        with open(kernel, "rb") as fh:
            head = fh.read(0x10000)  # the version string may sit past 16 KiB (0x44c0 in Debian 6.1)
    except OSError:
        return None
    # The boot protocol: "HdrS" at 0x202, the version string's offset (minus 0x200) at 0x20E.
    if len(head) < 0x210 or head[0x202:0x206] != b"HdrS":
        return None
    offset = int.from_bytes(head[0x20E:0x210], "little") + 0x200
    end = head.find(b"\0", offset)
    if offset >= len(head) or end < 0:
        return None
    text = head[offset:end].decode("ascii", errors="replace").split(" ", 1)[0]
    return text or None


def _tree_release(tree: KernelTree) -> str | None:
    release_file = tree.root / "include" / "config" / "kernel.release"
    try:
        return release_file.read_text(encoding="utf-8").strip() or None
    except OSError:
        return bzimage_release(tree.image)


@dataclass(frozen=True)
class ResolvedKernel:
    """A spec's kernel, checked and made bootable, before any file is written.

    ``spec`` boots an image file (a tree's built image in place of the tree).
    ``tree`` is the tree it came from, if any; ``modules`` the directory of
    modules to append to the initramfs (given by the caller), else None, and
    ``install_tree_modules`` says that the tree's modules are to be installed
    (``make modules_install``) and appended instead. ``config`` is the kernel
    config that was checked (None when none was found) and ``release`` the
    kernel's release, where known.
    """

    spec: VMSpec
    tree: KernelTree | None
    config: Path | None
    release: str | None
    modules: Path | None = None
    install_tree_modules: bool = False

    @property
    def needs_files(self) -> bool:
        """True if :meth:`materialize` writes an initramfs (modules are to go into it)."""
        return self.modules is not None or self.install_tree_modules

    @property
    def config_sha256(self) -> str | None:
        """The SHA-256 of the checked config (the result's ``kernel_config_sha256``)."""
        return config_sha256(self.config) if self.config is not None else None

    def materialize(self, workdir: str | Path) -> VMSpec:
        """The spec to boot: with the modules appended to its initramfs, written in ``workdir``.

        ``workdir`` (created if missing) belongs to the caller, who removes it
        when the VM is gone (a VM uses its runtime directory). Without modules
        this writes nothing and returns :attr:`spec`.
        """
        if not self.needs_files:
            return self.spec
        assert self.spec.initrd is not None  # resolve_kernel refused otherwise
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True, mode=0o700)
        modules = self.modules
        if modules is None:
            assert self.tree is not None
            log.debug("installing the modules of %s into %s", self.tree.root, work / "modules")
            modules = install_modules(self.tree, work / "modules")
        initrd = append_modules(Path(self.spec.initrd), modules, work)
        if self.modules is None:  # the installed tree is in the initramfs now
            shutil.rmtree(work / "modules", ignore_errors=True)
        return self.spec.replace(initrd=str(initrd))


def resolve_kernel(spec: VMSpec, modules: str | Path | None = None) -> ResolvedKernel:
    """Resolve ``spec.kernel`` (an image file or a built tree) and ``modules`` for a start.

    A tree (see :func:`find_tree`) boots its built image; if its config has
    modules and they were built, they are to be installed and appended to the
    initramfs (unless ``modules`` is given, which then wins). ``modules`` is a
    directory as ``make modules_install INSTALL_MOD_PATH=DIR`` leaves it
    (``DIR/lib/modules/<release>``) or the ``<release>`` directory itself.
    When the kernel's config can be found (a tree's ``.config``,
    ``config-<release>`` beside the image), options the spec needs and the
    config lacks raise :class:`SpecError` naming them. Nothing is written and
    nothing is started; every mistake (a missing kernel, modules without an
    initrd, a modules directory of the wrong shape or holding a file an
    initramfs cannot carry) is raised here. A ``host_root`` is resolved here too
    (:func:`qemukit.rootfs.resolve_host_root`).
    """
    given = Path(modules) if modules is not None else None
    if given is not None:
        _check_modules_dir(given)
    if spec.host_root is not None:  # its transport decides the options the kernel needs
        from .rootfs import resolve_host_root

        spec = resolve_host_root(spec)
    if spec.kernel is None:
        if given is not None:
            raise SpecError("modules", str(given), "needs a kernel booted with an initrd")
        return ResolvedKernel(spec, None, None, None)
    if Path(spec.kernel).is_dir():
        tree = find_tree(spec.kernel, spec.arch)
        booted = spec.replace(kernel=str(tree.image))
        if tree.config is not None:  # the error names the tree the user gave
            missing = missing_options(booted, read_config(tree.config))
            if missing:
                raise missing_error(spec.kernel, tree.config, missing)
        install = tree.modules and given is None
        if install and booted.initrd is None:
            raise SpecError("kernel", str(spec.kernel), "the tree's modules need an initrd to go "
                            "into")
        if install and _depmod() is None:
            raise HostError(f"installing the modules of {tree.root} needs depmod, which make "
                            "modules_install runs to write modules.dep (apt-get install kmod)")
        resolved = ResolvedKernel(booted, tree, tree.config, _tree_release(tree), given, install)
    else:
        if not Path(spec.kernel).is_file():
            raise SpecError("kernel", str(spec.kernel), "no such file or kernel tree")
        checked = check_kernel_config(spec)
        resolved = ResolvedKernel(spec, None, checked, bzimage_release(spec.kernel), given)
    if given is not None and spec.initrd is None:
        raise SpecError("modules", str(given), "needs a kernel booted with an initrd")
    return resolved


def _copy_errors(exc: OSError) -> str:
    """What went wrong in a copy: shutil.Error carries a list of (source, target, why)."""
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list):
        problems = [f"{src}: {why}" for src, _dst, why in exc.args[0][:3]]
        more = len(exc.args[0]) - len(problems)
        return "; ".join(problems) + (f" (and {more} more)" if more > 0 else "")
    return f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc)


_SPECIAL = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
            (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _release_dirs(modules: Path) -> list[Path]:
    """The ``<release>`` directories of a modules tree; SpecError naming what is wrong."""
    try:
        if not modules.is_dir():
            raise SpecError("modules", str(modules), "no such directory")
        release_dirs = [modules] if (modules / "modules.dep").exists() else []
        release_dirs += sorted(p for p in (modules / "lib" / "modules").glob("*") if p.is_dir())
    except OSError as exc:
        raise SpecError("modules", str(modules), f"cannot read it: {_copy_errors(exc)}") from exc
    if not release_dirs:
        raise SpecError("modules", str(modules),
                        "expected DIR/lib/modules/<release>/ or a <release>/ directory "
                        "with modules.dep (make modules_install INSTALL_MOD_PATH=DIR)")
    return release_dirs


def _check_modules_dir(modules: Path) -> None:
    """Refuse, before anything starts, a modules tree an initramfs cannot carry."""
    for release_dir in _release_dirs(modules):
        for dirpath, dirnames, filenames in os.walk(release_dir):
            dirnames[:] = [d for d in dirnames if d not in ("build", "source")]
            for entry in filenames:
                path = Path(dirpath) / entry
                try:
                    mode = path.lstat().st_mode
                except OSError as exc:
                    raise SpecError("modules", str(modules),
                                    f"cannot read {path}: {exc.strerror or exc}") from exc
                for test, what in _SPECIAL:
                    if test(mode):
                        raise SpecError("modules", str(modules), f"cannot copy {release_dir}: "
                                        f"{path} is {what}, which an initramfs cannot carry")


def append_modules(initrd: Path, modules: Path, workdir: Path) -> Path:
    """``initrd`` with the modules tree appended, written in ``workdir``; returns the new file.

    Every failure names the path concerned: :class:`SpecError` for a modules
    tree that cannot go into an initramfs, :class:`HostError` for a file that
    cannot be read or written.
    """
    from .images.tiny import append_to_initrd

    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    staging = workdir / "tree"
    for release_dir in _release_dirs(modules):
        try:
            shutil.copytree(release_dir, staging / "lib" / "modules" / release_dir.name,
                            symlinks=True, ignore=shutil.ignore_patterns("build", "source"))
        except OSError as exc:
            raise SpecError("modules", str(modules),
                            f"cannot copy {release_dir}: {_copy_errors(exc)}") from exc
    target = workdir / "initrd-with-modules.img"
    try:
        append_to_initrd(initrd, staging, target)
    except ValueError as exc:  # a file type a cpio archive for the kernel cannot hold
        raise SpecError("modules", str(modules), f"cannot go into an initramfs: {exc}") from exc
    except OSError as exc:
        raise HostError(f"cannot append the modules from {modules} to the initramfs {initrd} "
                        f"(writing {target}): {_copy_errors(exc)}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
