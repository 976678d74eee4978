"""The guest agent of a running VM, every call guarded: :class:`AsyncGuest` and :class:`SyncGuest`.

``vm.guest`` is one of these. The clients underneath speak the agents'
protocols (:class:`Agent` for qemukit's own agent in the tiny image,
:class:`~qemukit.qga.GuestAgent` for qemu-guest-agent); this layer adds what
a VM knows: a call ends at once, with the right error, when QEMU exits, the
guest panics or QEMU pauses it on a disk error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shlex
import shutil
import stat
import tarfile
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, BinaryIO, TypeVar

from ._sync import SyncFacade, blocking
from ._wire.agent import Agent, ExecResult
from ._wire.qga import GuestAgent
from ._wire.qmp import connect_unix
from .errors import AgentError, GuestError, QemukitError, QMPCommandError, StateError, WaitTimeout

if TYPE_CHECKING:
    from .target import VMTarget

__all__ = ["Agent", "AsyncGuest", "ExecResult", "Progress", "SshArgv", "SyncGuest", "ssh_copy_in",
           "ssh_copy_out"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Extra seconds the VM's guard allows beyond a call's own deadline (which fires first).
_GUARD_SLACK = 10.0


# -- copying files in and out ---------------------------------------------------------------

#: Bytes per write or read on the transfer port (bounded memory whatever the file's size).
_COPY_CHUNK = 1024 * 1024

#: The guest-side name prefix of a transfer port (a hot-plugged virtserialport).
_XFER_PORT_PREFIX = "org.qemukit.xfer."

#: Seconds the host side of a transfer may take after the guest command exited 0. What
#: can still be in flight then: the port's virtqueue (128 buffers, each one write of the
#: guest's, at most 32 KiB) and the socket buffers, which QEMU hands over as fast as the
#: host reads: about 0.5 MiB was left when the tiny guest's head exited, 4 MiB at most.
_DRAIN_TIMEOUT = 60.0

#: A transfer's progress callback: ``(bytes done, bytes in all)``.
Progress = Callable[[int, int], None]


def _find_port_script(name: str) -> str:
    """Shell code setting ``$dev`` to the /dev node of virtio-serial port ``name`` (30 s at most)."""
    return (
        "dev=; i=0\n"
        "while [ -z \"$dev\" ] && [ $i -lt 300 ]; do\n"
        "  for f in /sys/class/virtio-ports/*/name; do\n"
        f"    if [ \"$(cat \"$f\" 2>/dev/null)\" = {shlex.quote(name)} ]; then\n"
        "      d=${f%/name}; [ -c \"/dev/${d##*/}\" ] && dev=/dev/${d##*/}\n"
        "    fi\n"
        "  done\n"
        "  [ -n \"$dev\" ] || { i=$((i + 1)); sleep 0.1; }\n"
        "done\n"
        f"[ -n \"$dev\" ] || {{ echo 'qemukit: transfer port {name} never appeared' >&2; exit 90; }}\n"
    )


def _guest_stat_script(path: str) -> str:
    """Shell code printing ``d MODE``, ``f MODE SIZE``, ``other`` or ``missing`` for ``path``."""
    p = shlex.quote(path)
    return (f"if [ -d {p} ]; then echo d $(stat -c %a {p}); "
            f"elif [ -f {p} ]; then echo f $(stat -c '%a %s' {p}); "
            f"elif [ -e {p} ]; then echo other; else echo missing; fi")


class _TransferPort:
    """A virtio-serial port hot-plugged for one transfer: raw bytes, no encoding, any size.

    The agents' own channels carry base64 in JSON or in one text line, which
    is slow (the tiny agent's shell reads its line byte by byte) and holds
    the whole message in memory; this port is a plain byte stream between
    a host socket and ``/dev/vportNpM`` in the guest.
    """

    def __init__(self, vm: VMTarget) -> None:
        if vm.runtime is None:
            raise StateError(f"VM {vm.name!r} has no runtime directory")
        token = secrets.token_hex(4)
        self._vm = vm
        self.chardev = f"xfer-{token}"
        self.device = f"xfer-{token}-port"
        self.name = _XFER_PORT_PREFIX + token
        self.socket_path = vm.runtime.path / f"xfer-{token}.sock"
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> _TransferPort:
        await self._vm.qmp("chardev-add", id=self.chardev, backend={
            "type": "socket", "data": {"addr": {"type": "unix",
                                                "data": {"path": str(self.socket_path)}},
                                       "server": True, "wait": False}})
        try:
            await self._vm.qmp("device_add", driver="virtserialport", bus="vser0.0",
                               chardev=self.chardev, name=self.name, id=self.device)
            sock = await connect_unix(str(self.socket_path), 30.0)
            self.reader, self.writer = await asyncio.open_unix_connection(sock=sock)
        except BaseException:
            await self._remove(plugged=True)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._remove(plugged=True)

    async def _remove(self, plugged: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None
        if not self._vm.qemu_alive():
            return
        if plugged:
            with self._vm.monitor.listen("DEVICE_DELETED",
                                         match=lambda e: e.get("data", {}).get("device")
                                         == self.device) as events:
                try:
                    await self._vm.qmp("device_del", id=self.device)
                    await self._vm.monitor.wait_event(events, 30.0,
                                                      f"DEVICE_DELETED for {self.device}")
                except QMPCommandError as exc:
                    if exc.error_class != "DeviceNotFound":
                        raise
        try:
            await self._vm.qmp("chardev-remove", id=self.chardev)
        except QMPCommandError as exc:
            log.debug("chardev-remove %s: %s", self.chardev, exc)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


class _Tally:
    """How far one side of a transfer got: bytes moved of bytes expected (for its errors)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.done = 0

    def __repr__(self) -> str:
        return f"<_Tally {self.done} of {self.size} bytes>"


async def _race(transfer: Awaitable[None], command: asyncio.Task[ExecResult], what: str,
                tally: _Tally, moved: str, drain_timeout: float | None = None) -> ExecResult:
    """Run the host side of a transfer beside the guest command; the command's result.

    The guest command ending first is not an error by itself: the guest's
    writes to a virtio-serial port return once the buffers are queued in the
    port's virtqueue (Linux's virtio_console does not wait for the host to
    take them), so ``head -c N src > $dev`` can exit 0, and the agent's reply
    can reach the host, while part of the data (0.5 MiB measured, 4 MiB at
    most) is still on its way through QEMU to the transfer socket, or the
    host still stores the last chunk it read. Then the host side may finish, within
    ``drain_timeout`` (:class:`~qemukit.errors.WaitTimeout` saying how many
    of the bytes were ``moved``). A command that failed ends the transfer at
    once with the guest's error: nobody would read or write the rest.
    """
    if drain_timeout is None:
        drain_timeout = _DRAIN_TIMEOUT
    host_side = asyncio.ensure_future(transfer)
    try:
        done, _ = await asyncio.wait({host_side, command}, return_when=asyncio.FIRST_COMPLETED)
        if command in done and not host_side.done():
            result = command.result()  # the guard's errors (QEMU gone, timeout) end it here
            if result.exit_status != 0:
                raise GuestError(f"{what} failed in the guest (exit {result.exit_status}, "
                                 f"{tally.done} of {tally.size} bytes {moved}): "
                                 f"{result.stderr_text.strip()[-500:] or 'no output'}")
            log.debug("%s: the guest command exited 0 with %d of %d bytes %s; "
                      "waiting for the rest", what, tally.done, tally.size, moved)
            finished, _ = await asyncio.wait({host_side}, timeout=drain_timeout)
            if not finished:
                raise WaitTimeout(f"the rest of {what} after the guest command exited 0 "
                                  f"({tally.done} of {tally.size} bytes {moved})", drain_timeout)
        host_side.result()
        return await command
    finally:
        for task in (host_side, command):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, QemukitError):
                    await task


