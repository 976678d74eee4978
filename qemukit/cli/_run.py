"""``qemukit run`` (foreground, ``-- CMD``, ``--detach``) and ``qemukit cmdline``."""

from __future__ import annotations

import os
import shlex
import sys
from typing import TYPE_CHECKING, Any

import click

from .. import errors
from ..results import Outcome, json_text
from ._common import (
    EXIT_INTERRUPTED,
    build_request,
    emit_json,
    exit_code_for_outcome,
    spec_options,
)

if TYPE_CHECKING:
    from ..resolve import Purpose, Resolution
    from ..spec import VMSpec


@click.command(context_settings={"ignore_unknown_options": False})
@spec_options
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds for boot plus command; a hung guest ends with exit 124. A first "
              "warm start's build of the warm state has its own TIMEOUT for its boot.")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
              help="Write the result as JSON to FILE, or to stdout when no FILE is given.")
@click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report.")
@click.option("--console-log", type=click.Path(dir_okay=False),
              help="Keep a copy of the guest's whole console log here.")
@click.option("--modules", type=click.Path(file_okay=False, exists=True),
              help="Kernel modules for --kernel (make modules_install INSTALL_MOD_PATH=DIR), "
              "appended to the initramfs.")
@click.option("--detach", "-d", is_flag=True,
              help="Start the VM in the background, print its name and return.")
@click.option("--wait", "wait_for", type=click.Choice(["qmp", "agent", "ssh"]), default="qmp",
              show_default=True, help="With --detach: return once QMP answers, the guest agent "
              "answers, or ssh logs in (at least the agent with --net: it gives the guest its "
              "address).")
@click.option("--keep", is_flag=True, help="Keep the disk changes (overlays) under the VM's name; "
              "a later --keep run of that name boots them again.")
@click.option("--user-data", type=click.Path(exists=True, dir_okay=False),
              help="cloud-init user-data file, passed to the guest as it is.")
@click.option("--ssh-key", type=click.Path(exists=True, dir_okay=False),
              help="SSH public key to authorize in the guest (default: a keypair made per VM).")
@click.option("--continue-on-oops", is_flag=True,
              help="With -- CMD: a kernel oops or BUG is recorded, not fatal; CMD runs on.")
@click.option("--dump-on-panic", type=click.Path(dir_okay=False), metavar="FILE",
              help="With -- CMD: on a kernel panic, write the guest's memory to FILE (an ELF "
              "core for crash or drgn) before the run ends with 255.")
