"""``qemukit cp``, ``qemukit shell`` and ``qemukit ports``: files, a shell and forwards of a running VM.

``cp [-r] SRC DST`` copies between the host and a guest, one side written
``NAME:PATH``, through the guest agent (either kind) and a virtio-serial
port plugged for the copy, or as a tar over ssh for a guest without an agent
(``--via ssh`` forces that). ``shell NAME`` logs in over ssh when the VM has
an ssh forward, else attaches the console; ``shell NAME -- CMD`` runs one
command and exits with its status. ``ports NAME`` lists the user-network
forwards, those the port watcher added marked ``auto``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import click

from .. import errors
from ..ports import MAX_AUTO_FORWARDS
from ._common import attached, emit_json, name_argument

__all__ = ["GuestPath", "parse_cp_args", "start_port_watcher"]

_REMOTE_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9_.-]*):(?P<path>.*)$")


@dataclasses.dataclass(frozen=True)
class GuestPath:
    """``NAME:PATH``: a path inside the guest of VM ``name``."""

    name: str
    path: str


def parse_location(text: str) -> GuestPath | str:
    """``NAME:PATH`` as a :class:`GuestPath`; anything else (``/a:b``, ``./a:b``) a host path."""
    if text.startswith(("/", ".", "~")):
        return text
    m = _REMOTE_RE.match(text)
    if m is None:
        return text
    if not m.group("path"):
        raise errors.SpecError("cp", text, "give a guest path after the colon, e.g. NAME:/tmp")
    return GuestPath(m.group("name"), m.group("path"))


def parse_cp_args(src: str, dst: str) -> tuple[GuestPath | str, GuestPath | str]:
    """Both sides of ``cp``; exactly one must be ``NAME:PATH`` (else :class:`SpecError`)."""
    a, b = parse_location(src), parse_location(dst)
    if isinstance(a, GuestPath) and isinstance(b, GuestPath):
        raise errors.SpecError("cp", f"{src} {dst}",
                               "both sides are NAME:PATH; one side must be a host path")
    if not isinstance(a, GuestPath) and not isinstance(b, GuestPath):
        raise errors.SpecError("cp", f"{src} {dst}", "neither side is NAME:PATH (a guest path); "
                               "write a host path with a ':' as ./a:b")
    return a, b


class _ProgressLine:
    """A one-line progress display on a terminal's stderr for copies over 1 MiB; silent otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty()
        self.shown = False
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < 1024 * 1024:
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.2:
            return
        self.last = now
        self.shown = True
        pct = 100 * done // max(total, 1)
        sys.stderr.write(f"\r{self.label}: {pct:3d}% {done / 1048576:.1f}/{total / 1048576:.1f} MiB")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


@click.command(name="cp")
@click.option("-r", "--recursive", is_flag=True, help="Copy a directory and what it holds.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds for the whole copy.")
@click.option("--via", type=click.Choice(["auto", "agent", "ssh"]), default="auto",
              show_default=True, help="How the bytes travel: the guest agent, ssh (the VM's "
              "forward and key), or auto: the agent if the VM has one, else ssh.")
