"""``qemukit cache ls|prune|clear``: the warm states (see :mod:`qemukit.warm`)."""

from __future__ import annotations

import time
from typing import Any

import click

from .. import errors
from ..spec import parse_size
from ._common import emit_json, human_bytes

__all__ = ["cache"]


@click.group()
def cache() -> None:
    """List and prune the saved warm states that later starts restore from."""


@cache.command(name="ls")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def cache_ls(as_json: bool) -> None:
    """List the warm states, least recently used first, with their sizes."""
    from ..warm import WarmCache

    cache = WarmCache()
    entries = cache.entries()
    if as_json:
        emit_json([{"key": e.key, "path": str(e.path), "size": e.size,
                    "created": e.meta.get("created"), "last_used": e.last_used,
                    "in_use": cache.in_use(e), "parts": e.meta.get("parts")} for e in entries])
        return
    click.echo(f"{'KEY':22} {'SIZE':>6}  {'LAST USED':19}  {'IN USE':6}  SPEC")
    total = 0
    for e in entries:
        size = e.size
        total += size
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        parts = e.meta.get("parts") or {}
        spec = parts.get("spec") or {}
        what = spec.get("kernel") or next((d.get("file") for d in spec.get("drives", [])), "-")
        in_use = "yes" if cache.in_use(e) else "-"
        click.echo(f"{e.key:22} {human_bytes(size):>6}  {used:19}  {in_use:6}  {what}")
    click.echo(f"{len(entries)} entries, {human_bytes(total)} in {WarmCache().root}")


def _limit(text: str) -> int:
    try:
        return parse_size(text, "--max-size") * 2**20
    except errors.SpecError:
        raise click.BadParameter(f"{text!r} is not a size such as 500M or 2G") from None


@cache.command(name="prune")
@click.option("--max-size", required=True, metavar="SIZE",
              help="Keep at most this much (e.g. 500M, 2G), removing the least recently used.")
def cache_prune(max_size: str) -> None:
    """Remove least recently used warm states until the cache fits in SIZE."""
    from ..warm import WarmCache

    limit = _limit(max_size)
    cache = WarmCache()
    removed = cache.prune(limit)
    for e in removed:
        click.echo(f"removed {e.key}")
    click.echo(f"{len(removed)} removed")
    _say_kept(cache)


@cache.command(name="clear")
def cache_clear() -> None:
    """Remove every warm state not in use (the next start of each spec boots again).

    A state a running clone was restored from (a detached one too) is kept: its
    disks back the clone's overlays. It goes with the next clear once those ended.
    The standby clones of the states cleared (see qemukit ls) are ended first.
    The saved states of forks (qemukit fork) whose clones have ended go too.
    """
    from ..vm._fork import fork_cache
    from ..warm import WarmCache

    cache = WarmCache()
    removed = cache.clear()
    click.echo(f"{len(removed)} removed")
    _say_kept(cache)
    forks = fork_cache().clear()
    if forks:
        click.echo(f"{len(forks)} fork states removed")


def _say_kept(cache: Any) -> None:
    in_use = [e.key for e in cache.entries() if cache.in_use(e)]
    if in_use:
        click.echo(f"{len(in_use)} kept, in use by running VMs (removed by a later clear or "
                   f"prune once they end): {', '.join(in_use)}")


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (cache,)
