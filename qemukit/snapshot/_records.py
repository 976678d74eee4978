"""The snapshot files in a VM's runtime directory: external-snapshot records, hot-plug records, overlays."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import host
from .._fs import write_atomic
from ..errors import HostError, SnapshotError

if TYPE_CHECKING:
    from ..target import VMTarget


#: Internal snapshots holding an external snapshot's RAM are named with this prefix.
EXT_PREFIX = "qemukit-ext-"
#: Hot-plugged devices, as qemukit.hotplug records them in the runtime directory.
DEVICES_FILE = "devices.json"
#: External snapshots of a running VM, in its runtime directory (oldest first).
EXTERNAL_FILE = "external-snapshots.json"


def read_json_list(path: Path) -> list[dict[str, Any]]:
    """A JSON list from a state file; [] if it does not exist; SnapshotError if unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, list):
        raise SnapshotError(f"{path} does not hold a list")
    return data


def write_json(path: Path, data: Any) -> None:
    """Write a state file atomically (readers never see half of it)."""
    write_atomic(path, json.dumps(data, indent=1))


def external_records(vm: VMTarget) -> list[dict[str, Any]]:
    """The VM's external-snapshot records, oldest first."""
    return read_json_list(vm.runtime.path / EXTERNAL_FILE) if vm.runtime else []


def qemu_img(vm: VMTarget) -> str:
    """The qemu-img binary next to the VM's own QEMU (SnapshotError if missing)."""
    try:
        return host.find_qemu_img(vm.qemu)
    except HostError as exc:
        raise SnapshotError(str(exc)) from exc


def create_overlay(vm: VMTarget, backing: str, backing_fmt: str, size: int, path: Path) -> None:
    """A qcow2 over ``backing``, without opening it (QEMU holds its write lock), made with
    the VM's own QEMU's qemu-img."""
    try:
        host.create_overlay(vm.qemu, backing, backing_fmt, path, size=size, unsafe=True)
    except HostError as exc:
        raise SnapshotError(str(exc)) from exc


def safe_name(text: str) -> str:
    """``text`` with every character a file name should not hold replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)