async def _send_file(port: _TransferPort, source: BinaryIO, tally: _Tally,
                     progress: Progress | None) -> None:
    assert port.writer is not None
    size = tally.size
    while tally.done < size:
        chunk = await asyncio.to_thread(source.read, min(_COPY_CHUNK, size - tally.done))
        if not chunk:
            raise StateError(f"the host file shrank while it was copied "
                             f"({tally.done} of {size} bytes)")
        try:
            port.writer.write(chunk)
            await port.writer.drain()
        except ConnectionError as exc:
            raise AgentError(f"the transfer port closed after {tally.done} of {size} bytes "
                             f"were sent ({exc})") from exc
        tally.done += len(chunk)
        if progress is not None:
            progress(tally.done, size)


async def _receive_file(port: _TransferPort, sink: BinaryIO, tally: _Tally,
                        progress: Progress | None) -> None:
    assert port.reader is not None
    size = tally.size
    while tally.done < size:
        try:
            chunk = await port.reader.read(min(_COPY_CHUNK, size - tally.done))
        except ConnectionError as exc:
            raise AgentError(f"the transfer port closed after {tally.done} of {size} bytes "
                             f"were received ({exc})") from exc
        if not chunk:
            raise AgentError(f"the transfer port closed after {tally.done} of {size} bytes "
                             "were received")
        await asyncio.to_thread(sink.write, chunk)
        tally.done += len(chunk)
        if progress is not None:
            progress(tally.done, size)


def _send_out_script(source: str, size: int) -> str:
    """Shell code writing the first ``size`` bytes of guest file ``source`` to port ``$dev``.

    A file that shrank below ``size`` since its size was read fails at once
    (exit 94, ``head -c`` alone would exit 0 having sent less), so the host,
    which lets an exit-0 transfer finish, does not wait out its deadline for
    bytes that will not come. (Counting with ``| tee $dev | wc -c`` would be
    exact, but it made a 20 MiB copy six times slower in the tiny guest.)
    """
    src = shlex.quote(source)
    return (f"head -c {size} {src} > \"$dev\" || exit\n"
            f"n=$(stat -L -c %s {src}) || exit\n"
            f"[ \"$n\" -ge {size} ] || {{ echo \"qemukit: the file is $n bytes now, fewer than "
            f"the {size} to send (it shrank while it was copied)\" >&2; exit 94; }}\n")