@click.option("--crash-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="With -- CMD: on a kernel panic or oops, write a crash bundle (verdict, "
              "console, dump, kernel identity, QEMU argv, triage.txt) in a new directory "
              "under DIR.")
@click.option("--vmlinux", type=click.Path(dir_okay=False, exists=True),
              help="The kernel's vmlinux, for the crash bundle's drgn triage [default: the "
              "tree's, or one beside the image].")
@click.option("--kselftest", metavar="TARGET[,TARGET]",
              help="Build and install these kselftest targets from the kernel tree, run them "
              "in the guest with the kernel's runner, report each test (--json: JSON lines; "
              "--junit: a case per test).")
@click.option("--kselftest-src", type=click.Path(file_okay=False, exists=True), metavar="TREE",
              help="The kernel source tree to build --kselftest from [default: --kernel's].")
@click.option("--warm/--cold", "warm", default=None,
              help="Restore a saved ready state of this VM description (booting it once and "
              "saving that state if there is none), or boot it. Default: warm for --image and "
              "--kernel, as the spec file says for -f.")
@click.option("--verbose", "-v", is_flag=True,
              help="Explain the accelerator choice in full (as qemukit doctor does), and say "
              "whether the start was warm or cold, and why.")
@click.option("--standby/--no-standby", "standby", default=None,
              help="After a warm start, leave a standby clone of the same state behind "
              "(restored and paused, running after this command ends) for the next start of "
              "this VM description to take [default: the spec's standby, off].")
@click.option("--forward-auto/--no-forward-auto", "forward_auto", default=None,
              help="With --detach: forward each port the guest listens on (TCP and UDP) from "
                   "127.0.0.1, as it comes and goes [default: the spec's forward_auto, on for "
                   "the debian image and imported images with an agent].")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(timeout: float, json_out: str | None, junit: str | None, console_log: str | None,
        modules: str | None, detach: bool, wait_for: str, continue_on_oops: bool,
        dump_on_panic: str | None, crash_dir: str | None, vmlinux: str | None,
        kselftest: str | None, kselftest_src: str | None, verbose: bool,
        warm: bool | None, standby: bool | None, forward_auto: bool | None,
        command: tuple[str, ...], **opts: Any) -> None:
    """Boot a VM; with -- CMD, run CMD in the guest, print its output, stop, exit with its code.

    \b
    Examples:
      qemukit run --image tiny -- uname -r
      qemukit run --kernel arch/x86/boot/bzImage -- sh -c 'dmesg | tail'
    Without CMD the VM runs in the foreground with its console on stdout
    until the guest powers off or you press Ctrl-C (Ctrl-C stops the VM and exits 130).

    \b
    Exit codes: the command's status; 124 timeout; 125 qemukit error (also a
    --share the guest could not mount); 254 guest kernel oops or BUG (the
    kernel kept running; --continue-on-oops runs on); 255 guest kernel panic.
    Kernel warnings (soft lockups, RCU stalls, WARNING:) are reported, not fatal.
    """
    from ..resolve import resolve
    from ..vm import VM
    from ._guest import apply_run_options

    if detach and command:
        raise errors.SpecError("command", list(command), "--detach takes no command; "
                               "use 'qemukit exec NAME -- CMD'")
    # Unset, --forward-auto is the spec's: developer images (debian, imported ones with
    # an agent) say on; the library starts the forwards of a detached VM.
    resolution = resolve(build_request(opts, purpose=_purpose(detach, command, kselftest),
                                       warm=warm, modules=modules, forward_auto=forward_auto))
    spec = apply_run_options(resolution.spec, opts)
    if standby is not None:
        spec = spec.replace(standby=standby)
    if spec.standby:
        from ..vm import _standby

        _standby.detach_standbys()  # this process ends: the next run takes it
    if verbose and json_out != "-":
        click.echo(f"qemukit: {resolution.machine.describe()}", err=True)
    if kselftest is not None:
        if command or detach:
            raise errors.SpecError("kselftest", kselftest, "runs the kernel's runner: give no "
                                   "command and no --detach")
        from ._suites import run_kselftest_command

        run_kselftest_command(spec, kselftest, kselftest_src or opts["kernel"], timeout=timeout,
                              json_out=json_out, junit=junit, run_options=dict(
                                  console_log=console_log, modules=modules, crash_dir=crash_dir,
                                  continue_on_oops=continue_on_oops, vmlinux=vmlinux))
        return
    if detach:
        _run_detached(resolution.replace_spec(spec) if spec is not resolution.spec
                      else resolution, timeout, wait_for, json_out == "-", verbose)
        _settle_standbys(spec)
        return
    if not command:
        vm = VM(spec, boot_timeout=timeout, modules=modules)
        try:
            vm.start()
        except KeyboardInterrupt:
            # start() cancelled cleans up what it began (QEMU, a warm state half built).
            click.echo(f"\nqemukit: {vm.name} stopped (interrupted while starting)", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
        foreground(vm, verbose)
        _settle_standbys(spec)
        return
    from ..kernel import run_in_vm

    if spec.host_root is not None:  # the host's root (--rootfs host, or the spec's host_root)
        from ..rootfs import in_directory

        try:
            cwd = os.getcwd()
        except FileNotFoundError:
            raise errors.SpecError("rootfs", "host", "the current directory no longer exists; "
                                   "the command would start in it") from None
        command = tuple(in_directory(command, cwd))

    def announce(vm: VM) -> None:
        if json_out != "-":
            _announce_accel(vm, verbose)

    result = run_in_vm(spec, list(command), timeout=timeout, console_log=console_log,
                       modules=modules, on_started=announce, continue_on_oops=continue_on_oops,
                       dump_on_panic=dump_on_panic, crash_dir=crash_dir, vmlinux=vmlinux)
    _settle_standbys(spec)
    if json_out is not None:
        if json_out == "-":
            click.echo(json_text(result.to_dict()))
        else:
            result.write_json(json_out)
    if junit is not None:
        result.write_junit(junit)
    if json_out != "-":
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
    if json_out != "-":
        from .._wire.console import classify

        for line in result.warnings:
            event = classify(line)
            kind = "oops (continued past)" if event and event.kind == "oops" else "warning"
            click.echo(f"qemukit: guest kernel {kind}: {line}", err=True)
    if result.outcome is Outcome.PANIC:
        click.echo(f"qemukit: guest kernel panic: {result.panic}\n--- console ---\n"
                   f"{result.console_tail}", err=True)
        if result.dump is not None:
            hint = _crash_hint(spec, result.dump, vmlinux)
            click.echo(f"qemukit: crash dump in {result.dump} ({hint}; "
                       f"drgn -c {result.dump})", err=True)
        elif dump_on_panic is not None:
            click.echo(f"qemukit: {result.error}", err=True)
    elif result.outcome is Outcome.OOPS:
        click.echo(f"qemukit: guest kernel oops (it kept running; --continue-on-oops runs on): "
                   f"{result.oops}\n--- console ---\n{result.console_tail}", err=True)
    if result.crash_bundle is not None:
        click.echo(f"qemukit: crash bundle in {result.crash_bundle} (start with triage.txt)",
                   err=True)
    if result.console_log_error is not None:  # beside the verdict, which decides the exit
        click.echo(f"qemukit: warning: {result.console_log_error}", err=True)
    if result.outcome in (Outcome.TIMEOUT, Outcome.ERROR):
        tail = (f"\n--- console ---\n{result.console_tail}"
                if result.outcome is Outcome.TIMEOUT else "")
        click.echo(f"qemukit: {result.error}{tail}", err=True)
    sys.exit(exit_code_for_outcome(result.outcome, result.exit_status))


def _crash_hint(spec: VMSpec, dump: str, vmlinux: str | None) -> str:
    """The crash command for ``dump``: with ``--no_kmem_cache`` when the kernel's config says
    SLOB, with when to add it when there is no config to read."""
    from ..crashdir import crash_command, find_vmlinux
    from ..kconfig import resolve_kernel

    try:
        about = resolve_kernel(spec)
    except errors.QemukitError:  # it booted: this does not fail; if it does, say when instead
        config, tree = None, None
    else:
        config, tree = about.config, about.tree
    if vmlinux is None:
        found = find_vmlinux(tree.root if tree is not None else spec.kernel)
        vmlinux = str(found) if found is not None else None
    return crash_command(dump, vmlinux, config, kernel=spec.kernel)


def _purpose(detach: bool, command: tuple[str, ...], kselftest: str | None = None) -> Purpose:
    """What ``run`` (and ``cmdline`` with the same arguments) starts the VM for.

    ``--kselftest`` runs the kernel's runner as the command: a one-shot run too.
    """
    if detach:
        return "detached"
    return "command" if command or kselftest is not None else "interactive"


def _settle_standbys(spec: VMSpec) -> None:
    """With ``--standby``: wait until the standby clone left behind is ready (it outlives us)."""
    if spec.standby:
        from .._sync import run_sync
        from ..vm import _standby

        run_sync(_standby.settle())



def _announce_accel(vm: Any, verbose: bool) -> None:
    """One line on stderr: the accelerator in short, or with the whole reason under -v.

    With a gdb stub, a line with the gdb command that connects to it; under -v a
    line saying whether the start was warm or cold, and why.
    """
    if vm.accel is not None:
        text = vm.accel.reason if verbose else vm.accel.summary
        click.echo(f"qemukit: {vm.name}: {text}", err=True)
    if verbose and vm.warm_start is not None:
        click.echo(f"qemukit: {vm.name}: {vm.warm_start.describe()}", err=True)
    if vm.spec.gdb:
        address = vm.gdb_address()
        click.echo(f"qemukit: {vm.name}: gdb stub on {address}"
                   f"{' (vCPUs halted until gdb continues)' if vm.spec.gdb_wait else ''}: "
                   f"{gdb_command(vm.spec.kernel, address)}", err=True)


def gdb_command(kernel: str | os.PathLike[str] | None, address: str) -> str:
    """The gdb command line for a stub at ``address`` (a socket path or HOST:PORT).

    With the kernel's vmlinux when it is found, and the kernel's gdb scripts
    (``lx-dmesg``, ``lx-ps``) when its tree was built with CONFIG_GDB_SCRIPTS.
    """
    from ..gdbscripts import gdb_argv

    return shlex.join(gdb_argv(kernel, address))


def _run_detached(resolution: Resolution, timeout: float, wait_for: str, as_json: bool,
                  verbose: bool = False) -> None:
    from ..resolve import start_detached

    def announce(vm: Any) -> None:
        if verbose and not as_json:
            _announce_accel(vm, verbose)

    # The library starts the watcher (console log cap; the spec's forward_auto).
    started = start_detached(resolution, timeout=timeout,
                             wait_for=wait_for,  # type: ignore[arg-type]
                             on_started=announce)
    if started.gdb is not None:
        click.echo(f"qemukit: {started.name}: gdb stub: "
                   f"{gdb_command(resolution.spec.kernel, started.gdb)}", err=True)
    if as_json:
        emit_json({"name": started.name, "pid": started.pid, "accel": started.accel,
                   "gdb": started.gdb, "warm": started.warm})
    else:
        click.echo(started.name)


def foreground(vm: Any, verbose: bool = False) -> None:
    """Show the console live until the guest powers off or Ctrl-C, then stop the VM.

    After Ctrl-C the process exits with 130 (128 + SIGINT), as shells expect;
    a Ctrl-C at any moment after the start (even before the console shows) stops
    the VM the same way.
    """

    def show(chunk: bytes) -> None:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()

    interrupted = False
    try:
        _announce_accel(vm, verbose)
        click.echo(f"qemukit: {vm.name} running; console below, Ctrl-C stops it", err=True)
        click.echo(vm.console_tail(200), nl=False)
        vm.follow_console(show)
        vm.wait_exit()
    except KeyboardInterrupt:
        interrupted = True
        click.echo("", err=True)
    vm.follow_console(None)
    result = vm.shutdown(timeout=15)
    click.echo(f"qemukit: {vm.name} stopped ({result.rung.value})", err=True)
    if interrupted:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)


@click.command()
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the argv as a JSON list.")
@click.option("--detach", "-d", is_flag=True, help="As for run --detach.")
@click.option("--warm/--cold", "warm", default=None, help="As for run --warm/--cold.")
@click.option("--modules", type=click.Path(file_okay=False, exists=True),
              help="As for run --modules.")
@click.option("--verbose", "-v", is_flag=True, help="Say which machine, and why.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def cmdline(as_json: bool, detach: bool, warm: bool | None, modules: str | None, verbose: bool,
            command: tuple[str, ...], **opts: Any) -> None:
    """Print the QEMU command line a VM would run with, without starting it.

    Give it run's arguments (with -- CMD, --detach, --warm/--cold) and it prints
    what that run would spawn: the same request is resolved the same way (for a
    --kernel, the machine depends on them). A warm start spawns a restore of the
    saved state instead (-incoming); this shows the cold boot's command line.
    """
    from ..resolve import resolve
    from ..vm import preview_argv

    resolution = resolve(build_request(opts, purpose=_purpose(detach, command), warm=warm,
                                       modules=modules, record=False))
    if verbose:
        for line in resolution.describe():
            click.echo(f"# {line}", err=True)
    argv, notes = preview_argv(resolution.spec, detached=detach)
    if as_json:
        emit_json({"argv": argv, "notes": notes})
        return
    import shlex

    for note in notes:
        click.echo(f"# {note}", err=True)
    click.echo(shlex.join(argv))


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (run, cmdline,)