@click.argument("src")
@click.argument("dst")
def cp_command(recursive: bool, timeout: float, via: str, src: str, dst: str) -> None:
    """Copy files between the host and a running VM: qemukit cp [-r] SRC DST.

    \b
    One side is NAME:PATH (a path in VM NAME's guest), the other a host path:
      qemukit cp ./build.tar vm1:/tmp/       qemukit cp -r vm1:/var/log ./logs
    Like cp: into DST if it is a directory, else as DST. Modes are kept,
    except that on the host setuid, setgid, sticky and group/other write are
    dropped and your umask applies; each file is written under a temporary
    name and renamed, so a failed copy leaves nothing behind. What the guest
    sends is untrusted: a copy out never writes or reads outside DST, never
    follows a symlink there, and skips (with a warning) hard links, device
    files, FIFOs and symlinks that could lead out of the copied tree.
    Goes through the guest agent (the tiny image's or
    qemu-guest-agent), or where there is none (an imported image without
    qemu-guest-agent) as a tar over ssh, logged in as the seed's user;
    progress is shown on a terminal for large files.
    """
    a, b = parse_cp_args(src, dst)
    remote = a if isinstance(a, GuestPath) else b
    assert isinstance(remote, GuestPath)
    progress = _ProgressLine(f"{src} -> {dst}")
    if isinstance(a, str):
        # Check the host side first: a missing source must change nothing anywhere.
        local = Path(a).expanduser()
        if not local.exists():
            raise errors.StateError(f"no such file or directory on the host: {a}")
        if local.is_dir() and not recursive:
            raise errors.StateError(f"{a} is a directory (use cp -r)")
    else:
        target = Path(str(b)).expanduser()
        if not target.is_dir() and not target.parent.is_dir():
            raise errors.StateError(f"no such directory on the host: {target.parent}")
    # What a copy out skips (hard links, devices, links leaving the tree) is logged as a
    # warning by qemukit.guest: show it.
    shown = logging.StreamHandler(sys.stderr)
    shown.setLevel(logging.WARNING)
    shown.setFormatter(logging.Formatter("qemukit: cp: %(message)s"))
    guest_log = logging.getLogger("qemukit.guest")
    guest_log.addHandler(shown)
    with contextlib.ExitStack() as stack:
        stack.callback(guest_log.removeHandler, shown)
        _copy(remote, a, b, recursive, progress, timeout, via)


def _copy(remote: GuestPath, a: GuestPath | str, b: GuestPath | str, recursive: bool,
          progress: _ProgressLine, timeout: float, via: str) -> None:
    with attached(remote.name) as vm:
        try:
            if isinstance(a, str):
                vm.copy_in(Path(a).expanduser(), remote.path, recursive=recursive,
                           progress=progress, timeout=timeout, via=via)
            else:
                vm.copy_out(remote.path, Path(str(b)).expanduser(), recursive=recursive,
                            progress=progress, timeout=timeout, via=via)
        finally:
            progress.finish()


def _has_ssh(vm: Any) -> bool:
    if vm.spec.cloud_init is None:
        return False
    try:
        vm.ssh_address()
    except errors.StateError:
        return False
    return True


@click.command(name="shell", context_settings={"ignore_unknown_options": True})
@name_argument
@click.option("-l", "--user", help="Log in as USER over ssh (default: the seed's user).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def shell_command(name: str, user: str | None, command: tuple[str, ...]) -> None:
    """Open a shell in a running VM, or run one command: qemukit shell NAME [-- CMD...].

    \b
    Over ssh when the VM has an ssh forward and a cloud-init seed (the
    Debian image; several shells at once work), else the serial console
    (the tiny image: one at a time, Ctrl-] detaches). With CMD: over ssh,
    or through the guest agent, and the exit status is CMD's.
    """
    with attached(name) as vm:
        ssh = _has_ssh(vm)
        # ssh_argv quotes each word for the remote shell: CMD arrives as given.
        argv = vm.ssh_argv(list(command), user=user,
                           options=() if command else ("-t",)) if ssh else None
        result = None
        if argv is None and command:
            result = vm.exec(list(command), timeout=None)
    if argv is not None:
        from ._guest import warn_unpinned

        warn_unpinned(name, argv)
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            raise errors.HostError(
                f"cannot run {argv[0]}: {exc.strerror}; install openssh-client") from exc
    if result is not None:
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr)
        sys.stderr.flush()
        sys.exit(result.exit_status)
    from ._detached import console

    click.get_current_context().invoke(console, name=name)


@click.command(name="ports")
@name_argument
@click.option("--json", "as_json", is_flag=True, help="Print the forwards as a JSON list.")
@click.option("--watch", is_flag=True, hidden=True,
              help="Run the port watcher of a detached VM (started by run --detach).")
@click.option("--interval", type=float, default=2.0, hidden=True)
@click.option("--forward/--no-forward", default=True, hidden=True,
              help="With --watch: forward ports (else only keep the console log capped).")
@click.option("--log-max", type=click.IntRange(min=4096), default=None, hidden=True,
              help="With --watch: the console log's cap in bytes.")
