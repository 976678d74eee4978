"""Saved state: a bundle directory written from a running VM, and clones restored from it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import host
from .._launch.argv import drive_ids, quote_opt
from .._launch.process import run_command
from .._wire.qmp import EventListener
from ..errors import LaunchError, QemukitError, QMPCommandError, SnapshotError
from ..spec import Drive, VMSpec
from ..timeouts import SAVE_TIMEOUT
from ._jobs import Deadline, next_event
from ._preflight import BlockDevice, checks
from ._records import DEVICES_FILE, qemu_img, read_json_list, safe_name, write_json

if TYPE_CHECKING:
    from ..target import VMTarget

log = logging.getLogger(__name__)

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
STATE_FILE = "state.bin"
SPEC_FILE = "spec.toml"
#: A mapped bundle's RAM file (the guest's RAM, which its state file leaves out).
RAM_FILE = "ram"
#: The id of the RAM backend object of a VM whose RAM is a file (see :func:`shared_ram_args`).
RAM_ID = "qemukit-ram"
#: QEMU opens a private file mapping read-only (``readonly=on,rom=off``) from 8.2 on.
READONLY_PRIVATE_QEMU = (8, 2, 0)


def shared_ram_args(memory_mib: int, ram: Path) -> tuple[str, ...]:
    """QEMU arguments making a VM's RAM the file ``ram`` (created by QEMU), shared with it.

    A state saved with the ``x-ignore-shared`` migration capability then leaves
    the RAM out: it is in the file (QEMU's VM templating).
    """
    return ("-object", f"memory-backend-file,id={RAM_ID},size={memory_mib}M,"
                       f"mem-path={quote_opt(str(ram))},share=on",
            "-machine", f"memory-backend={RAM_ID}")


def private_ram_args(memory_mib: int, ram: Path,
                     qemu_version: tuple[int, int, int]) -> tuple[str, ...]:
    """QEMU arguments mapping ``ram`` privately (copy on write) as a clone's RAM.

    From QEMU 8.2 the file is opened read-only (``readonly=on,rom=off``); before,
    QEMU opens it read-write but maps it ``MAP_PRIVATE``, so the guest's writes
    never reach it (a device that discards guest RAM could: see
    :func:`qemukit.vm._warm.mapping_refusal`).
    """
    readonly = ",readonly=on,rom=off" if qemu_version >= READONLY_PRIVATE_QEMU else ""
    return ("-object", f"memory-backend-file,id={RAM_ID},size={memory_mib}M,"
                       f"mem-path={quote_opt(str(ram))},share=off{readonly}",
            "-machine", f"memory-backend={RAM_ID}")


def without_ram_args(args: Sequence[str]) -> tuple[str, ...]:
    """``args`` without the RAM backend arguments of :func:`shared_ram_args`."""
    out: list[str] = []
    skip = False
    for index, arg in enumerate(args):
        if skip:
            skip = False
            continue
        following = args[index + 1] if index + 1 < len(args) else ""
        if ((arg == "-object" and following.startswith(f"memory-backend-file,id={RAM_ID},"))
                or (arg == "-machine" and following == f"memory-backend={RAM_ID}")):
            skip = True
            continue
        out.append(arg)
    return tuple(out)


#: Device drivers that give guest RAM back to QEMU, which discards it (see
#: :func:`discarding_device_refusal`).
DISCARDING_DRIVERS = ("virtio-balloon", "virtio-mem")


def writable_template(args: Sequence[str]) -> str | None:
    """The RAM file a VM with these QEMU ``args`` maps privately but opens read-write, or None.

    That is a mapped clone's RAM (:func:`private_ram_args`) on a QEMU before
    8.2, which has no ``readonly=on`` for a memory backend.
    """
    prefix = f"memory-backend-file,id={RAM_ID},"
    for index, arg in enumerate(args[:-1]):
        value = args[index + 1]
        if arg == "-object" and value.startswith(prefix):
            opts = value.replace(",,", "\0").split(",")
            if "share=off" in opts and "readonly=on" not in opts:
                path = next((o for o in opts if o.startswith("mem-path=")), "mem-path=")
                return path.removeprefix("mem-path=").replace("\0", ",")
    return None


def discarding_device_refusal(args: Sequence[str], driver: object) -> str | None:
    """Why a VM run with QEMU ``args`` must not get a ``driver`` device, or None.

    A mapped clone on QEMU < 8.2 has the warm state's RAM file open
    read-write (:func:`writable_template`). QEMU 7.2 discards the pages a
    virtio-balloon or virtio-mem gives back with ``fallocate(PUNCH_HOLE)``
    on that file even though the clone maps it privately: the shared
    template, which every later clone maps, would lose them.
    """
    name = str(driver).lower()
    if not name.startswith(DISCARDING_DRIVERS):
        return None
    ram = writable_template(args)
    if ram is None:
        return None
    return (f"this VM maps the warm state's RAM file {ram} and its QEMU (before 8.2) opens it "
            f"read-write; QEMU discards the memory a {name} gives back by punching holes in "
            "that file, which would zero the template every later clone restores from "
            "(start the VM with QEMUKIT_WARM_MAP=0 to copy its RAM instead)")
_BANDWIDTH = 1 << 40  # bytes/s: no throttling while the guest is paused anyway


@dataclass(frozen=True)
class Bundle:
    """A saved VM state on disk (a directory): restore starts clones from it.

    It holds ``manifest.json``, ``spec.toml`` (the VM as saved, accelerator
    pinned), ``state.bin`` (QEMU's migration stream), ``disk-<id>.*`` (each
    writable drive's top layer at save time, read-only) and, if devices were
    hot-plugged, ``devices.json``.
    """

    path: Path
    manifest: Mapping[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> Bundle:
        """Read and check the bundle at ``path``."""
        path = Path(path)
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except FileNotFoundError:
            raise SnapshotError(f"{path} is not a qemukit state bundle (no {MANIFEST})") from None
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"cannot read {path / MANIFEST}: {exc}") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
            raise SnapshotError(f"{path}: unknown bundle format {manifest.get('format')!r}")
        names = [STATE_FILE, SPEC_FILE] + [d["file"] for d in manifest.get("disks", [])]
        if manifest.get("ram"):
            names.append(RAM_FILE)
        for name in names:
            if not (path / name).is_file():
                raise SnapshotError(f"{path} is incomplete: {name} is missing")
        return cls(path, manifest)

    @property
    def state_file(self) -> Path:
        """QEMU's migration stream."""
        return self.path / STATE_FILE

    @property
    def spec(self) -> VMSpec:
        """The VM's spec as saved (drives pointing at the original files)."""
        return VMSpec.load(self.path / SPEC_FILE)

    @property
    def ram_file(self) -> Path | None:
        """The guest's RAM, for a mapped bundle (its state file leaves the RAM out); else None."""
        return self.path / RAM_FILE if self.manifest.get("ram") else None

    def adopt_ram(self, ram: Path) -> Bundle:
        """Move ``ram`` (the saved VM's shared RAM file, QEMU gone) in: a mapped bundle."""
        try:
            os.rename(ram, self.path / RAM_FILE)
            os.chmod(self.path / RAM_FILE, 0o600)
        except OSError as exc:
            raise SnapshotError(f"cannot move the RAM file {ram} into {self.path}: {exc}") from exc
        manifest = {**self.manifest, "ram": RAM_FILE}
        write_json(self.path / MANIFEST, manifest)
        return Bundle(self.path, manifest)

    def clone_spec(self, name: str | None = None, *,
                   qemu_version: tuple[int, int, int] = (0, 0, 0)) -> VMSpec:
        """The spec a clone runs: each saved disk becomes an overlay over its bundle copy.

        A mapped bundle's clone maps its RAM file privately (``qemu_version``:
        the QEMU that will run it, for the read-only mapping of 8.2 on).
        """
        spec = self.spec
        ram = self.ram_file
        if ram is not None:
            spec = spec.replace(extra_args=without_ram_args(spec.extra_args)
                                + private_ram_args(spec.memory, ram, qemu_version))
        copies = {d["id"]: d for d in self.manifest.get("disks", [])}
        drives = []
        for drive, drive_id in zip(spec.drives, drive_ids(spec), strict=True):
            copy = copies.get(drive_id)
            if copy is None:
                drives.append(Drive(drive.file, drive.format, drive.interface, drive.read_only,
                                    drive.overlay, drive_id, drive.backing))
            else:
                # The copy's backing chain as QEMU had it open at the save: named, so
                # the clone opens exactly it (bundles from before it was recorded: none).
                drives.append(Drive(str(self.path / copy["file"]), copy["format"],
                                    drive.interface, False, True, drive_id,
                                    backing=tuple(copy.get("backing") or ())))
        return spec.replace(name=name, drives=tuple(drives))

    def hotplugged(self) -> list[dict[str, Any]]:
        """The hot-plugged devices to recreate before the state is loaded."""
        return read_json_list(self.path / DEVICES_FILE)

    def check_qemu(self, qemu: host.QemuBinary) -> None:
        """Refuse a QEMU whose machine types differ from the one that saved the state."""
        saved = str(self.manifest.get("qemu", ""))
        if saved.split(".")[:2] != qemu.version_string.split(".")[:2]:
            raise SnapshotError(
                f"{self.path} was saved by QEMU {saved} and this is {qemu.version_string} "
                f"({qemu.path}): the machine types differ, so the state cannot be loaded; "
                "set QEMUKIT_QEMU to a QEMU of the same major.minor version"
            )


def _copy_top_layer(img: str, src: str, fmt: str, dst: Path) -> str:
    """Copy one image file (sparse); keep its backing reference absolute. Returns its format.

    ``fmt`` is the format QEMU has the file open in: never probed (the guest wrote the file).
    """
    out = run_command([img, "info", "-U", "-f", fmt, "--output=json", "--", src], timeout=30)
    if out.returncode != 0:
        raise SnapshotError(f"qemu-img cannot read {src}: {out.stderr.strip()}")
    info = json.loads(out.stdout)
    copied = run_command(["cp", "--sparse=always", "--", src, str(dst)], timeout=600)
    if copied.returncode != 0:
        raise SnapshotError(f"cannot copy {src} to {dst}: {copied.stderr.strip()}")
    backing, full = info.get("backing-filename"), info.get("full-backing-filename")
    if backing and full and backing != full:
        rebased = run_command(
            [img, "rebase", "-u", "-b", full, "-F", info.get("backing-filename-format", "raw"),
             str(dst)],
            timeout=60,
        )
        if rebased.returncode != 0:
            raise SnapshotError(f"cannot point {dst} at {full}: {rebased.stderr.strip()}")
    os.chmod(dst, 0o444)
    return str(info["format"])


async def _migrate_out(vm: VMTarget, path: Path, deadline: Deadline) -> None:
    """Migrate the (paused) guest's state into ``path`` through a passed fd."""
    caps = await vm.qmp("query-migrate-capabilities")
    events_were = bool(next((c["state"] for c in caps if c["capability"] == "events"), False))
    bandwidth_was = int((await vm.qmp("query-migrate-parameters")).get("max-bandwidth", 0))
    await vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    await vm.qmp("migrate-set-parameters", max_bandwidth=_BANDWIDTH)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fdname = await vm.monitor.hand_over_fd(fd, "qemukit-save")
        finally:
            os.close(fd)  # QEMU holds its own copy now
        with vm.monitor.listen("MIGRATION") as listener:
            try:
                await vm.qmp("migrate", uri=f"fd:{fdname}")
            except QMPCommandError:
                with contextlib.suppress(QMPCommandError):  # QEMU may have dropped it already
                    await vm.qmp("closefd", fdname=fdname)
                raise
            await _wait_migration(vm, listener, deadline, f"saving the guest's state to {path}")
    except BaseException:
        if vm.qemu_alive():
            with contextlib.suppress(QemukitError):  # the migration's own error is raised
                await _set_migration(vm, events_were, bandwidth_was)
        raise
    await _set_migration(vm, events_were, bandwidth_was)


async def _set_migration(vm: VMTarget, events: bool, bandwidth: int) -> None:
    await vm.qmp("migrate-set-parameters", max_bandwidth=bandwidth)
    await vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "events", "state": events}])


