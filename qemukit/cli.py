"""The ``qemukit`` command: parsing, printing and exit codes over the library.

Exit codes of ``qemukit run -- CMD``: the guest command's own status
(0-255), except 124 when a wait timed out (boot or command), 125 when
qemukit itself failed (bad option, QEMU refused to start), and 255 when the
guest kernel panicked. These are also listed in ``qemukit run --help``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from . import errors
from .spec import VMSpec, parse_drive, parse_nic

F = TypeVar("F", bound=Callable[..., Any])

EXIT_TIMEOUT = 124
EXIT_ERROR = 125
EXIT_PANIC = 255


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _fail(exc: BaseException, code: int = EXIT_ERROR) -> None:
    click.echo(f"qemukit: {exc}", err=True)
    sys.exit(code)


def spec_options(func: F) -> F:
    """The options that describe a VM, shared by ``run`` and ``cmdline``."""
    options = [
        click.option("-f", "--file", "spec_file", type=click.Path(dir_okay=False),
                     help="Read the VM description from a TOML file."),
        click.option("--image", help="Start from a built-in image (tiny)."),
        click.option("--name", help="VM name (unique among running VMs)."),
        click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]),
                     help="Accelerator; auto uses KVM only where a probe boot proved it works."),
        click.option("--machine", type=click.Choice(["q35", "pc", "microvm"])),
        click.option("--cpu", "cpu_model", help="CPU model (e.g. host, max, kvm64)."),
        click.option("--cpus", type=int, help="vCPUs at boot."),
        click.option("--max-cpus", type=int, help="vCPU limit for hotplug."),
        click.option("--memory", "-m", help="Memory, e.g. 512M or 2G."),
        click.option("--max-memory", help="Memory limit for hotplug (needs --slots)."),
        click.option("--slots", type=int, help="Memory hotplug slots."),
        click.option("--kernel", type=click.Path(dir_okay=False), help="Kernel to boot."),
        click.option("--initrd", type=click.Path(dir_okay=False), help="Initramfs."),
        click.option("--append", help="Kernel command line (replaces the image's)."),
        click.option("--disk", "disks", multiple=True, metavar="PATH[,opts]",
                     help="Add a disk: PATH[,format=qcow2|raw][,if=virtio-blk|virtio-scsi|nvme]"
                     "[,readonly][,overlay][,id=ID]; write ',' in PATH as ',,'."),
        click.option("--nic", "nics", multiple=True, metavar="user|tap[,opts]",
                     help="Add a NIC: user[,hostfwd=[ADDR:]HOST:GUEST] or tap,ifname=NAME."),
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
                       ("kernel", "kernel"), ("initrd", "initrd"), ("append", "append")):
        if opts.get(key) is not None:
            changes[field] = opts[key]
    if opts["disks"]:
        changes["drives"] = spec.drives + tuple(parse_drive(d) for d in opts["disks"])
    if opts["nics"]:
        changes["nics"] = spec.nics + tuple(parse_nic(n) for n in opts["nics"])
    if opts["no_sandbox"]:
        changes["sandbox"] = False
    if opts["extra_args"]:
        changes["extra_args"] = spec.extra_args + tuple(opts["extra_args"])
    return spec.replace(**changes) if changes else spec


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qemukit")
def main() -> None:
    """Launch and control QEMU virtual machines, without libvirt.

    \b
    Exit codes: 0 success (run: the guest command's status), 1 usage or
    operation error, 124 a wait timed out, 125 qemukit failed (bad spec,
    QEMU refused to start), 255 the guest kernel panicked.
    """


@main.command(context_settings={"ignore_unknown_options": False})
@spec_options
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds for boot plus command; a hung guest ends with exit 124.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(timeout: float, as_json: bool, command: tuple[str, ...], **opts: Any) -> None:
    """Boot a VM; with -- CMD, run CMD in the guest, print its output, stop, exit with its code.

    \b
    Examples:
      qemukit run --image tiny -- uname -r
      qemukit run --kernel arch/x86/boot/bzImage -- sh -c 'dmesg | tail'
    Without CMD the VM runs in the foreground with its console on stdout
    until the guest powers off or you press Ctrl-C.

    \b
    Exit codes: the command's status; 124 timeout; 125 qemukit error;
    255 guest kernel panic.
    """
    from .vm import VM

    try:
        spec = build_spec(opts)
    except errors.QemukitError as exc:
        _fail(exc)
    deadline = time.monotonic() + timeout
    vm = VM(spec, boot_timeout=timeout)
    result_json: dict[str, Any] = {"name": None, "command": list(command)}
    code = 0
    try:
        vm.start()
        result_json["name"] = vm.name
        accel = vm.accel
        if accel is not None and not as_json:
            click.echo(f"qemukit: {vm.name}: {accel.reason}", err=True)
        if not command:
            _foreground(vm)
            return
        boot_time = vm.wait_ready(max(1.0, deadline - time.monotonic()))
        result = vm.exec(list(command), timeout=max(1.0, deadline - time.monotonic()))
        code = result.exit_status
        if as_json:
            result_json.update(
                exit_status=code, stdout=result.stdout_text, stderr=result.stderr_text,
                boot_time=round(boot_time, 3), accel=accel.accel if accel else None,
                console_log=str(vm.console_log),
            )
        else:
            sys.stdout.buffer.write(result.stdout)
            sys.stdout.flush()
            sys.stderr.buffer.write(result.stderr)
            sys.stderr.flush()
    except errors.GuestPanic as exc:
        code = EXIT_PANIC
        result_json.update(panic=exc.line, console=exc.console)
        click.echo(f"qemukit: {exc}", err=True)
    except errors.WaitTimeout as exc:
        code = EXIT_TIMEOUT
        result_json.update(error=str(exc))
        click.echo(f"qemukit: {exc}", err=True)
    except errors.QemukitError as exc:
        code = EXIT_ERROR
        result_json.update(error=str(exc))
        click.echo(f"qemukit: {exc}", err=True)
    finally:
        if vm.state.value == "running":
            vm.shutdown(timeout=10)
    if as_json:
        result_json.setdefault("exit_status", code)
        _emit_json(result_json)
    sys.exit(code)


def _foreground(vm: Any) -> None:
    """Show the console live until the guest powers off or Ctrl-C, then stop the VM."""
    click.echo(f"qemukit: {vm.name} running; console below, Ctrl-C stops it", err=True)
    click.echo(vm.console_tail(200), nl=False)

    def show(chunk: bytes) -> None:
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()

    vm.follow_console(show)
    try:
        vm.wait_exit()
    except KeyboardInterrupt:
        click.echo("", err=True)
    vm.follow_console(None)
    result = vm.shutdown(timeout=15)
    click.echo(f"qemukit: {vm.name} stopped ({result.rung.value})", err=True)


@main.command()
@spec_options
@click.option("--json", "as_json", is_flag=True, help="Print the argv as a JSON list.")
def cmdline(as_json: bool, **opts: Any) -> None:
    """Print the QEMU command line a VM would run with, without starting it."""
    from .vm import preview_argv

    try:
        spec = build_spec(opts)
        argv, notes = preview_argv(spec)
    except errors.QemukitError as exc:
        _fail(exc)
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
@click.argument("name", type=click.Choice(["tiny"]))
@click.option("--force", is_flag=True, help="Rebuild even if already built.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def images_build(name: str, force: bool, as_json: bool) -> None:
    """Build an image from Debian's packages into the cache (once)."""
    from . import images

    start = time.monotonic()
    try:
        image = images.build(
            name, force=force, progress=lambda msg: click.echo(f"  {msg}", err=True)
        )
    except errors.QemukitError as exc:
        _fail(exc, 1)
    if as_json:
        _emit_json({"name": name, "directory": str(image.directory), "kernel": str(image.kernel),
                    "initrd": str(image.initrd), "seconds": round(time.monotonic() - start, 1)})
    else:
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
