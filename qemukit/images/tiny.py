"""Build the "tiny" test guest: a Debian cloud kernel plus a busybox initramfs.

The guest boots straight into a shell script (``images/tiny/init``) that loads
the virtio modules, brings up networking, CPU/memory hotplug and the ACPI power
button, and starts a small line-based agent on the virtio-serial port
``org.qemukit.agent`` (``images/tiny/agent``; the protocol is described in
``images/tiny/README.md``).

Everything comes from Debian packages fetched with ``apt-get download``, so the
build needs no internet beyond the host's apt mirror and no root privileges
(the initramfs is written as a cpio archive directly, owned by root).  Only the
Python standard library is used.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..arch import ARCHES, DEFAULT_ARCH, ArchInfo

__all__ = ["TinyImage", "append_to_initrd", "build_tiny", "find_tiny", "recipe_digest"]

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"

#: Modules the guest needs (dependencies are added automatically).
REQUIRED_MODULES: tuple[str, ...] = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_console",
    "scsi_common",
    "scsi_mod",
    "sd_mod",
    "virtio_scsi",
    "virtio_rng",
    "virtio_balloon",
    "virtio_mmio",
    "button",
    "evdev",
)
#: Modules loaded when the kernel package has them (silently skipped otherwise).
OPTIONAL_MODULES: tuple[str, ...] = ("pvpanic_pci", "fuse", "virtiofs",
                                     # 9p (the read-only host root of --rootfs host; shares
                                     # without virtiofsd) and overlayfs (that root's changes)
                                     "9pnet", "9pnet_virtio", "9p", "overlay",
                                     # fw_cfg in sysfs: it hands QEMU's vmcoreinfo device the
                                     # kernel's VMCOREINFO note, which drgn and crash need to
                                     # open a dump (x86 and arm64 kernels have it)
                                     "qemu_fw_cfg")
#: Modules a foreign kernel may lack: required ones it may not have at all (no ACPI
#: button on s390x or pseries), and 9p, loaded where the kernel has it (all but the
#: arm64 cloud kernel): virtiofs does not work on big-endian s390x.
FOREIGN_OPTIONAL: tuple[str, ...] = ("button", "scsi_common", "scsi_mod", "sd_mod", "virtio_scsi",
                                     "9pnet", "9pnet_virtio", "9p",
                                     # arm virt's power button: a PL061 GPIO line as a key
                                     "gpio_pl061", "gpio_keys")

#: PID 1 of a foreign-architecture image. Its busybox cannot run on the host,
#: so the applet links are made at boot (``--install`` needs /proc/self/exe);
#: on pseries the kernel answers the power button (EPOW) by running
#: ``poweroff_cmd``, whose default asks PID 1 (a shell) to stop, in vain.
FOREIGN_PREAMBLE = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sbin /usr/bin /usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
echo /sbin/qemukit-poweroff >/proc/sys/kernel/poweroff_cmd
umount /proc
exec /sbin/qemukit-init
"""
FOREIGN_POWEROFF = """#!/bin/sh
echo "qemukit-init: power-off requested, powering off" >/dev/console
sync
poweroff -f
"""

MANIFEST = "manifest.json"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
INIT_PATH_IN_IMAGE = "init"
AGENT_PATH_IN_IMAGE = "sbin/qemukit-agent"

_APT_NO_LISTS_PATTERNS = (
    "Unable to locate package",
    "has no installation candidate",
    "Can't select candidate version",
    "No packages found",
    "Can't find a source to download",
)


@dataclass(frozen=True)
class TinyImage:
    """A built tiny guest: boot it with ``-kernel kernel -initrd initrd``."""

    kernel: Path
    initrd: Path
    kernel_release: str
    directory: Path


def _image_root(cache_dir: Path, arch: str = DEFAULT_ARCH) -> Path:
    return Path(cache_dir) / f"tiny{ARCHES[arch].cache_suffix}"


