"""Typed, validated descriptions of a VM: pure data, no processes.

A :class:`VMSpec` is frozen and checked when it is built: a bad value raises
:class:`~qemukit.errors.SpecError` naming the field and the value, so nothing
is started for a description that cannot work. Specs load from and dump to
TOML, and the CLI's ``--disk``/``--nic`` strings parse into the same parts.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

from .arch import ARCHES, DEFAULT_ARCH, ArchInfo, ArchName
from .errors import SpecError

__all__ = [
    "DEFAULT_MEMORY_SLOTS",
    "HOST_ROOT_MOUNT",
    "HOST_ROOT_TAG",
    "CloudInit",
    "Drive",
    "HostRoot",
    "Nic",
    "PortForward",
    "Share",
    "VMSpec",
    "parse_drive",
    "parse_nic",
    "parse_size",
    "resolve_spec_file",
    "spec_from_resolved",
    "template_names",
]

MachineType = Literal["q35", "pc", "microvm", "virt", "s390-ccw-virtio", "pseries"]
AccelName = Literal["auto", "kvm", "tcg"]
Firmware = Literal["seabios", "ovmf"]
DriveInterface = Literal["virtio-blk", "virtio-scsi", "nvme"]
DriveFormat = Literal["qcow2", "raw"]
NicKind = Literal["user", "tap"]
AgentKind = Literal["qemukit", "qga", "none"]

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")
# Device ids also name block nodes ("<id>-file"), and QEMU caps node names at 31 bytes.
ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,25}")
# Ids qemukit gives its own devices: a user id of this shape could collide with one.
RESERVED_ID_RE = re.compile(r"(hp\d+|scsi\d+|vser\d+|agent\d.*|console\d+|qmp-.*|ovmf-.*)")
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
#: A private network's name (see docs/networks.md): it names a directory and a device
#: id, so no ',', '/' or '.'.
NETWORK_RE = re.compile(r"[a-z][a-z0-9-]{0,14}")
_SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
MAX_CPUS = 288
MAX_MEMORY_MIB = 16 * 1024 * 1024  # 16 TiB
#: DIMM slots a VM gets when it has ``max_memory`` but no ``slots``: room for a few
#: hot-added DIMMs, as users of ``-m`` expect, at no cost while they are empty.
DEFAULT_MEMORY_SLOTS = 8
#: The bounds QEMU (7.2 to 10) takes for TCG's code buffer, in MiB (``tb_size``).
MIN_TB_SIZE_MIB = 1
MAX_TB_SIZE_MIB = 2048


def parse_size(value: int | str, field_name: str = "size") -> int:
    """Parse a memory size into MiB: an int is MiB already; '512M', '2G', '2GiB' work."""
    if isinstance(value, bool):
        raise SpecError(field_name, value, "expected a size such as 512M or 2G")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise SpecError(field_name, value, "expected a size such as 512M or 2G")
    m = _SIZE_RE.fullmatch(value)
    if not m:
        raise SpecError(field_name, value, "expected a size such as 512M or 2G")
    mib = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if mib != int(mib):
        raise SpecError(field_name, value, "must be a whole number of MiB")
    return int(mib)


def _check_choice(field_name: str, value: object, choices: Any) -> None:
    allowed = get_args(choices)
    if value not in allowed:
        raise SpecError(field_name, value, f"must be one of {', '.join(map(str, allowed))}")


def _check_int(field_name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field_name, value, "must be an integer")
    if not low <= value <= high:
        raise SpecError(field_name, value, f"must be between {low} and {high}")


def _check_text(field_name: str, value: object, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise SpecError(field_name, value, "must be a string")
    if not value and not allow_empty:
        raise SpecError(field_name, value, "must not be empty")
    if "\x00" in value:
        raise SpecError(field_name, value, "must not contain a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(
            field_name, value, "is not valid UTF-8 (a file name that is not UTF-8 cannot be used)"
        ) from None


def _check_path(field_name: str, value: object) -> None:
    if isinstance(value, Path):
        value = str(value)
    _check_text(field_name, value)
    if "\n" in cast(str, value):
        raise SpecError(field_name, value, "must not contain a newline")


def _freeze(obj: object, name: str, item_type: type, parse: Any = None) -> None:
    """Turn a list given for a tuple field into a tuple, parsing strings if allowed."""
    raw = getattr(obj, name)
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable):
        raise SpecError(name, raw, "must be a list")
    items = []
    for item in raw:
        if parse is not None and isinstance(item, (str, Mapping)):
            item = parse(item) if isinstance(item, str) else item_type(**item)
        if not isinstance(item, item_type):
            raise SpecError(name, item, f"items must be {item_type.__name__}")
        items.append(item)
    object.__setattr__(obj, name, tuple(items))


@dataclass(frozen=True)
class PortForward:
    """A user-mode networking port forward from the host to the guest."""

    host_port: int
    guest_port: int
    protocol: Literal["tcp", "udp"] = "tcp"
    host_addr: str = "127.0.0.1"

    def __post_init__(self) -> None:
        _check_int("forward.host_port", self.host_port, 0, 65535)
        _check_int("forward.guest_port", self.guest_port, 1, 65535)
        _check_choice("forward.protocol", self.protocol, Literal["tcp", "udp"])
        try:
            ipaddress.IPv4Address(self.host_addr)
        except (ipaddress.AddressValueError, ValueError):
            raise SpecError("forward.host_addr", self.host_addr, "must be an IPv4 address") from None

    @classmethod
    def parse(cls, text: str) -> PortForward:
        """Parse ``[tcp|udp:][ADDR:]HOSTPORT:GUESTPORT`` (e.g. ``2222:22``)."""
        parts = text.split(":")
        protocol = "tcp"
        if parts and parts[0] in ("tcp", "udp"):
            protocol = parts.pop(0)
        addr = "127.0.0.1"
        if len(parts) == 3:
            addr = parts.pop(0)
        if len(parts) != 2 or not all(p.isascii() and p.isdigit() for p in parts):
            raise SpecError("forward", text, "expected [tcp|udp:][ADDR:]HOSTPORT:GUESTPORT")
        return cls(int(parts[0]), int(parts[1]), cast(Literal["tcp", "udp"], protocol), addr)

    def __str__(self) -> str:
        return f"{self.protocol}:{self.host_addr}:{self.host_port}:{self.guest_port}"


@dataclass(frozen=True)
class Drive:
    """A disk attached at boot.

    ``overlay=True`` boots on a throwaway qcow2 overlay over ``file``; the
    base is opened read-only and never written, and the overlay is removed
    when the VM stops.

    ``format`` is passed to QEMU as given (``raw`` stays raw whatever the
    file's first bytes look like). ``format=None``: the format is probed
    once, at the first start that sees this file, and recorded (by path,
    device and inode) in qemukit's cache; later starts use the record, never
    a new probe, because a guest can write a qcow2 header into its raw disk.

    ``backing`` names the backing chain a qcow2 ``file`` has, top first, as
    ``"FORMAT:PATH"`` entries (``"raw:/images/base.img"``). QEMU opens exactly
    these files, in these formats, read-only; a qcow2 whose header names a
    backing file not listed here (or an external data file) is refused.
    """

    file: str | Path
    format: DriveFormat | None = None
    interface: DriveInterface = "virtio-blk"
    read_only: bool = False
    overlay: bool = False
    id: str | None = None
    backing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_path("drive.file", self.file)
        object.__setattr__(self, "file", str(self.file))
        if self.format is not None:
            _check_choice("drive.format", self.format, DriveFormat)
        _check_choice("drive.interface", self.interface, DriveInterface)
        for name in ("read_only", "overlay"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(f"drive.{name}", getattr(self, name), "must be true or false")
        if self.id is not None and not (isinstance(self.id, str) and ID_RE.fullmatch(self.id)):
            raise SpecError("drive.id", self.id, f"must match {ID_RE.pattern}")
        if self.read_only and self.overlay:
            raise SpecError("drive.overlay", True, "a read-only drive needs no overlay")
        backing: object = self.backing
        if isinstance(backing, str) or not isinstance(backing, Iterable):
            raise SpecError("drive.backing", backing, "must be a list of FORMAT:PATH")
        object.__setattr__(self, "backing", tuple(backing))
        for entry in self.backing:
            _check_backing(entry)
        if self.backing and self.format == "raw":
            raise SpecError("drive.backing", self.backing, "a raw drive has no backing file")

    @property
    def backing_chain(self) -> tuple[tuple[str, DriveFormat], ...]:
        """``backing`` as (absolute path, format) pairs, top first."""
        out = []
        for entry in self.backing:
            fmt, _, path = entry.partition(":")
            out.append((os.path.abspath(path), cast(DriveFormat, fmt)))
        return tuple(out)


def _check_backing(entry: object) -> None:
    if not isinstance(entry, str) or ":" not in entry:
        raise SpecError("drive.backing", entry, "entries must be FORMAT:PATH (raw:/images/base.img)")
    fmt, _, path = entry.partition(":")
    if fmt not in ("qcow2", "raw"):
        raise SpecError("drive.backing", entry, "the format must be qcow2 or raw")
    _check_path("drive.backing", path)


@dataclass(frozen=True)
class Nic:
    """A network interface: user-mode (with port forwards) or an existing tap device."""

    kind: NicKind = "user"
    forwards: tuple[PortForward, ...] = ()
    ifname: str | None = None
    mac: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        _check_choice("nic.kind", self.kind, NicKind)
        _freeze(self, "forwards", PortForward, PortForward.parse)
        if self.kind == "tap":
            if not isinstance(self.ifname, str) or not IFNAME_RE.fullmatch(self.ifname):
                raise SpecError("nic.ifname", self.ifname, "a tap nic needs an interface name")
            if self.forwards:
                raise SpecError("nic.forwards", self.forwards, "only user-mode nics forward ports")
        elif self.ifname is not None:
            raise SpecError("nic.ifname", self.ifname, "only tap nics take an interface name")
        if self.mac is not None and not (isinstance(self.mac, str) and MAC_RE.fullmatch(self.mac)):
            raise SpecError("nic.mac", self.mac, "must look like 52:54:00:12:34:56")
        if self.id is not None and not (isinstance(self.id, str) and ID_RE.fullmatch(self.id)):
            raise SpecError("nic.id", self.id, f"must match {ID_RE.pattern}")


def _parse_bool(field_name: str, text: str) -> bool:
    lowered = text.lower()
    if lowered in ("on", "true", "yes", "1", ""):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise SpecError(field_name, text, "expected on or off")


def _split_opts(text: str) -> list[str]:
    """Split on ',' where ',,' stands for a literal comma (QEMU's own convention)."""
    parts, current, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    parts.append("".join(current))
    return parts


def parse_drive(text: str) -> Drive:
    """Parse the CLI form ``PATH[,format=F][,if=I][,readonly][,overlay][,id=ID][,backing=F:P]``.

    ``backing=FORMAT:PATH`` may be repeated (the chain, top first). A comma
    inside the path is written ',,' as in QEMU's own syntax; a path with a
    single comma that does not start a known option is taken whole.
    """
    parts = _split_opts(text)
    known = {"format", "if", "interface", "readonly", "read-only", "overlay", "id", "backing"}
    # A path such as 'x,y.qcow2' (single comma, no known key) is a path, not options.
    while len(parts) > 1 and parts[1].split("=", 1)[0] not in known:
        parts[0:2] = [parts[0] + "," + parts[1]]
    kwargs: dict[str, Any] = {"file": parts[0]}
    for opt in parts[1:]:
        key, _, value = opt.partition("=")
        if key == "format":
            kwargs["format"] = value
        elif key in ("if", "interface"):
            kwargs["interface"] = value
        elif key in ("readonly", "read-only"):
            kwargs["read_only"] = _parse_bool("drive.read_only", value)
        elif key == "overlay":
            kwargs["overlay"] = _parse_bool("drive.overlay", value)
        elif key == "id":
            kwargs["id"] = value
        elif key == "backing":
            kwargs["backing"] = (*kwargs.get("backing", ()), value)
        else:
            raise SpecError("disk", text, f"unknown option {key!r}")
    return Drive(**kwargs)


def parse_nic(text: str) -> Nic:
    """Parse ``user[,hostfwd=2222:22]...`` or ``tap,ifname=tap0`` (``mac=``, ``id=``)."""
    parts = text.split(",")
    kind = parts[0] or "user"
    kwargs: dict[str, Any] = {"kind": kind}
    forwards = []
    for opt in parts[1:]:
        key, _, value = opt.partition("=")
        if key in ("hostfwd", "fwd", "forward"):
            forwards.append(PortForward.parse(value))
        elif key == "ifname":
            kwargs["ifname"] = value
        elif key == "mac":
            kwargs["mac"] = value
        elif key == "id":
            kwargs["id"] = value
        else:
            raise SpecError("nic", text, f"unknown option {key!r}")
    return Nic(forwards=tuple(forwards), **kwargs)


ShareTransport = Literal["virtiofs", "9p"]
TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,19}")


@dataclass(frozen=True)
class Share:
    """A host directory shared with the guest (virtiofs, or virtio-9p).

    qemukit's guests mount it on ``guest_path`` by themselves (the tiny
    image reads ``qemukit.share=TAG:PATH`` from the kernel command line).
    virtiofs needs a virtiofsd on the host; 9p needs a guest kernel with 9p.
    """

    host_path: str | Path
    guest_path: str = "/mnt/host"
    tag: str = "share0"
    read_only: bool = False
    transport: ShareTransport = "virtiofs"

    def __post_init__(self) -> None:
        _check_path("share.host_path", self.host_path)
        object.__setattr__(self, "host_path", str(self.host_path))
        _check_path("share.guest_path", self.guest_path)
        if not self.guest_path.startswith("/") or any(c.isspace() for c in self.guest_path):
            raise SpecError("share.guest_path", self.guest_path,
                            "must be an absolute path without spaces")
        if not (isinstance(self.tag, str) and TAG_RE.fullmatch(self.tag)):
            raise SpecError("share.tag", self.tag, f"must match {TAG_RE.pattern}")
        if not isinstance(self.read_only, bool):
            raise SpecError("share.read_only", self.read_only, "must be true or false")
        _check_choice("share.transport", self.transport, ShareTransport)

    @classmethod
    def parse(cls, text: str) -> Share:
        """Parse the CLI form ``HOST:GUEST[,ro][,9p][,tag=T]`` (',' in a path: ',,')."""
        known = {"ro", "readonly", "9p", "virtiofs", "tag"}
        parts = _split_opts(text)
        # As for --disk: a single ',' that does not start a known option is part of the path.
        while len(parts) > 1 and parts[1].split("=", 1)[0] not in known:
            parts[0:2] = [parts[0] + "," + parts[1]]
        head, *opts = parts
        host, sep, guest = head.rpartition(":")
        if not sep or not host:
            raise SpecError("share", text, "expected HOST_DIR:GUEST_DIR[,ro][,9p][,tag=TAG]")
        kwargs: dict[str, Any] = {"host_path": host, "guest_path": guest}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key in ("ro", "readonly"):
                kwargs["read_only"] = True
            elif key in ("9p", "virtiofs"):
                kwargs["transport"] = key
            elif key == "tag":
                kwargs["tag"] = value
            else:
                raise SpecError("share", text, f"unknown option {key!r}")
        return cls(**kwargs)


#: Where the guest mounts the host's root before laying the overlay over it.
HOST_ROOT_MOUNT = "/run/qemukit-hostroot"
#: The share tag of the host's root.
HOST_ROOT_TAG = "hostroot"
HostRootTransport = Literal["auto", "9p", "virtiofs"]


@dataclass(frozen=True)
class HostRoot:
    """The host's ``/`` as the guest's root: read-only, changes kept in guest memory.

    Written ``host_root = { rw = ["out"] }`` in a spec file. Each directory in
    ``rw`` is shared writable at its own path, so a build's or a test's output
    lands on the host; a relative one is relative to the directory qemukit runs
    in. ``transport`` of the root: ``auto`` picks 9p where the guest kernel has
    it, else virtiofs (see :func:`qemukit.rootfs.root_transport`); a start
    resolves it (and makes ``rw`` absolute) before anything runs. It needs a
    kernel and the tiny image's init (which reads ``qemukit.rootfs=``).
    """

    rw: tuple[str, ...] = ()
    transport: HostRootTransport = "auto"

    def __post_init__(self) -> None:
        rw: object = self.rw
        if isinstance(rw, (str, bytes, Path)) or not isinstance(rw, Iterable):
            raise SpecError("host_root.rw", rw, "must be a list of directories")
        object.__setattr__(self, "rw", tuple(str(d) if isinstance(d, Path) else d for d in rw))
        for directory in self.rw:
            _check_path("host_root.rw", directory)
            if any(c.isspace() for c in directory):
                raise SpecError("host_root.rw", directory, "must not contain white space (the "
                                "guest's kernel command line names it)")
            if os.path.normpath(directory) == "/":
                raise SpecError("host_root.rw", directory, "the whole host root cannot be writable")
        _check_choice("host_root.transport", self.transport, HostRootTransport)

    @property
    def resolved(self) -> bool:
        """True once the transport is chosen and every ``rw`` directory is absolute."""
        return self.transport != "auto" and all(os.path.isabs(d) for d in self.rw)

    def shares(self) -> tuple[Share, ...]:
        """The root (read-only) and the ``rw`` directories as shares, each ``rw`` one at its
        own path (``auto`` counts as 9p here: a start resolves it first)."""
        relative = [d for d in self.rw if not os.path.isabs(d)]
        if relative:
            raise SpecError("host_root.rw", relative[0], "is relative: resolve the spec first "
                            "(qemukit.rootfs.resolve_host_root, as every start does)")
        how: ShareTransport = "virtiofs" if self.transport == "virtiofs" else "9p"
        root = Share("/", HOST_ROOT_MOUNT, tag=HOST_ROOT_TAG, read_only=True, transport=how)
        return (root, *(Share(d, os.path.normpath(d), tag=f"rw{i}")
                        for i, d in enumerate(self.rw)))


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class CloudInit:
    """A cloud-init NoCloud seed CD, written per VM at start (see :mod:`qemukit.seed`).

    ``hostname`` defaults to the VM's name. ``ssh_key`` is a public key file
    to authorize; without one, a keypair is generated into the VM's runtime
    directory. ``user_data`` is a file passed through to the guest as it is.
    ``ssh_user`` is the account ``qemukit ssh`` logs in as: the default user
    cloud-init creates on Debian's images.
    """

    hostname: str | None = None
    ssh_key: str | Path | None = None
    user_data: str | Path | None = None
    ssh_user: str = "debian"

    def __post_init__(self) -> None:
        if self.hostname is not None and not (
            isinstance(self.hostname, str) and HOSTNAME_RE.fullmatch(self.hostname)
        ):
            raise SpecError("cloud_init.hostname", self.hostname,
                            "must be a host name: lower-case letters, digits, '-' and '.'")
        for name in ("ssh_key", "user_data"):
            if getattr(self, name) is not None:
                _check_path(f"cloud_init.{name}", getattr(self, name))
                object.__setattr__(self, name, str(getattr(self, name)))
        if not (isinstance(self.ssh_user, str) and USER_RE.fullmatch(self.ssh_user)):
            raise SpecError("cloud_init.ssh_user", self.ssh_user, f"must match {USER_RE.pattern}")



#: Keys a spec file may hold beyond the VM's fields: what it is based on, a line saying
#: what it is for, and the built-in image it boots (resolved by :mod:`qemukit.templates`).
TEMPLATE_KEYS = ("base", "description", "image")
#: Where the built-in templates live (``<name>.toml``; data files of the package).
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
#: The placeholders a spec file's strings may hold, expanded when the file is loaded.
PLACEHOLDERS = ("${PWD}", "${HOME}")
_PLACEHOLDER_RE = re.compile(r"\$\{[^}]*\}")
#: Which top-level key a field named in a SpecError belongs to.
_FIELD_KEYS = {"drive": "drives", "nic": "nics", "forward": "nics", "share": "shares"}


def template_names() -> list[str]:
    """The built-in templates' names (the ``*.toml`` files in :data:`TEMPLATE_DIR`)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.toml"))


def _merge(low: dict[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``: tables merge key by key, anything else (lists too) is replaced."""
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _expand(value: Any, where: str, key: str, cwd: str, home: str) -> Any:
    if isinstance(value, str):
        for found in _PLACEHOLDER_RE.findall(value):
            if found not in PLACEHOLDERS:
                raise SpecError(f"{where}: {key}", value, f"unknown placeholder {found}; "
                                f"known: {', '.join(PLACEHOLDERS)}")
        return value.replace("${PWD}", cwd).replace("${HOME}", home)
    if isinstance(value, list):
        return [_expand(v, where, key, cwd, home) for v in value]
    if isinstance(value, Mapping):
        return {k: _expand(v, where, f"{key}.{k}", cwd, home) for k, v in value.items()}
    return value


def resolve_spec_file(path: str | Path, *, cwd: str | Path | None = None
                      ) -> tuple[dict[str, Any], dict[str, str]]:
    """A spec file's table with its ``base`` chain merged in, and where each key came from.

    ``base`` names a file (a path with a ``/`` or ending in ``.toml``, relative to
    the file that names it) or a built-in template (:func:`template_names`). The
    base is loaded first and the file's own keys override it: a scalar is replaced,
    a table (``cloud_init``) is merged key by key, a list (``drives``, ``nics``,
    ``shares``, ``extra_args``) is replaced whole. ``${PWD}`` (the directory the
    spec is loaded from, ``cwd``) and ``${HOME}`` in any string are expanded.
    Every mistake is a :class:`SpecError` naming the file and the key: an unknown
    key, a missing base file, an unknown template, a cycle (with its chain). The
    result keeps ``image`` and ``description``; ``base`` is consumed.
    """
    here = str(cwd) if cwd is not None else os.getcwd()
    home = str(Path.home())
    known = {f.name for f in dataclasses.fields(VMSpec)} | set(TEMPLATE_KEYS)

    def one(file: Path, label: str, chain: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
        raw = load_toml(file)
        # A lone file keeps the plain field names; in a chain each error says its file.
        where = f"{label}: " if len(chain) > 1 or "base" in raw else ""
        for key in raw:
            if key not in known:
                raise SpecError(f"{where}{key}", raw[key], "unknown key; a spec file takes "
                                f"{', '.join(sorted(known))}")
        data = {k: _expand(v, label, k, here, home) for k, v in raw.items() if k != "base"}
        origins = dict.fromkeys(data, label)
        base = raw.get("base")
        if base is None:
            return data, origins
        if not isinstance(base, str) or not base:
            raise SpecError(f"{label}: base", base, "must be a file name or a template name")
        if "/" in base or base.endswith(".toml"):
            target = (file.parent / base).resolve()
            target_label = str(target)
            if not target.is_file():
                raise SpecError(f"{label}: base", base, f"no such file: {target}")
        else:
            if base not in template_names():
                raise SpecError(f"{label}: base", base, "unknown template; built-in: "
                                f"{', '.join(template_names())} (a file needs a / or .toml)")
            target = TEMPLATE_DIR / f"{base}.toml"
            target_label = f"template {base}"
        key = str(target.resolve())
        if key in chain:
            names = chain_labels[chain.index(key):] + [target_label]
            raise SpecError(f"{label}: base", base, "a cycle of bases: " + " -> ".join(names))
        chain_labels.append(target_label)
        low, low_origins = one(target, target_label, [*chain, key])
        return _merge(low, data), {**low_origins, **origins}

    start = Path(path)
    chain_labels = [str(path)]
    try:
        first = str(start.resolve())
    except OSError as exc:
        raise SpecError("file", str(path), exc.strerror or str(exc)) from exc
    return one(start, str(path), [first])


def spec_from_resolved(data: Mapping[str, Any], origins: Mapping[str, str]) -> VMSpec:
    """:meth:`VMSpec.from_dict` of a resolved file's table, its errors naming the file."""
    fields = {k: v for k, v in data.items() if k not in TEMPLATE_KEYS}
    try:
        return VMSpec.from_dict(fields)
    except SpecError as exc:
        head = exc.field.split(".", 1)[0]
        origin = origins.get(_FIELD_KEYS.get(head, head))
        if origin is None or len(set(origins.values())) < 2:
            raise
        raise SpecError(f"{origin}: {exc.field}", exc.value, exc.reason) from exc
    except TypeError as exc:
        raise SpecError(", ".join(sorted(set(origins.values()))), dict(fields), str(exc)) from exc


def load_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's table; :class:`SpecError` naming the file if it cannot be read or parsed."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("file", str(path), f"invalid TOML: {exc}") from exc
    except OSError as exc:
        raise SpecError("file", str(path), exc.strerror or str(exc)) from exc

@dataclass(frozen=True)
class VMSpec:
    """Everything needed to start one VM. Sizes are in MiB.

    ``name=None`` lets the launcher pick a unique name. ``agent`` is the
    in-guest agent to talk to: ``qemukit`` (the tiny image's), ``qga``
    (qemu-guest-agent, as in the debian image) or ``none``. ``accel='auto'`` uses
    KVM only when a probe boot proved it works on this host, else TCG.
    ``extra_args`` are appended verbatim to QEMU's argv (an escape hatch).
    ``run_as`` drops QEMU to that user once it has opened its files (for
    root); ``qmp_tcp_port`` adds a QMP monitor on 127.0.0.1 (off by default:
    anyone on the host who can connect controls the VM).
    ``gdb`` exposes QEMU's gdb stub on a Unix socket in the VM's private
    runtime directory (only its owner can connect; see
    :meth:`~qemukit.AsyncVM.gdb_address`). ``gdb_port`` puts the stub on TCP
    at 127.0.0.1 instead (0: a free port the kernel picks) and implies
    ``gdb``: any local user who reaches that port controls the VM (the stub
    passes gdb's ``monitor`` commands to QEMU's monitor), so it is for an
    explicit ask only and warns. ``gdb_wait`` keeps the vCPUs halted until
    the debugger continues them.
    ``cloud_init`` attaches a per-VM cloud-init seed CD (:class:`CloudInit`).
    ``max_memory`` allows memory hotplug up to that size, into ``slots`` DIMM
    slots; ``slots=0`` (the default) with ``max_memory`` set means
    :data:`DEFAULT_MEMORY_SLOTS` (8) slots, and slots without ``max_memory``
    are refused.
    ``arch`` is the guest's architecture (``x86_64``, ``aarch64``, ``riscv64``,
    ``s390x``, ``ppc64le``); a non-x86 spec left at the default machine
    (``q35``) gets its architecture's machine (``virt``, ``s390-ccw-virtio``,
    ``pseries``; see :mod:`qemukit.arch`).
    ``warm`` starts the VM from a saved ready state of the same description
    when there is one (booting it once and saving that state when there is
    not), see :mod:`qemukit.warm`; a spec that cannot start warm boots cold.
    ``forward_auto`` forwards each port the guest listens on (TCP and UDP)
    from 127.0.0.1 while the VM runs detached (``qemukit run --detach``
    leaves a watcher behind, see :mod:`qemukit.ports`); it needs a user
    network and a guest agent. The debian image and imported images with an
    agent turn it on; ``None`` (the default) means off.
    ``networks`` names private networks the VM joins (``["lan"]``), each a NIC
    ``net-<name>`` on a switch shared by the VMs of this user that name it, with
    a stable MAC and an address qemukit writes into the guest once its agent
    answers (without an agent the NIC is there, unconfigured; see
    docs/networks.md).
    ``tb_size`` is TCG's translated-code buffer in MiB (QEMU's ``-accel
    tcg,tb-size=N``; a size string such as ``"128M"`` is taken too). QEMU's
    default is 1 GiB per VM, reserved and filled as the guest runs, so many
    TCG VMs on one host each grow towards it; 64-256 MiB bounds that at the
    cost of an occasional flush of the buffer. ``None`` keeps QEMU's default; a
    VM that runs under KVM ignores it. The matrix's local pool chooses one when
    it runs several VMs at once and a job sets none.
    ``host_root`` makes the host's ``/`` the guest's root, read-only with the
    changes kept in guest memory, each of its ``rw`` directories writable at its
    own path (:class:`HostRoot`; ``host_root = { rw = ["out"] }`` in a spec file;
    see :mod:`qemukit.rootfs`). It needs a kernel and the tiny image's init.
    ``standby`` keeps a standby clone ready after a warm start: the next clone
    of the same warm state restored in the background and left paused, which
    the next start of the same description takes (resumes and gives its
    identity) instead of restoring (see docs/warm-starts.md). ``None`` (the
    default) leaves it to the VM's owner: on for the pytest plugin's VMs, the
    MCP server's, a VM pool's and a matrix worker's (within their limits), off
    elsewhere.
    """

    name: str | None = None
    machine: MachineType = "q35"
    accel: AccelName = "auto"
    cpu: str | None = None
    cpus: int = 1
    max_cpus: int | None = None
    memory: int = 512
    max_memory: int | None = None
    slots: int = 0
    kernel: str | Path | None = None
    initrd: str | Path | None = None
    append: str | None = None
    firmware: Firmware = "seabios"
    drives: tuple[Drive, ...] = ()
    nics: tuple[Nic, ...] = ()
    shares: tuple[Share, ...] = ()
    serial: bool = True
    agent: AgentKind | bool = "qemukit"
    no_reboot: bool = False
    hotplug_ports: int = 4
    sandbox: bool = True
    run_as: str | None = None
    qmp_tcp_port: int | None = None
    gdb: bool = False
    gdb_port: int | None = None
    gdb_wait: bool = False
    extra_args: tuple[str, ...] = field(default=())
    cloud_init: CloudInit | None = None
    arch: ArchName = DEFAULT_ARCH
    warm: bool = False
    forward_auto: bool | None = None
    networks: tuple[str, ...] = ()
    tb_size: int | None = None
    host_root: HostRoot | None = None
    standby: bool | None = None

    def __post_init__(self) -> None:
        if self.name is not None and not (
            isinstance(self.name, str) and NAME_RE.fullmatch(self.name)
        ):
            raise SpecError(
                "name", self.name, "use 1-40 letters, digits, '_', '.' or '-', not starting with one"
            )
        _check_choice("arch", self.arch, ArchName)
        _check_choice("machine", self.machine, MachineType)
        info = ARCHES[self.arch]
        if self.machine == "q35" and "q35" not in info.machines:  # the default: this arch's
            object.__setattr__(self, "machine", info.default_machine)
        if self.machine not in info.machines:
            raise SpecError("machine", self.machine, f"not a machine for arch {self.arch}; "
                            f"use {', '.join(info.machines)}")
        _check_choice("accel", self.accel, AccelName)
        _check_choice("firmware", self.firmware, Firmware)
        if self.cpu is not None:
            _check_text("cpu", self.cpu)
            if not re.fullmatch(r"[A-Za-z0-9_.+=,-]+", self.cpu):
                raise SpecError("cpu", self.cpu, "not a CPU model name")
        _check_int("cpus", self.cpus, 1, MAX_CPUS)
        if self.max_cpus is not None:
            _check_int("max_cpus", self.max_cpus, 1, MAX_CPUS)
            if self.max_cpus < self.cpus:
                raise SpecError("max_cpus", self.max_cpus, f"must be >= cpus ({self.cpus})")
        object.__setattr__(self, "memory", parse_size(self.memory, "memory"))
        _check_int("memory", self.memory, 16, MAX_MEMORY_MIB)
        _check_int("slots", self.slots, 0, 256)
        if self.max_memory is not None:
            object.__setattr__(self, "max_memory", parse_size(self.max_memory, "max_memory"))
            _check_int("max_memory", self.max_memory, 16, MAX_MEMORY_MIB)
            assert self.max_memory is not None
            if self.max_memory < self.memory:
                raise SpecError(
                    "max_memory", self.max_memory, f"must be >= memory ({self.memory} MiB)"
                )
            if self.slots == 0:
                object.__setattr__(self, "slots", DEFAULT_MEMORY_SLOTS)
        elif self.slots:
            raise SpecError("slots", self.slots, "slots need max_memory")
        for name in ("kernel", "initrd"):
            if getattr(self, name) is not None:
                _check_path(name, getattr(self, name))
                object.__setattr__(self, name, str(getattr(self, name)))
        if self.append is not None:
            _check_text("append", self.append, allow_empty=True)
        if self.kernel is None and (self.initrd is not None or self.append is not None):
            raise SpecError("kernel", None, "initrd and append need a kernel")
        if isinstance(self.agent, bool):  # True/False kept for convenience
            object.__setattr__(self, "agent", "qemukit" if self.agent else "none")
        _check_choice("agent", self.agent, AgentKind)
        for name in ("serial", "no_reboot", "sandbox", "warm"):
            if not isinstance(getattr(self, name), bool):
                raise SpecError(name, getattr(self, name), "must be true or false")
        _check_int("hotplug_ports", self.hotplug_ports, 0, 32)
        if self.run_as is not None and not (
            isinstance(self.run_as, str) and re.fullmatch(r"[a-z_][a-z0-9_.-]{0,31}|\d+:\d+", self.run_as)
        ):
            raise SpecError("run_as", self.run_as, "must be a user name or UID:GID")
        if self.qmp_tcp_port is not None:
            _check_int("qmp_tcp_port", self.qmp_tcp_port, 1, 65535)
        if not isinstance(self.gdb, bool):
            raise SpecError("gdb", self.gdb, "must be true or false")
        if self.gdb_port is not None:
            _check_int("gdb_port", self.gdb_port, 0, 65535)
            object.__setattr__(self, "gdb", True)  # a TCP stub is a stub (older specs say so)
        if not isinstance(self.gdb_wait, bool):
            raise SpecError("gdb_wait", self.gdb_wait, "must be true or false")
        if self.gdb_wait and not self.gdb:
            raise SpecError("gdb_wait", True, "needs a gdb stub (gdb = true)")
        _freeze(self, "drives", Drive, parse_drive)
        _freeze(self, "nics", Nic, parse_nic)
        _freeze(self, "shares", Share, Share.parse)
        raw_root = cast(object, self.host_root)
        if isinstance(raw_root, Mapping):
            object.__setattr__(self, "host_root",
                               HostRoot(**_known(HostRoot, raw_root, "host_root")))
        if self.host_root is not None:
            if not isinstance(cast(object, self.host_root), HostRoot):
                raise SpecError("host_root", self.host_root, "must be a HostRoot (a table: "
                                "host_root = { rw = [\"out\"] })")
            if self.kernel is None:
                raise SpecError("host_root", "set", "needs a kernel and the tiny image's "
                                "initramfs (image tiny, or a kernel with it); an image booting "
                                "from its disk has its own root")
            if any(sh.tag == HOST_ROOT_TAG or sh.guest_path == HOST_ROOT_MOUNT
                   for sh in self.shares):
                raise SpecError("host_root", "set", f"share tag {HOST_ROOT_TAG!r} or guest "
                                f"path {HOST_ROOT_MOUNT} is already in use")
            used_tags = {sh.tag for sh in self.shares}
            clash = [f"rw{i}" for i in range(len(self.host_root.rw)) if f"rw{i}" in used_tags]
            if clash:
                raise SpecError("host_root.rw", clash[0], "share tag already used by a share")
        tags = [sh.tag for sh in self.shares]
        if len(tags) != len(set(tags)):
            raise SpecError("share.tag", tags, "share tags must be unique")
        if not isinstance(cast(object, self.extra_args), (list, tuple)):
            raise SpecError("extra_args", self.extra_args, "must be a list of arguments")
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        raw_seed = cast(object, self.cloud_init)
        if isinstance(raw_seed, Mapping):
            object.__setattr__(
                self, "cloud_init", CloudInit(**_known(CloudInit, raw_seed, "cloud_init"))
            )
        if self.cloud_init is not None:
            if not isinstance(cast(object, self.cloud_init), CloudInit):
                raise SpecError("cloud_init", self.cloud_init, "must be a CloudInit")
            if self.machine == "microvm":
                raise SpecError("cloud_init", "set", "microvm has no PCI bus for the seed CD")
            taken = [i for i in [d.id for d in self.drives] + [n.id for n in self.nics]
                     if i and i.startswith("cidata")]
            if taken:
                raise SpecError("id", taken[0], "ids starting with 'cidata' name the seed CD")
        # What each architecture can do is data in its ARCHES row, nothing is keyed on a name.
        if self.firmware != "seabios" and not info.ovmf:
            uefi = " and ".join(a.name for a in ARCHES.values() if a.ovmf)
            raise SpecError("firmware", self.firmware,
                            f"OVMF is {uefi} firmware; {self.arch} boots with {info.firmware}")
        if self.kernel is None and not info.boots_from_disk:
            raise SpecError("kernel", None, f"a {self.arch} guest needs a kernel to boot "
                            "(qemukit boots foreign guests with -kernel only)")
        if self.max_cpus is not None and self.max_cpus > self.cpus and not info.cpu_hotplug:
            raise SpecError("max_cpus", self.max_cpus, f"CPU hotplug is not supported on "
                            f"{self.machine} ({self.arch}) with QEMU 7.2")
        if self.max_memory is not None and not info.memory_hotplug:
            raise SpecError("max_memory", self.max_memory, f"memory hotplug is not "
                            f"supported on {self.machine} ({self.arch}) with QEMU 7.2")
        if self.cloud_init is not None and not info.seed_cd:
            supported = " and ".join(a.name for a in ARCHES.values() if a.seed_cd)
            raise SpecError("cloud_init", "set", f"the cloud-init seed CD works on "
                            f"{supported} only (not on {self.arch})")
        if info.virtiofs and (any(sh.transport == "virtiofs" for sh in self.shares) or (
                self.host_root is not None and self.host_root.transport == "virtiofs")):
            raise SpecError("share.transport", "virtiofs",
                            f"virtiofs does not work on {self.arch}: {info.virtiofs}; "
                            "use a 9p share (HOST:GUEST,9p)")
        if info.transport == "ccw" and any(d.interface == "nvme" for d in self.drives):
            raise SpecError("drive.interface", "nvme",
                            f"{self.machine} has no PCI bus for NVMe; use virtio-blk")
        if self.machine == "microvm":
            if self.firmware != "seabios":
                raise SpecError("firmware", self.firmware, "microvm boots without OVMF")
            if self.kernel is None:
                raise SpecError("kernel", None, "microvm needs a kernel to boot")
            if any(d.interface != "virtio-blk" for d in self.drives):
                raise SpecError("drives", self.drives, "microvm supports virtio-blk drives only")
        for arg in self.extra_args:
            _check_text("extra_args", arg, allow_empty=True)
        for given in [d.id for d in self.drives if d.id] + [n.id for n in self.nics if n.id]:
            if RESERVED_ID_RE.fullmatch(given):
                raise SpecError("id", given, "qemukit uses ids of this shape for its own devices")
        self._check_networks()
        # Generated ids (disk0, net0...) count too: 'disk1' given to the first drive
        # would otherwise collide with the second drive's default id.
        ids = [d.id or f"disk{i}" for i, d in enumerate(self.drives)]
        ids += [n.id or f"net{i}" for i, n in enumerate(self.nics)]
        ids += [f"net-{name}" for name in self.networks]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise SpecError("id", sorted(dupes)[0], "device ids must be unique (defaults are "
                            "disk0, disk1... and net0, net1...)")
        if self.tb_size is not None:
            object.__setattr__(self, "tb_size", parse_size(self.tb_size, "tb_size"))
            _check_int("tb_size", self.tb_size, MIN_TB_SIZE_MIB, MAX_TB_SIZE_MIB)
        if self.forward_auto is not None and not isinstance(self.forward_auto, bool):
            raise SpecError("forward_auto", self.forward_auto, "must be true or false")
        if self.standby is not None and not isinstance(self.standby, bool):
            raise SpecError("standby", self.standby, "must be true or false")
        if self.forward_auto:
            if not any(n.kind == "user" for n in self.nics):
                raise SpecError("forward_auto", True, "needs a user network (a nic of kind "
                                "user, --nic user) to add forwards to")
            if self.agent == "none":
                raise SpecError("forward_auto", True, "needs a guest agent to see the guest's "
                                "listeners (agent is 'none')")

    def _check_networks(self) -> None:
        raw: object = self.networks
        if isinstance(raw, str) or not isinstance(raw, Iterable):
            raise SpecError("networks", raw, "must be a list of network names")
        names = tuple(raw)
        for name in names:
            if not isinstance(name, str) or not NETWORK_RE.fullmatch(name):
                raise SpecError("networks", name, f"a network name must match "
                                f"{NETWORK_RE.pattern} (lower-case letters, digits and '-'; "
                                "no ',', '/' or '.')")
        if len(set(names)) != len(names):
            raise SpecError("networks", list(names), "names a network twice")
        object.__setattr__(self, "networks", names)

    # -- helpers ---------------------------------------------------------

    @property
    def arch_info(self) -> ArchInfo:
        """The guest architecture's row of :data:`qemukit.arch.ARCHES`: what it can do, as data."""
        return ARCHES[self.arch]

    @property
    def all_shares(self) -> tuple[Share, ...]:
        """Every host directory the VM gets: ``shares``, then the host root's (if any)."""
        if self.host_root is None:
            return self.shares
        return self.shares + self.host_root.shares()

    def replace(self, **changes: Any) -> VMSpec:
        """Return a copy with some fields changed (validated again).

        ``max_memory=None`` also drops the memory slots, unless ``slots`` is given too.
        """
        if "max_memory" in changes and changes["max_memory"] is None:
            changes.setdefault("slots", 0)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str, int, bool, lists, dicts) with None fields left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None or value == ():
                continue
            if f.name == "drives":
                value = [{k: list(v) if isinstance(v, tuple) else v for k, v in _part_dict(d).items()}
                         for d in value]
            elif f.name == "shares":
                value = [_part_dict(d) for d in value]
            elif f.name == "nics":
                value = [
                    {**_part_dict(n), "forwards": [str(fw) for fw in n.forwards]}
                    if n.forwards
                    else _part_dict(n)
                    for n in value
                ]
            elif f.name in ("cloud_init", "host_root"):
                value = {k: list(v) if isinstance(v, tuple) else v
                         for k, v in _part_dict(value).items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VMSpec:
        """Build a spec from plain data (as written by :meth:`to_dict` or a TOML file)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError(unknown[0], data[unknown[0]], "unknown field")
        kwargs = dict(data)
        for key in ("drives", "nics", "shares"):
            if not isinstance(kwargs.get(key, ()), (list, tuple)):
                raise SpecError(key, kwargs[key], "must be a list")
        kwargs["drives"] = tuple(
            Drive(**_known(Drive, d, "drives")) if isinstance(d, Mapping) else d
            for d in kwargs.get("drives", ())
        )
        kwargs["shares"] = tuple(
            Share(**_known(Share, sh, "shares")) if isinstance(sh, Mapping) else sh
            for sh in kwargs.get("shares", ())
        )
        kwargs["nics"] = tuple(
            Nic(**_known(Nic, n, "nics")) if isinstance(n, Mapping) else n
            for n in kwargs.get("nics", ())
        )
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | Path) -> VMSpec:
        """Read a spec from a TOML file, its ``base`` chain resolved (see :func:`resolve_spec_file`).

        A file whose chain names a built-in image (``image = "tiny"``, as the built-in
        templates do) needs the image cache: load it with :func:`qemukit.templates.load_spec`.
        """
        data, origins = resolve_spec_file(path)
        if "image" in data:
            raise SpecError(f"{origins['image']}: image", data["image"],
                            "a spec on a built-in image is loaded by qemukit.templates.load_spec "
                            "(as qemukit run -f does)")
        return spec_from_resolved(data, origins)

    def dumps(self) -> str:
        """The spec as TOML text that :meth:`load` reads back to an equal spec."""
        data = self.to_dict()
        lines: list[str] = []
        tables: list[str] = []
        for key, value in data.items():
            if key in ("drives", "nics", "shares"):
                for item in value:
                    tables.append(f"\n[[{key}]]")
                    tables.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
            elif isinstance(value, dict):
                tables.append(f"\n[{key}]")
                tables.extend(f"{k} = {_toml_value(v)}" for k, v in value.items())
            else:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines + tables) + "\n"

    def dump(self, path: str | Path) -> None:
        """Write the spec as TOML to ``path``."""
        Path(path).write_text(self.dumps(), encoding="utf-8")


def _known(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise SpecError(f"{where}.{key}", data[key], "unknown field")
    return dict(data)


def _part_dict(part: Any) -> dict[str, Any]:
    return {
        f.name: getattr(part, f.name)
        for f in dataclasses.fields(part)
        if getattr(part, f.name) is not None and getattr(part, f.name) != ()
    }


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        escaped = "".join(
            ch if ch.isprintable() and ch not in '"\\'
            else (f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
            for ch in value
        )
        return f'"{escaped}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
