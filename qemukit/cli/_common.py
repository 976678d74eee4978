"""What every command shares: the ``main`` group, the one exit-code table, spec options, attaching to a VM."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .. import errors

if TYPE_CHECKING:
    from ..resolve import Purpose, Request
    from ..results import Outcome
    from ..spec import VMSpec

# The spec module (and arch) are imported by the functions that use them, not here:
# `qemukit --help` and `qemukit ls` do not need them (tests/unit/test_imports.py).

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
    errors.CommandFailed: EXIT_ERROR,
    errors.GuestPanic: EXIT_PANIC,
    errors.GuestOops: EXIT_OOPS,
    errors.ShareMountError: EXIT_ERROR,
    errors.GuestIOError: EXIT_ERROR,
    errors.AgentError: EXIT_ERROR,
}


def exit_code_for(exc: errors.QemukitError | type[errors.QemukitError]) -> int:
    """The exit code :data:`EXIT_CODES` gives ``exc``'s class (or its nearest base's)."""
    for cls in (exc if isinstance(exc, type) else type(exc)).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return EXIT_ERROR


def exit_code_for_outcome(outcome: Outcome, exit_status: int | None = None) -> int:
    """The exit code of one run that ended with ``outcome`` (``run -- CMD``).

    The command's own ``exit_status`` when it ran to its end (passed, failed);
    otherwise the code :data:`EXIT_CODES` gives the error the outcome stands
    for (:attr:`~qemukit.results.Outcome.error_class`: a panic exits as a
    GuestPanic does, a timeout as a WaitTimeout), so both say the same.
    """
    error = outcome.error_class
    return (exit_status or 0) if error is None else exit_code_for(error)


def exit_code_for_outcomes(outcomes: Iterable[Outcome], *, complete: bool = True) -> int:
    """The exit code of many runs (``matrix``): 0 when every one ran and passed, else
    :data:`EXIT_REFUSED` (the run is a verdict, not an error of qemukit's)."""
    from ..results import Outcome

    passed = all(o is Outcome.PASSED for o in outcomes)
    return 0 if passed and complete else EXIT_REFUSED


def exit_codes_help() -> str:
    """The exit-code table as ``qemukit --help`` shows it, made from :data:`EXIT_CODES`."""

    def classes(code: int) -> str:
        return ", ".join(cls.__name__ for cls, c in EXIT_CODES.items()
                         if c == code and cls is not errors.QemukitError)

    rows = [
        (0, "success; run -- CMD, exec and ssh: the command's own status"),
        (EXIT_REFUSED, f"the VM refused the operation, the message says why ({classes(EXIT_REFUSED)}); "
                       "doctor: a problem was found; matrix: a job did not pass"),
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


def report(exc: errors.QemukitError) -> None:
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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Commands imported on first use: name -> (their module in qemukit.cli, the first
        #: paragraph of their help, which ``--help`` shows without importing them).
        self.lazy_commands: dict[str, tuple[str, str]] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Every command's name, the ones not imported yet included."""
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        """The command ``cmd_name``, importing its module (and only that one) on first use."""
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            import importlib

            module = importlib.import_module(f"{__package__}.{self.lazy_commands[cmd_name][0]}")
            for command in module.COMMANDS:
                self.commands.setdefault(command.name or "", command)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list of ``--help``, from :attr:`lazy_commands` for the ones not imported."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            # Not imported yet: a stand-in with its help shortens it the way click does.
            command = self.commands.get(name) or click.Command(name, help=self.lazy_commands[name][1])
            if not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        """Run the subcommand, mapping its errors through :data:`EXIT_CODES`."""
        try:
            return super().invoke(ctx)
        except errors.QemukitError as exc:
            report(exc)
            ctx.exit(exit_code_for(exc))
        except KeyboardInterrupt:
            click.echo("qemukit: interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except OSError as exc:
            if exc.filename is None:
                raise  # not about a file the user named: a bug, keep its traceback
            click.echo(f"qemukit: {os.fsdecode(exc.filename)}: {exc.strerror or exc}", err=True)
            ctx.exit(EXIT_ERROR)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def spec_options(func: F) -> F:
    """The options that describe a VM, shared by ``run`` and ``cmdline``."""
    from ..arch import ARCHES
    from ..spec import DEFAULT_MEMORY_SLOTS

    options = [
        click.option("-f", "--file", "spec_file", type=click.Path(dir_okay=False),
                     help="Read the VM description from a TOML file or a built-in template "
                     "(qemukit templates ls)."),
        click.option("--image", help="Start from a built-in image (tiny, debian) or an imported one."),
        click.option("--name", help="VM name (unique among running VMs)."),
        click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]),
                     help="Accelerator; auto uses KVM only where a probe boot proved it works."),
        click.option("--arch", type=click.Choice(list(ARCHES)),
                     help="Guest architecture [default: x86_64]; a foreign one runs under TCG."),
        click.option("--machine", type=click.Choice(
            ["q35", "pc", "microvm", "virt", "s390-ccw-virtio", "pseries"])),
        click.option("--cpu", "cpu_model", help="CPU model (e.g. host, max, kvm64)."),
        click.option("--cpus", type=int, help="vCPUs at boot."),
        click.option("--max-cpus", type=int, help="vCPU limit for hotplug."),
        click.option("--memory", "-m", help="Memory, e.g. 512M or 2G."),
        click.option("--max-memory", help="Memory limit for hotplug, e.g. 2G; gives "
                     f"{DEFAULT_MEMORY_SLOTS} DIMM slots unless --slots says otherwise."),
        click.option("--slots", type=int, help="Memory hotplug (DIMM) slots; needs --max-memory "
                     f"[default with --max-memory: {DEFAULT_MEMORY_SLOTS}]."),
        click.option("--kernel", type=click.Path(), help="Kernel to boot: an image file, or a "
                     "built kernel tree (its arch/*/boot image; the tree's modules are installed "
                     "into the initramfs)."),
        click.option("--initrd", type=click.Path(dir_okay=False), help="Initramfs."),
        click.option("--append", help="Kernel command line (replaces the image's)."),
        click.option("--disk", "disks", multiple=True, metavar="PATH[,opts]",
                     help="Add a disk: PATH[,format=qcow2|raw][,if=virtio-blk|virtio-scsi|nvme]"
                     "[,readonly][,overlay][,id=ID][,backing=FORMAT:PATH]...; write ',' in PATH "
                     "as ',,'. format= is used as given; unset, it is probed at the first start "
                     "and recorded. A qcow2's backing files must be named with backing=."),
        click.option("--nic", "nics", multiple=True, metavar="user|tap[,opts]",
                     help="Add a NIC: user[,hostfwd=[ADDR:]HOST:GUEST] or tap,ifname=NAME."),
        click.option("--net", "networks", multiple=True, metavar="NAME",
                     help="Join the private network NAME (repeatable): a NIC net-NAME shared "
                     "with your other VMs on it, its address and their names written into the "
                     "guest; the host is not on it."),
        click.option("--share", "shares", multiple=True, metavar="HOST:GUEST[,ro][,9p]",
                     help="Share a host directory, mounted in the guest at GUEST (virtiofs; "
                     "9p with ,9p)."),
        click.option("--rootfs", type=click.Choice(["image", "host"]), default="image",
                     show_default=True, help="host: the guest's root is the host's / (read-only; "
                     "changes stay in guest memory) and the command starts in this directory."),
        click.option("--rw", "rw_dirs", multiple=True, metavar="DIR",
                     type=click.Path(file_okay=False),
                     help="With --rootfs host: DIR is writable, on the host, at its own path."),
        click.option("--run-as", help="Run QEMU as this user once it has started (for root)."),
        click.option("--gdb", "gdb", is_flag=False, flag_value="unix", default=None,
                     metavar="[tcp:PORT]", help="Expose QEMU's gdb stub on a Unix socket only "
                     "you can reach; tcp:PORT puts it on 127.0.0.1:PORT instead (0: a free port; "
                     "any local user could then control the VM). The gdb command is printed."),
        click.option("--gdb-wait", "gdb_wait", is_flag=True, default=None,
                     help="With --gdb: keep the vCPUs halted until gdb continues them."),
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


def parse_gdb(value: str) -> dict[str, Any]:
    """``--gdb``'s value as spec fields: ``unix`` (the default) or ``tcp:PORT``."""
    kind, sep, port = value.partition(":")
    if value == "unix":
        return {"gdb": True}
    if kind == "tcp" and sep and port.isdigit():
        return {"gdb": True, "gdb_port": int(port)}
    raise errors.SpecError("gdb", value, "expected nothing (a Unix socket only you can reach) or "
                           "tcp:PORT (127.0.0.1:PORT, reachable by every local user; 0: a free "
                           "port)")


def build_request(opts: dict[str, Any], *, purpose: Purpose = "interactive",
                  warm: bool | None = None, modules: str | None = None,
                  record: bool = True, forward_auto: bool | None = None) -> Request:
    """The request that -f FILE, --image, --kernel and the per-field options make.

    ``run`` and ``cmdline`` both resolve it (:func:`qemukit.resolve.resolve`), so what
    ``cmdline`` prints is what ``run`` spawns. No rule about the VM lives here.
    """
    from ..resolve import Request
    from ..spec import HostRoot, Share, parse_drive, parse_nic

    if opts["spec_file"] and opts["image"]:
        raise errors.SpecError("image", opts["image"], "give either --image or -f, not both")
    changes: dict[str, Any] = {}
    for key, field in (("name", "name"), ("accel", "accel"), ("machine", "machine"),
                       ("cpu_model", "cpu"), ("cpus", "cpus"), ("max_cpus", "max_cpus"),
                       ("memory", "memory"), ("max_memory", "max_memory"), ("slots", "slots"),
                       ("initrd", "initrd"), ("append", "append"),
                       ("run_as", "run_as"), ("qmp_tcp_port", "qmp_tcp_port"),
                       ("gdb_wait", "gdb_wait")):
        if opts.get(key) is not None:
            changes[field] = opts[key]
    kernel = opts.get("kernel")
    if kernel is not None and (opts["spec_file"] or opts["image"]):
        changes["kernel"] = kernel  # the kernel of that spec or image, replaced
        kernel = None
    if opts.get("gdb") is not None:
        changes.update(parse_gdb(opts["gdb"]))
    extra: dict[str, tuple[Any, ...]] = {}
    if opts["disks"]:
        extra["drives"] = tuple(parse_drive(d) for d in opts["disks"])
    if opts["nics"]:
        extra["nics"] = tuple(parse_nic(n) for n in opts["nics"])
    if opts.get("networks"):
        extra["networks"] = tuple(opts["networks"])
    if opts.get("shares"):
        extra["shares"] = tuple(Share.parse(sh) for sh in opts["shares"])
    if opts["extra_args"]:
        extra["extra_args"] = tuple(opts["extra_args"])
    if opts["no_sandbox"]:
        changes["sandbox"] = False
    if forward_auto is not None:  # validated by the spec: a user network and an agent
        changes["forward_auto"] = forward_auto
    if opts.get("rootfs") == "host":
        try:
            changes["host_root"] = HostRoot(rw=tuple(opts.get("rw_dirs") or ()))
        except errors.SpecError as exc:
            raise errors.SpecError("rw", exc.value, exc.reason) from exc
    elif opts.get("rw_dirs"):
        raise errors.SpecError("rw", opts["rw_dirs"][0], "--rw needs --rootfs host")
    seed = {}
    if opts.get("user_data") is not None:
        seed["user_data"] = os.path.abspath(opts["user_data"])
    if opts.get("ssh_key") is not None:
        seed["ssh_key"] = os.path.abspath(opts["ssh_key"])
    return Request(image=opts["image"], spec_file=opts["spec_file"], kernel=kernel,
                   arch=opts.get("arch"), overrides=changes, appended=extra, warm=warm,
                   purpose=purpose, modules=modules, seed=seed, record=record)


def build_spec(opts: dict[str, Any], *, purpose: Purpose = "interactive",
               warm: bool | None = None) -> VMSpec:
    """The spec the options describe, resolved as ``run`` resolves it (see :func:`build_request`).

    A command that runs the kernel once and judges it (``kunit``, ``bisect``) asks for
    ``purpose="command"``, as ``run --kernel K -- CMD`` does, so it boots the same machine.
    """
    from ..resolve import resolve

    return resolve(build_request(opts, purpose=purpose, warm=warm)).spec


@click.group(cls=QemukitGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\n" + exit_codes_help())
@click.version_option(package_name="qemukit")
@click.option("-v", "--verbose", "verbosity", count=True,
              help="Show qemukit's log on stderr: -v its steps, -vv every detail (each "
              "process spawned with its argv and pid, QMP, hotplug, snapshots).")
def main(verbosity: int) -> None:
    """Launch and control QEMU virtual machines, without libvirt."""
    # The library's warnings (a TCP gdb stub or QMP port anyone local can reach) as one
    # line each, not Python's file:line form with a source line from asyncio's loop.
    warnings.formatwarning = _one_line_warning
    if verbosity:
        show_log(logging.INFO if verbosity == 1 else logging.DEBUG)
    from ..paths import invoking_user

    if invoking_user() is not None:  # under sudo: what lands in the user's cache is theirs
        click.get_current_context().call_on_close(_hand_over_quietly)


def show_log(level: int) -> None:
    """Print the ``qemukit`` loggers' records from ``level`` up on stderr, for this command.

    The logger's level and handler are put back when the command ends (the
    CLI can be invoked more than once in one process: tests, ``--help``).
    """
    logger = logging.getLogger("qemukit")
    handler = logging.StreamHandler()  # sys.stderr as it is now
    handler.setFormatter(logging.Formatter("qemukit: %(name)s: %(message)s"))
    previous = logger.level
    logger.setLevel(level)
    logger.addHandler(handler)

    def restore() -> None:
        logger.removeHandler(handler)
        logger.setLevel(previous)

    click.get_current_context().call_on_close(restore)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    return f"qemukit: warning: {message}\n"


def _hand_over_quietly() -> None:
    from ..paths import hand_over_cache

    with contextlib.suppress(errors.QemukitError, OSError):
        hand_over_cache()


def complete_names(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    from .._launch.runtime import list_entries

    try:
        entries = list_entries()
    except (OSError, errors.QemukitError):  # an unreadable or refused registry: nothing
        return []
    return [rd.name for rd, _ in entries if rd.name.startswith(incomplete)]


def name_argument(func: F) -> F:
    return click.argument("name", shell_complete=complete_names)(func)


def attach_vm(name: str, timeout: float = 30.0) -> Any:
    """Take control of the running VM ``name`` (``VM.attach``)."""
    from ..vm import VM

    return VM.attach(name, timeout=timeout)


@contextlib.contextmanager
def attached(name: str, timeout: float = 30.0) -> Iterator[Any]:
    """``with attached(NAME) as vm:`` the VM for the block; let go of it (never stop it) after."""
    vm = attach_vm(name, timeout)
    try:
        yield vm
    finally:
        vm.detach()


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if n < 1024:
            return f"{n:.0f}{unit}"
        n //= 1024
    return f"{n}T"
