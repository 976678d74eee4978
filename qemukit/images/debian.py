"""Build the "debian" guest: Debian (bookworm, trixie, sid) with sshd, qemu-guest-agent, cloud-init.

The recipe lives in ``images/debian`` (the package list, the cloud-init
defaults and a README). The steps, all from Debian's packages:

1. ``mmdebstrap --variant=apt`` (as root) installs the packages into a
   directory, from the bookworm, bookworm-updates and bookworm-security
   suites (the last one carries the current kernel);
2. qemukit's changes are written into that tree (fstab, no ssh host keys,
   cloud-init defaults, locale), and the kernel and initramfs are copied out;
3. ``mkfs.ext4 -d`` turns the tree into a file system image, with no loop
   device and no mount;
4. ``qemu-img convert`` makes it a qcow2, which is made read-only: VMs boot on
   overlays over it and never write it.

With ``bootable=True`` step 3 writes a whole disk instead (see
:mod:`qemukit.images.bootable`): a GPT, a BIOS boot partition and an EFI
system partition with GRUB, and the root file system, booted by UEFI or BIOS
firmware rather than ``-kernel``.

For another architecture (``arch="aarch64"``, the only foreign one so far)
mmdebstrap builds a foreign tree (``--architectures=arm64``): its maintainer
scripts run under qemu-user through the host's binfmt_misc entry, which is
checked before anything is done (:func:`qemukit.host.foreign_exec_problem`).
The recipe's ``arm64/`` directory replaces the kernel package (the generic
arm64 kernel, whose ``gpio_keys`` hears the virt machine's power button) and
lists the modules the initramfs carries (``MODULES=list``: the generic
kernel's ``MODULES=most`` initramfs would be several times larger).

The result is cached in ``<cache>/debian/<suite>[-<arch>][-bootable]-<key>/``
(no ``-<arch>`` for x86_64), the key being a digest of everything the build
depends on (suite, extra packages, architecture, mirrors, recipe files and
:data:`RECIPE_VERSION`, and for a bootable disk its
:data:`~qemukit.images.bootable.LAYOUT_VERSION`), with ``manifest.json`` written last, so a half-built
image is never found and a changed input never finds an old image.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..arch import ARCHES, DEFAULT_ARCH
from ..errors import HostError, SpecError
from ..host import find_qemu_img, foreign_exec_problem, host_arch
from .bootable import LAYOUT_VERSION

__all__ = [
    "ARCHES_BUILT",
    "DEBIAN_APPEND",
    "DEFAULT_SUITE",
    "RECIPE_VERSION",
    "SUITES",
    "DebianImage",
    "build_debian",
    "cache_key",
    "check_arch",
    "check_packages",
    "debian_append",
    "find_debian",
    "read_package_list",
]

#: The Debian suites the recipe builds; the first one is the default.
SUITES = ("bookworm", "trixie", "sid")
DEFAULT_SUITE = SUITES[0]
#: Bumped whenever the build steps change what an image holds (part of the cache key).
RECIPE_VERSION = 2
#: The guest architectures the image is built for (qemukit's names); the first is the default.
ARCHES_BUILT = tuple(name for name, info in ARCHES.items() if info.debian_image)
_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
#: Where packages come from; ``QEMUKIT_DEBIAN_MIRROR`` points at another mirror of the same layout.
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
#: The file system's size (a sparse qcow2 stores only what is used).
DEFAULT_DISK_SIZE = "4G"
ROOT_LABEL = "debian-root"
#: The guest's kernel command line: root on the first virtio disk, console on the serial port.
DEBIAN_APPEND = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
#: The recipe's own files (part of the key); a foreign arch adds its directory's files.
_RECIPE_FILES = ("packages", "cloud.cfg")
_FOREIGN_RECIPE_FILES = ("packages", "initramfs-modules")

MANIFEST = "manifest.json"
DISK_NAME = "disk.qcow2"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"

# Written into the tree after mmdebstrap. The root is whatever the kernel was told.
_FSTAB = (
    "# qemukit debian image: the root file system (the kernel is told root=/dev/vda)\n"
    f"LABEL={ROOT_LABEL} / ext4 rw,errors=remount-ro 0 1\n"
)
# The root disk must be found by the initramfs; everything else udev loads from the disk.
_MODULES_WANTED = ("virtio_blk", "virtio_pci")
# initramfs-tools settings a foreign tree gets before its kernel is installed (mmdebstrap's
# setup hook), so its first initramfs is already the small one.
_INITRAMFS_CONF = ("# qemukit debian image: only the modules listed in modules.d/qemukit.conf\n"
                   "MODULES=list\n")


def check_arch(arch: str, bootable: bool = False) -> None:
    """Raise :class:`SpecError` unless the image is built for guest architecture ``arch``."""
    if arch not in ARCHES:
        raise SpecError("arch", arch, f"must be one of {', '.join(ARCHES)}")
    if arch not in ARCHES_BUILT:
        raise SpecError("arch", arch, f"the debian image is built for {' and '.join(ARCHES_BUILT)} "
                        "only")
    grub = {name: info.grub_platform for name, info in ARCHES.items() if info.grub_platform}
    if bootable and arch not in grub:
        raise SpecError("bootable", True, f"bootable disks are built for {' and '.join(grub)} "
                        f"only (GRUB for {' and '.join(grub.values())}); the {arch} image boots "
                        "with -kernel (drop --bootable)")


def debian_append(arch: str = DEFAULT_ARCH) -> str:
    """The debian guest's kernel command line for ``arch`` (its console device)."""
    check_arch(arch)
    return DEBIAN_APPEND.replace("console=ttyS0", f"console={ARCHES[arch].console}")


