"""The ``qemukit`` command: parsing, printing and exit codes over the library.

Every command reports a qemukit error the same way: :class:`QemukitGroup`
(the ``main`` group) catches it, prints ``qemukit: <message>`` and exits
with the code :data:`EXIT_CODES` gives its class; no command picks its own.
``run -- CMD``, ``exec`` and ``ssh`` otherwise exit with the command's own
status, so every error code of a class those can raise lies above 123.
The table is printed in ``qemukit --help`` and the README.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import errors
from .spec import DEFAULT_MEMORY_SLOTS, Share, VMSpec, parse_drive, parse_nic

F = TypeVar("F", bound=Callable[..., Any])

#: The VM refused the operation and is left as it was (or as the message says).
EXIT_REFUSED = 1
#: Bad command-line usage (click's own code).
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_ERROR = 125
#: Ctrl-C (SIGINT): the VM in the foreground was stopped first. 128 + SIGINT, as shells use.
EXIT_INTERRUPTED = 130
#: The guest kernel oopsed (or hit a BUG) and ran on; 255 when it panicked.
EXIT_OOPS = 254
EXIT_PANIC = 255

#: The exit code of each error class, for every command. A class missing here takes
#: the code of its nearest listed base class; a unit test keeps every class listed.
EXIT_CODES: dict[type[errors.QemukitError], int] = {
    errors.QemukitError: EXIT_ERROR,
    errors.SpecError: EXIT_ERROR,
    errors.HostError: EXIT_ERROR,
    errors.AcceleratorError: EXIT_ERROR,
    errors.LaunchError: EXIT_ERROR,
    errors.StateError: EXIT_ERROR,
    errors.HotplugError: EXIT_REFUSED,
    errors.SnapshotError: EXIT_REFUSED,
    errors.WaitTimeout: EXIT_TIMEOUT,
    errors.QMPError: EXIT_ERROR,
    errors.QMPCommandError: EXIT_REFUSED,
    errors.QMPConnectionError: EXIT_ERROR,
    errors.GuestError: EXIT_ERROR,
    errors.GuestPanic: EXIT_PANIC,
    errors.GuestOops: EXIT_OOPS,
    errors.ShareMountError: EXIT_ERROR,
    errors.GuestIOError: EXIT_ERROR,
    errors.AgentError: EXIT_ERROR,
}

def exit_code_for(exc: errors.QemukitError) -> int:
    """The exit code :data:`EXIT_CODES` gives ``exc``'s class (or its nearest base's)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_ERROR


def exit_codes_help() -> str:
    """The exit-code table as ``qemukit --help`` shows it, made from :data:`EXIT_CODES`."""

    def classes(code: int) -> str:
        return ", ".join(cls.__name__ for cls, c in EXIT_CODES.items()
                         if c == code and cls is not errors.QemukitError)

    rows = [
        (0, "success; run -- CMD, exec and ssh: the command's own status"),
        (EXIT_REFUSED, f"the VM refused the operation, the message says why ({classes(EXIT_REFUSED)}); "
                       "doctor: a problem was found"),
        (EXIT_USAGE, "bad command-line usage"),
        (EXIT_TIMEOUT, f"a wait timed out: boot, command, QEMU's reply ({classes(EXIT_TIMEOUT)})"),
        (EXIT_ERROR, "qemukit or QEMU failed: bad spec, missing host tool, QEMU refused to "
                     "start, VM not found or unreachable, a file it cannot write "
                     f"({classes(EXIT_ERROR)})"),
        (EXIT_INTERRUPTED, "interrupted (Ctrl-C); a VM in the foreground was stopped first"),
        (EXIT_OOPS, f"the guest kernel oopsed or hit a BUG and ran on, tainted "
                    f"({classes(EXIT_OOPS)}; run --continue-on-oops records it instead)"),
        (EXIT_PANIC, f"the guest kernel panicked ({classes(EXIT_PANIC)})"),
    ]
    import textwrap

    lines = ["Exit codes (every command):"]
    for code, text in rows:
        lines += textwrap.wrap(text, 78, initial_indent=f"  {code:<4} ", subsequent_indent=" " * 7)
    return "\n".join(lines)


def _report(exc: errors.QemukitError) -> None:
    click.echo(f"qemukit: {exc}", err=True)
    for note in getattr(exc, "__notes__", ()):
        click.echo(f"qemukit: {note}", err=True)


