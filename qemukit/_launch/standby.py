"""Standby clones in the registry: the marker that makes a runtime directory a standby.

A standby clone (see :mod:`qemukit.vm._standby`) is a VM like any other in
the registry, restored from a warm state and left paused, plus the file
``standby.json`` in its runtime directory: which warm state it is a clone
of, and where that state lives. Taking it (the next start of the same
state) and ending it (``gc``, ``cache clear``, a start that finds it
outdated) both begin with :func:`claim`: removing the marker, which exactly
one process can do, so a standby is never both taken and ended, nor taken
twice. What is no longer a standby is an ordinary VM, stopped or taken
over as one.

Nothing here talks QMP: this is what ``qemukit ls``, ``gc`` and
``qemukit cache clear`` need, in the layer below the VM.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import select
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .._fs import write_atomic
from .runtime import DATA_LINK, RuntimeDir, VMInfo, list_entries

log = logging.getLogger(__name__)

__all__ = ["MARKER", "StandbyInfo", "claim", "end_standby", "end_standbys", "list_standbys",
           "make_info", "move_runtime", "read_marker", "write_marker"]

#: The file that makes a runtime directory a standby clone.
MARKER = "standby.json"
#: How long ending a standby waits for its QEMU to be gone (it holds its warm entry in use).
END_TIMEOUT = 10.0
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


@dataclass(frozen=True)
class StandbyInfo:
    """What ``standby.json`` says: the warm state a standby is a clone of, and whose it is."""

    #: The warm state's key (its entry's directory name).
    key: str
    #: The entry's directory: a standby whose entry is gone is outdated.
    entry: str
    #: What the VM description is, apart from its files' contents: two keys of one
    #: family mean the files, the QEMU binary or qemukit changed (the older is outdated).
    family: str
    #: The process that made it, and whether it outlives that process (``run --standby``).
    owner_pid: int
    detached: bool
    created: float

    def outdated(self) -> bool:
        """True if its warm state is no longer in the cache."""
        return not os.path.isdir(self.entry)


def write_marker(rd: RuntimeDir, info: StandbyInfo) -> None:
    """Make ``rd`` a standby (atomically: a reader sees the whole marker or none)."""
    write_atomic(rd.path / MARKER, json.dumps(info.__dict__, indent=1))


def read_marker(rd: RuntimeDir) -> StandbyInfo | None:
    """The marker of ``rd``; None if it is no standby (or the marker is unreadable)."""
    try:
        data = json.loads((rd.path / MARKER).read_text())
        return StandbyInfo(**data)
    except (OSError, ValueError, TypeError):
        return None


def claim(rd: RuntimeDir) -> bool:
    """Take ``rd``'s standby for the caller: True for exactly one of any number of callers.

    The marker is removed; ``unlink`` succeeds once. The claimer then owns
    the VM: it takes it over, or ends it.
    """
    try:
        os.unlink(rd.path / MARKER)
    except FileNotFoundError:
        return False
    return True


def list_standbys(root: Path | None = None) -> list[tuple[RuntimeDir, VMInfo, StandbyInfo]]:
    """Every standby in the registry at ``root`` whose QEMU still runs."""
    found = []
    for rd, info in list_entries(root):
        marker = read_marker(rd)
        if marker is not None and info is not None and info.alive():
            found.append((rd, info, marker))
    return found


def end_standby(rd: RuntimeDir, info: VMInfo, *, claimed: bool = False) -> bool:
    """Claim (unless ``claimed``) and end a standby: kill its QEMU, wait for it, remove its entry.

    False if another process claimed it first (it is being taken or ended).
    Waits (up to :data:`END_TIMEOUT`) until QEMU is gone, so the warm entry it
    held in use can be deleted right after.
    """
    from .registry import kill_verified

    if not claimed and not claim(rd):
        return False
    try:
        pidfd = os.pidfd_open(info.pid)
    except OSError:
        pidfd = None
    try:
        kill_verified(info)
        if pidfd is not None:
            select.select([pidfd], [], [], END_TIMEOUT)
    finally:
        if pidfd is not None:
            os.close(pidfd)
    if info.alive():
        log.warning("%s: the standby's QEMU pid %d survived SIGKILL for %.0f s", rd.name,
                    info.pid, END_TIMEOUT)
    rd.remove()
    return True


def end_standbys(root: Path | None = None, *, keys: set[str] | None = None,
                 cache: Path | None = None) -> list[str]:
    """End the standbys in the registry at ``root``: those of ``keys``, of the warm cache at
    ``cache``, else all. Returns their names."""
    ended = []
    for rd, info, marker in list_standbys(root):
        if keys is not None and marker.key not in keys:
            continue
        if cache is not None and Path(marker.entry).parent != cache:
            continue
        if end_standby(rd, info):
            ended.append(rd.name)
    return ended


def _rename_noreplace(old: Path, new: Path) -> None:
    """``rename(old, new)`` that fails (FileExistsError) rather than replace ``new``."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(_AT_FDCWD, os.fsencode(old), _AT_FDCWD, os.fsencode(new),
                      _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(new))


def move_runtime(rd: RuntimeDir, name: str) -> RuntimeDir:
    """Rename a claimed standby's runtime directory (and its data directory) to ``name``.

    Never over an existing entry: a name in use is a FileExistsError, and
    ``rd`` is left as it was. QEMU keeps running on the files and sockets it
    opened; the paths that reach them are the new ones from now on.
    """
    new = RuntimeDir(rd.path.parent / name)
    link = rd.path / DATA_LINK
    data = Path(os.readlink(link)) if os.path.islink(link) else None
    _rename_noreplace(rd.path, new.path)
    os.utime(new.path)  # (an entry's age counts from its last change)
    if data is not None and data.name == rd.name:
        target = data.with_name(name)
        shutil.rmtree(target, ignore_errors=True)  # a leftover of a VM of this name: ours now
        try:
            os.rename(data, target)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise
        tmp = new.path / f".{DATA_LINK}.tmp"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        os.symlink(target, tmp)
        os.replace(tmp, new.path / DATA_LINK)
    return new


def make_info(key: str, entry: Path, family: str, *, detached: bool) -> StandbyInfo:
    """The marker of a standby of ``key`` made by this process."""
    return StandbyInfo(key=key, entry=str(entry), family=family, owner_pid=os.getpid(),
                       detached=detached, created=time.time())