async def _wait_migration(
    vm: VMTarget, listener: EventListener, deadline: Deadline, what: str
) -> None:
    status = "setup"
    while status != "completed":
        event = await next_event(
            vm, listener, deadline,
            f"the MIGRATION event 'completed' ({what}; last status: {status})",
        )
        status = str(event["data"]["status"])
        if status in ("failed", "cancelled"):
            info = await vm.qmp("query-migrate")
            raise SnapshotError(
                f"{what}: the migration {status}: {info.get('error-desc', 'QEMU gave no reason')}"
            )


async def save_state(vm: VMTarget, path: Path, *, stop: bool = False,
                     timeout: float = SAVE_TIMEOUT) -> Bundle:
    """Save ``vm``'s state to a new bundle (see :func:`_save_state`), under its operation lock."""
    async with vm.operation_lock():
        log.debug("%s: saving its state to %s (stop=%s)", vm.name, path, stop)
        bundle = await _save_state(vm, path, stop=stop, timeout=timeout)
        log.debug("%s: state saved to %s", vm.name, path)
        return bundle


async def _save_state(vm: VMTarget, path: Path, *, stop: bool = False,
                      timeout: float = SAVE_TIMEOUT) -> Bundle:
    """Save ``vm``'s state to a new bundle directory at ``path`` (see :class:`Bundle`).

    The guest is paused while its state is written and its disks copied,
    then resumed (left paused if it was paused); with ``stop=True`` QEMU
    quits instead, as ``virsh save`` does. Nothing is left at ``path`` if
    the save fails.
    """
    deadline = Deadline(timeout)
    devices = await checks(vm, "state")
    assert vm.runtime is not None and vm.accel is not None
    path = Path(path).absolute()
    if path.exists():
        raise SnapshotError(f"{path} already exists; choose a new path or remove it")
    if not path.parent.is_dir():
        raise SnapshotError(f"{path.parent} is not a directory")
    partial = path.parent / f".{path.name}.partial-{secrets.token_hex(3)}"
    try:
        partial.mkdir(mode=0o700)
    except OSError as exc:
        raise SnapshotError(f"cannot write a bundle in {path.parent}: {exc}") from exc
    was_running = await vm.status() == "running"
    migrated = False
    try:
        await vm.pause()
        await _migrate_out(vm, partial / STATE_FILE, deadline)
        migrated = True
        try:
            manifest = await _fill_bundle(vm, devices, partial, was_running)
            os.rename(partial, path)
        except OSError as exc:
            raise SnapshotError(f"cannot write the bundle {path}: {exc}") from exc
    except BaseException:
        # Nothing was saved: remove the partial bundle and let the guest go on as before.
        shutil.rmtree(partial, ignore_errors=True)
        if vm.qemu_alive():
            with contextlib.suppress(QemukitError):  # the save's own error is raised
                await _resume_after(vm, was_running, migrated)
        raise
    if stop:
        await vm.shutdown(0)
    else:
        await _resume_after(vm, was_running, migrated)
    return Bundle(path, manifest)