@dataclass(frozen=True)
class DebianImage:
    """A built debian guest: boot ``kernel`` + ``initrd`` with an overlay over ``disk``."""

    disk: Path
    kernel: Path
    initrd: Path
    kernel_release: str
    directory: Path
    manifest: dict[str, Any]

    @property
    def bootable(self) -> bool:
        """True if ``disk`` is a whole bootable disk (GPT, ESP, GRUB), not a bare file system."""
        return bool(self.manifest.get("bootable"))

    @property
    def disk_bytes(self) -> int:
        """Bytes the qcow2 file takes."""
        return self.disk.stat().st_size

    @property
    def build_seconds(self) -> float | None:
        """How long the build took, from the manifest."""
        value = self.manifest.get("build_seconds")
        return float(value) if isinstance(value, (int, float)) else None


def check_packages(packages: Sequence[str]) -> tuple[str, ...]:
    """``packages`` checked as Debian package names, sorted and without duplicates.

    Raises :class:`~qemukit.errors.SpecError` naming ``packages`` and the bad name.
    """
    for name in packages:
        if not (isinstance(name, str) and _PACKAGE_RE.fullmatch(name)):
            raise SpecError("packages", name, "not a Debian package name "
                            "(lower-case letters, digits, '+', '-', '.')")
    return tuple(sorted(set(packages)))


def _check_suite(suite: str) -> None:
    if suite not in SUITES:
        raise SpecError("suite", suite, f"must be one of {', '.join(SUITES)}")


def cache_key(suite: str, packages: Sequence[str] = (), *, bootable: bool = False,
              recipe_files: dict[str, bytes] | None = None, arch: str = DEFAULT_ARCH) -> str:
    """The digest naming a build: its suite, extra packages, arch, mirrors, recipe and version.

    The order and repetition of ``packages`` do not matter. ``arch`` is the
    guest architecture; the key holds its Debian name (``amd64``, ``arm64``).
    """
    _check_suite(suite)
    check_arch(arch, bootable)
    inputs = {
        "recipe_version": RECIPE_VERSION,
        "suite": suite,
        "arch": ARCHES[arch].debian_arch,
        "packages": list(check_packages(packages)),
        "bootable": bootable,
        "sources": _sources(suite),
        # Only for bootable disks, so a new disk layout leaves the plain image's key alone.
        **({"bootable_layout": LAYOUT_VERSION} if bootable else {}),
        "recipe": {name: hashlib.sha256(data).hexdigest()
                   for name, data in sorted((recipe_files or {}).items())},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _recipe_files(recipe_dir: Path | None, arch: str = DEFAULT_ARCH) -> dict[str, bytes]:
    """The recipe files a build of ``arch`` reads (the top ones; a foreign arch also ``<debarch>/``)."""
    if recipe_dir is None:
        return {}
    names = list(_RECIPE_FILES)
    if not ARCHES[arch].images_native:
        names += [f"{ARCHES[arch].debian_arch}/{n}" for n in _FOREIGN_RECIPE_FILES]
    return {name: (Path(recipe_dir) / name).read_bytes() for name in names
            if (Path(recipe_dir) / name).is_file()}


def _image_dir(cache_dir: Path, suite: str = DEFAULT_SUITE, packages: Sequence[str] = (),
               bootable: bool = False, recipe_dir: Path | None = None,
               arch: str = DEFAULT_ARCH) -> Path:
    key = cache_key(suite, packages, bootable=bootable, arch=arch,
                    recipe_files=_recipe_files(recipe_dir, arch))
    tag = ARCHES[arch].cache_suffix
    return Path(cache_dir) / "debian" / f"{suite}{tag}{'-bootable' if bootable else ''}-{key[:16]}"


def _load_image(directory: Path) -> DebianImage | None:
    try:
        data = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("kernel_release"), str):
        return None
    files = [directory / n for n in (DISK_NAME, KERNEL_NAME, INITRD_NAME)]
    if not all(f.is_file() for f in files):
        return None
    return DebianImage(files[0], files[1], files[2], data["kernel_release"], directory, data)


