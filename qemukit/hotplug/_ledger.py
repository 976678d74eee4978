"""``devices.json``: the record of what was hot-plugged, shared by every process controlling a VM."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .._fs import locked, write_atomic
from .._launch.runtime import RuntimeDir
from ..errors import (
    HotplugError,
)

DeviceKind = Literal["disk", "nic", "cpu", "memory", "controller"]

# The command that removes what each backend command created, and the argument naming it.
UNDO = {"blockdev-add": ("blockdev-del", "node-name", "node-name"),
         "netdev_add": ("netdev_del", "id", "id"),
         "object-add": ("object-del", "id", "id")}


log = logging.getLogger(__name__)


def refuse(field_name: str, value: Any, reason: str, device: str | None = None) -> HotplugError:
    """A :class:`HotplugError` for a change refused before QEMU was touched."""
    return HotplugError(f"{field_name}={value!r}: {reason}", field=field_name, value=value,
                        device=device)


@dataclass(frozen=True)
class PluggedDevice:
    """A device qemukit hot-plugged: what :meth:`AsyncHotplug.disk` & co. return.

    ``backends`` are the block node names (file node first), the netdev id or
    the memory backend object id; ``bus`` is the pcie-root-port (``hp2``) or
    the SCSI bus the device sits on; ``overlay`` the throwaway qcow2 of an
    ``overlay=True`` disk.
    """

    id: str
    kind: DeviceKind
    driver: str
    bus: str | None = None
    backends: tuple[str, ...] = ()
    overlay: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON output."""
        return {"id": self.id, "kind": self.kind, "driver": self.driver, "bus": self.bus,
                "backends": list(self.backends), "overlay": self.overlay}


@dataclass(frozen=True)
class DeviceRecord:
    """One entry of ``devices.json``: the QMP commands that recreate a device."""

    id: str
    kind: DeviceKind
    backend: tuple[tuple[str, dict[str, Any]], ...]
    device: dict[str, Any]
    overlay: str | None = None

    def handle(self) -> PluggedDevice:
        names = tuple(str(args[UNDO[cmd][2]]) for cmd, args in self.backend if cmd in UNDO)
        bus = self.device.get("bus")
        return PluggedDevice(self.id, self.kind, str(self.device["driver"]),
                             str(bus) if bus is not None else None, names, self.overlay)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "backend": [{"command": cmd, "arguments": args} for cmd, args in self.backend],
            "device": self.device,
        }
        if self.overlay is not None:
            data["overlay"] = self.overlay
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceRecord:
        return cls(
            id=str(data["id"]),
            kind=data["kind"],
            backend=tuple((str(b["command"]), dict(b["arguments"])) for b in data["backend"]),
            device=dict(data["device"]),
            overlay=data.get("overlay"),
        )


class DeviceLedger:
    """``devices.json`` (and the TCG vCPU count) in a VM's runtime directory.

    The file is the one view of what is plugged, shared by every process
    that controls the VM: each change is a read-modify-write under an
    ``flock`` and lands with an atomic rename, so a reader never sees half a
    file and two writers never lose each other's entry.
    """

    def __init__(self, runtime: RuntimeDir) -> None:
        self.runtime = runtime

    @property
    def path(self) -> Path:
        """``devices.json``: a list of {"id", "kind", "backend", "device"} entries."""
        return self.runtime.path / "devices.json"

    @property
    def _counter_path(self) -> Path:
        return self.runtime.path / "vcpus-added"

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return locked(self.runtime.path / "devices.lock")

    def _read(self) -> list[DeviceRecord]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise refuse("devices.json", str(self.path), exc.strerror or str(exc)) from exc
        try:
            return [DeviceRecord.from_json(item) for item in json.loads(text)]
        except (ValueError, KeyError, TypeError) as exc:
            raise refuse("devices.json", str(self.path), f"unreadable: {exc}") from exc

    def _write(self, records: Sequence[DeviceRecord]) -> None:
        write_atomic(self.path, json.dumps([r.to_json() for r in records], indent=1))

    def records(self) -> list[DeviceRecord]:
        """Every recorded device, in the order they were plugged."""
        with self._locked():
            return self._read()

    def add(self, record: DeviceRecord) -> None:
        """Append ``record`` (replacing an entry with the same id)."""
        log.debug("%s: plugged %s %s", self.runtime.name, record.kind, record.id)
        with self._locked():
            records = [r for r in self._read() if r.id != record.id]
            self._write([*records, record])
            if record.kind == "cpu":
                write_atomic(self._counter_path, str(self._vcpus_added() + 1))

    def remove(self, device_id: str) -> None:
        """Drop the entry of ``device_id`` (no error if there is none)."""
        log.debug("%s: unplugged %s", self.runtime.name, device_id)
        with self._locked():
            records = self._read()
            if any(r.id == device_id for r in records):
                self._write([r for r in records if r.id != device_id])

    def argv(self) -> list[str]:
        """QEMU options that declare the recorded devices on a new QEMU's command line.

        For a restore (``-incoming``) the new QEMU must have the same devices
        with the same ids and properties: ``-blockdev``/``-netdev``/``-object``
        then ``-device``, in JSON, in plug order. Paths are used as recorded
        (an overlay lives in this VM's runtime directory).
        """
        return records_argv(self.records())

    def vcpus_added(self) -> int:
        """How many vCPUs were hot-added over the VM's life (unplugged ones included)."""
        with self._locked():
            return self._vcpus_added()

    def _vcpus_added(self) -> int:
        try:
            return int(self._counter_path.read_text())
        except (OSError, ValueError):
            return 0


_BACKEND_OPTION = {"blockdev-add": "-blockdev", "netdev_add": "-netdev", "object-add": "-object"}


def records_argv(records: Sequence[DeviceRecord]) -> list[str]:
    """The command-line form of recorded devices (see :meth:`DeviceLedger.argv`)."""
    argv: list[str] = []
    for record in records:
        for command, arguments in record.backend:
            argv += [_BACKEND_OPTION[command], json.dumps(arguments, separators=(",", ":"))]
        argv += ["-device", json.dumps(record.device, separators=(",", ":"))]
    return argv