def recipe_digest(recipe_dir: Path, arch: str = DEFAULT_ARCH) -> str:
    """A digest of everything that shapes the image: the recipe files and module lists.

    An image built from another recipe is stale and is not returned by :func:`find_tiny`.
    """
    h = hashlib.sha256()
    for name in sorted(p.name for p in Path(recipe_dir).iterdir() if p.is_file()):
        h.update(name.encode() + b"\0" + (Path(recipe_dir) / name).read_bytes() + b"\0")
    h.update(repr((REQUIRED_MODULES, OPTIONAL_MODULES)).encode())
    if not ARCHES[arch].images_native:
        h.update(repr((arch, FOREIGN_OPTIONAL, FOREIGN_PREAMBLE, FOREIGN_POWEROFF)).encode())
    return h.hexdigest()[:16]


def _load_image(directory: Path, digest: str | None = None) -> TinyImage | None:
    """Return the image in ``directory`` if its manifest and files are present
    (and, given ``digest``, it was built from that recipe)."""
    manifest = directory / MANIFEST
    kernel = directory / KERNEL_NAME
    initrd = directory / INITRD_NAME
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    release = data.get("kernel_release")
    if not isinstance(release, str) or not release:
        return None
    if digest is not None and data.get("recipe") != digest:
        return None
    if not (kernel.is_file() and initrd.is_file()):
        return None
    return TinyImage(kernel=kernel, initrd=initrd, kernel_release=release, directory=directory)


def find_tiny(
    cache_dir: Path, recipe_dir: Path | None = None, arch: str = DEFAULT_ARCH
) -> TinyImage | None:
    """Return the already-built tiny image under ``cache_dir``, or ``None``.

    An image counts only when its ``manifest.json`` (written last) and both
    boot files exist.  When several kernel releases are cached, the most
    recently built one wins. With ``recipe_dir``, only an image built from
    that exact recipe counts (see :func:`recipe_digest`). ``arch`` picks the
    guest architecture's images (``tiny-<arch>/`` beside x86_64's ``tiny/``).
    """
    digest = recipe_digest(recipe_dir, arch) if recipe_dir is not None else None
    root = _image_root(cache_dir, arch)
    if not root.is_dir():
        return None
    found: list[tuple[float, TinyImage]] = []
    for child in root.iterdir():
        if child.name.startswith(".") or not child.is_dir():
            continue
        image = _load_image(child, digest)
        if image is not None:
            found.append(((child / MANIFEST).stat().st_mtime, image))
    if not found:
        return None
    found.sort(key=lambda item: item[0])
    return found[-1][1]


