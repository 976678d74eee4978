"""Disk images a user brings (a distribution's cloud image): registered, never written.

``import_image(name, path)`` checks the file with ``qemu-img info`` (format,
virtual size, backing file, lock), reads what it can of the guest without
booting it, and records it in ``<cache>/images/imported.json`` (0600): the
path, its size, mtime and SHA-256, the OS facts, the agent kind, the default
user and the firmware. VMs boot it on a qcow2 overlay, so the file itself is
only ever read.

How the guest is read: the partition table (GPT, else MBR) gives the EFI
system partition (then the image boots with UEFI, else BIOS) and the Linux
partitions; ``debugfs`` (read-only, it has no write mode unless asked) reads
``/etc/os-release`` and looks for ``qemu-ga`` in each ext2/3/4 partition at
its byte offset (``FILE?offset=N``). A qcow2 is first converted to a
temporary sparse raw file in the cache (a few seconds for a cloud image),
since debugfs reads only raw. Other file systems (xfs, btrfs) are not read:
the facts are then unknown and ``--user`` must be given.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import host
from .._fs import locked, write_atomic
from ..errors import HostError, SpecError
from .bootable import ESP_TYPE
from .debian import file_sha256

__all__ = [
    "ImageInfo",
    "ImportedImage",
    "Partition",
    "find_imported",
    "import_image",
    "list_imported",
    "parse_img_info",
    "read_partitions",
    "registry_path",
    "remove_imported",
    "verify_unchanged",
]

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
#: Names the built-in images use: an import may not shadow them.
RESERVED = ("tiny", "debian")
FORMATS = ("qcow2", "raw")
_LINUX_TYPES = {"0FC63DAF-8483-4772-8E79-3D69D8477DE4",  # Linux file system
                "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"}  # Linux root (x86-64)
_QGA_PATHS = ("/usr/sbin/qemu-ga", "/usr/bin/qemu-ga")


@dataclass(frozen=True)
class ImageInfo:
    """What ``qemu-img info`` says of a file (``backing`` is always None: see :func:`parse_img_info`)."""

    format: str
    virtual_size: int
    backing: str | None


@dataclass(frozen=True)
class Partition:
    """A partition: where it starts and how long it is (bytes), and its type."""

    start: int
    size: int
    type: str


@dataclass(frozen=True)
class ImportedImage:
    """A registered image: the file, its fingerprint, and how to boot and reach it."""

    name: str
    path: str
    format: str
    virtual_size: int
    size: int
    mtime_ns: int
    sha256: str
    firmware: str
    agent: str
    user: str
    os: dict[str, str] = field(default_factory=dict)
    imported_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The registry entry (JSON-ready)."""
        return asdict(self)


def registry_path(cache_dir: Path) -> Path:
    """The registry file under ``cache_dir``."""
    return Path(cache_dir) / "images" / "imported.json"


def _check_name(name: str) -> None:
    if not (isinstance(name, str) and NAME_RE.fullmatch(name)):
        raise SpecError("name", name, f"must match {NAME_RE.pattern}")
    if name in RESERVED:
        raise SpecError("name", name, "is a built-in image's name; choose another")


def parse_img_info(text: str, path: str) -> ImageInfo:
    """``qemu-img info --output=json`` output as :class:`ImageInfo`; SpecError on what qemukit refuses.

    Refused: a format other than qcow2 or raw, and an image that is not
    self-contained: a backing file or an external data file named inside it
    is never opened (it could be any host file), so such an image must be
    flattened first (``qemu-img convert -O qcow2``).
    """
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HostError(f"qemu-img info on {path} printed no JSON: {text[:200]!r}") from exc
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt not in FORMATS:
        raise SpecError("format", fmt, f"{path}: only {' and '.join(FORMATS)} images can be imported")
    size = data.get("virtual-size")
    if not isinstance(size, int) or size <= 0:
        raise SpecError("virtual-size", size, f"{path}: qemu-img reports no usable size")
    backing = data.get("full-backing-filename") or data.get("backing-filename")
    if backing is not None:
        raise SpecError("backing-filename", backing, _not_self_contained(path, "backing file"))
    specific = (data.get("format-specific") or {}).get("data") or {}
    if isinstance(specific, dict) and specific.get("data-file"):
        raise SpecError("data-file", specific["data-file"],
                        _not_self_contained(path, "external data file"))
    return ImageInfo(fmt, size, None)


def _not_self_contained(path: str, what: str) -> str:
    return (f"{path} names a {what} outside itself; qemukit imports only self-contained "
            "images (a file named inside an image could be any host file, so it is never "
            f"opened): flatten it first, e.g. qemu-img convert -O qcow2 {path} flat.qcow2")


