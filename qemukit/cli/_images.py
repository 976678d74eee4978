"""``qemukit images``: build the built-in images, import a user's own, list and remove them."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import click

from .. import errors
from ..arch import ARCHES, DEFAULT_ARCH
from ._common import emit_json


@click.group(name="images")
def images_group() -> None:
    """Build, import and list guest images."""


def _split_packages(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


@images_group.command(name="build")
@click.argument("name", type=click.Choice(["tiny", "debian"]))
@click.option("--force", is_flag=True, help="Rebuild even if already built.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--arch", type=click.Choice(list(ARCHES)), default=DEFAULT_ARCH, show_default=True,
              help="Guest architecture (tiny; debian: x86_64 or aarch64). Foreign packages come from "
              "apt lists of their own; a foreign debian tree is built under qemu-user.")
@click.option("--suite", type=click.Choice(["bookworm", "trixie", "sid"]), default=None,
              help="debian: the Debian suite [default: bookworm].")
@click.option("--packages", metavar="A,B", help="debian: more packages to install.")
@click.option("--bootable", is_flag=True, help="debian: a whole disk (GPT, EFI system partition "
              "with GRUB, root file system) that UEFI and BIOS firmware boot, like Debian's cloud images.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), metavar="FILE",
              help="debian --bootable: also copy the qcow2 to FILE (which must not exist).")
def images_build(name: str, force: bool, as_json: bool, arch: str, suite: str | None,
                 packages: str | None, bootable: bool, output: str | None) -> None:
    """Build an image from Debian's packages into the cache (once per set of inputs)."""
    from .. import images

    if output is not None:
        if not bootable:
            raise errors.SpecError("output", output, "-o is for debian --bootable")
        if os.path.lexists(output):
            raise errors.SpecError("output", output, "already exists; remove it or pick another")
    start = time.monotonic()
    image = images.build(name, force=force, arch=arch, suite=suite,
                         packages=_split_packages(packages), bootable=bootable,
                         progress=lambda msg: click.echo(f"  {msg}", err=True))
    from ._guest import image_summary

    summary = image_summary(image)
    if output is not None:
        disk = getattr(image, "disk")  # noqa: B009 - a debian image always has one
        tmp = Path(output).with_name(f".{Path(output).name}.part")
        shutil.copyfile(disk, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
        summary["output"] = str(Path(output).absolute())
    if as_json:
        emit_json({"name": name, "arch": arch, "directory": str(image.directory), "kernel": str(image.kernel),
                    "initrd": str(image.initrd), "seconds": round(time.monotonic() - start, 1),
                    **summary})
    else:
        if "disk" in summary:
            click.echo(f"  {name}: {summary['disk_bytes'] / 2**20:.0f} MiB qcow2, built in "
                       f"{summary['build_seconds']:.0f}s", err=True)
        click.echo(summary.get("output") or str(image.directory))


@images_group.command(name="import")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--user", help="Login user cloud-init creates [default: the OS's ID, e.g. debian].")
@click.option("--agent", type=click.Choice(["qga", "none"]),
              help="Guest agent [default: qga if the image has qemu-ga, else none (ssh only)].")
@click.option("--firmware", type=click.Choice(["uefi", "bios"]),
              help="Firmware [default: uefi if the image has an EFI system partition].")
@click.option("--replace", is_flag=True, help="Replace an image already imported under NAME.")
@click.option("--json", "as_json", is_flag=True, help="Print the registry entry as JSON.")
def images_import(name: str, file: str, user: str | None, agent: str | None,
                  firmware: str | None, replace: bool, as_json: bool) -> None:
    """Register a disk image (qcow2 or raw) as NAME; the file is only ever read."""
    from .. import images

    image = images.import_image(name, file, user=user, agent=agent, firmware=firmware,
                                replace=replace)
    if as_json:
        emit_json(image.to_dict())
        return
    click.echo(f"{image.name}: {image.os.get('PRETTY_NAME', 'unknown OS')}, {image.format} "
               f"{image.virtual_size / 2**30:.1f} GiB, firmware {image.firmware}, agent "
               f"{image.agent}, user {image.user}")


@images_group.command(name="remove")
@click.argument("name")
def images_remove(name: str) -> None:
    """Unregister an imported image (its file is left where it is)."""
    from .. import images

    image = images.remove_imported(name)
    click.echo(f"{image.name}: removed ({image.path} left alone)")


@images_group.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def images_list(as_json: bool) -> None:
    """List the built-in images (built or not; other architectures' when built) and the imported ones."""
    from .. import images
    from ..images.debian import ARCHES_BUILT

    rows = {n: images.find_image(n) for n in images.NAMES}
    foreign = {arch: {n: images.find_image(n, arch) for n in images.NAMES
                      if n == "tiny" or arch in ARCHES_BUILT} for arch in ARCHES if arch != DEFAULT_ARCH}
    imported = images.list_imported()
    if as_json:
        data = {n: (str(i.directory) if i else None) for n, i in rows.items()}
        by_arch = {arch: {n: (str(i.directory) if i else None) for n, i in found.items()}
                   for arch, found in foreign.items()}
        emit_json({**data, "arch": by_arch, "imported": {i.name: i.to_dict() for i in imported}})
        return
    for n, i in rows.items():
        click.echo(f"{n:8} {i.directory if i else 'not built'}")
    for arch, found in foreign.items():
        for n, i in found.items():
            if i is not None:
                click.echo(f"{n:8} {i.directory} (--arch {arch})")
    for image in imported:
        click.echo(f"{image.name:8} imported: {image.path} ({image.format}, "
                   f"{image.os.get('PRETTY_NAME', 'unknown OS')}, {image.firmware}, "
                   f"agent {image.agent}, user {image.user})")


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (images_group,)