# --------------------------------------------------------------------------- helpers


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; raise ``RuntimeError`` with its stderr when it fails."""
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, errors="replace", check=False
        )
    except FileNotFoundError as exc:
        raise RuntimeError(
            f"{argv[0]} not found: building the tiny guest needs a Debian or Ubuntu host"
            " (apt-get, dpkg-deb)"
        ) from exc
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise RuntimeError(f"{' '.join(argv)} failed (exit {proc.returncode}): {detail}")
    return proc


def _apt_lists_present() -> bool:
    """Whether apt has downloaded any package index (``apt-get update`` ran)."""
    lists = Path("/var/lib/apt/lists")
    try:
        proc = subprocess.run(
            ["apt-config", "shell", "LISTS", "Dir::State::Lists/d"],
            capture_output=True,
            text=True,
            check=False,
        )
        match = re.search(r"LISTS='([^']+)'", proc.stdout)
        if match:
            lists = Path(match.group(1))
    except OSError:
        pass
    try:
        return any("Packages" in entry.name for entry in lists.iterdir())
    except OSError:
        return False


def _foreign_apt_options(info: ArchInfo, apt_dir: Path) -> list[str]:
    """apt options for another architecture's packages, in lists of their own.

    Nothing of the host's apt or dpkg configuration changes: the lists and
    cache live in ``apt_dir``; a suite other than bookworm (riscv64 is in
    Debian only from trixie on) gets a private sources file.
    """
    lists = apt_dir / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    opts = [f"-oAPT::Architecture={info.debian_arch}",
            f"-oAPT::Architectures={info.debian_arch}",
            f"-oDir::State::Lists={lists}", f"-oDir::Cache={apt_dir / 'cache'}"]
    if info.debian_suite != "bookworm":
        etc = apt_dir / "etc"
        (etc / "sources.list.d").mkdir(parents=True, exist_ok=True)
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        suite = info.debian_suite
        (etc / f"{suite}.sources").write_text(
            f"Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {suite} {suite}-updates\n"
            f"Components: main\nSigned-By: {keyring}\n\n"
            f"Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: {suite}-security\n"
            f"Components: main\nSigned-By: {keyring}\n", encoding="utf-8")
        opts += [f"-oDir::Etc::SourceList={etc / f'{suite}.sources'}",
                 f"-oDir::Etc::SourceParts={etc / 'sources.list.d'}"]
    return opts


def _apt_download(packages: list[str], cwd: Path, apt_opts: list[str] | None = None) -> list[Path]:
    """Download ``packages`` (no dependencies) into ``cwd``; return the .deb files."""
    before = set(cwd.glob("*.deb"))
    argv = ["apt-get", *(apt_opts or []), "download", *packages]
    try:
        proc = subprocess.run(
            argv, cwd=cwd, capture_output=True, text=True, errors="replace", check=False
        )
    except FileNotFoundError as exc:
        raise RuntimeError(
            "apt-get not found: building the tiny guest needs a Debian or Ubuntu host"
        ) from exc
    if proc.returncode != 0:
        err = proc.stderr.strip()
        if any(pattern in err for pattern in _APT_NO_LISTS_PATTERNS):
            said = err.splitlines()[-1]
            if not _apt_lists_present():
                raise RuntimeError(
                    f"apt-get cannot find {', '.join(packages)}: the package lists are empty;"
                    f" run `apt-get update` (as root) and try again (apt-get said: {said})"
                )
            raise RuntimeError(
                f"apt-get cannot find {', '.join(packages)} ({said}); the package lists may be"
                " stale or lack Debian's main component: run `apt-get update` and try again"
            )
        raise RuntimeError(f"apt-get download {' '.join(packages)} failed: {err}")
    debs = sorted(set(cwd.glob("*.deb")) - before)
    if len(debs) != len(packages):
        raise RuntimeError(
            f"apt-get download {' '.join(packages)} produced {len(debs)} files, expected"
            f" {len(packages)}"
        )
    return debs


def _deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field]).stdout.strip()


def _find_deb(debs: Iterable[Path], package: str) -> Path:
    for deb in debs:
        if _deb_field(deb, "Package") == package:
            return deb
    raise RuntimeError(f"downloaded files do not contain package {package}")


def _kernel_dependency(meta_deb: Path, meta: str = KERNEL_META_PACKAGE) -> str:
    """Return the versioned kernel package the meta package depends on."""
    depends = _deb_field(meta_deb, "Depends")
    for alternative in re.split(r"[,|]", depends):
        name = alternative.strip().split(" ", 1)[0].split(":", 1)[0]
        if name.startswith("linux-image-") and name != meta:
            return name
    raise RuntimeError(f"cannot find the kernel package in {meta}'s Depends: {depends!r}")


def _modules_root(kernel_root: Path) -> Path:
    """``lib/modules`` of the package, or ``usr/lib/modules`` (merged /usr, trixie on)."""
    for candidate in (kernel_root / "lib" / "modules", kernel_root / "usr" / "lib" / "modules"):
        if candidate.is_dir():
            return candidate
    return kernel_root / "lib" / "modules"


def _kernel_release(kernel_root: Path) -> str:
    modules = _modules_root(kernel_root)
    releases = sorted(p.name for p in modules.iterdir() if p.is_dir()) if modules.is_dir() else []
    if len(releases) != 1:
        raise RuntimeError(f"expected one kernel release in the kernel package, found {releases}")
    return releases[0]


# --------------------------------------------------------------------------- modules

_MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def _module_base(path: Path) -> str | None:
    """Return the file name without the compression suffix (``x.ko``), or None."""
    name = path.name
    for suffix in _MODULE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".ko"
    return None


def _normalize(name: str) -> str:
    return name.replace("-", "_")


def _read_module(path: Path) -> bytes:
    """Return the uncompressed ELF contents of a kernel module file."""
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        if shutil.which("zstd") is None:
            raise RuntimeError(
                f"{name} is zstd-compressed; install zstd (the Python stdlib cannot decompress it)"
            )
        return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


def _modinfo(elf: bytes) -> dict[str, str]:
    """Parse the ``.modinfo`` section of a 64-bit ELF module (either byte order)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] not in (1, 2):
        raise ValueError("not a 64-bit ELF file")
    order = "<" if elf[5] == 1 else ">"  # EI_DATA: 1 little-endian, 2 big-endian (s390x)
    (e_shoff,) = struct.unpack_from(f"{order}Q", elf, 0x28)
    e_shentsize, e_shnum, e_shstrndx = struct.unpack_from(f"{order}HHH", elf, 0x3A)
    shdr = f"{order}IIQQQQIIQQ"

    def section(index: int) -> tuple[int, int, int]:
        fields = struct.unpack_from(shdr, elf, e_shoff + index * e_shentsize)
        return fields[0], fields[4], fields[5]  # name offset, file offset, size

    _, strtab_off, _ = section(e_shstrndx)
    info: dict[str, str] = {}
    for index in range(e_shnum):
        name_off, offset, size = section(index)
        end = elf.index(b"\0", strtab_off + name_off)
        if elf[strtab_off + name_off : end] != b".modinfo":
            continue
        for entry in elf[offset : offset + size].split(b"\0"):
            key, sep, value = entry.decode("utf-8", "replace").partition("=")
            if sep and key not in info:
                info[key] = value
        break
    return info


