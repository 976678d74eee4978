"""``qemukit fork NAME N``: fork a running VM into N clones (see :mod:`qemukit.vm._fork`)."""

from __future__ import annotations

import click

from ..timeouts import SAVE_TIMEOUT
from ._common import attached, emit_json, name_argument


@click.command(name="fork")
@name_argument
@click.argument("count", type=int)
@click.option("--timeout", type=float, default=SAVE_TIMEOUT, show_default=True,
              help="Seconds for the save and for each clone's restore.")
@click.option("--json", "as_json", is_flag=True, help="Print the clones as JSON.")
def fork_command(name: str, count: int, timeout: float, as_json: bool) -> None:
    """Fork the running VM NAME into COUNT clones that run on from this moment; NAME runs on.

    \b
    Each clone has NAME's memory, disks and hot-plugged devices as they were at
    the fork, its own name (NAME-1, NAME-2, ...), host name, machine id, RNG
    state, disk overlay and host ports; it runs detached, like run --detach:
    qemukit ls lists it, qemukit stop NAME-1 ends it.
    """
    with attached(name) as vm:
        clones = vm.fork(count, timeout=timeout, die_with_parent=False)
        rows = []
        try:
            for clone in clones:
                warm = clone.warm_start
                rows.append({"name": clone.name, "pid": clone.pid,
                             "hostname": clone.identity.hostname if clone.identity else None,
                             "seconds": round(warm.seconds, 3) if warm else None})
        finally:
            for clone in clones:
                clone.detach()
    if as_json:
        emit_json({"name": name, "forks": rows})
        return
    for row in rows:
        click.echo(f"{row['name']}\tpid {row['pid']}")


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (fork_command,)
