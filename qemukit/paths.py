"""Where qemukit keeps things: the image cache, the runtime registry, VMs' big files.

Each can be moved with an environment variable (``QEMUKIT_CACHE``,
``QEMUKIT_STATE``, ``QEMUKIT_DATA``: see :func:`data_dir`); when one cannot
be written, :func:`state_dir_error` and :func:`cache_dir_error` make the
one-line error that says which directory, why, and which variable moves it.

What is in these directories is code: a warm state's ``spec.toml`` becomes a
clone's QEMU command line, a cached image becomes its kernel. So each is used
only if it is safe: :func:`cache_dir`, :func:`state_dir` and :func:`data_dir`
create what is missing with mode 0700 and refuse (:class:`HostError`, :class:`StateError`) a
directory that another user owns or that group or others can write, or that
sits below a directory such a user could rename it out of (writable by group
or others without the sticky bit). Root's directories are trusted (root can
run anything anyway).

Run as root under ``sudo``, qemukit keeps images in the invoking user's cache
(their ``QEMUKIT_CACHE`` if sudo kept it, else their ``~/.cache/qemukit``),
and :func:`hand_over_cache` gives what root created there to that user, so
their own later ``qemukit run --image`` finds it.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

from .errors import HostError, StateError

__all__ = ["cache_dir", "cache_dir_error", "check_private_dir", "data_dir", "hand_over_cache",
           "invoking_user", "state_dir", "state_dir_error"]


def invoking_user() -> tuple[int, int, Path] | None:
    """``(uid, gid, home)`` of the user who ran ``sudo``, when this runs as root under sudo.

    None when not root, or when ``SUDO_UID`` is unset, not a number, 0, or
    names no user.
    """
    if os.geteuid() != 0:
        return None
    try:
        uid = int(os.environ.get("SUDO_UID", ""))
        gid = int(os.environ.get("SUDO_GID", ""))
    except ValueError:
        return None
    if uid == 0:
        return None
    try:
        home = Path(pwd.getpwuid(uid).pw_dir)
    except KeyError:
        return None
    return uid, gid, home


def _cache_path() -> Path:
    env = os.environ.get("QEMUKIT_CACHE")
    if env:
        return Path(env)
    sudo = invoking_user()
    if sudo is not None:  # root's XDG_CACHE_HOME, if sudo kept one, is not the user's
        return sudo[2] / ".cache" / "qemukit"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qemukit"


def _state_path() -> Path:
    env = os.environ.get("QEMUKIT_STATE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "qemukit"
    return Path.home() / ".local" / "state" / "qemukit"


def cache_dir() -> Path:
    """Built images and probe results: ``$QEMUKIT_CACHE``, else ``~/.cache/qemukit``.

    Created (mode 0700) if missing; raises :class:`HostError` if it is not
    safe to use (see the module's docstring).
    """
    path = _cache_path()
    problem = check_private_dir(path)
    if problem is not None:
        raise HostError(_unsafe("cache", path, problem, "QEMUKIT_CACHE"))
    return path


def state_dir() -> Path:
    """Per-VM runtime directories: ``$QEMUKIT_STATE``, else ``$XDG_RUNTIME_DIR/qemukit``,
    else ``~/.local/state/qemukit``.

    Created (mode 0700) if missing; raises :class:`StateError` if it is not
    safe to use (see the module's docstring).
    """
    path = _state_path()
    problem = check_private_dir(path)
    if problem is not None:
        raise StateError(_unsafe("state", path, problem, "QEMUKIT_STATE"))
    return path


def _data_path() -> Path:
    env = os.environ.get("QEMUKIT_DATA")
    if env:
        return Path(env)
    if os.environ.get("QEMUKIT_STATE") or not os.environ.get("XDG_RUNTIME_DIR"):
        return _state_path()  # the state directory is on disk already: one directory per VM
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "qemukit-data"


def data_dir() -> Path:
    """Where a VM's big files live (overlays, console and QEMU logs, initramfs copies).

    ``$QEMUKIT_DATA``; else the state directory when it is on disk
    (``$QEMUKIT_STATE`` set, or no ``$XDG_RUNTIME_DIR``); else
    ``${XDG_STATE_HOME:-~/.local/state}/qemukit-data``: not ``$XDG_RUNTIME_DIR``,
    a tmpfs in memory that systemd sizes at 10% of RAM, where a VM's overlay or a
    guest flooding its console would fill it (sockets stay there). Checked like
    :func:`state_dir` (:class:`StateError`).
    """
    path = _data_path()
    problem = check_private_dir(path)
    if problem is not None:
        raise StateError(_unsafe("data", path, problem, "QEMUKIT_DATA"))
    return path


def _unsafe(kind: str, root: Path, problem: str, variable: str) -> str:
    return (f"refusing qemukit's {kind} directory {root}: {problem}; what is in it runs as "
            f"you, so it must be yours and writable by you only (chmod go-w, or set "
            f"{variable} to a directory of your own)")


def _trusted_owners() -> set[int]:
    owners = {0, os.geteuid()}
    sudo = invoking_user()
    if sudo is not None:
        owners.add(sudo[0])
    return owners


def check_private_dir(path: Path) -> str | None:
    """Why directory ``path`` is not safe for qemukit's code-bearing files, or None if it is.

    Missing components are created with mode 0700 first (owned by the
    invoking user under sudo). The directory must be owned by the user (or
    root, or the invoking user under sudo) and not writable by group or
    others; each existing parent must be owned likewise and, if group or
    others can write it, have the sticky bit (``/tmp``). A path that cannot
    be created or is not a directory is left to the caller's own error.
    """
    _make_missing(Path(os.path.abspath(path)))
    owners = _trusted_owners()
    try:
        st = os.stat(path)
    except OSError:
        return None
    path = Path(os.path.realpath(path))  # the parents that matter are those of the real one
    if not stat.S_ISDIR(st.st_mode):
        return None
    if st.st_uid not in owners:
        return f"it is owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"it is writable by {_who(st.st_mode)} (mode {stat.S_IMODE(st.st_mode):04o})"
    for parent in path.parents:
        try:
            pst = os.stat(parent)
        except OSError:
            return None
        if pst.st_uid not in owners:
            return f"its parent {parent} is owned by uid {pst.st_uid}, who could replace it"
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            return (f"its parent {parent} is writable by {_who(pst.st_mode)} without the "
                    f"sticky bit (mode {stat.S_IMODE(pst.st_mode):04o}), so it can be replaced")
    return None


def _who(mode: int) -> str:
    return " and ".join(w for w, bit in (("group", 0o020), ("others", 0o002)) if mode & bit)


def _make_missing(path: Path) -> None:
    missing = []
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    sudo = invoking_user()
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        except OSError:
            return  # the caller's own mkdir reports it, with the variable that moves it
        if sudo is not None and directory.is_relative_to(sudo[2]):
            os.chown(directory, sudo[0], sudo[1], follow_symlinks=False)


def hand_over_cache(root: Path | None = None) -> int:
    """Under sudo, give what root created in the cache to the invoking user; how many entries.

    Walks ``root`` (default :func:`cache_dir`) by file descriptor without
    following symbolic links (a link the user plants cannot turn this into a
    chown of a system file) and changes only entries owned by root. Does
    nothing when not root under sudo.
    """
    sudo = invoking_user()
    if sudo is None:
        return 0
    uid, gid, _ = sudo
    root = root if root is not None else cache_dir()
    changed = 0
    try:
        top = os.stat(root, follow_symlinks=False)
    except OSError:
        return 0
    if top.st_uid == 0 and stat.S_ISDIR(top.st_mode):
        os.chown(root, uid, gid, follow_symlinks=False)
        changed += 1
    for _, dirnames, filenames, dirfd in os.fwalk(root, follow_symlinks=False):
        for name in (*dirnames, *filenames):
            try:
                st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                if st.st_uid == 0:
                    os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
                    changed += 1
            except OSError:
                continue
    return changed


def _problem(kind: str, root: Path, exc: OSError, variable: str, fallback: tuple[str, ...]) -> str:
    reason = "exists and is not a directory" if isinstance(exc, FileExistsError) else (
        exc.strerror or str(exc))
    where = str(root)
    if exc.filename is not None and os.fsdecode(exc.filename) != str(root):
        reason = f"{os.fsdecode(exc.filename)}: {reason}"
    if os.environ.get(variable):
        origin = f"from {variable}"
    else:
        chosen = next((v for v in fallback if os.environ.get(v)), None)
        origin = f"the default under ${chosen}" if chosen else "the default under your home"
    return (f"cannot use qemukit's {kind} directory {where} ({origin}): {reason}; "
            f"set {variable} to a directory you can write")


def state_dir_error(root: Path, exc: OSError) -> StateError:
    """The error for a state directory (or a file in it) that cannot be created or written."""
    return StateError(_problem("state", root, exc, "QEMUKIT_STATE", ("XDG_RUNTIME_DIR",)))


def cache_dir_error(root: Path, exc: OSError) -> HostError:
    """The error for a cache directory (or a file in it) that cannot be created or written."""
    return HostError(_problem("cache", root, exc, "QEMUKIT_CACHE", ("XDG_CACHE_HOME",)))