@dataclass
class _Module:
    name: str
    path: Path
    base: str
    depends: tuple[str, ...] = ()
    data: bytes = b""


def _index_modules(module_dir: Path) -> dict[str, Path]:
    """Map normalized module name (from the file name) to its file."""
    index: dict[str, Path] = {}
    for path in sorted(module_dir.rglob("*")):
        base = _module_base(path)
        if base is not None and path.is_file():
            index.setdefault(_normalize(base[:-3]), path)
    return index


def _builtin_modules(module_dir: Path) -> set[str]:
    """Names of the drivers built into the kernel (``modules.builtin``)."""
    try:
        text = (module_dir / "modules.builtin").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    out = set()
    for line in text.splitlines():
        base = _module_base(Path(line.strip()))
        if base is not None:
            out.add(_normalize(base[:-3]))
    return out


def _resolve_modules(module_dir: Path, optional: Iterable[str] = ()) -> list[_Module]:
    """Return the wanted modules plus their dependencies in load order.

    A wanted module built into the kernel (``modules.builtin``) is skipped,
    and so is one named in ``optional`` that the kernel lacks altogether.
    """
    index = _index_modules(module_dir)
    builtin = _builtin_modules(module_dir)
    maybe = set(OPTIONAL_MODULES) | set(optional)
    loaded: dict[str, _Module] = {}

    def load(name: str) -> _Module | None:
        if name in loaded:
            return loaded[name]
        path = index.get(name)
        if path is None and name in builtin:
            return None
        if path is None:
            raise RuntimeError(f"kernel module {name} not found in the kernel package")
        data = _read_module(path)
        info = _modinfo(data)
        deps = tuple(_normalize(d) for d in info.get("depends", "").split(",") if d)
        base = _module_base(path)
        assert base is not None
        module = _Module(name=name, path=path, base=base, depends=deps, data=data)
        loaded[name] = module
        for dep in deps:
            load(dep)
        return module

    wanted = [name for name in REQUIRED_MODULES if name not in maybe or name in index]
    wanted += [name for name in OPTIONAL_MODULES if name in index]
    wanted += [name for name in optional if name not in wanted and name in index]
    for name in wanted:
        load(name)
    wanted = [name for name in wanted if name in loaded]

    order: list[_Module] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise RuntimeError(f"module dependency cycle through {name}")
        state[name] = 1
        for dep in loaded[name].depends:
            if dep in loaded:  # else built in
                visit(dep)
        state[name] = 2
        order.append(loaded[name])

    for name in wanted:
        visit(name)
    return order