@click.option("--max-forwards", type=click.IntRange(min=0), default=MAX_AUTO_FORWARDS,
              show_default=True, help="With --watch: the most guest listeners forwarded; more "
                                      "are ignored (logged in the VM's ports.log).")
def ports_command(name: str, as_json: bool, watch: bool, interval: float, forward: bool,
                  log_max: int | None, max_forwards: int) -> None:
    """List a running VM's port forwards: guest port, protocol, host address, auto or static.

    \b
    'auto' forwards follow the guest's listening TCP and UDP sockets (run
    --detach of a spec with forward_auto, the default for the Debian image and
    imported images with an agent; --forward-auto); 'static' ones come from
    --nic user,hostfwd=... . Host addresses are 127.0.0.1 unless asked; an
    auto forward's host port is one the kernel picks (never the guest's number,
    never a privileged port), shown here.
    """
    from .._sync import run_sync
    from ..ports import list_forwards

    if watch:
        _watch(name, interval, max_forwards if forward else None, log_max)
        return
    with attached(name) as vm:
        forwards = run_sync(list_forwards(vm.aio))
    if as_json:
        emit_json([fw.to_json() for fw in forwards])
        return
    click.echo(f"{'GUEST':<8}{'PROTO':<7}{'HOST':<24}KIND")
    for fw in forwards:
        click.echo(f"{fw.guest_port:<8}{fw.proto:<7}{fw.host_addr + ':' + str(fw.host_port):<24}"
                   f"{fw.kind}")


#: Seconds between two looks at a detached VM's console log size.
_LOG_LOOK = 0.1


def _watch(name: str, interval: float, limit: int | None, log_max: int | None = None) -> None:
    """The helper of a detached VM: caps its console log, and forwards its ports unless
    ``limit`` is None; attaches for each look, lets go between looks.

    Nobody reads a detached VM's console, so QEMU only writes its log: each
    look rotates it past ``log_max`` bytes (default
    :data:`~qemukit._wire.console.CONSOLE_LOG_MAX`). QEMU's
    monitor and the agent's channel serve one client at a time, so the watcher
    holds neither between looks: ``exec``, ``cp`` and the rest wait at most one
    look for it. It ends once QEMU has exited.
    """
    import logging

    from .._launch.runtime import RuntimeDir
    from .._wire import console
    from ..paths import state_dir
    from ..ports import wait_pid_exit

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("qemukit.ports")
    rd = RuntimeDir(state_dir() / name)
    info = rd.read_info()
    if info is None:
        raise errors.StateError(f"no VM named {name!r}")
    cap = log_max or console.CONSOLE_LOG_MAX
    next_forward = 0.0
    while info.alive():
        # The log is looked at ten times a second (a stat), the guest's ports every
        # ``interval``: a guest printing flat out under TCG writes megabytes between two
        # port looks, and the cap must hold within what it prints in one log look.
        try:
            if rd.console_log.stat().st_size > cap:
                console.rotate_log(rd.console_log)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                log.warning("%s: cannot cap the console log: %s", name, exc)
        if limit is not None and time.monotonic() >= next_forward:
            _forward_once(name, limit, log)
            next_forward = time.monotonic() + interval
        if wait_pid_exit(info.pid, min(interval, _LOG_LOOK)):
            break


def _forward_once(name: str, limit: int, log: Any) -> None:
    from .._sync import run_sync
    from ..ports import guest_listeners, sync_forwards
    from ..vm import VM

    try:
        vm = VM.attach(name, timeout=30.0)
    except errors.QemukitError as exc:
        log.warning("%s: port watch cannot attach: %s", name, exc)
        return
    try:
        vm.guest.ping(timeout=5.0)
        run_sync(sync_forwards(vm.aio, run_sync(guest_listeners(vm.aio.guest)), limit))
    except errors.QemukitError as exc:
        log.info("%s: port watch: %s", name, exc)
    finally:
        vm.detach()


def start_port_watcher(name: str, limit: int = MAX_AUTO_FORWARDS, forward: bool = True) -> int:
    """The library's :func:`qemukit.ports.start_watcher` (kept for the callers of this name)."""
    from ..ports import start_watcher

    return start_watcher(name, forward=forward, limit=limit)


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (cp_command, shell_command, ports_command)
