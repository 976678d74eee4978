"""``qemukit doctor``: the host's state (QEMU, KVM, firmware, images)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from .. import errors
from ..arch import ARCHES, DEFAULT_ARCH, arch_option
from ._common import EXIT_REFUSED, emit_json

if TYPE_CHECKING:
    from ..host import HostProbe


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--reprobe", is_flag=True, help="Ignore the cached KVM probe result.")
def doctor(as_json: bool, reprobe: bool) -> None:
    """Report QEMU, KVM (with the probe boot's verdict), firmware and images.

    The QEMU reported is the one for this host's architecture (the one KVM can
    run), with the others installed listed; then each guest architecture.
    """
    from .. import host, images
    from ..paths import cache_dir, state_dir

    probe = host.host_probe()
    report: dict[str, Any] = {"cache_dir": str(cache_dir()), "state_dir": str(state_dir())}
    problems = 0
    # The QEMU that matters here is the host's own architecture's: the one KVM can run.
    arch = _native_arch(probe)
    others = {name: path for name in ARCHES if name != arch
              and (path := probe.qemu_path(name)) is not None}
    try:
        qemu = probe.find_qemu(arch)
        report["qemu"] = {"arch": arch, "path": qemu.path, "version": qemu.version_string,
                          "sandbox": qemu.has_sandbox, "qemu_img": qemu.qemu_img,
                          "machines": sorted(m for m in qemu.machines
                                             if m in ARCHES[arch].machines),
                          "others": others}
    except errors.HostError as exc:
        report["qemu"] = {"arch": arch, "error": str(exc), "others": others}
        qemu = None
        problems += 1
    tiny = images.find_image("tiny", arch)
    report["images"] = {"tiny": str(tiny.directory) if tiny else None}
    device_ok, device_reason = probe.kvm_device_status()
    kvm: dict[str, Any] = {"device": device_ok, "device_reason": device_reason}
    if qemu is not None:
        probe_image = (str(tiny.kernel), str(tiny.initrd)) if tiny else None
        status = probe.kvm_status(qemu, probe_image, use_cache=not reprobe, arch=arch)
        kvm.update(usable=status.usable, probed=status.probed, reason=status.reason)
        if status.probed and not status.usable:
            kvm["probe_console_tail"] = status.console
    report["kvm"] = kvm
    report["accel_auto"] = "kvm" if kvm.get("usable") else "tcg"
    ovmf = host.find_ovmf()
    report["firmware"] = {"seabios": "built into QEMU",
                          "ovmf": list(ovmf) if ovmf else None}
    report["architectures"] = _architectures(report["accel_auto"], probe)
    if as_json:
        emit_json(report)
    else:
        q = report["qemu"]
        click.echo(f"QEMU:      {q.get('path')} {q.get('version', '')} (this {arch} host's)"
                   if "path" in q else f"QEMU:      MISSING for this {arch} host: {q['error']}")
        if "path" in q:
            click.echo(f"           sandbox: {'yes' if q['sandbox'] else 'no'}; "
                       f"qemu-img: {q['qemu_img'] or 'MISSING'}")
        if others:
            click.echo("           also: " + ", ".join(f"{name} ({path})"
                                                        for name, path in others.items()))
        click.echo(f"KVM:       {'usable' if kvm.get('usable') else 'not used'}: "
                   f"{kvm.get('reason', device_reason)}")
        click.echo(f"auto:      {report['accel_auto']}")
        click.echo(f"firmware:  SeaBIOS (built in); OVMF: {ovmf[0] if ovmf else 'not installed'}")
        build = f"not built (qemukit images build tiny{arch_option(arch)})"
        click.echo(f"tiny:      {tiny.directory if tiny else build}")
        click.echo("guests:")
        for name, row in report["architectures"].items():
            binary = row["qemu"] or f"MISSING (apt-get install {row['package']})"
            image = row["image"] or f"not built (qemukit images build tiny --arch {name})"
            fw = row["firmware"] + ("" if row["firmware_present"] else " (MISSING)")
            click.echo(f"  {name:8} {row['machine']:16} qemu: {binary}")
            click.echo(f"  {'':8} {'':16} firmware: {fw}; accel: {row['accel']}")
            click.echo(f"  {'':8} {'':16} tiny: {image}")
            click.echo(f"  {'':8} {'':16} dumps: {row['dumps']}")
            if row["debian"] is not None:
                click.echo(f"  {'':8} {'':16} debian: {row['debian']}")
        click.echo(f"cache:     {report['cache_dir']}")
        click.echo(f"state:     {report['state_dir']}")
    sys.exit(EXIT_REFUSED if problems else 0)


def _native_arch(probe: HostProbe) -> str:
    """The guest architecture of this host's machine (the default for a machine qemukit
    boots no guests of)."""
    native = probe.arch()
    return native if native in ARCHES else DEFAULT_ARCH


def _architectures(native_accel: str, probe: HostProbe) -> dict[str, dict[str, Any]]:
    """Each guest architecture's state: QEMU binary (or the package to install),
    firmware, tiny image, debian image (where there is one for it; built or
    what building it needs), and the accelerator it would get."""
    import os

    from .. import images
    from ..images.debian import ARCHES_BUILT

    native = probe.arch()
    out: dict[str, dict[str, Any]] = {}
    for name, info in ARCHES.items():
        path = probe.qemu_path(name)
        image = images.find_image("tiny", name)
        fw_path = f"/usr/share/qemu/{info.firmware_file}" if info.firmware_file else None
        if name == native:
            accel = native_accel
        else:
            accel = f"tcg ({name} guest emulated on this {native} host)"
        out[name] = {
            "qemu": path, "binary": info.qemu_binary, "package": info.qemu_package,
            "machine": info.default_machine, "cpu_tcg": info.tcg_cpu, "console": info.console,
            "transport": info.transport, "firmware": info.firmware,
            "firmware_file": fw_path,
            "firmware_present": fw_path is None or os.path.isfile(fw_path),
            "image": str(image.directory) if image else None, "accel": accel,
            "cpu_hotplug": info.cpu_hotplug, "memory_hotplug": info.memory_hotplug,
            "disk_hotplug": info.hotplug_bus is not None or info.transport == "ccw",
            "powerdown": info.powerdown,
            "vmcoreinfo": info.no_vmcoreinfo is None,
            "dumps": _dumps(info.no_vmcoreinfo),
            "debian": _debian_state(name) if name in ARCHES_BUILT else None,
        }
    return out


def _dumps(no_vmcoreinfo: str | None) -> str:
    """Whether ``qemukit dump`` files of this architecture open in drgn and crash, and why not."""
    if no_vmcoreinfo is None:
        return ("readable by drgn and crash (-device vmcoreinfo; the kernel needs "
                "CONFIG_FW_CFG_SYSFS and CONFIG_KEXEC, the tiny image loads qemu_fw_cfg)")
    return f"no VMCOREINFO in dumps ({no_vmcoreinfo}): drgn refuses them"


def _debian_state(arch: str) -> str:
    """The debian image of ``arch``: its directory, or how to build it (and what is missing)."""
    from .. import host, images

    found = images.find_image("debian", arch)
    if found is not None:
        return str(found.directory)
    flag = arch_option(arch)
    problem = host.foreign_exec_problem(arch)
    return f"not built (qemukit images build debian{flag}" + (
        f"; cannot here: {problem})" if problem else ")")


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (doctor,)