# --------------------------------------------------------------------------- cpio


class _CpioWriter:
    """Write a "newc" cpio archive with every entry owned by root."""

    def __init__(self, out: gzip.GzipFile, mtime: int) -> None:
        self._out = out
        self._mtime = mtime
        self._ino = 300000
        self._seen: set[str] = set()

    def _header(
        self, name: str, mode: int, size: int, nlink: int = 1, rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if name != "TRAILER!!!":
            if name in self._seen:
                raise ValueError(f"duplicate cpio entry {name}")
            self._seen.add(name)
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (
            self._ino,
            mode,
            0,
            0,
            nlink,
            self._mtime,
            size,
            0,
            0,
            rdev[0],
            rdev[1],
            len(encoded),
            0,
        )
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._out.write(header + encoded)
        self._pad(len(header) + len(encoded))

    def _pad(self, length: int) -> None:
        self._out.write(b"\0" * (-length % 4))

    def directory(self, name: str, perm: int = 0o755) -> None:
        self._header(name, stat.S_IFDIR | perm, 0, nlink=2)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._header(name, stat.S_IFREG | perm, len(data))
        self._out.write(data)
        self._pad(len(data))

    def symlink(self, name: str, target: str) -> None:
        data = target.encode()
        self._header(name, stat.S_IFLNK | 0o777, len(data))
        self._out.write(data)
        self._pad(len(data))

    def chardev(self, name: str, major: int, minor: int, perm: int) -> None:
        self._header(name, stat.S_IFCHR | perm, 0, rdev=(major, minor))

    def tree(self, root: Path) -> None:
        """Add everything under ``root`` (directories before their contents)."""
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            here = Path(dirpath)
            entries = sorted(dirnames + filenames)
            for entry in entries:
                path = here / entry
                name = path.relative_to(root).as_posix()
                st = path.lstat()
                perm = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    self.symlink(name, os.readlink(path))
                elif stat.S_ISDIR(st.st_mode):
                    self.directory(name, perm)
                elif stat.S_ISREG(st.st_mode):
                    self.file(name, path.read_bytes(), perm)
                else:
                    raise ValueError(f"unsupported file type in initramfs tree: {path}")

    def finish(self) -> None:
        self._header("TRAILER!!!", 0, 0, nlink=1)


# --------------------------------------------------------------------------- build


def _busybox_applets(busybox: Path) -> list[str]:
    """Return applet paths relative to / (``bin/sh``, ``sbin/poweroff``, ...)."""
    proc = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=False
    )
    if proc.returncode == 0 and proc.stdout.strip():
        paths = [line.strip().lstrip("/") for line in proc.stdout.splitlines()]
    else:
        names = _run([str(busybox), "--list"]).stdout.split()
        paths = [f"bin/{name}" for name in names]
    return sorted({p for p in paths if p and not p.endswith("/busybox") and ".." not in p})


def _busybox_version(busybox: Path, deb: Path, foreign: bool = False) -> str:
    if foreign:  # cannot run here
        return _deb_field(deb, "Version")
    proc = subprocess.run([str(busybox)], capture_output=True, text=True, check=False)
    match = re.search(r"BusyBox v(\S+)", proc.stdout + proc.stderr)
    return match.group(1) if match else _deb_field(deb, "Version")