def find_debian(cache_dir: Path, suite: str = DEFAULT_SUITE, packages: Sequence[str] = (),
                bootable: bool = False, recipe_dir: Path | None = None,
                arch: str = DEFAULT_ARCH) -> DebianImage | None:
    """The debian image built from these inputs under ``cache_dir``, or None.

    ``recipe_dir`` (the recipe's files are part of the key) defaults to the
    installed recipe; ``arch`` is the guest architecture. The manifest is
    written last, so a half-built image is not found.
    """
    return _load_image(_image_dir(cache_dir, suite, packages, bootable,
                                  recipe_dir or _default_recipe_dir(), arch))


def _default_recipe_dir() -> Path | None:
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_recipes" / "debian", here.parent / "images" / "debian"):
        if candidate.is_dir():
            return candidate
    return None


def _read_names(path: Path, pattern: re.Pattern[str] = _PACKAGE_RE,
                what: str = "package name") -> list[str]:
    """The names in a recipe list file, one a line ('#' starts a comment)."""
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            if not pattern.fullmatch(name):
                raise RuntimeError(f"bad {what} {name!r} in {path}")
            names.append(name)
    return names


def read_package_list(recipe_dir: Path, arch: str = DEFAULT_ARCH) -> list[str]:
    """The packages named in the recipe's ``packages`` file (comments and blanks skipped).

    For another ``arch``, the kernel packages (``linux-image-*``) of that file
    are replaced by the ones in ``<debian-arch>/packages``.
    """
    names = _read_names(Path(recipe_dir) / "packages")
    if ARCHES[arch].images_native:
        return names
    extra = _read_names(Path(recipe_dir) / ARCHES[arch].debian_arch / "packages")
    return [n for n in names if not n.startswith("linux-image-")] + [
        n for n in extra if n not in names]


# --------------------------------------------------------------------------- steps


def _run(argv: list[str], what: str, timeout: float = 600, input_text: str | None = None) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              input=input_text if input_text is not None else "",
                              timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise RuntimeError(f"{argv[0]} not found; {what} needs it (scripts/setup installs it)") from exc
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{what} did not finish within {timeout:g}s") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {detail}")
    return proc.stdout


def _sources(suite: str = DEFAULT_SUITE) -> list[str]:
    """The apt lines for the chroot: the suite, its updates, and security (current kernel).

    sid has neither updates nor security suites.
    """
    mirror = os.environ.get("QEMUKIT_DEBIAN_MIRROR", DEFAULT_MIRROR).rstrip("/")
    security = os.environ.get("QEMUKIT_DEBIAN_SECURITY_MIRROR", DEFAULT_SECURITY_MIRROR).rstrip("/")
    if suite == "sid":
        return [f"deb {mirror} sid main"]
    return [
        f"deb {mirror} {suite} main",
        f"deb {mirror} {suite}-updates main",
        f"deb {security} {suite}-security main",
    ]


