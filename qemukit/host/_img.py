"""Disk images: what format a drive's file is, and which backing files it may have.

A guest writes its disks. A raw disk whose first bytes the guest made into a
qcow2 header would, probed again at the next start, become a qcow2 whose
header names any host file as its backing file (the guest then reads that
file as its disk), or an external data file. So, as libvirt does:

* A format is never probed on a file a guest can write, except once, at
  first sight of a drive given without ``format=``: the answer is recorded
  by path and (device, inode) in ``<cache>/disk-formats.json`` and every
  later start uses the record. A raw disk stays raw whatever the guest
  writes into it. A format the user gives (``format=``) is used as given
  and never checked against the file's contents.
* A backing file is opened only if qemukit made the overlay over it or the
  user named it (``Drive.backing``); its format is given, never probed. A
  qcow2 whose header names any other backing file, or an external data
  file, is refused before QEMU starts (:func:`resolve_disk`).
* Headers are read by this module in Python, from regular files only
  (:func:`open_regular`: a FIFO or a device is refused, not opened for
  reading), and only the first cluster of each.

``qemu-img`` makes the throwaway overlays, with the base's format and size
given so that it does not open the base either.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._fs import locked, write_atomic
from .._launch.plan import DiskImage
from .._launch.process import run_command
from ..errors import HostError, SpecError
from ..paths import cache_dir
from ..spec import Drive
from ._qemu import QemuBinary, find_qemu_img

__all__ = [
    "Qcow2Header",
    "create_overlay",
    "format_records_path",
    "image_format",
    "open_regular",
    "read_qcow2_header",
    "recorded_format",
    "resolve_disk",
]

QCOW2_MAGIC = b"QFI\xfb"
#: QEMU refuses a backing file name longer than this (block/qcow2.c).
_MAX_BACKING_NAME = 1023
#: The largest qcow2 cluster (cluster_bits 21): the header and its extensions live in the first.
_MAX_CLUSTER = 2 << 20
_EXT_END, _EXT_BACKING_FORMAT, _EXT_DATA_FILE = 0, 0xE2792ACA, 0x44415441
_INCOMPAT_DATA_FILE = 1 << 2
#: Chains deeper than this are refused (QEMU's own limit is similar in spirit: no endless chains).
MAX_CHAIN = 16
FORMATS_FILE = "disk-formats.json"


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], field: str = "drive.file", *,
                 follow: bool = True) -> int:
    """Open ``path`` read-only if it is a regular file; SpecError naming it otherwise.

    ``O_NONBLOCK`` makes opening a FIFO return at once (it is then refused,
    never read), so nothing here can hang; ``follow=False`` adds
    ``O_NOFOLLOW`` (a symbolic link is refused). Returns the fd (the caller
    closes it).
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        reason = "is a symbolic link" if exc.errno == errno.ELOOP and not follow else (
            exc.strerror or str(exc)).lower()
        raise SpecError(field, os.fspath(path), reason) from exc
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise SpecError(field, os.fspath(path),
                        f"is {_kind(mode)}, not a regular file (qemukit opens only regular "
                        "files as disks)")
    os.set_blocking(fd, True)
    return fd


@dataclass(frozen=True)
class Qcow2Header:
    """What a qcow2 header says that matters here (names as written in the header)."""

    virtual_size: int
    backing: str | None
    backing_format: str | None
    #: The external data file's name, or "" if the header sets the flag without a name.
    data_file: str | None

    def backing_path(self, image: str) -> str | None:
        """The backing file as QEMU would resolve it (relative to ``image``'s directory)."""
        if self.backing is None:
            return None
        if os.path.isabs(self.backing):
            return self.backing
        return os.path.join(os.path.dirname(os.path.abspath(image)), self.backing)


def _read_at(fd: int, offset: int, size: int) -> bytes:
    return os.pread(fd, size, offset)