def _stage_initramfs(
    staging: Path,
    busybox: Path,
    recipe_dir: Path,
    release: str,
    modules: list[_Module],
    foreign: bool = False,
) -> None:
    for sub in (
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "root",
        "mnt",
        "var/log",
        "var/tmp",
        f"lib/modules/{release}",
    ):
        (staging / sub).mkdir(parents=True, exist_ok=True)
    (staging / "tmp").chmod(0o1777)
    (staging / "var/tmp").chmod(0o1777)
    (staging / "root").chmod(0o700)
    (staging / "var/run").symlink_to("/run")

    shutil.copyfile(busybox, staging / "bin/busybox")
    (staging / "bin/busybox").chmod(0o755)
    if foreign:
        # Another architecture's busybox cannot run here: PID 1 makes the links at boot.
        (staging / INIT_PATH_IN_IMAGE).write_text(FOREIGN_PREAMBLE, encoding="ascii")
        (staging / INIT_PATH_IN_IMAGE).chmod(0o755)
        (staging / "sbin/qemukit-poweroff").write_text(FOREIGN_POWEROFF, encoding="ascii")
        (staging / "sbin/qemukit-poweroff").chmod(0o755)
    else:
        for applet in _busybox_applets(busybox):
            link = staging / applet
            if link.exists() or link.is_symlink():
                continue
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to("/bin/busybox")

    init_target = "sbin/qemukit-init" if foreign else INIT_PATH_IN_IMAGE
    for source, target in (("init", init_target), ("agent", AGENT_PATH_IN_IMAGE)):
        src = recipe_dir / source
        if not src.is_file():
            raise RuntimeError(f"recipe file missing: {src}")
        dest = staging / target
        if dest.is_symlink():
            dest.unlink()
        shutil.copyfile(src, dest)
        dest.chmod(0o755)

    moddir = staging / "lib/modules" / release
    for module in modules:
        (moddir / module.base).write_bytes(module.data)
        (moddir / module.base).chmod(0o644)
    (staging / "etc/modules.order").write_text(
        "".join(f"{module.base}\n" for module in modules), encoding="ascii"
    )


def _write_initrd(staging: Path, target: Path, mtime: int) -> None:
    with (
        open(target, "wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=mtime) as gz,
    ):
        writer = _CpioWriter(gz, mtime)
        writer.directory(".")
        writer.tree(staging)  # includes the "dev" directory
        writer.chardev("dev/console", 5, 1, 0o600)
        writer.chardev("dev/null", 1, 3, 0o666)
        writer.finish()


def append_to_initrd(base: Path, tree: Path, target: Path) -> None:
    """Write ``target``: the initrd ``base`` followed by a second archive of ``tree``.

    The kernel unpacks concatenated (compressed) cpio archives in order, so
    files of ``tree`` (e.g. ``lib/modules/<release>/...``) are added to the
    guest's root without rebuilding the image.
    """
    mtime = int(datetime.datetime.now(datetime.UTC).timestamp())
    with open(target, "wb") as raw:
        raw.write(Path(base).read_bytes())
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=mtime) as gz:
            writer = _CpioWriter(gz, mtime)
            writer.tree(tree)
            writer.finish()


