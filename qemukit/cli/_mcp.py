"""``qemukit mcp``: serve throwaway VMs to a coding agent over the Model Context Protocol (stdio)."""

from __future__ import annotations

import importlib.util
import logging

import click

from .. import errors


@click.command()
@click.option("--max-vms", type=click.IntRange(1, 64), default=2, show_default=True,
              help="VMs a client may run at once.")
@click.option("--max-memory", default="4G", show_default=True,
              help="Memory a client may give one VM.")
@click.option("--max-total-memory", default="8G", show_default=True,
              help="Memory all the VMs together may use.")
@click.option("--max-cpus", type=click.IntRange(1, 64), default=4, show_default=True,
              help="vCPUs a client may give one VM.")
def mcp(max_vms: int, max_memory: str, max_total_memory: str, max_cpus: int) -> None:
    """Serve MCP over stdin/stdout: tools to start a VM, exec, read/write files, stop it.

    Every VM it starts dies with it: at stdin EOF, SIGTERM, or (parent-death
    signal) when the server is killed. No host share or port forward unless a
    tool call asks; forwards bind 127.0.0.1 only. Logs go to stderr.
    """
    if importlib.util.find_spec("mcp") is None:
        raise errors.HostError("qemukit mcp needs the MCP SDK: pip install 'qemukit[mcp]'")
    from ..mcp import Limits, serve
    from ..spec import parse_size

    logging.basicConfig(level=logging.INFO, format="qemukit mcp: %(message)s")
    limits = Limits(max_vms=max_vms, max_memory_mib=parse_size(max_memory, "max_memory"),
                    max_total_memory_mib=parse_size(max_total_memory, "max_total_memory"),
                    max_cpus=max_cpus)
    serve(limits)


COMMANDS = (mcp,)
