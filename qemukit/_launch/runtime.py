"""The per-VM runtime directory: what lets a later process find and control a VM.

Each VM owns ``<state_dir>/<name>/`` (mode 0700) holding its QMP, console and
agent sockets, the spec, and ``vm.json`` with QEMU's pid and start time. Its
big files (overlays, the console and QEMU logs, initramfs copies) are in
:attr:`RuntimeDir.data_path`: ``<data_dir>/<name>/`` on disk, reached through
the ``data`` link, when the state directory is ``$XDG_RUNTIME_DIR``'s tmpfs
(see :func:`qemukit.paths.data_dir`); else the directory itself. Creating the directory is the name lock:
``mkdir`` is atomic, so two launches can never share a name. An entry whose
QEMU is gone (pid dead, or reused by another program) is stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._fs import write_atomic
from ..errors import SpecError, StateError
from ..paths import data_dir, state_dir, state_dir_error
from ._pids import is_same_process

log = logging.getLogger(__name__)

__all__ = ["RuntimeDir", "VMInfo", "list_entries"]

_SUN_PATH_MAX = 107

#: The link in a runtime directory to the VM's directory for big files.
DATA_LINK = "data"


@dataclass(frozen=True)
class VMInfo:
    """What ``vm.json`` records about a running VM."""

    name: str
    pid: int
    start_time: float
    accel: str
    accel_reason: str
    owner_pid: int
    die_with_parent: bool
    created: float
    argv: tuple[str, ...]
    owner_start_time: float = 0.0
    #: (pid, start time) of helper daemons such as virtiofsd.
    helpers: tuple[tuple[int, float], ...] = ()

    def alive(self) -> bool:
        """True if the recorded QEMU still runs (same pid and start time)."""
        return is_same_process(self.pid, self.start_time)

    def orphaned(self) -> bool:
        """True if QEMU was meant to die with its owner and the owner is gone."""
        return self.die_with_parent and not is_same_process(self.owner_pid, self.owner_start_time)


@dataclass(frozen=True)
class RuntimeDir:
    """Paths inside one VM's runtime directory."""

    path: Path

    @property
    def name(self) -> str:
        """The VM's name (the directory's name)."""
        return self.path.name

    @property
    def qmp_socket(self) -> Path:
        """Shared QMP monitor socket for clients other than the owner."""
        return self.path / "qmp.sock"

    @property
    def gdb_socket(self) -> Path:
        """QEMU's gdb stub (``spec.gdb``): a socket only the owner can reach."""
        return self.path / "gdb.sock"

    @property
    def console_socket(self) -> Path:
        """Serial console socket (interactive use)."""
        return self.path / "console.sock"

    @property
    def ready_stamp(self) -> Path:
        """``guest-ready``: written once the guest agent first answered (boot is over)."""
        return self.path / "guest-ready"

    @property
    def lock_file(self) -> Path:
        """``ops.lock``: flock'ed by every operation that changes the VM's state files."""
        return self.path / "ops.lock"

    def operation_lock(self, timeout: float) -> AbstractAsyncContextManager[None]:
        """The ``flock`` on :attr:`lock_file`, waited for at most ``timeout`` seconds."""
        from .._aio import file_lock  # (asyncio: not for the commands that only list VMs)

        return file_lock(self.lock_file, timeout, f"VM {self.name!r}'s operation lock "
                         f"({self.lock_file}), held by another operation on it")

    @property
    def data_path(self) -> Path:
        """Where the big files are: the ``data`` link (to the data directory) if made, else
        the directory itself."""
        link = self.path / DATA_LINK
        return link if os.path.islink(link) else self.path

    @property
    def console_log(self) -> Path:
        """What the guest wrote to its serial console (the older part, past the cap, in
        ``console.log.1``; see :class:`~qemukit._wire.console.ConsoleWatcher`)."""
        return self.data_path / "console.log"

    @property
    def agent_socket(self) -> Path:
        """The in-guest agent's virtio-serial channel."""
        return self.path / "agent.sock"

    @property
    def qemu_log(self) -> Path:
        """QEMU's own stdout and stderr."""
        return self.data_path / "qemu.log"

    @property
    def info_file(self) -> Path:
        """``vm.json``: pid, start time, accelerator, argv."""
        return self.path / "vm.json"

    @property
    def spec_file(self) -> Path:
        """The VM's spec as TOML."""
        return self.path / "spec.toml"

    def overlay(self, drive_id: str) -> Path:
        """Where the throwaway overlay of drive ``drive_id`` lives."""
        return self.data_path / f"overlay-{drive_id}.qcow2"

    @classmethod
    def create(cls, name: str | None, root: Path | None = None) -> RuntimeDir:
        """Claim a fresh runtime directory for ``name`` (generated when None).

        Raises :class:`StateError` if a live VM already has the name, or if the
        directory cannot be created (naming it, and ``QEMUKIT_STATE`` when that
        is where it comes from); a stale entry of a dead VM is removed and the
        name reused.
        """
        default_root = root is None
        root = root or state_dir()

        def unusable(exc: OSError) -> StateError:
            if default_root:
                return state_dir_error(root, exc)
            where = f"{os.fsdecode(exc.filename)}: " if exc.filename is not None else ""
            return StateError(f"cannot create a runtime directory in {root}: "
                              f"{where}{exc.strerror or exc}")

        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise unusable(exc) from exc
        for _ in range(20):
            vm_name = name or f"vm-{secrets.token_hex(3)}"
            rd = cls(root / vm_name)
            longest = rd.path / "console.sock"
            if len(os.fsencode(longest)) > _SUN_PATH_MAX:
                raise SpecError(
                    "name", vm_name, f"socket path {longest} is longer than {_SUN_PATH_MAX} bytes; "
                    "use a shorter name or set QEMUKIT_STATE to a shorter directory",
                )
            try:
                rd.path.mkdir(mode=0o700)
            except FileExistsError:
                info = rd.read_info()
                if info is not None and info.alive():
                    if name is not None:
                        raise StateError(
                            f"a VM named {name!r} is already running (pid {info.pid})"
                        ) from None
                    continue
                if info is None and time.time() - _mtime(rd.path) < 60:
                    # Another launch is setting this entry up right now.
                    if name is not None:
                        raise StateError(f"a VM named {name!r} is being started") from None
                    continue
                rd.remove()
                continue
            except OSError as exc:  # not writable, read-only, not a directory, full
                raise unusable(exc) from exc
            os.chmod(rd.path, 0o700)
            if default_root:
                try:
                    rd._link_data()
                except OSError as exc:
                    rd.remove()
                    raise StateError(f"cannot create the data directory of VM {vm_name!r}: "
                                     f"{exc}; set QEMUKIT_DATA to a directory you can "
                                     "write") from exc
            return rd
        raise StateError("could not claim a runtime directory (too many name collisions)")

    def _link_data(self) -> None:
        """Make this VM's directory in the data directory (when that is elsewhere), linked."""
        root = data_dir()
        if os.path.realpath(root) == os.path.realpath(self.path.parent):
            return
        data = root / self.name
        shutil.rmtree(data, ignore_errors=True)  # a leftover of a VM of this name: ours now
        data.mkdir(mode=0o700)
        os.symlink(data, self.path / DATA_LINK)

    def write_private(self, path: Path, text: str) -> None:
        """Write a file readable by the owner only (mode 0600 from creation)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with open(fd, "w", encoding="utf-8") as fh:
            fh.write(text)

    def write_info(self, info: VMInfo) -> None:
        """Write ``vm.json`` atomically."""
        data: dict[str, Any] = dict(info.__dict__)
        data["argv"] = list(info.argv)
        data["helpers"] = [list(h) for h in info.helpers]
        write_atomic(self.info_file, json.dumps(data, indent=1))

    def read_info(self) -> VMInfo | None:
        """Read ``vm.json``; None if missing or unreadable."""
        try:
            data = json.loads(self.info_file.read_text())
            data["argv"] = tuple(data["argv"])
            data["helpers"] = tuple(tuple(h) for h in data.get("helpers", ()))
            return VMInfo(**data)
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def remove(self) -> None:
        """Delete the directory and everything in it (sockets, logs, overlays), and its data."""
        link = self.path / DATA_LINK
        with contextlib.suppress(OSError):
            target = Path(os.readlink(link))
            if target.name == self.name:
                shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():  # rmtree went on past what it could not delete: say so
            log.warning("%s: the runtime directory %s could not be removed completely",
                        self.name, self.path)


def _mtime(path: Path) -> float:
    with contextlib.suppress(OSError):
        return path.stat().st_mtime
    return 0.0


def list_entries(root: Path | None = None) -> list[tuple[RuntimeDir, VMInfo | None]]:
    """Every runtime directory under ``root`` with its ``vm.json`` (None if unreadable)."""
    root = root or state_dir()
    try:
        # Not the private networks' switches (.net, see qemukit._launch.netswitch).
        dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    return [(RuntimeDir(p), RuntimeDir(p).read_info()) for p in dirs]