def _img_info(path: Path) -> ImageInfo:
    # Read the header first (regular file, first cluster only): a qcow2 naming another
    # file is refused before any tool opens it.
    header = host.read_qcow2_header(path, "file")
    if header is not None and header.backing is not None:
        raise SpecError("backing-filename", header.backing, _not_self_contained(str(path),
                                                                               "backing file"))
    if header is not None and header.data_file is not None:
        raise SpecError("data-file", header.data_file, _not_self_contained(str(path),
                                                                          "external data file"))
    qemu_img = host.find_qemu_img()
    # Without -U: qemu-img then takes the image's lock and fails if a QEMU has it open.
    proc = subprocess.run([qemu_img, "info", "--output=json", "--", str(path)],
                          capture_output=True, text=True, errors="replace",
                          stdin=subprocess.DEVNULL, timeout=60, check=False)
    if proc.returncode != 0:
        message = proc.stderr.strip()
        if "lock" in message:
            raise SpecError("file", str(path), "is in use (another QEMU holds its lock); "
                            f"stop that VM first: {message}")
        raise SpecError("file", str(path), f"qemu-img cannot read it: {message}")
    return parse_img_info(proc.stdout, str(path))


def read_partitions(head: bytes, disk_bytes: int) -> list[Partition]:
    """The partitions in the first sectors of a raw disk (GPT if there is one, else MBR).

    ``head`` must hold at least the first 34 sectors (the GPT and its entries).
    A disk without a table gives one "whole disk" partition of type ``""``.
    """
    if len(head) >= 1024 and head[512:520] == b"EFI PART":
        entries_lba, count, entry_size = struct.unpack_from("<QII", head, 512 + 72)
        out = []
        for i in range(min(count, 128)):
            offset = entries_lba * 512 + i * entry_size
            if offset + 128 > len(head):
                break
            raw_type = head[offset:offset + 16]
            if raw_type == bytes(16):
                continue
            first, last = struct.unpack_from("<QQ", head, offset + 32)
            type_guid = str(_uuid_le(raw_type)).upper()
            out.append(Partition(first * 512, (last - first + 1) * 512, type_guid))
        return out
    if len(head) >= 512 and head[510:512] == b"\x55\xaa":
        out = []
        for i in range(4):
            entry = head[446 + 16 * i: 462 + 16 * i]
            kind = entry[4]
            start, sectors = struct.unpack_from("<II", entry, 8)
            if kind and sectors and kind != 0xEE:
                out.append(Partition(start * 512, sectors * 512, f"mbr:{kind:02x}"))
        if out:
            return out
    return [Partition(0, disk_bytes, "")]


def _uuid_le(raw: bytes) -> str:
    import uuid

    return str(uuid.UUID(bytes_le=raw))


def _debugfs(target: str, request: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["debugfs", "-c", "-R", request, target], capture_output=True,
                          text=True, errors="replace", stdin=subprocess.DEVNULL, timeout=60,
                          check=False)


def _parse_os_release(text: str) -> dict[str, str]:
    facts: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Z_]+", key.strip()):
            facts[key.strip()] = value.strip().strip('"').strip("'")
    return facts


def _read_guest(raw: Path, partitions: Sequence[Partition]) -> tuple[dict[str, str], bool | None]:
    """os-release facts and whether qemu-ga is installed, from the first readable ext partition."""
    if shutil.which("debugfs") is None:
        return {}, None
    for part in partitions:
        if part.type and part.type not in _LINUX_TYPES and part.type != "mbr:83":
            continue
        target = f"{raw}?offset={part.start}"
        facts: dict[str, str] = {}
        for path in ("/etc/os-release", "/usr/lib/os-release"):
            proc = _debugfs(target, f"cat {path}")
            if proc.returncode == 0 and "ID=" in proc.stdout:
                facts = _parse_os_release(proc.stdout)
                break
        if not facts:
            continue
        has_qga = False
        for path in _QGA_PATHS:
            proc = _debugfs(target, f"stat {path}")
            if proc.returncode == 0 and "Inode:" in proc.stdout:
                has_qga = True
        return facts, has_qga
    return {}, None


def _raw_view(path: Path, info: ImageInfo, scratch: Path) -> Path:
    """A raw file to read the guest from: the file itself if raw, else a temporary copy."""
    if info.format == "raw":
        return path
    view = scratch / "view.raw"
    proc = subprocess.run(["qemu-img", "convert", "-f", info.format, "-O", "raw", "--",
                           str(path), str(view)], capture_output=True, text=True,
                          errors="replace", stdin=subprocess.DEVNULL, timeout=600, check=False)
    if proc.returncode != 0:
        raise HostError(f"reading {path} for its OS facts failed: {proc.stderr.strip()}")
    return view