def _mmdebstrap(root: Path, packages: list[str], progress: Callable[[str], None],
                suite: str = DEFAULT_SUITE, arch: str = DEFAULT_ARCH,
                preload: Path | None = None) -> None:
    """Install the packages into ``root``, passing mmdebstrap's own progress lines on.

    An ``arch`` not the host's gets ``--architectures``; ``preload`` is a tree copied
    into the chroot before any package is installed (mmdebstrap's ``sync-in``
    setup hook, run by mmdebstrap itself, no shell).
    """
    foreign: list[str] = []
    if arch != host_arch():
        foreign.append(f"--architectures={ARCHES[arch].debian_arch}")
    if preload is not None:
        if any(c.isspace() for c in str(preload)):
            # mmdebstrap splits a special hook's arguments at spaces.
            raise RuntimeError(f"the build directory {preload} has white space in its path, "
                               "which mmdebstrap's sync-in hook cannot take; set QEMUKIT_CACHE "
                               "to a path without spaces")
        foreign.append(f"--setup-hook=sync-in {preload} /")
    argv = [
        "mmdebstrap", "--mode=root", "--variant=apt", "--format=directory", *foreign,
        "--include=" + ",".join(packages),
        # The guest never needs documentation or translations: about 60 MB less.
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        suite, str(root), *_sources(suite),
    ]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
    except FileNotFoundError as exc:
        raise RuntimeError("mmdebstrap not found; apt-get install mmdebstrap "
                           "(scripts/setup does)") from exc
    tail: list[str] = []
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-30:]
            if line.startswith(("I:", "E:", "W:")):
                progress("mmdebstrap: " + line[2:].strip())
    if proc.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed (exit {proc.returncode}):\n" + "\n".join(tail))


def _initramfs_preload(work: Path, recipe_dir: Path, arch: str) -> Path:
    """The tree a foreign build copies into its chroot first: initramfs-tools' MODULES=list.

    The module list goes to ``/usr/share/initramfs-tools/modules.d/`` (read in
    every mode) and the setting to ``conf.d``: neither is a package's conffile,
    so dpkg installs initramfs-tools over them without a question.
    """
    modules = _read_names(Path(recipe_dir) / ARCHES[arch].debian_arch / "initramfs-modules",
                          re.compile(r"[a-z0-9_-]+"), "module name")
    tree = work / "preload"
    conf = tree / "etc/initramfs-tools/conf.d"
    conf.mkdir(parents=True)
    (conf / "qemukit").write_text(_INITRAMFS_CONF, encoding="utf-8")
    listing = tree / "usr/share/initramfs-tools/modules.d"
    listing.mkdir(parents=True)
    (listing / "qemukit.conf").write_text("".join(f"{m}\n" for m in modules), encoding="utf-8")
    for path in [tree, *tree.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return tree


def _customize(root: Path, recipe_dir: Path) -> None:
    """qemukit's changes to the installed tree: what makes it a clonable cloud guest."""
    (root / "etc/fstab").write_text(_FSTAB, encoding="utf-8")
    cloud_cfg = root / "etc/cloud/cloud.cfg.d/90-qemukit.cfg"
    shutil.copyfile(recipe_dir / "cloud.cfg", cloud_cfg)
    cloud_cfg.chmod(0o644)
    (root / "etc/default/locale").write_text("LANG=C.UTF-8\n", encoding="utf-8")
    # Each clone gets its own identity: cloud-init makes new host keys and names the host,
    # systemd makes a machine id on first boot.
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/hostname").write_text("debian\n", encoding="utf-8")
    (root / "etc/machine-id").write_text("", encoding="utf-8")
    dbus_id = root / "var/lib/dbus/machine-id"
    if dbus_id.is_file() and not dbus_id.is_symlink():
        dbus_id.unlink()
    # mmdebstrap copied the build host's resolver config; dhclient writes the guest's own.
    resolv = root / "etc/resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    for leftover in (root / "var/cache/apt").glob("*.bin"):
        leftover.unlink()
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)


def _kernel_files(root: Path) -> tuple[str, Path, Path]:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in the image's /boot, found {[k.name for k in kernels]}")
    release = kernels[0].name[len("vmlinuz-"):]
    initrd = root / "boot" / f"initrd.img-{release}"
    if not initrd.is_file():
        raise RuntimeError(f"the image has no initramfs for {release} (initramfs-tools did not run)")
    return release, kernels[0], initrd