def read_qcow2_header(path: str | os.PathLike[str], field: str = "drive.file", *,
                      follow: bool = True) -> Qcow2Header | None:
    """The qcow2 header of ``path``, or None if it does not start with the qcow2 magic.

    Reads at most the first cluster, from a regular file only
    (:func:`open_regular`). A header whose fields point outside that
    cluster is refused with SpecError, as QEMU refuses it.
    """
    fd = open_regular(path, field, follow=follow)
    try:
        head = _read_at(fd, 0, 104)
        if len(head) < 72 or head[:4] != QCOW2_MAGIC:
            return None
        version, backing_offset, backing_size, cluster_bits, size = struct.unpack_from(
            ">IQIIQ", head, 4)
        bad = None
        if version not in (2, 3):
            bad = f"qcow2 version {version}"
        elif not 9 <= cluster_bits <= 21:
            bad = f"cluster_bits {cluster_bits}"
        elif backing_size > _MAX_BACKING_NAME:
            bad = f"a backing file name of {backing_size} bytes"
        if bad is not None:
            raise SpecError(field, os.fspath(path), f"has an invalid qcow2 header ({bad})")
        cluster = 1 << cluster_bits
        first = _read_at(fd, 0, min(cluster, _MAX_CLUSTER))
    finally:
        os.close(fd)
    backing = None
    if backing_offset:
        if backing_offset + backing_size > len(first):
            raise SpecError(field, os.fspath(path), "has an invalid qcow2 header (the backing "
                            "file name lies outside the first cluster)")
        backing = first[backing_offset:backing_offset + backing_size].decode(
            "utf-8", "surrogateescape") or None
    incompatible, header_length = 0, 72
    if version == 3 and len(first) >= 104:
        incompatible = struct.unpack_from(">Q", first, 72)[0]
        header_length = struct.unpack_from(">I", first, 100)[0]
    backing_format = None
    data_file = "" if incompatible & _INCOMPAT_DATA_FILE else None
    offset = header_length
    while offset + 8 <= len(first):
        ext_type, ext_len = struct.unpack_from(">II", first, offset)
        if ext_type == _EXT_END:
            break
        data = first[offset + 8:offset + 8 + ext_len]
        if ext_type == _EXT_BACKING_FORMAT:
            backing_format = data.decode("utf-8", "replace")
        elif ext_type == _EXT_DATA_FILE:
            data_file = data.decode("utf-8", "surrogateescape")
        offset += 8 + ((ext_len + 7) & ~7)
    return Qcow2Header(size, backing, backing_format, data_file)


# -- the format record ---------------------------------------------------------------------


def format_records_path(root: Path | None = None) -> Path:
    """The file holding the format recorded per disk file (``<cache>/disk-formats.json``)."""
    return (root if root is not None else cache_dir()) / FORMATS_FILE


def _load_records(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}  # a broken record is re-made; the backing-file check still holds
    return data if isinstance(data, dict) else {}