class QemukitGroup(click.Group):
    """The ``qemukit`` group: the one place where errors become exit codes.

    A :class:`~qemukit.errors.QemukitError` from any subcommand is printed as
    ``qemukit: <message>`` (no traceback) and ends the process with
    :func:`exit_code_for`; Ctrl-C ends it with 130 instead of click's 1. A
    file-system error about a path that no library call turned into a qemukit
    error (say ``--json`` into a missing directory) is one line and 125 too.
    """

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand, mapping its errors through :data:`EXIT_CODES`."""
        try:
            return super().invoke(ctx)
        except errors.QemukitError as exc:
            _report(exc)
            ctx.exit(exit_code_for(exc))
        except KeyboardInterrupt:
            click.echo("qemukit: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except OSError as exc:
            if exc.filename is None:
                raise  # not about a file the user named: a bug, keep its traceback
            click.echo(f"qemukit: {os.fsdecode(exc.filename)}: {exc.strerror or exc}", err=True)
            ctx.exit(EXIT_ERROR)


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def spec_options(func: F) -> F:
    """The options that describe a VM, shared by ``run`` and ``cmdline``."""
    options = [
        click.option("-f", "--file", "spec_file", type=click.Path(dir_okay=False),
                     help="Read the VM description from a TOML file."),
        click.option("--image", help="Start from a built-in image (tiny, debian)."),
        click.option("--name", help="VM name (unique among running VMs)."),
        click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]),
                     help="Accelerator; auto uses KVM only where a probe boot proved it works."),
        click.option("--machine", type=click.Choice(["q35", "pc", "microvm"])),
        click.option("--cpu", "cpu_model", help="CPU model (e.g. host, max, kvm64)."),
        click.option("--cpus", type=int, help="vCPUs at boot."),
        click.option("--max-cpus", type=int, help="vCPU limit for hotplug."),
        click.option("--memory", "-m", help="Memory, e.g. 512M or 2G."),
        click.option("--max-memory", help="Memory limit for hotplug, e.g. 2G; gives "
                     f"{DEFAULT_MEMORY_SLOTS} DIMM slots unless --slots says otherwise."),
        click.option("--slots", type=int, help="Memory hotplug (DIMM) slots; needs --max-memory "
                     f"[default with --max-memory: {DEFAULT_MEMORY_SLOTS}]."),
        click.option("--kernel", type=click.Path(dir_okay=False), help="Kernel to boot."),
        click.option("--initrd", type=click.Path(dir_okay=False), help="Initramfs."),
        click.option("--append", help="Kernel command line (replaces the image's)."),
        click.option("--disk", "disks", multiple=True, metavar="PATH[,opts]",
                     help="Add a disk: PATH[,format=qcow2|raw][,if=virtio-blk|virtio-scsi|nvme]"
                     "[,readonly][,overlay][,id=ID]; write ',' in PATH as ',,'."),
        click.option("--nic", "nics", multiple=True, metavar="user|tap[,opts]",
                     help="Add a NIC: user[,hostfwd=[ADDR:]HOST:GUEST] or tap,ifname=NAME."),
        click.option("--share", "shares", multiple=True, metavar="HOST:GUEST[,ro][,9p]",
                     help="Share a host directory, mounted in the guest at GUEST (virtiofs; "
                     "9p with ,9p)."),
        click.option("--run-as", help="Run QEMU as this user once it has started (for root)."),
        click.option("--qmp-tcp", "qmp_tcp_port", type=int, metavar="PORT",
                     help="Also serve QMP on 127.0.0.1:PORT (off by default; a warning is shown)."),
        click.option("--no-sandbox", is_flag=True, default=None,
                     help="Do not start QEMU under its seccomp sandbox."),
        click.option("--qemu-arg", "extra_args", multiple=True, metavar="ARG",
                     help="Extra raw argument for QEMU (repeatable)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def build_spec(opts: dict[str, Any]) -> VMSpec:
    """Combine -f FILE, --image and the per-field options into one spec."""
    from . import images

    if opts["spec_file"] and opts["image"]:
        raise errors.SpecError("image", opts["image"], "give either --image or -f, not both")
    if opts["spec_file"]:
        spec = VMSpec.load(opts["spec_file"])
    elif opts["image"]:
        spec = images.spec(opts["image"])
    elif opts["kernel"]:
        spec = images.spec("tiny", kernel=opts["kernel"])
    else:
        spec = VMSpec()
    changes: dict[str, Any] = {}
    for key, field in (("name", "name"), ("accel", "accel"), ("machine", "machine"),
                       ("cpu_model", "cpu"), ("cpus", "cpus"), ("max_cpus", "max_cpus"),
                       ("memory", "memory"), ("max_memory", "max_memory"), ("slots", "slots"),
                       ("kernel", "kernel"), ("initrd", "initrd"), ("append", "append"),
                       ("run_as", "run_as"), ("qmp_tcp_port", "qmp_tcp_port")):
        if opts.get(key) is not None:
            changes[field] = opts[key]
    if opts["disks"]:
        changes["drives"] = spec.drives + tuple(parse_drive(d) for d in opts["disks"])
    if opts["nics"]:
        changes["nics"] = spec.nics + tuple(parse_nic(n) for n in opts["nics"])
    if opts.get("shares"):
        changes["shares"] = spec.shares + tuple(Share.parse(sh) for sh in opts["shares"])
    if opts["no_sandbox"]:
        changes["sandbox"] = False
    if opts["extra_args"]:
        changes["extra_args"] = spec.extra_args + tuple(opts["extra_args"])
    return spec.replace(**changes) if changes else spec


@click.group(cls=QemukitGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\n" + exit_codes_help())
@click.version_option(package_name="qemukit")
def main() -> None:
    """Launch and control QEMU virtual machines, without libvirt."""


@main.command(context_settings={"ignore_unknown_options": False})
@spec_options
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds for boot plus command; a hung guest ends with exit 124.")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
              help="Write the result as JSON to FILE, or to stdout when no FILE is given.")
@click.option("--junit", type=click.Path(dir_okay=False), help="Write a JUnit XML report.")
@click.option("--console-log", type=click.Path(dir_okay=False),
              help="Keep a copy of the guest's whole console log here.")
@click.option("--modules", type=click.Path(file_okay=False, exists=True),
              help="Kernel modules for --kernel (make modules_install INSTALL_MOD_PATH=DIR).")
@click.option("--detach", "-d", is_flag=True,
              help="Start the VM in the background, print its name and return.")
@click.option("--wait", "wait_for", type=click.Choice(["qmp", "agent", "ssh"]), default="qmp",
              show_default=True, help="With --detach: return once QMP answers, the guest agent "
              "answers, or ssh logs in.")
@click.option("--keep", is_flag=True, help="Keep the disk changes (overlays) under the VM's name; "
              "a later --keep run of that name boots them again.")
@click.option("--user-data", type=click.Path(exists=True, dir_okay=False),
              help="cloud-init user-data file, passed to the guest as it is.")
@click.option("--ssh-key", type=click.Path(exists=True, dir_okay=False),
              help="SSH public key to authorize in the guest (default: a keypair made per VM).")
@click.option("--continue-on-oops", is_flag=True,
              help="With -- CMD: a kernel oops or BUG is recorded, not fatal; CMD runs on.")
@click.option("--verbose", "-v", is_flag=True,
              help="Explain the accelerator choice in full (as qemukit doctor does).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(timeout: float, json_out: str | None, junit: str | None, console_log: str | None,
        modules: str | None, detach: bool, wait_for: str, continue_on_oops: bool, verbose: bool,
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
    from .cli_guest import apply_run_options
    from .vm import VM

    spec = apply_run_options(build_spec(opts), opts)
    if detach:
        if command:
            raise errors.SpecError("command", list(command), "--detach takes no command; "
                                   "use 'qemukit exec NAME -- CMD'")
        _run_detached(spec, timeout, wait_for, json_out == "-")
        return
    if not command:
        vm = VM(spec, boot_timeout=timeout)
        vm.start()
        _announce_accel(vm, verbose)
        _foreground(vm)
        return
    from .kernel import run_in_vm

    def announce(vm: VM) -> None:
        if json_out != "-":
            _announce_accel(vm, verbose)

    result = run_in_vm(spec, list(command), timeout=timeout, console_log=console_log,
                       modules=modules, on_started=announce, continue_on_oops=continue_on_oops)
    if json_out is not None:
        if json_out == "-":
            _emit_json(result.to_dict())
        else:
            result.write_json(json_out)
    if junit is not None:
        result.write_junit(junit)
    if json_out != "-":
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
    if json_out != "-":
        from .console import classify

        for line in result.warnings:
            event = classify(line)
            kind = "oops (continued past)" if event and event.kind == "oops" else "warning"
            click.echo(f"qemukit: guest kernel {kind}: {line}", err=True)
    if result.outcome == "panic":
        click.echo(f"qemukit: guest kernel panic: {result.panic}\n--- console ---\n"
                   f"{result.console_tail}", err=True)
    elif result.outcome == "oops":
        click.echo(f"qemukit: guest kernel oops (it kept running; --continue-on-oops runs on): "
                   f"{result.oops}\n--- console ---\n{result.console_tail}", err=True)
    elif result.outcome in ("timeout", "error"):
        tail = f"\n--- console ---\n{result.console_tail}" if result.outcome == "timeout" else ""
        click.echo(f"qemukit: {result.error}{tail}", err=True)
    sys.exit({"panic": EXIT_PANIC, "oops": EXIT_OOPS, "timeout": EXIT_TIMEOUT,
              "error": EXIT_ERROR}.get(result.outcome, result.exit_status or 0))


def _announce_accel(vm: Any, verbose: bool) -> None:
    """One line on stderr: the accelerator in short, or with the whole reason under -v."""
    if vm.accel is not None:
        text = vm.accel.reason if verbose else vm.accel.summary
        click.echo(f"qemukit: {vm.name}: {text}", err=True)


def _run_detached(spec: VMSpec, timeout: float, wait_for: str, as_json: bool) -> None:
    from .vm import VM

    vm = VM(spec, die_with_parent=False, boot_timeout=timeout)
    try:
        vm.start()
        if wait_for == "agent":
            vm.wait_ready(timeout)
        elif wait_for == "ssh":
            vm.wait_ssh(timeout)
    except BaseException:
        # Nobody would own a VM left running here: end it, then report why.
        if vm.state.value == "running":
            vm.kill()
        raise
    name, pid, accel = vm.name, vm.pid, vm.accel
    vm.detach()
    if as_json:
        _emit_json({"name": name, "pid": pid, "accel": accel.accel if accel else None})
    else:
        click.echo(name)


def _foreground(vm: Any) -> None:
    """Show the console live until the guest powers off or Ctrl-C, then stop the VM.

    After Ctrl-C the process exits with 130 (128 + SIGINT), as shells expect.
    """
    click.echo(f"qemukit: {vm.name} running; console below, Ctrl-C stops it", err=True)
    click.echo(vm.console_tail(200), nl=False)

    def show(chunk: bytes) -> None:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()

    vm.follow_console(show)
    interrupted = False
    try:
        vm.wait_exit()
    except KeyboardInterrupt:
        interrupted = True
        click.echo("", err=True)
    vm.follow_console(None)
    result = vm.shutdown(timeout=15)
    click.echo(f"qemukit: {vm.name} stopped ({result.rung.value})", err=True)
    if interrupted:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)


@main.command()
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the argv as a JSON list.")
def cmdline(as_json: bool, **opts: Any) -> None:
    """Print the QEMU command line a VM would run with, without starting it."""
    from .vm import preview_argv

    argv, notes = preview_argv(build_spec(opts))
    if as_json:
        _emit_json({"argv": argv, "notes": notes})
        return
    import shlex

    for note in notes:
        click.echo(f"# {note}", err=True)
    click.echo(shlex.join(argv))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--reprobe", is_flag=True, help="Ignore the cached KVM probe result.")
def doctor(as_json: bool, reprobe: bool) -> None:
    """Report QEMU, KVM (with the probe boot's verdict), firmware and images."""
    from . import host, images
    from .paths import cache_dir, state_dir

    report: dict[str, Any] = {"cache_dir": str(cache_dir()), "state_dir": str(state_dir())}
    problems = 0
    try:
        qemu = host.find_qemu()
        report["qemu"] = {"path": qemu.path, "version": qemu.version_string,
                          "sandbox": qemu.has_sandbox, "qemu_img": qemu.qemu_img,
                          "machines": sorted(m for m in qemu.machines if m in
                                             ("q35", "pc", "microvm"))}
    except errors.HostError as exc:
        report["qemu"] = {"error": str(exc)}
        qemu = None
        problems += 1
    tiny = images.find_image("tiny")
    report["images"] = {"tiny": str(tiny.directory) if tiny else None}
    device_ok, device_reason = host.kvm_device_status()
    kvm: dict[str, Any] = {"device": device_ok, "device_reason": device_reason}
    if qemu is not None:
        probe = (str(tiny.kernel), str(tiny.initrd)) if tiny else None
        status = host.kvm_status(qemu, probe, use_cache=not reprobe)
        kvm.update(usable=status.usable, probed=status.probed, reason=status.reason)
        if status.probed and not status.usable:
            kvm["probe_console_tail"] = status.console
    report["kvm"] = kvm
    report["accel_auto"] = "kvm" if kvm.get("usable") else "tcg"
    ovmf = host.find_ovmf()
    report["firmware"] = {"seabios": "built into QEMU",
                          "ovmf": list(ovmf) if ovmf else None}
    if as_json:
        _emit_json(report)
    else:
        q = report["qemu"]
        click.echo(f"QEMU:      {q.get('path')} {q.get('version', '')}" if "path" in q
                   else f"QEMU:      MISSING: {q['error']}")
        if "path" in q:
            click.echo(f"           sandbox: {'yes' if q['sandbox'] else 'no'}; "
                       f"qemu-img: {q['qemu_img'] or 'MISSING'}")
        click.echo(f"KVM:       {'usable' if kvm.get('usable') else 'not used'}: "
                   f"{kvm.get('reason', device_reason)}")
        click.echo(f"auto:      {report['accel_auto']}")
        click.echo(f"firmware:  SeaBIOS (built in); OVMF: {ovmf[0] if ovmf else 'not installed'}")
        click.echo(f"tiny:      {tiny.directory if tiny else 'not built (qemukit images build tiny)'}")
        click.echo(f"cache:     {report['cache_dir']}")
        click.echo(f"state:     {report['state_dir']}")
    sys.exit(1 if problems else 0)


@main.group(name="images")
def images_group() -> None:
    """Build and list the built-in guest images."""


@images_group.command(name="build")
@click.argument("name", type=click.Choice(["tiny", "debian"]))
@click.option("--force", is_flag=True, help="Rebuild even if already built.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def images_build(name: str, force: bool, as_json: bool) -> None:
    """Build an image from Debian's packages into the cache (once)."""
    from . import images

    start = time.monotonic()
    image = images.build(name, force=force, progress=lambda msg: click.echo(f"  {msg}", err=True))
    from .cli_guest import image_summary

    summary = image_summary(image)
    if as_json:
        _emit_json({"name": name, "directory": str(image.directory), "kernel": str(image.kernel),
                    "initrd": str(image.initrd), "seconds": round(time.monotonic() - start, 1),
                    **summary})
    else:
        if "disk" in summary:
            click.echo(f"  {name}: {summary['disk_bytes'] / 2**20:.0f} MiB qcow2, built in "
                       f"{summary['build_seconds']:.0f}s", err=True)
        click.echo(str(image.directory))


@images_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def images_list(as_json: bool) -> None:
    """List the built-in images and whether they are built."""
    from . import images

    rows = {n: images.find_image(n) for n in images.NAMES}
    if as_json:
        _emit_json({n: (str(i.directory) if i else None) for n, i in rows.items()})
        return
    for n, i in rows.items():
        click.echo(f"{n:8} {i.directory if i else 'not built'}")


# -- detached VMs -------------------------------------------------------------


def _complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    from .state import list_entries

    try:
        entries = list_entries()
    except OSError:  # an unreadable registry just offers nothing to complete
        return []
    return [rd.name for rd, _ in entries if rd.name.startswith(incomplete)]


def _name_argument(func: F) -> F:
    return click.argument("name", shell_complete=_complete_names)(func)


def _attach(name: str, timeout: float = 30.0) -> Any:
    from .vm import VM

    return VM.attach(name, timeout=timeout)


def _human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n //= 1024
    return f"{n}T"


@main.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def ls_command(as_json: bool) -> None:
    """List VMs: name, pid, state (from QMP), accelerator, uptime, CPU %, RSS, ports."""
    from .registry import list_vms

    vms = list_vms()
    if as_json:
        _emit_json([vm.to_dict() for vm in vms])
        return
    click.echo(f"{'NAME':20} {'PID':>8} {'STATE':12} {'ACCEL':5} {'UPTIME':>8} {'CPU%':>6} "
               f"{'RSS':>6}  PORTS")
    for vm in vms:
        state = vm.state + (" (orphan)" if vm.orphaned else "")
        uptime = f"{vm.uptime:.0f}s" if vm.uptime is not None else "-"
        cpu = f"{vm.cpu_percent:.1f}" if vm.cpu_percent is not None else "-"
        click.echo(f"{vm.name:20} {vm.pid or '-':>8} {state:12} {vm.accel or '-':5} {uptime:>8} "
                   f"{cpu:>6} {_human_bytes(vm.rss):>6}  {', '.join(vm.forwards)}")


@main.command()
@_name_argument
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds for the guest's own (ACPI) shutdown before falling back.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def stop(name: str, timeout: float, as_json: bool) -> None:
    """Stop a VM through the ladder (ACPI, quit, SIGTERM, SIGKILL); prints the rung that worked."""
    try:
        vm = _attach(name)
    except (errors.QMPError, errors.WaitTimeout) as exc:
        # The ladder starts on QMP; a QEMU that cannot be reached there can still be killed.
        exc.add_note(f"its QMP monitor does not answer; 'qemukit kill {name}' ends it with SIGKILL")
        raise
    result = vm.shutdown(timeout=timeout)
    if as_json:
        _emit_json({"name": name, "rung": result.rung.value, "elapsed": round(result.elapsed, 3),
                    "tried": [r.value for r in result.tried]})
    else:
        click.echo(f"{name}: stopped by {result.rung.value} after {result.elapsed:.1f}s")


@main.command()
@_name_argument
def kill(name: str) -> None:
    """SIGKILL a VM's QEMU at once (no QMP needed) and remove its entry."""
    from .paths import state_dir
    from .registry import kill_verified
    from .state import RuntimeDir

    rd = RuntimeDir(state_dir() / name)
    info = rd.read_info()
    if info is None:
        raise errors.StateError(f"no VM named {name!r} in {rd.path.parent}")
    kill_verified(info)
    rd.remove()
    click.echo(f"{name}: killed")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def gc(as_json: bool) -> None:
    """Remove entries of dead VMs; kill QEMUs whose owner died (die-with-parent VMs)."""
    from .registry import gc as run_gc

    actions = run_gc()
    if as_json:
        _emit_json([a.__dict__ for a in actions])
        return
    for a in actions:
        click.echo(f"{a.name}: {a.action} ({a.detail})")
    if not actions:
        click.echo("nothing to clean")


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@_name_argument
@click.option("--timeout", type=float, default=300.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_command(name: str, timeout: float, as_json: bool, command: tuple[str, ...]) -> None:
    """Run CMD in a running VM's guest; exit with its status."""
    vm = _attach(name)
    try:
        result = vm.exec(list(command), timeout=timeout)
    finally:
        vm.detach()
    if as_json:
        _emit_json({"exit_status": result.exit_status, "stdout": result.stdout_text,
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


@main.command(name="qmp")
@_name_argument
@click.argument("command")
@click.argument("arguments", required=False, callback=_json_object)
def qmp_command(name: str, command: str, arguments: dict[str, Any] | None) -> None:
    """Send a raw QMP command; ARGUMENTS is a JSON object. Prints the reply as JSON.

    QMP errors exit 1 with QEMU's error class and message.
    """
    vm = _attach(name)
    try:
        reply = vm.qmp(command, arguments)
    finally:
        vm.detach()
    _emit_json(reply)


@main.command()
@_name_argument
@click.option("-f", "--follow", is_flag=True, help="Keep printing new console output.")
@click.option("--qemu", "qemu_log", is_flag=True, help="Show QEMU's own output instead.")
@click.option("-n", "--lines", type=int, default=0, help="Only the last N lines (0: all).")
def logs(name: str, follow: bool, qemu_log: bool, lines: int) -> None:
    """Print a VM's console log (or QEMU's own output with --qemu)."""
    from .paths import state_dir
    from .state import RuntimeDir

    rd = RuntimeDir(state_dir() / name)
    path = rd.qemu_log if qemu_log else rd.console_log
    if not path.exists():
        raise errors.StateError(f"no log for VM {name!r} at {path}")
    data = path.read_bytes()
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


@main.command()
@_name_argument
def console(name: str) -> None:
    """Attach to a VM's serial console. Press Ctrl-] to detach (the VM keeps running)."""
    from .paths import state_dir
    from .state import RuntimeDir

    rd = RuntimeDir(state_dir() / name)
    if rd.read_info() is None:
        raise errors.StateError(f"no VM named {name!r} in {rd.path.parent}")
    _stream_console(rd.console_socket, interactive=True,
                    banner=f"qemukit: connected to {name}'s console; Ctrl-] detaches")
    click.echo("\r\nqemukit: detached", err=True)


from . import cli_hotplug  # noqa: E402,F401

from . import cli_snapshot  # noqa: E402,F401  # isort: skip
from . import cli_guest  # noqa: E402,F401
