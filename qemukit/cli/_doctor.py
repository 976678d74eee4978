"""``qemukit doctor`` and ``qemukit images``: the host's state and the built-in images."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from .. import errors
from ._common import emit_json


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--reprobe", is_flag=True, help="Ignore the cached KVM probe result.")
def doctor(as_json: bool, reprobe: bool) -> None:
    """Report QEMU, KVM (with the probe boot's verdict), firmware and images."""
    from .. import host, images
    from ..paths import cache_dir, state_dir

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
        emit_json(report)
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


@click.group(name="images")
def images_group() -> None:
    """Build and list the built-in guest images."""


@images_group.command(name="build")
@click.argument("name", type=click.Choice(["tiny", "debian"]))
@click.option("--force", is_flag=True, help="Rebuild even if already built.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def images_build(name: str, force: bool, as_json: bool) -> None:
    """Build an image from Debian's packages into the cache (once)."""
    from .. import images

    start = time.monotonic()
    image = images.build(name, force=force, progress=lambda msg: click.echo(f"  {msg}", err=True))
    from ._guest import image_summary

    summary = image_summary(image)
    if as_json:
        emit_json({"name": name, "directory": str(image.directory), "kernel": str(image.kernel),
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
    from .. import images

    rows = {n: images.find_image(n) for n in images.NAMES}
    if as_json:
        emit_json({n: (str(i.directory) if i else None) for n, i in rows.items()})
        return
    for n, i in rows.items():
        click.echo(f"{n:8} {i.directory if i else 'not built'}")


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (doctor, images_group,)