def _load(cache_dir: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(registry_path(cache_dir).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise HostError(f"the image registry {registry_path(cache_dir)} is unreadable: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _save(cache_dir: Path, entries: dict[str, dict[str, Any]]) -> None:
    path = registry_path(cache_dir)
    write_atomic(path, json.dumps(entries, indent=2, sort_keys=True) + "\n")
    os.chmod(path, 0o600)


def _registry_lock(cache_dir: Path) -> Path:
    directory = registry_path(cache_dir).parent
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory / ".imported.lock"


def _from_entry(entry: dict[str, Any]) -> ImportedImage:
    known = {k: entry[k] for k in ImportedImage.__dataclass_fields__ if k in entry}
    return ImportedImage(**known)


def import_image(cache_dir: Path, name: str, path: str | os.PathLike[str], *,
                 user: str | None = None, agent: str | None = None,
                 firmware: str | None = None, replace: bool = False) -> ImportedImage:
    """Register the disk image at ``path`` as ``name``; the file is only read.

    ``user``, ``agent`` (``qga`` or ``none``) and ``firmware`` (``uefi`` or
    ``bios``) override what was read from the image. Raises SpecError naming
    the field for a bad name, a missing or unsupported file, a file in use, or
    a name already taken (unless ``replace``).
    """
    _check_name(name)
    if agent not in (None, "qga", "none"):
        raise SpecError("agent", agent, "must be qga or none")
    if firmware not in (None, "uefi", "bios"):
        raise SpecError("firmware", firmware, "must be uefi or bios")
    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise SpecError("file", str(file), "no such file" if not file.exists() else "not a file")
    if not replace and name in _load(cache_dir):
        raise SpecError("name", name, "is already imported (qemukit images remove it first)")
    info = _img_info(file)
    scratch_parent = Path(cache_dir) / "images"
    scratch_parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(prefix=".view-", dir=scratch_parent) as scratch:
        view = _raw_view(file, info, Path(scratch))
        with open(view, "rb") as fh:
            head = fh.read(34 * 512)
        partitions = read_partitions(head, info.virtual_size)
        facts, has_qga = _read_guest(view, partitions)
    has_esp = any(p.type == ESP_TYPE or p.type == "mbr:ef" for p in partitions)
    login = user or facts.get("ID")
    if login is None:
        raise SpecError("user", None, f"{file}: its OS could not be read (no ext4 root with "
                        "/etc/os-release); give the login user with --user")
    stat = file.stat()
    image = ImportedImage(
        name=name, path=str(file), format=info.format, virtual_size=info.virtual_size,
        size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256=file_sha256(file),
        firmware=firmware or ("uefi" if has_esp else "bios"),
        agent=agent or ("qga" if has_qga else "none"), user=login,
        os={k: facts[k] for k in ("ID", "VERSION_ID", "PRETTY_NAME") if k in facts},
        imported_at=datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        .isoformat().replace("+00:00", "Z"),
    )
    with locked(_registry_lock(cache_dir)):
        entries = _load(cache_dir)
        if not replace and name in entries:
            raise SpecError("name", name, "is already imported (qemukit images remove it first)")
        entries[name] = image.to_dict()
        _save(cache_dir, entries)
    return image


def list_imported(cache_dir: Path) -> list[ImportedImage]:
    """The registered images, by name."""
    return [_from_entry(e) for _, e in sorted(_load(cache_dir).items())]


def find_imported(cache_dir: Path, name: str) -> ImportedImage | None:
    """The registered image ``name``, or None."""
    entry = _load(cache_dir).get(name)
    return _from_entry(entry) if entry is not None else None


def remove_imported(cache_dir: Path, name: str) -> ImportedImage:
    """Unregister ``name`` (the file is left alone); SpecError if it is not registered."""
    with locked(_registry_lock(cache_dir)):
        entries = _load(cache_dir)
        if name not in entries:
            raise SpecError("name", name, "is not an imported image")
        entry = entries.pop(name)
        _save(cache_dir, entries)
    return _from_entry(entry)


def verify_unchanged(image: ImportedImage) -> None:
    """Raise SpecError if the file is gone or its size or mtime changed since import.

    (The SHA-256 is recorded for a full check; reading gigabytes on each boot is not.)
    """
    try:
        stat = os.stat(image.path)
    except OSError as exc:
        raise SpecError("image", image.name, f"its file {image.path} is gone "
                        f"({exc.strerror}); import it again") from exc
    if stat.st_size != image.size or stat.st_mtime_ns != image.mtime_ns:
        raise SpecError("image", image.name, f"its file {image.path} changed since it was "
                        f"imported; check it and run: qemukit images import --replace "
                        f"{image.name} {image.path}")
