"""``qemukit mcp``: serve throwaway VMs to a coding agent over the Model Context Protocol (stdio)."""

from __future__ import annotations

import importlib.util
import logging
import re

import click

from .. import errors

_BYTES_RE = re.compile(r"(\d+)([KMG]?)(?:i?B)?", re.IGNORECASE)
_SHIFTS = {"": 0, "K": 10, "M": 20, "G": 30}


def _bytes(field: str, text: str) -> int:
    """``16M``, ``64K``, ``8G`` or a number of bytes."""
    m = _BYTES_RE.fullmatch(text.strip())
    if not m or int(m.group(1)) <= 0:
        raise errors.SpecError(field, text, "expected a size such as 64K, 16M or 8G")
    return int(m.group(1)) << _SHIFTS[m.group(2).upper()]


@click.command()
@click.option("--max-vms", type=click.IntRange(1, 64), default=2, show_default=True,
              help="VMs a client may run at once.")
@click.option("--max-memory", default="4G", show_default=True,
              help="Memory a client may give one VM.")
@click.option("--max-total-memory", default="8G", show_default=True,
              help="Memory all the VMs together may use.")
@click.option("--max-cpus", type=click.IntRange(1, 64), default=4, show_default=True,
              help="vCPUs a client may give one VM.")
@click.option("--max-disk", default="8G", show_default=True,
              help="Bytes one VM's throwaway disk overlays may hold on the host; the VM is "
                   "stopped when they pass it.")
@click.option("--max-console-log", default="16M", show_default=True,
              help="Bytes of console log kept per VM (older output is dropped).")
@click.option("--max-output", default="1M", show_default=True,
              help="Bytes of stdout, and of stderr, one exec returns (cut in the guest).")
@click.option("--max-file", default="16M", show_default=True,
              help="Bytes one read_file or write_file moves (checked before the copy).")
@click.option("--max-lifetime", type=click.FloatRange(1, None), default=3600.0,
              show_default=True, help="Seconds a VM may run; the server stops it then.")
@click.option("--allow-share", "allow_share", multiple=True, metavar="DIR[:ro|:rw]",
              help="A host directory clients may share (or a directory below it); read-only "
                   "unless :rw. Repeatable. Without it no host directory is shared.")
@click.option("--allow-network", is_flag=True,
              help="Give VMs user networking (and port forwards). Off by default: with it a "
                   "guest reaches every service on the host's 127.0.0.1 at 10.0.2.2.")
@click.option("--template-dir", "template_dirs", multiple=True,
              type=click.Path(exists=True, file_okay=False),
              help="A directory whose NAME.toml files clients may start by NAME (checked like "
                   "the built-in templates). Repeatable.")
def mcp(max_vms: int, max_memory: str, max_total_memory: str, max_cpus: int, max_disk: str,
        max_console_log: str, max_output: str, max_file: str, max_lifetime: float,
        allow_share: tuple[str, ...], allow_network: bool, template_dirs: tuple[str, ...]
        ) -> None:
    """Serve MCP over stdin/stdout: tools to start a VM, exec, read/write files, stop it.

    The client is treated as hostile: it gets a VM built from a built-in image
    or a template named by name, with the fields it may set and within the caps
    above; no host directory unless --allow-share grants it; no network unless
    --allow-network (forwards then bind 127.0.0.1 only). Every VM it starts
    dies with it: at stdin EOF, SIGTERM, or (parent-death signal) when the
    server is killed. Logs go to stderr.
    """
    if importlib.util.find_spec("mcp") is None:
        raise errors.HostError("qemukit mcp needs the MCP SDK: pip install 'qemukit[mcp]'")
    from ..mcp import Limits, ShareGrant, serve
    from ..spec import parse_size

    limits = Limits(max_vms=max_vms, max_memory_mib=parse_size(max_memory, "max_memory"),
                    max_total_memory_mib=parse_size(max_total_memory, "max_total_memory"),
                    max_cpus=max_cpus, max_disk=_bytes("max_disk", max_disk),
                    max_console_log=_bytes("max_console_log", max_console_log),
                    max_output=_bytes("max_output", max_output),
                    max_file=_bytes("max_file", max_file), max_lifetime=max_lifetime)
    shares = [ShareGrant.parse(text) for text in allow_share]
    logging.basicConfig(level=logging.INFO, format="qemukit mcp: %(message)s")
    serve(limits, shares=shares, template_dirs=template_dirs, network=allow_network)


COMMANDS = (mcp,)
