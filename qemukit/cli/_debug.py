"""``qemukit dump``: a running VM's memory as an ELF core for crash or drgn."""

from __future__ import annotations

from typing import get_args

import click

from ..dump import DumpFormat
from ..timeouts import SAVE_TIMEOUT
from ._common import attached, emit_json, name_argument


@click.command(name="dump")
@name_argument
@click.argument("file", type=click.Path(dir_okay=False, writable=True))
@click.option("--format", "dump_format", type=click.Choice(get_args(DumpFormat)), default="elf",
              show_default=True, help="ELF core, or kdump-compressed (where QEMU has the codec).")
@click.option("--timeout", type=float, default=SAVE_TIMEOUT, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def dump_command(name: str, file: str, dump_format: str, timeout: float, as_json: bool) -> None:
    """Write VM NAME's guest memory to FILE (new) as an ELF core; the guest runs on.

    \b
    Open it with: crash vmlinux FILE (crash --no_kmem_cache vmlinux FILE for a SLOB
    kernel, CONFIG_SLOB=y), or drgn -c FILE -s vmlinux.
    """
    with attached(name) as vm:
        result = vm.dump_memory(file, format=dump_format, timeout=timeout)
    if as_json:
        emit_json({"name": name, "path": str(result.path), "format": result.format,
                   "bytes": result.size})
    else:
        click.echo(f"{name}: memory written to {result.path} ({result.size / 2**20:.0f} MiB, "
                   f"{result.format})")


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (dump_command,)