def _check_initramfs(root: Path, release: str, wanted: Sequence[str] = _MODULES_WANTED) -> list[str]:
    """The wanted modules missing from the initramfs (lsinitramfs run in the tree).

    A module the kernel has built in (``=y`` in its config) is not missing.
    """
    listing = _run(["chroot", str(root), "lsinitramfs", f"/boot/initrd.img-{release}"],
                   "listing the initramfs")
    present = {Path(line).name.split(".ko")[0] for line in listing.splitlines() if ".ko" in line}
    config = root / "boot" / f"config-{release}"
    builtin = config.read_text(encoding="utf-8", errors="replace") if config.is_file() else ""
    symbols = {"ext4": "CONFIG_EXT4_FS", "virtio_blk": "CONFIG_VIRTIO_BLK",
               "virtio_pci": "CONFIG_VIRTIO_PCI", "virtio_scsi": "CONFIG_SCSI_VIRTIO"}
    return [m for m in wanted if m not in present
            and f"{symbols.get(m, '-')}=y\n" not in builtin]


def _du_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                continue
    return total


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (images are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _nonroot_problem() -> str:
    """One line saying why a normal user cannot build the image here."""
    user = os.environ.get("USER") or str(os.getuid())
    have_ids = all(
        any(line.split(":", 1)[0] in (user, str(os.getuid())) for line in
            Path(f).read_text(encoding="utf-8", errors="replace").splitlines())
        for f in ("/etc/subuid", "/etc/subgid") if Path(f).is_file()
    ) and Path("/etc/subuid").is_file() and Path("/etc/subgid").is_file()
    if not have_ids or shutil.which("newuidmap") is None:
        return (f"building the debian image needs root, or mmdebstrap --mode=unshare with "
                f"subordinate ids for {user} (lines in /etc/subuid and /etc/subgid, newuidmap "
                "from the uidmap package): run it as root")
    return ("building the debian image needs root: mmdebstrap --mode=unshare would work for "
            f"{user}, but this mkfs.ext4 -d cannot keep the tree's root ownership without it; "
            "run it as root")


def build_debian(
    cache_dir: Path,
    recipe_dir: Path,
    progress: Callable[[str], None] = lambda s: None,
    force: bool = False,
    disk_size: str = DEFAULT_DISK_SIZE,
    suite: str = DEFAULT_SUITE,
    packages: Sequence[str] = (),
    bootable: bool = False,
    arch: str = DEFAULT_ARCH,
) -> DebianImage:
    """Build (or reuse) the debian guest of ``suite`` plus ``packages`` under ``cache_dir/debian/``.

    ``bootable`` writes a whole disk (GPT, EFI system partition with GRUB,
    root file system) that UEFI or BIOS firmware boots, instead of a bare file system
    booted with ``-kernel`` (x86_64 only). ``arch`` is the guest architecture
    (see :data:`ARCHES_BUILT`); another than the host's needs binfmt_misc and
    qemu-user-static, checked before anything runs. Needs root (mmdebstrap
    into a directory keeps file ownership only as root; no mount or loop
    device is used), ``mmdebstrap``, ``mkfs.ext4`` and ``qemu-img`` (and for
    ``bootable``: ``sfdisk``, ``mkfs.vfat``, mtools, ``grub-mkstandalone``,
    ``grub-mkimage`` and grub-pc-bin's i386-pc files).
    ``progress`` receives one line per step. Raises ``RuntimeError`` naming
    the failed step or what the host lacks.
    """
    cache_dir, recipe_dir = Path(cache_dir), Path(recipe_dir)
    _check_suite(suite)
    check_arch(arch, bootable)
    extra = check_packages(packages)
    out = _image_dir(cache_dir, suite, extra, bootable, recipe_dir, arch)
    if not force:
        existing = _load_image(out)
        if existing is not None:
            progress(f"using cached debian image {existing.directory}")
            return existing
    if os.geteuid() != 0:
        raise RuntimeError(_nonroot_problem())
    if arch != host_arch():
        problem = foreign_exec_problem(arch)
        if problem is None and shutil.which("arch-test") is None:
            problem = ("mmdebstrap needs arch-test for a foreign tree: apt-get install "
                       "arch-test (scripts/setup does)")
        if problem is not None:
            raise RuntimeError(f"cannot build the {arch} debian image: {problem}")
    wanted = read_package_list(recipe_dir, arch)
    all_packages = wanted + [p for p in extra if p not in wanted]
    try:
        qemu_img = find_qemu_img()
    except HostError as exc:
        raise RuntimeError(str(exc)) from exc
    from . import bootable as _bootable

    if bootable:
        _bootable.check_tools()
    started = time.monotonic()
    parent = cache_dir / "debian"
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=parent))
    layout: dict[str, Any] = {}
    try:
        root = work / "root"
        native = ARCHES[arch].images_native
        foreign = "" if native else f" for {ARCHES[arch].debian_arch} (under qemu-user)"
        progress(f"mmdebstrap {suite}{foreign} with {len(all_packages)} packages (and their "
                 "dependencies)")
        t0 = time.monotonic()
        if native:
            _mmdebstrap(root, all_packages, progress, suite)
        else:
            _mmdebstrap(root, all_packages, progress, suite, arch,
                        _initramfs_preload(work, recipe_dir, arch))
        installed = len(list((root / "var/lib/dpkg/info").glob("*.list")))
        progress(f"installed {installed} packages in {time.monotonic() - t0:.0f}s")

        _customize(root, recipe_dir)
        release, vmlinuz, initrd = _kernel_files(root)
        # A foreign kernel package (generic, not cloud) has ext4 as a module: the initramfs
        # must carry it too.
        need_ext4 = bootable or not native
        missing = _check_initramfs(root, release, _MODULES_WANTED + (("ext4",) if need_ext4 else ()))
        if missing:
            raise RuntimeError(f"the initramfs for {release} lacks {', '.join(missing)}; "
                               "the guest could not find its root disk")
        shutil.copyfile(vmlinuz, work / KERNEL_NAME)
        shutil.copyfile(initrd, work / INITRD_NAME)
        tree_bytes = _du_bytes(root)

        raw = work / "disk.raw"
        if bootable:
            key = out.name.rsplit("-", 1)[-1]
            progress(f"bootable disk: GPT, BIOS boot and EFI partitions with GRUB, ext4 root "
                     f"({tree_bytes / 2**20:.0f} MiB of files, {disk_size} disk)")
            layout = _bootable.write_disk(root, raw, work, release=release, key=key,
                                          disk_size=disk_size, run=_run)
        else:
            progress(f"mkfs.ext4 -d ({tree_bytes / 2**20:.0f} MiB of files, {disk_size} file system)")
            _run(["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(root), str(raw), disk_size],
                 "mkfs.ext4 -d")
        shutil.rmtree(root)
        progress("qemu-img convert to qcow2")
        _run([qemu_img, "convert", "-f", "raw", "-O", "qcow2", str(raw), str(work / DISK_NAME)],
             "qemu-img convert")
        raw.unlink()
        (work / DISK_NAME).chmod(0o444)  # the base is never written: VMs use overlays
        for name in (KERNEL_NAME, INITRD_NAME):
            (work / name).chmod(0o644)

        progress("installing image")
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)  # incomplete from here on
        for name in (DISK_NAME, KERNEL_NAME, INITRD_NAME):
            target = out / name
            if target.exists():
                target.chmod(0o644)
            os.replace(work / name, target)
        manifest = {
            "suite": suite,
            "arch": ARCHES[arch].debian_arch,
            "recipe_version": RECIPE_VERSION,
            "cache_key": cache_key(suite, extra, bootable=bootable, arch=arch,
                                   recipe_files=_recipe_files(recipe_dir, arch)),
            "bootable": bootable,
            "kernel_release": release,
            "packages": installed,
            "requested_packages": all_packages,
            "extra_packages": list(extra),
            "tree_bytes": tree_bytes,
            "disk_size": disk_size,
            "disk_bytes": (out / DISK_NAME).stat().st_size,
            "disk_sha256": file_sha256(out / DISK_NAME),
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": datetime.datetime.now(datetime.UTC).replace(microsecond=0)
            .isoformat().replace("+00:00", "Z"),
            "sources": _sources(suite),
            **({"layout": layout} if layout else {}),
        }
        tmp = work / MANIFEST
        tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out / MANIFEST)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    image = _load_image(out)
    if image is None:
        raise RuntimeError(f"debian image in {out} is incomplete after building")
    progress(f"debian image ready in {out}")
    return image