def _identity(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def recorded_format(path: str, root: Path | None = None) -> str | None:
    """The format recorded for ``path`` (the same file: device and inode match), or None."""
    entry = _load_records(format_records_path(root)).get(os.path.realpath(path))
    if not isinstance(entry, dict):
        return None
    if [entry.get("dev"), entry.get("ino")] != list(_identity(path)):
        return None  # another file now has that name: first sight again
    fmt = entry.get("format")
    return fmt if fmt in ("qcow2", "raw") else None


def record_format(path: str, fmt: str, root: Path | None = None) -> None:
    """Remember ``fmt`` as ``path``'s format (by device and inode) for the next starts."""
    records = format_records_path(root)
    try:
        records.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with locked(records.with_name(f".{FORMATS_FILE}.lock")):
            data = _load_records(records)
            # Forget the files that are gone, so the table stays the size of what exists.
            data = {p: e for p, e in data.items() if os.path.exists(p)}
            dev, ino = _identity(path)
            data[os.path.realpath(path)] = {"dev": dev, "ino": ino, "format": fmt}
            write_atomic(records, json.dumps(data, indent=1, sort_keys=True) + "\n")
            os.chmod(records, 0o600)
    except OSError as exc:
        raise HostError(f"cannot record the format of {path} in {records}: {exc}") from exc


def image_format(path: str, qemu: QemuBinary) -> str:
    """The format of a disk image as ``qemu-img info`` probes it (read-only, -U).

    A probe: used only at first sight of a drive given without a format
    (:func:`resolve_disk` records the answer) and for images being imported.
    """
    os.close(open_regular(path))
    out = run_command([find_qemu_img(qemu), "info", "-U", "--output=json", "--", path],
                      timeout=30)
    if out.returncode != 0:
        raise SpecError("drive.file", path, f"qemu-img cannot read it: {out.stderr.strip()}")
    fmt = str(json.loads(out.stdout).get("format", ""))
    if fmt not in ("qcow2", "raw"):
        raise SpecError("drive.format", fmt, f"{path}: only qcow2 and raw images are supported")
    return fmt


def _first_sight_format(drive: Drive, path: str, qemu: QemuBinary, record: bool,
                        root: Path | None) -> str:
    if drive.format is not None:
        return drive.format
    known = recorded_format(path, root)
    if known is not None:
        return known
    header = read_qcow2_header(path)
    if header is not None and header.data_file is not None:
        # qemu-img info would open the data file the header names: refuse before it runs.
        raise SpecError("drive.file", path, _data_file_reason(header))
    fmt = image_format(path, qemu)
    if record:
        record_format(path, fmt, root)
    return fmt


def _data_file_reason(header: Qcow2Header) -> str:
    return (f"is a qcow2 whose header names an external data file ({header.data_file or 'unnamed'});"
            " qemukit never opens a file because an image names it (convert it: qemu-img convert "
            "-O qcow2)")


def _virtual_size(path: str, fmt: str, header: Qcow2Header | None) -> int:
    if fmt == "qcow2":
        assert header is not None
        return header.virtual_size
    return os.stat(path).st_size


def resolve_disk(drive: Drive, qemu: QemuBinary, *, record: bool = True,
                 root: Path | None = None) -> DiskImage:
    """Decide what QEMU opens for ``drive``: its format and its explicit backing chain.

    The format is ``drive.format``, else the one recorded at first sight,
    else probed now and recorded (``record=False``: not recorded, for a
    preview). A qcow2's header must name exactly the backing files
    ``drive.backing`` lists (each then read the same way, in its given
    format) and no external data file: anything else is a SpecError before
    any process starts. ``root`` is the cache directory (tests).
    """
    path = os.path.abspath(drive.file)
    if not os.path.lexists(path):
        raise SpecError("drive.file", str(drive.file), "no such file")
    fmt = _first_sight_format(drive, path, qemu, record, root)
    declared = list(drive.backing_chain)
    if declared and fmt != "qcow2":
        raise SpecError("drive.backing", drive.backing,
                        f"{path} is opened as {fmt}, and only a qcow2 has a backing file")
    chain: list[tuple[str, str]] = []
    current, current_fmt, field = path, fmt, "drive.file"
    size = -1
    while True:
        header = None
        if current_fmt == "qcow2":
            header = read_qcow2_header(current, field)
            if header is None:
                raise SpecError("drive.format", "qcow2", f"{current} has no qcow2 header "
                                "(give format=raw if it is a raw disk)")
        else:
            os.close(open_regular(current, field))
        if size < 0:
            size = _virtual_size(current, current_fmt, header)
        if header is None:
            break
        if header.data_file is not None:
            raise SpecError(field, current, _data_file_reason(header))
        named = header.backing_path(current)
        depth = len(chain)
        if named is None:
            break
        if depth >= len(declared):
            raise SpecError(
                field, current,
                f"is a qcow2 whose header names the backing file {named!r}, which qemukit did "
                "not make and you did not name; qemukit never opens a file because an image "
                "names it. If this disk is raw (a guest can write a qcow2 header into a raw "
                f"disk), give format=raw; if that backing file is meant, name it: "
                f"backing=FORMAT:{named}")
        want, want_fmt = declared[depth]
        if os.path.realpath(named) != os.path.realpath(want):
            raise SpecError("drive.backing", want,
                            f"{current}'s header names {named!r} as its backing file, not this")
        if depth + 1 > MAX_CHAIN:
            raise SpecError("drive.backing", drive.backing, f"more than {MAX_CHAIN} layers")
        chain.append((named, want_fmt))
        current, current_fmt, field = named, want_fmt, "drive.backing"
    if len(chain) < len(declared):
        raise SpecError("drive.backing", declared[len(chain)][0],
                        f"{current} ({current_fmt}) names no backing file")
    return DiskImage(fmt, tuple(chain), size)


def create_overlay(qemu: QemuBinary, base: str, base_format: str,
                   target: str | os.PathLike[str], *, size: int | None = None,
                   unsafe: bool = False) -> None:
    """Create a private (0600) qcow2 overlay at ``target`` over ``base``, with ``qemu``'s qemu-img
    (the VM's own QEMU: never one found again for a default architecture).

    The base is only recorded as the backing file (with its format), never
    written. With ``size`` and ``unsafe`` qemu-img does not open the base at
    all (needed while a running QEMU holds its lock, and so a base's own
    header is never followed). Raises :class:`HostError` with qemu-img's own
    message on failure.
    """
    argv = [find_qemu_img(qemu), "create", "-q", "-f", "qcow2", "-F", base_format, "-b", base]
    argv += ["-u"] if unsafe else []
    argv += [os.fspath(target)] + ([str(size)] if size is not None else [])
    out = run_command(argv, timeout=60)
    if out.returncode != 0:
        raise HostError(f"cannot create an overlay over {base}: {out.stderr.strip()}")
    os.chmod(target, 0o600)
