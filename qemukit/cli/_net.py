"""``qemukit net``: the private networks of running VMs (see docs/networks.md).

``net forward NETWORK VM:PORT`` gives the host a port on 127.0.0.1 into a VM's TCP
port on a private network, which is closed to the host until asked: the first
forward starts the network's gateway, which stops with the network.
"""

from __future__ import annotations

import re

import click

from ._common import emit_json

__all__: list[str] = []

_TARGET_RE = re.compile(r"^(?P<vm>[A-Za-z0-9][A-Za-z0-9_.-]{0,39}):(?P<port>\d{1,5})$")


@click.group(name="net")
def net_group() -> None:
    """Private networks of running VMs: give the host a port into one (net forward)."""


@net_group.command(name="forward")
@click.argument("network")
@click.argument("target", metavar="VM:PORT")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="Seconds for the switch to answer (starting the gateway included).")
@click.option("--json", "as_json", is_flag=True, help="Print the forward as JSON.")
def forward_command(network: str, target: str, timeout: float, as_json: bool) -> None:
    """Give the host a port into VM:PORT on NETWORK; prints 127.0.0.1:HOSTPORT.

    \b
    Example:
      qemukit net forward lan web:80      # prints 127.0.0.1:41234
      curl http://127.0.0.1:41234/
    VM is the name the VM has on the network. The port listens on 127.0.0.1
    only, until the network's last VM stops. The VMs gain no way out: the
    gateway behind the port lets no connection of theirs leave the network.
    """
    from ..vm import network_forward

    m = _TARGET_RE.match(target)
    if m is None or not 1 <= int(m.group("port")) <= 65535:
        raise click.BadParameter(f"{target!r}: write VM:PORT, such as web:80 (port 1-65535)",
                                 param_hint="VM:PORT")
    port = network_forward(network, m.group("vm"), int(m.group("port")), timeout=timeout)
    if as_json:
        emit_json({"network": network, "vm": m.group("vm"), "port": int(m.group("port")),
                   "host": "127.0.0.1", "host_port": port})
    else:
        click.echo(f"127.0.0.1:{port}")


COMMANDS = (net_group,)