def _backing_chains(query_block: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Per top node, its backing chain as QEMU has it open (``FORMAT:PATH``, top first)."""
    out: dict[str, list[str]] = {}
    for entry in query_block:
        inserted = entry.get("inserted") or {}
        chain = []
        image = (inserted.get("image") or {}).get("backing-image")
        while image:
            chain.append(f"{image.get('format')}:{image.get('filename')}")
            image = image.get("backing-image")
        out[str(inserted.get("node-name", ""))] = chain
    return out


async def _fill_bundle(vm: VMTarget, devices: Sequence[BlockDevice], partial: Path,
                       was_running: bool) -> dict[str, Any]:
    """Copy the disks' top layers, write the spec, devices and manifest; returns the manifest."""
    assert vm.runtime is not None and vm.accel is not None
    ids = drive_ids(vm.spec)
    chains = _backing_chains(await vm.qmp("query-block"))
    disks = []
    for dev in devices:
        if dev.read_only or dev.pflash or dev.device not in ids:
            continue
        name = f"disk-{safe_name(dev.device)}.{'qcow2' if dev.driver == 'qcow2' else 'img'}"
        fmt = await asyncio.to_thread(_copy_top_layer, qemu_img(vm), dev.file, dev.driver,
                                      partial / name)
        disks.append({"id": dev.device, "file": name, "format": fmt,
                      "backing": chains.get(dev.node, [])})
    # The accelerator and CPU model are pinned: the state only loads into the same ones.
    spec = vm.spec.replace(accel=vm.accel.accel, cpu=vm.spec.cpu or vm.accel.cpu)
    spec.dump(partial / SPEC_FILE)
    hotplugged = read_json_list(vm.runtime.path / DEVICES_FILE)
    if hotplugged:
        write_json(partial / DEVICES_FILE, hotplugged)
    qemu = vm.qemu
    manifest = {
        "format": BUNDLE_FORMAT, "created": time.time(), "source": vm.name,
        "qemu": qemu.version_string, "accel": vm.accel.accel,
        "guest": "running" if was_running else "paused",
        "state_size": (partial / STATE_FILE).stat().st_size, "disks": disks,
    }
    write_json(partial / MANIFEST, manifest)
    return manifest


async def _resume_after(vm: VMTarget, was_running: bool, migrated: bool) -> None:
    """After an outgoing migration QEMU has let go of the disks; 'cont' takes them back."""
    if was_running:
        await vm.resume()
    elif migrated:
        await vm.resume()
        await vm.pause()


async def restore_vm(vm: VMTarget, bundle: Bundle, timeout: float = SAVE_TIMEOUT, *,
                     resume: bool = True) -> None:
    """Restore ``bundle`` into ``vm`` (see :func:`_restore_vm`), under the clone's operation lock.

    ``resume=False`` leaves the guest paused after the load (a standby clone,
    launched with ``-S``: nothing of the guest runs until it is taken).
    """
    async with vm.operation_lock():
        log.debug("%s: restoring the state of %s", vm.name, bundle.path)
        await _restore_vm(vm, bundle, timeout, resume=resume)
        log.debug("%s: restored from %s", vm.name, bundle.path)


async def _restore_vm(vm: VMTarget, bundle: Bundle, timeout: float = SAVE_TIMEOUT, *,
                      resume: bool = True) -> None:
    """Feed ``bundle``'s state to ``vm``, just started with ``-incoming defer``; resume it.

    The hot-plugged devices are recreated first (same ids and arguments), so
    the state finds the devices it describes.
    """
    deadline = Deadline(timeout)
    try:
        records = bundle.hotplugged()
        for rec in records:
            for cmd in rec.get("backend") or ():
                await vm.qmp(cmd["command"], cmd.get("arguments") or {})
            await vm.qmp("device_add", rec["device"])
        if records and vm.runtime is not None:
            write_json(vm.runtime.path / DEVICES_FILE, records)
        capabilities = [{"capability": "events", "state": True}]
        if bundle.ram_file is not None:  # the RAM is the mapped file, not in the stream
            capabilities.append({"capability": "x-ignore-shared", "state": True})
        await vm.qmp("migrate-set-capabilities", capabilities=capabilities)
        fd = os.open(bundle.state_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fdname = await vm.monitor.hand_over_fd(fd, "qemukit-restore")
        finally:
            os.close(fd)
        with vm.monitor.listen("MIGRATION") as listener:
            await vm.qmp("migrate-incoming", uri=f"fd:{fdname}")
            await _wait_migration(vm, listener, deadline, f"loading the state in {bundle.path}")
    except LaunchError as exc:
        raise SnapshotError(
            f"QEMU could not load the state in {bundle.path} (were devices added or changed "
            f"since it was saved?): {exc}"
        ) from exc
    if resume and bundle.manifest.get("guest") == "running":
        await vm.resume()