def _pack(src: Path, arcname: str, spool: BinaryIO) -> None:
    """A tar of directory ``src`` named ``arcname`` inside, written to ``spool`` (modes kept)."""
    with tarfile.open(fileobj=spool, mode="w") as tar:
        tar.add(src, arcname=arcname)


# -- unpacking what the guest sends: hostile input ----------------------------------------
#
# Everything in a tar from the guest is the guest's choice: names, link targets, modes,
# types, even whether it is a tar. The rules (tarfile's ``filter="data"`` is the floor):
#
# - refused (GuestError, nothing written): a stream that is not a tar, and names no honest
#   ``tar -c DIR`` makes: absolute, with a ``..`` part, or outside the copied name;
# - skipped with a warning: hard links, device files, FIFOs and sockets (cp -r of a tree
#   holding them makes no sense on the host), symlinks that could lead out of the tree
#   (absolute, empty, or with a ``..`` after a name, or more ``..`` than the link is deep),
#   and entries whose place on the host is taken by a symlink or a non-directory;
# - every directory is opened relative to its parent's fd with O_NOFOLLOW, so no symlink,
#   old or new, is ever followed; files are written under a temporary name and renamed;
# - modes lose setuid, setgid, sticky and group/other write, and the umask applies.

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _Skip(Exception):
    """An entry that is not unpacked (the message says why)."""


def _current_umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _clean_mode(mode: int, umask: int, *, directory: bool) -> int:
    """A guest's mode made safe: no set-id, sticky or group/other write; owner access; umask."""
    mode &= 0o755
    if directory:
        mode |= 0o700
    else:
        if not mode & 0o100:
            mode &= ~0o111  # executable only if the owner may run it (as filter="data")
        mode |= 0o600
    return mode & ~umask


def _member_parts(member_name: str, top: str) -> tuple[str, ...]:
    """The path of a member below ``top`` as parts (``()`` for ``top`` itself); refuses escapes."""
    name = member_name
    while name.startswith("./"):
        name = name[2:]
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if (not parts or name.startswith("/") or ".." in parts or "\0" in name
            or parts[0] != top):
        raise GuestError(f"the guest's archive holds {member_name!r}, which is not inside "
                         f"{top!r}: copy refused, nothing written")
    return parts[1:]


def _link_stays_inside(depth: int, target: str) -> bool:
    """Whether a symlink ``depth`` directories below the top, pointing at ``target``, stays in.

    Allowed: a relative target made of leading ``..`` parts (no more than ``depth``)
    and then names. Every directory above a link is a real one (they are made or
    opened with O_NOFOLLOW), so the ``..`` parts stay in the tree, and any link the
    names pass through obeys the same rule.
    """
    if not target or target.startswith("/") or "\0" in target:
        return False
    ups, seen_name = 0, False
    for part in target.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if seen_name:
                return False
            ups += 1
        else:
            seen_name = True
    return ups <= depth


class _Tree:
    """Writes below one directory fd, never following a symlink (see the rules above)."""

    def __init__(self, root_fd: int, umask: int, top: str) -> None:
        self.root_fd = root_fd
        self.top = top
        self.umask = umask
        #: Directories this copy made: only these get the guest's (clean) mode.
        self.made: set[tuple[str, ...]] = set()
        self.skipped: list[str] = []

    def open_dir(self, parts: Sequence[str]) -> int:
        """An fd of directory ``parts`` (made if missing); _Skip if a non-directory is in the way."""
        fd = os.dup(self.root_fd)
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(part, _clean_mode(0o755, self.umask, directory=True), dir_fd=fd)
                    self.made.add(tuple(parts[:i + 1]))
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise _Skip(f"{'/'.join((self.top, *parts[:i + 1]))} on the host is a symlink or "
                                    "not a directory (not followed, not replaced)") from None
                    raise
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd

    def directory(self, parts: tuple[str, ...], mode: int) -> None:
        fd = self.open_dir(parts)
        try:
            if parts in self.made:  # a directory this copy made gets the guest's (clean) mode
                os.fchmod(fd, _clean_mode(mode, self.umask, directory=True))
        finally:
            os.close(fd)

    def file(self, parts: tuple[str, ...], data: IO[bytes], mode: int) -> None:
        parent = self.open_dir(parts[:-1])
        try:
            _write_new(parent, parts[-1], data, _clean_mode(mode, self.umask, directory=False))
        except _Skip:
            raise _Skip(f"{'/'.join((self.top, *parts))} is a directory on the host "
                        "(not replaced by a file)") from None
        finally:
            os.close(parent)

    def symlink(self, parts: tuple[str, ...], target: str) -> None:
        parent = self.open_dir(parts[:-1])
        try:
            name = parts[-1]
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise _Skip(f"{'/'.join((self.top, *parts))} is a directory on the host "
                                "(not replaced by a symlink)")
            tmp = f".{name}.{secrets.token_hex(4)}.qemukit-tmp"
            os.symlink(target, tmp, dir_fd=parent)
            try:
                os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=parent)
                raise
        finally:
            os.close(parent)