def _install(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` through a temporary name and an atomic rename."""
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def build_tiny(
    cache_dir: Path,
    recipe_dir: Path,
    progress: Callable[[str], None] = lambda s: None,
    force: bool = False,
    arch: str = DEFAULT_ARCH,
) -> TinyImage:
    """Build (or reuse) the tiny guest under ``cache_dir/tiny/<kernel_release>/``.

    ``arch`` other than x86_64 builds that architecture's guest (its Debian
    kernel and busybox-static, fetched with apt lists of their own) under
    ``cache_dir/tiny-<arch>/<kernel_release>/``.

    ``recipe_dir`` holds the guest's ``init`` and ``agent`` scripts
    (``images/tiny`` in the source tree).  Unless ``force`` is true an already
    complete image is returned without any download.  ``progress`` receives
    short human-readable step descriptions.  Raises ``RuntimeError`` when a
    step fails (for example when apt's package lists are empty).
    """
    cache_dir = Path(cache_dir)
    recipe_dir = Path(recipe_dir)
    info = ARCHES[arch]
    foreign = not info.images_native
    meta = info.kernel_package
    if not force:
        existing = find_tiny(cache_dir, recipe_dir, arch)
        if existing is not None:
            progress(f"using cached tiny image {existing.directory}")
            return existing

    for name in ("init", "agent"):
        if not (recipe_dir / name).is_file():
            raise RuntimeError(f"recipe file missing: {recipe_dir / name}")

    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tiny-work-", dir=cache_dir))
    try:
        downloads = work / "debs"
        downloads.mkdir()
        apt_opts: list[str] = []
        if foreign:
            apt_dir = cache_dir / "apt" / info.debian_arch
            apt_opts = _foreign_apt_options(info, apt_dir)
            progress(f"updating apt lists for {info.debian_arch} ({info.debian_suite}) in {apt_dir}")
            _run(["apt-get", *apt_opts, "update"])
        progress(f"downloading {meta} and {BUSYBOX_PACKAGE}")
        debs = _apt_download([meta, BUSYBOX_PACKAGE], downloads, apt_opts)
        meta_deb = _find_deb(debs, meta)
        busybox_deb = _find_deb(debs, BUSYBOX_PACKAGE)
        kernel_package = _kernel_dependency(meta_deb, meta)
        progress(f"downloading {kernel_package}")
        (kernel_deb,) = _apt_download([kernel_package], downloads, apt_opts)

        progress("extracting packages")
        kernel_root = work / "kernel"
        busybox_root = work / "busybox"
        _run(["dpkg-deb", "-x", str(kernel_deb), str(kernel_root)])
        _run(["dpkg-deb", "-x", str(busybox_deb), str(busybox_root)])
        release = _kernel_release(kernel_root)
        # arm64 and s390x ship boot/vmlinuz-*, riscv64 and ppc64el boot/vmlinux-*: each
        # file is what -kernel takes as it is (whatever its name says about compression).
        images = [kernel_root / "boot" / f"{stem}-{release}" for stem in ("vmlinuz", "vmlinux")]
        vmlinuz = next((p for p in images if p.is_file()), images[0])
        if not vmlinuz.is_file():
            raise RuntimeError(f"{kernel_package} has no boot/vmlinuz-{release} or vmlinux")
        busybox = next((p for p in (busybox_root / "bin" / "busybox",
                                    busybox_root / "usr" / "bin" / "busybox") if p.is_file()),
                       busybox_root / "bin" / "busybox")
        if not busybox.is_file():
            raise RuntimeError(f"{BUSYBOX_PACKAGE} has no bin/busybox")
        busybox.chmod(0o755)
        busybox_version = _busybox_version(busybox, busybox_deb, foreign)

        progress(f"resolving kernel modules for {release}")
        modules = _resolve_modules(_modules_root(kernel_root) / release,
                                   FOREIGN_OPTIONAL if foreign else ())

        progress(f"assembling initramfs ({len(modules)} modules, busybox {busybox_version})")
        staging = work / "root"
        _stage_initramfs(staging, busybox, recipe_dir, release, modules, foreign)
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        initrd = work / INITRD_NAME
        _write_initrd(staging, initrd, int(now.timestamp()))

        progress("installing image")
        out_dir = _image_root(cache_dir, arch) / release
        out_dir.mkdir(parents=True, exist_ok=True)
        manifest_path = out_dir / MANIFEST
        manifest_path.unlink(missing_ok=True)  # the image is incomplete from here on
        _install(vmlinuz, out_dir / KERNEL_NAME)
        _install(initrd, out_dir / INITRD_NAME)
        manifest = {
            "kernel_release": release,
            "busybox_version": busybox_version,
            "built_at": now.isoformat().replace("+00:00", "Z"),
            "modules": [module.base for module in modules],
            "recipe": recipe_digest(recipe_dir, arch),
            "arch": arch,
        }
        tmp_manifest = work / MANIFEST
        tmp_manifest.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _install(tmp_manifest, manifest_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    image = _load_image(out_dir)
    if image is None:
        raise RuntimeError(f"tiny image in {out_dir} is incomplete after building")
    progress(f"tiny image ready in {out_dir}")
    return image
