"""Commands on VMs that run already: ls, stop, kill, gc, exec, qmp, logs, console."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from .. import errors
from ._common import attach_vm, attached, emit_json, human_bytes, name_argument


@click.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def ls_command(as_json: bool) -> None:
    """List VMs: name, pid, state (from QMP), accelerator, uptime, CPU %, RSS, ports."""
    from .._launch.registry import list_vms

    vms = list_vms()
    if as_json:
        emit_json([vm.to_dict() for vm in vms])
        return
    click.echo(f"{'NAME':20} {'PID':>8} {'STATE':12} {'ACCEL':5} {'UPTIME':>8} {'CPU%':>6} "
               f"{'RSS':>6}  PORTS")
    for vm in vms:
        state = vm.state + (" (orphan)" if vm.orphaned else "")
        uptime = f"{vm.uptime:.0f}s" if vm.uptime is not None else "-"
        cpu = f"{vm.cpu_percent:.1f}" if vm.cpu_percent is not None else "-"
        click.echo(f"{vm.name:20} {vm.pid or '-':>8} {state:12} {vm.accel or '-':5} {uptime:>8} "
                   f"{cpu:>6} {human_bytes(vm.rss):>6}  {', '.join(vm.forwards)}")


@click.command()
@name_argument
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds for the guest's own (ACPI) shutdown before falling back.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def stop(name: str, timeout: float, as_json: bool) -> None:
    """Stop a VM through the ladder (ACPI, quit, SIGTERM, SIGKILL); prints the rung that worked."""
    try:
        vm = attach_vm(name)
    except (errors.QMPError, errors.WaitTimeout) as exc:
        # The ladder starts on QMP; a QEMU that cannot be reached there can still be killed.
        exc.add_note(f"its QMP monitor does not answer; 'qemukit kill {name}' ends it with SIGKILL")
        raise
    result = vm.shutdown(timeout=timeout)
    if as_json:
        emit_json({"name": name, "rung": result.rung.value, "elapsed": round(result.elapsed, 3),
                    "tried": [r.value for r in result.tried]})
    else:
        click.echo(f"{name}: stopped by {result.rung.value} after {result.elapsed:.1f}s")


@click.command()
@name_argument
def kill(name: str) -> None:
    """SIGKILL a VM's QEMU at once (no QMP needed) and remove its entry."""
    from .._launch.registry import kill_verified
    from .._launch.runtime import RuntimeDir
    from ..paths import state_dir

    rd = RuntimeDir(state_dir() / name)
    info = rd.read_info()
    if info is None:
        raise errors.StateError(f"no VM named {name!r} in {rd.path.parent}")
    kill_verified(info)
    rd.remove()
    click.echo(f"{name}: killed")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def gc(as_json: bool) -> None:
    """Remove entries of dead VMs; kill QEMUs whose owner died (die-with-parent VMs)."""
    from .._launch.registry import gc as run_gc

    actions = run_gc()
    if as_json:
        emit_json([a.__dict__ for a in actions])
        return
    for a in actions:
        click.echo(f"{a.name}: {a.action} ({a.detail})")
    if not actions:
        click.echo("nothing to clean")


@click.command(name="exec", context_settings={"ignore_unknown_options": True})
@name_argument
@click.option("--timeout", type=float, default=300.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(name: str, timeout: float, as_json: bool, command: tuple[str, ...]) -> None:
    """Run CMD in a running VM's guest; exit with its status."""
    with attached(name) as vm:
        result = vm.exec(list(command), timeout=timeout)
    if as_json:
        emit_json({"exit_status": result.exit_status, "stdout": result.stdout_text,
                    "stderr": result.stderr_text, "duration": round(result.duration, 3)})
    else:
        sys.stdout.buffer.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.buffer.write(result.stderr)
    sys.exit(result.exit_status)


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object")
    return parsed


@click.command(name="qmp")
@name_argument
@click.argument("command")
@click.argument("arguments", required=False, callback=_json_object)
def qmp_command(name: str, command: str, arguments: dict[str, Any] | None) -> None:
    """Send a raw QMP command; ARGUMENTS is a JSON object. Prints the reply as JSON.

    QMP errors exit 1 with QEMU's error class and message.
    """
    with attached(name) as vm:
        reply = vm.qmp(command, arguments)
    emit_json(reply)


@click.command()
@name_argument
@click.option("-f", "--follow", is_flag=True, help="Keep printing new console output.")
@click.option("--qemu", "qemu_log", is_flag=True, help="Show QEMU's own output instead.")
@click.option("-n", "--lines", type=int, default=0, help="Only the last N lines (0: all).")
def logs(name: str, follow: bool, qemu_log: bool, lines: int) -> None:
    """Print a VM's console log (or QEMU's own output with --qemu)."""
    from .._launch.runtime import RuntimeDir
    from ..paths import state_dir

    rd = RuntimeDir(state_dir() / name)
    path = rd.qemu_log if qemu_log else rd.console_log
    if not path.exists():
        raise errors.StateError(f"no log for VM {name!r} at {path}")
    older = Path(f"{path}.1")  # the console log's part before its last rotation (cap)
    data = (older.read_bytes() if not qemu_log and older.exists() else b"") + path.read_bytes()
    if lines:
        data = b"\n".join(data.splitlines()[-lines:]) + b"\n"
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    if follow and not qemu_log:
        _stream_console(rd.console_socket, interactive=False)


def _stream_console(path: Path, interactive: bool, banner: str = "") -> None:
    """Copy the console socket to stdout (and stdin to it when interactive) until it closes.

    Interactive mode puts the terminal in raw mode; Ctrl-] detaches.
    """
    import select
    import socket as socket_mod

    sock = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise errors.StateError(f"cannot connect to the console at {path}: {exc.strerror}") from exc
    fds: list[Any] = [sock]
    old_tty = None
    if interactive and sys.stdin.isatty():
        import termios
        import tty

        old_tty = termios.tcgetattr(sys.stdin.fileno())
        # TCSANOW: what the user already typed is kept, not flushed.
        tty.setraw(sys.stdin.fileno(), termios.TCSANOW)
        fds.append(sys.stdin)
    elif interactive:
        fds.append(sys.stdin)
    if banner:  # only now: connected, and keystrokes go to the guest
        click.echo(banner + "\r", err=True)
    try:
        while True:
            readable, _, _ = select.select(fds, [], [])
            if sock in readable:
                data = sock.recv(65536)
                if not data:
                    break
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
            if sys.stdin in readable:
                data = os.read(sys.stdin.fileno(), 4096)
                if not data or b"\x1d" in data:  # Ctrl-] detaches
                    break
                sock.sendall(data)
    except KeyboardInterrupt:
        pass
    finally:
        if old_tty is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, old_tty)
        sock.close()


@click.command()
@name_argument
def console(name: str) -> None:
    """Attach to a VM's serial console. Press Ctrl-] to detach (the VM keeps running)."""
    from .._launch.runtime import RuntimeDir
    from ..paths import state_dir

    rd = RuntimeDir(state_dir() / name)
    if rd.read_info() is None:
        raise errors.StateError(f"no VM named {name!r} in {rd.path.parent}")
    _stream_console(rd.console_socket, interactive=True,
                    banner=f"qemukit: connected to {name}'s console; Ctrl-] detaches")
    click.echo("\r\nqemukit: detached", err=True)


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (ls_command, stop, kill, gc, exec_command, qmp_command, logs, console,)