def _write_new(dir_fd: int, name: str, data: IO[bytes], mode: int) -> None:
    """Write ``data`` to ``name`` in ``dir_fd`` under a temporary name, then rename over it.

    The rename replaces a symlink at ``name`` (it does not write through it); a
    directory there is left alone (_Skip). A failure leaves no temporary file.
    """
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise _Skip(f"{name} is a directory on the host (not replaced by a file)")
    tmp = f".{name}.{secrets.token_hex(4)}.qemukit-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(data, out, _COPY_CHUNK)
            os.fchmod(out.fileno(), mode)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _open_tar(archive: BinaryIO) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=archive, mode="r:")
    except tarfile.TarError as exc:
        raise GuestError(f"the guest sent no valid tar archive: {exc}") from exc


def _members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    try:
        return tar.getmembers()
    except tarfile.TarError as exc:
        raise GuestError(f"the guest's tar archive is damaged: {exc}") from exc


def _unpack(archive: BinaryIO, name: str, target: Path) -> list[str]:
    """Unpack the tar holding directory ``name`` as ``target`` (merged into it if it exists).

    The guest wrote the tar: see the rules above. Every name is checked before
    anything is written, so a hostile name refuses the whole copy. A new
    ``target`` is built beside it and renamed into place, so a failed copy
    leaves nothing; into an existing one each file is renamed into place. Returns
    what was skipped (each also logged as a warning).
    """
    umask = _current_umask()
    with _open_tar(archive) as tar:
        members = _members(tar)
        planned = [(m, _member_parts(m.name, name)) for m in members]
        if not planned:
            raise GuestError(f"the guest's archive holds no directory {name!r}")
        for m, parts in planned:
            if not parts and not m.isdir():
                raise GuestError(f"the guest's archive holds {name!r} as no directory")
        parent_fd = os.open(target.parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
        staging: str | None = None
        try:
            try:
                root_fd = os.open(target.name, _DIR_FLAGS, dir_fd=parent_fd)
            except FileNotFoundError:
                staging = f".{target.name}.{secrets.token_hex(4)}.qemukit-tmp"
                os.mkdir(staging, 0o700, dir_fd=parent_fd)
                root_fd = os.open(staging, _DIR_FLAGS, dir_fd=parent_fd)
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise StateError(f"{target} exists and is not a directory (a symlink is "
                                     "not followed)") from None
                raise
            try:
                tree = _Tree(root_fd, umask, name)
                if staging is not None:
                    tree.made.add(())
                _extract(tar, planned, tree)
                if staging is not None:
                    os.rename(staging, target.name, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
                    staging = None
            finally:
                os.close(root_fd)
        finally:
            if staging is not None:
                _remove_tree(parent_fd, staging)
            os.close(parent_fd)
    skipped = list(dict.fromkeys(tree.skipped))  # each blocked place once, not per entry below it
    for why in skipped:
        log.warning("copy out to %s: skipped %s", target, why)
    return skipped


def _extract(tar: tarfile.TarFile, planned: list[tuple[tarfile.TarInfo, tuple[str, ...]]],
             tree: _Tree) -> None:
    links: dict[tuple[str, ...], str] = {}
    dir_modes: dict[tuple[str, ...], int] = {}
    for member, parts in planned:
        shown = "/".join((member.name.strip("/").split("/")[0], *parts))
        links.pop(parts, None)  # the last entry of a name wins, as in tar
        try:
            if member.isdir():
                os.close(tree.open_dir(parts))
                dir_modes[parts] = member.mode
            elif member.isreg():
                data = tar.extractfile(member)
                assert data is not None
                tree.file(parts, data, member.mode)
            elif member.issym():
                if not parts:
                    raise _Skip(f"{shown}: the copied directory itself is a symlink")
                if not _link_stays_inside(len(parts) - 1, member.linkname):
                    raise _Skip(f"{shown}: a symlink to {member.linkname!r}, which may lead "
                                "out of the copied tree")
                links[parts] = member.linkname  # made last: nothing can be written through it
            elif member.islnk():
                raise _Skip(f"{shown}: a hard link (to {member.linkname!r})")
            else:
                kind = ("a device file" if member.ischr() or member.isblk() else
                        "a FIFO" if member.isfifo() else "an entry of an unknown type")
                raise _Skip(f"{shown}: {kind}")
        except _Skip as skip:
            tree.skipped.append(str(skip))
        except tarfile.TarError as exc:
            raise GuestError(f"the guest's tar archive is damaged at {shown}: {exc}") from exc
    for parts, target in links.items():
        try:
            tree.symlink(parts, target)
        except _Skip as skip:
            tree.skipped.append(str(skip))
    # Directory modes last and deepest first: a read-only one must not stop its children.
    for parts in sorted(dir_modes, key=len, reverse=True):
        try:
            tree.directory(parts, dir_modes[parts])
        except _Skip as skip:
            tree.skipped.append(str(skip))


def _remove_tree(dir_fd: int, name: str) -> None:
    """Remove ``name`` in ``dir_fd`` and everything below it, following no symlink."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            os.unlink(name, dir_fd=dir_fd)
        elif exc.errno != errno.ENOENT:
            log.warning("cannot remove the staging directory %s: %s", name, exc)
        return
    try:
        os.fchmod(fd, 0o700)
        for entry in os.listdir(fd):
            _remove_tree(fd, entry)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _unpack_file(archive: BinaryIO, name: str, target: Path) -> None:
    """The one regular file ``name`` of the guest's tar, written to ``target`` (mode cleaned).

    Written under a temporary name beside ``target`` and renamed over it, so a
    symlink at ``target`` is replaced, not written through, and a failure leaves nothing.
    """
    umask = _current_umask()
    with _open_tar(archive) as tar:
        members = _members(tar)
        if len(members) != 1 or _member_parts(members[0].name, name) or not members[0].isreg():
            raise GuestError(f"the guest's archive holds more or other than the regular file "
                             f"{name!r}: copy refused, nothing written")
        data = tar.extractfile(members[0])
        assert data is not None
        parent_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _write_new(parent_fd, target.name, data,
                       _clean_mode(members[0].mode, umask, directory=False))
        except _Skip:
            raise StateError(f"{target} is a directory on the host") from None
        finally:
            os.close(parent_fd)


# -- the same copies over ssh, for guests without an agent --------------------------------

#: Gives the ssh argv running one command (an argv) in the guest (``AsyncVM.ssh_argv`` with
#: batch options; each word reaches the guest intact).
SshArgv = Callable[[Sequence[str]], Awaitable[list[str]]]


def _remote(script: str) -> list[str]:
    """``script`` as a command run by ``sh`` whatever the login shell is."""
    return ["sh", "-c", script]


async def _ssh_run(ssh: SshArgv, script: str, timeout: float, what: str, *,
                   source: BinaryIO | None = None, sink: BinaryIO | None = None,
                   progress: Callable[[int], None] | None = None) -> None:
    from ._launch.process import run_streaming

    argv = await ssh(_remote(script))
    status, err = await asyncio.to_thread(run_streaming, argv, source=source, sink=sink,
                                          timeout=timeout, progress=progress)
    if status != 0:
        lines = [ln for ln in err.strip().splitlines() if not ln.startswith("Warning: Permanently")]
        detail = "\n".join(lines[-5:]) or f"exit status {status}"
        if status == 255:
            raise StateError(f"{what}: ssh failed: {detail}")
        raise GuestError(f"{what}: {detail}")


async def _ssh_output(ssh: SshArgv, script: str, what: str) -> str:
    out = tempfile.TemporaryFile()
    with out:
        await _ssh_run(ssh, script, 60.0, what, sink=out)
        out.seek(0)
        return out.read().decode("utf-8", "replace")


async def ssh_copy_in(ssh: SshArgv, host_path: str | os.PathLike[str], guest_path: str, *,
                      recursive: bool = False, progress: Progress | None = None,
                      timeout: float = 600.0) -> str:
    """:meth:`AsyncGuest.copy_in` over ssh: a tar streamed to ``tar -x`` in the guest.

    The same rules: into ``guest_path`` if it is a directory, else as it;
    modes kept (``tar -p``; files belong to the ssh user); unpacked in a
    temporary directory beside the target and renamed, so a failed copy
    leaves nothing; a missing host path or guest directory is an error
    before any data moves. ``ssh(command)`` gives the argv running a remote
    command (``AsyncVM.ssh_argv``).
    """
    src = Path(host_path)
    st = src.stat()  # FileNotFoundError names the path
    is_dir = stat.S_ISDIR(st.st_mode)
    if is_dir and not recursive:
        raise StateError(f"{src} is a directory (copy it with recursive=True, cp -r)")
    if not (is_dir or stat.S_ISREG(st.st_mode)):
        raise StateError(f"{src} is neither a regular file nor a directory")
    g, n = shlex.quote(guest_path), shlex.quote(src.name)
    dest = await _ssh_output(ssh, (
        f"d={g}; if [ -d \"$d\" ]; then d=\"${{d%/}}\"/{n}; fi\n"
        "p=$(dirname \"$d\")\n"
        "[ -d \"$p\" ] || { echo \"no such directory in the guest: $p\" >&2; exit 2; }\n"
        "[ -w \"$p\" ] || { echo \"cannot write to $p in the guest (as $(id -un))\" >&2; exit 2; }\n"
        + ("" if is_dir else "[ -d \"$d\" ] && { echo \"$d is a directory\" >&2; exit 2; }\n")
        + "printf '%s' \"$d\""), f"cannot copy {src} to {guest_path}")
    q = shlex.quote(dest)
    with tempfile.TemporaryFile() as spool:
        await asyncio.to_thread(_pack, src, src.name, spool)
        size = spool.tell()
        spool.seek(0)
        unpack = (
            f"s=$(mktemp -d \"$(dirname {q})/.qemukit-cp.XXXXXX\") || exit 91\n"
            "tar -x -p --no-same-owner -f - -C \"$s\" || { rm -rf \"$s\"; exit 92; }\n"
            + (f"if [ -d {q} ]; then cp -a \"$s\"/{n}/. {q}/ && rm -rf \"$s\"; "
               f"else mv \"$s\"/{n} {q} && rmdir \"$s\"; fi\n" if is_dir else
               f"mv -f \"$s\"/{n} {q} && rmdir \"$s\"\n"))
        await _ssh_run(ssh, unpack, timeout, f"copying {src} to {dest} over ssh", source=spool,
                       progress=None if progress is None else (lambda done: progress(done, size)))
    return dest


def _copy_out_target(kind: list[str], guest_path: str, host_path: str | os.PathLike[str],
                     recursive: bool) -> tuple[Path, str]:
    """The host path a copy out writes and the copied entry's name, from the guest's stat words.

    ``kind`` is :func:`_guest_stat_script`'s output split into words. Raises
    before anything is copied: a missing or odd guest path, a directory without
    ``recursive``, a host directory that does not exist.
    """
    if not kind or kind[0] == "missing":
        raise GuestError(f"no such file or directory in the guest: {guest_path}")
    if kind[0] == "other":
        raise GuestError(f"{guest_path} in the guest is neither a regular file nor a directory")
    if (kind[0] not in ("d", "f") or len(kind) != (2 if kind[0] == "d" else 3)
            or not set(kind[1]) <= set("01234567") or not all(w.isdigit() for w in kind[2:])):
        raise GuestError(f"the guest answered {' '.join(kind)[:80]!r} about {guest_path}")
    if kind[0] == "d" and not recursive:
        raise StateError(f"{guest_path} in the guest is a directory "
                         "(copy it with recursive=True, cp -r)")
    target = Path(host_path)
    name = PurePosixPath(guest_path.rstrip("/") or "/").name
    if target.is_dir():
        target = target / name
    if not target.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such directory", str(target.parent))
    return target, name


async def ssh_copy_out(ssh: SshArgv, guest_path: str, host_path: str | os.PathLike[str], *,
                       recursive: bool = False, progress: Progress | None = None,
                       timeout: float = 600.0) -> Path:
    """:meth:`AsyncGuest.copy_out` over ssh: the guest's ``tar -c`` streamed to the host.

    The same rules as the agent's copy: into ``host_path`` if it is a
    directory, else as it; the mode kept; written under a temporary name
    (or unpacked beside the target) and renamed; a missing guest path is a
    :class:`~qemukit.errors.GuestError` that changes nothing.
    """
    kind = (await _ssh_output(ssh, _guest_stat_script(guest_path),
                              f"cannot look at {guest_path}")).split()
    target, name = _copy_out_target(kind, guest_path, host_path, recursive)
    size = int(kind[2]) if kind[0] == "f" else 0
    q = shlex.quote(guest_path)
    with tempfile.TemporaryFile(dir=target.parent) as spool:
        await _ssh_run(ssh, f"cd \"$(dirname {q})\" && exec tar -c -f - \"$(basename {q})\"",
                       timeout, f"copying {guest_path} out over ssh", sink=spool,
                       progress=None if progress is None
                       else (lambda done: progress(done, max(size, done))))
        spool.seek(0)
        if kind[0] == "d":
            await asyncio.to_thread(_unpack, spool, name, target)
        else:
            await asyncio.to_thread(_unpack_file, spool, name, target)
    return target


class AsyncGuest:
    """The guest agent of one running VM (``vm.guest`` of an :class:`~qemukit.AsyncVM`).

    Every call is guarded like :meth:`AsyncVM.exec <qemukit.AsyncVM.exec>`:
    it ends at once with the right error if QEMU exits
    (:class:`~qemukit.errors.LaunchError`), the guest panics
    (:class:`~qemukit.errors.GuestPanic`) or QEMU pauses it on a disk error
    (:class:`~qemukit.errors.GuestIOError`), instead of waiting out its
    timeout. File transfer and fsfreeze need qemu-guest-agent
    (``agent="qga"``); the tiny image's own agent runs commands and answers
    pings.
    """

    def __init__(self, vm: VMTarget, agent: Agent) -> None:
        self._vm = vm
        self._agent = agent

    @property
    def agent(self) -> Agent:
        """The unguarded agent client (:class:`~qemukit.guest.Agent` or :class:`GuestAgent`)."""
        return self._agent

    def _qga(self, what: str) -> GuestAgent:
        if not isinstance(self._agent, GuestAgent):
            raise StateError(f"{what} needs qemu-guest-agent (spec agent='qga'); "
                             "the qemukit agent only runs commands")
        return self._agent

    async def _guarded(self, aw: Awaitable[T], timeout: float | None, what: str) -> T:
        limit = None if timeout is None else timeout + _GUARD_SLACK
        return await self._vm.guarded(aw, limit, what, guest_io=True)

    async def ping(self, timeout: float = 60.0) -> None:
        """Wait until the agent answers."""
        await self._guarded(self._agent.ping(timeout), timeout, "the guest agent to answer")

    async def exec(self, command: str | Sequence[str], timeout: float | None = 60.0, *,
                   stdin: bytes | None = None) -> ExecResult:
        """Run ``command`` in the guest (a list as argv, a string as shell code).

        ``stdin`` is fed to the command (qemu-guest-agent only). When
        ``timeout`` passes, the command is killed in the guest and
        :class:`~qemukit.errors.WaitTimeout` is raised.
        """
        what = f"the guest command {command!r}"
        if stdin is not None:
            call = self._qga("stdin for a guest command").exec(command, timeout, stdin=stdin)
        else:
            call = self._agent.exec(command, timeout)
        return await self._guarded(call, timeout, what)

    async def call(self, command: str, arguments: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> Any:
        """Run one raw QGA command and return its ``return`` value."""
        return await self._guarded(self._qga(command).call(command, arguments, timeout=timeout),
                                   timeout, f"the guest agent to run {command}")

    async def read_file(self, path: str, *, timeout: float = 60.0) -> bytes:
        """The contents of ``path`` in the guest."""
        return await self._guarded(self._qga("reading a file").read_file(path, timeout=timeout),
                                   timeout, f"the guest agent to read {path}")

    async def write_file(self, path: str, data: bytes, *, timeout: float = 60.0,
                         append: bool = False) -> None:
        """Write ``data`` to ``path`` in the guest (created or truncated, unless ``append``)."""
        agent = self._qga("writing a file")
        await self._guarded(agent.write_file(path, data, timeout=timeout, append=append),
                            timeout, f"the guest agent to write {path}")

    async def freeze(self, *, timeout: float = 60.0) -> int:
        """Flush and freeze the guest's file systems; returns how many."""
        return await self._guarded(self._qga("fsfreeze").freeze(timeout=timeout), timeout,
                                   "the guest agent to freeze the file systems")

    async def thaw(self, *, timeout: float = 60.0) -> int:
        """Thaw the guest's file systems; returns how many were thawed."""
        return await self._guarded(self._qga("fsfreeze").thaw(timeout=timeout), timeout,
                                   "the guest agent to thaw the file systems")

    async def fsfreeze_status(self, *, timeout: float = 30.0) -> str:
        """``thawed`` or ``frozen``."""
        return await self._guarded(self._qga("fsfreeze").fsfreeze_status(timeout=timeout),
                                   timeout, "the guest agent's fsfreeze status")

    @contextlib.asynccontextmanager
    async def frozen(self, *, timeout: float = 60.0) -> AsyncIterator[int]:
        """``async with vm.guest.frozen():`` file systems frozen inside the block only."""
        count = await self.freeze(timeout=timeout)
        try:
            yield count
        finally:
            await self.thaw(timeout=timeout)

    async def info(self, *, timeout: float = 30.0) -> dict[str, Any]:
        """The agent's version and the commands it supports."""
        return await self._guarded(self._qga("guest-info").info(timeout=timeout), timeout,
                                   "the guest agent's info")

    async def _run_checked(self, script: str, timeout: float, what: str) -> ExecResult:
        result = await self.exec(script, timeout)
        if result.exit_status != 0:
            raise GuestError(f"{what}: {result.stderr_text.strip()[-500:] or 'failed'}")
        return result

    async def copy_in(self, host_path: str | os.PathLike[str], guest_path: str, *,
                      recursive: bool = False, progress: Progress | None = None,
                      timeout: float = 600.0) -> str:
        """Copy a host file (a directory with ``recursive``) into the guest; returns its guest path.

        Like ``cp``: into ``guest_path`` if that is a directory there, else
        as ``guest_path``. The file's mode is kept. The bytes go through a
        virtio-serial port plugged for this copy, read and written 1 MiB at
        a time; the guest file is written under a temporary name and renamed,
        so a failed copy leaves nothing behind. A missing source or guest
        directory raises :class:`~qemukit.errors.GuestError` (or
        :class:`FileNotFoundError` for the host side) before anything is written.
        ``progress(done, total)`` is called as bytes go.
        """
        src = Path(host_path)
        st = src.stat()  # FileNotFoundError names the path
        if stat.S_ISDIR(st.st_mode) and not recursive:
            raise StateError(f"{src} is a directory (copy it with recursive=True, cp -r)")
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise StateError(f"{src} is neither a regular file nor a directory")
        g = shlex.quote(guest_path)
        base = shlex.quote(src.name)
        where = await self._run_checked(
            f"d={g}; if [ -d \"$d\" ]; then d=\"${{d%/}}/\"{base}; fi\n"
            "p=$(dirname \"$d\")\n"
            "[ -d \"$p\" ] || { echo \"no such directory in the guest: $p\" >&2; exit 2; }\n"
            + ("" if stat.S_ISDIR(st.st_mode) else
               "[ -d \"$d\" ] && { echo \"$d is a directory\" >&2; exit 2; }\n")
            + "printf '%s' \"$d\"", 60.0, f"cannot copy {src} to {guest_path}")
        dest = where.stdout_text
        q, n = shlex.quote(dest), shlex.quote(PurePosixPath(dest).name)
        with contextlib.ExitStack() as stack:
            if stat.S_ISDIR(st.st_mode):
                spool = stack.enter_context(tempfile.TemporaryFile())
                await asyncio.to_thread(_pack, src, Path(dest).name, spool)
                size = spool.tell()
                spool.seek(0)
                source: BinaryIO = spool
            else:
                source = stack.enter_context(src.open("rb"))
                size = st.st_size
            async with _TransferPort(self._vm) as port:
                if stat.S_ISDIR(st.st_mode):
                    body = (
                        f"s=$(mktemp -d \"$(dirname {q})/.qemukit-cp.XXXXXX\") || exit 91\n"
                        f"head -c {size} \"$dev\" | tar -x -f - -C \"$s\" || "
                        "{ rm -rf \"$s\"; exit 92; }\n"
                        # The packed name, not a glob: '*' misses a name with a leading dot.
                        f"if [ -d {q} ]; then cp -a \"$s\"/{n}/. {q}/ && rm -rf \"$s\"; "
                        f"else mv \"$s\"/{n} {q} && rmdir \"$s\"; fi\n")
                else:
                    body = (
                        f"t={q}.qemukit-tmp.$$\n"
                        f"head -c {size} \"$dev\" > \"$t\" || {{ rm -f \"$t\"; exit 92; }}\n"
                        f"[ \"$(wc -c < \"$t\")\" -eq {size} ] || "
                        "{ rm -f \"$t\"; echo 'short transfer' >&2; exit 93; }\n"
                        f"chmod {stat.S_IMODE(st.st_mode):o} \"$t\" && mv -f \"$t\" {q}\n")
                command = asyncio.ensure_future(
                    self.exec(_find_port_script(port.name) + body, timeout))
                tally = _Tally(size)
                result = await _race(_send_file(port, source, tally, progress), command,
                                     f"copying {src} to {dest}", tally, "sent")
        if result.exit_status != 0:
            raise GuestError(f"copying {src} to {dest} failed in the guest "
                             f"(exit {result.exit_status}): {result.stderr_text.strip()[-500:]}")
        return dest

    async def copy_out(self, guest_path: str, host_path: str | os.PathLike[str], *,
                       recursive: bool = False, progress: Progress | None = None,
                       timeout: float = 600.0) -> Path:
        """Copy a guest file (a directory with ``recursive``) to the host; returns the host path.

        Like ``cp``: into ``host_path`` if it is a directory, else as
        ``host_path``; the mode is kept; written under a temporary name and
        renamed, so a failed copy leaves no partial file. A missing guest
        path raises :class:`~qemukit.errors.GuestError` and changes nothing.
        """
        kind = (await self._run_checked(_guest_stat_script(guest_path), 60.0,
                                        f"cannot look at {guest_path}")).stdout_text.split()
        target, name = _copy_out_target(kind, guest_path, host_path, recursive)
        q = shlex.quote(guest_path)
        async with contextlib.AsyncExitStack() as stack:
            if kind[0] == "d":
                made = await self._run_checked(
                    f"t=$(mktemp /tmp/qemukit-cp.XXXXXX) && "
                    f"tar -c -f \"$t\" -C \"$(dirname {q})\" \"$(basename {q})\" && "
                    "echo \"$t\" $(stat -c %s \"$t\")", timeout, f"cannot pack {guest_path}")
                tar_path, size_text = made.stdout_text.split()
                stack.push_async_callback(self.exec, f"rm -f {shlex.quote(tar_path)}", 60.0)
                source, size, mode = tar_path, int(size_text), 0o600
            else:
                source, size, mode = guest_path, int(kind[2]), int(kind[1], 8)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".qemukit-tmp",
                                            dir=target.parent)
            tmp = Path(tmp_name)
            sink = stack.enter_context(os.fdopen(fd, "w+b"))
            try:
                async with _TransferPort(self._vm) as port:
                    command = asyncio.ensure_future(self.exec(
                        _find_port_script(port.name) + _send_out_script(source, size), timeout))
                    tally = _Tally(size)
                    result = await _race(_receive_file(port, sink, tally, progress), command,
                                         f"copying {guest_path} out", tally, "received")
                if result.exit_status != 0:
                    raise GuestError(f"copying {guest_path} out failed in the guest: "
                                     f"{result.stderr_text.strip()[-500:]}")
                sink.flush()
                if kind[0] == "d":
                    sink.seek(0)
                    await asyncio.to_thread(_unpack, sink, name, target)
                    tmp.unlink()
                else:
                    os.fchmod(sink.fileno(), _clean_mode(mode, _current_umask(), directory=False))
                    os.replace(tmp, target)  # a symlink at target is replaced, not followed
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        return target


class SyncGuest(SyncFacade):
    """The guest agent for synchronous code (``VM.guest``), derived from :class:`AsyncGuest`."""

    _aio: AsyncGuest

    @property
    def aio(self) -> AsyncGuest:
        """The async (guarded) guest agent."""
        return self._aio

    ping = blocking(AsyncGuest.ping)
    exec = blocking(AsyncGuest.exec)
    call = blocking(AsyncGuest.call)
    read_file = blocking(AsyncGuest.read_file)
    write_file = blocking(AsyncGuest.write_file)
    freeze = blocking(AsyncGuest.freeze)
    thaw = blocking(AsyncGuest.thaw)
    fsfreeze_status = blocking(AsyncGuest.fsfreeze_status)
    info = blocking(AsyncGuest.info)
    copy_in = blocking(AsyncGuest.copy_in)
    copy_out = blocking(AsyncGuest.copy_out)

    @contextlib.contextmanager
    def frozen(self, *, timeout: float = 60.0) -> Iterator[int]:
        """``with vm.guest.frozen():`` freezes for the block, thaws after it whatever happens."""
        count = self.freeze(timeout=timeout)
        try:
            yield count
        finally:
            self.thaw(timeout=timeout)
