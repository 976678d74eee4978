"""``qemukit bisect``: git bisect run with a qemukit verdict as the judge."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ._common import EXIT_REFUSED, build_spec, spec_options


@click.command()
@spec_options
@click.option("--good", required=True, metavar="REV", help="A revision where the test passes.")
@click.option("--bad", required=True, metavar="REV", help="A revision where it does not.")
@click.option("--build", metavar="CMD",
              help="Build command run in the tree at each commit, split as a shell would but "
              "never run by one (a failed build skips the commit) [default: make -jN for a "
              "kernel tree with a .config, else none].")
@click.option("--repo", type=click.Path(file_okay=False, exists=True), default=".",
              show_default=True, help="The git tree to bisect.")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds for each commit's boot plus test.")
@click.option("--crash-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="A commit whose kernel panics or oopses writes a crash bundle under DIR.")
@click.option("--continue-on-oops", is_flag=True,
              help="An oops is recorded, not a verdict; the test's exit status decides.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Write the result (first bad commit, its verdict, every step) as JSON.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def bisect(good: str, bad: str, build: str | None, repo: str, timeout: float,
           crash_dir: str | None, continue_on_oops: bool, json_out: str | None,
           command: tuple[str, ...], **opts: Any) -> None:
    """Find the commit that broke TEST: git bisect run with a qemukit verdict.

    \b
    Example (a kernel tree; each commit built with make, booted, judged):
      qemukit bisect --good v6.1 --bad HEAD --kernel . -- sh -c 'test -e /dev/vda'
    At each commit: the build (if any; a failed build skips the commit), then
    TEST in a VM: passed = good; failed, panic, oops, timeout = bad; a qemukit
    or QEMU failure = skip (125, as git expects). Prints the first bad commit
    with its verdict (and crash bundle). Exit 0 when found, 1 when skipped
    commits left git unsure (the candidates are printed).
    """
    from ..bisect import bisect as run_bisect

    # Each commit's kernel is one cold run of TEST, resolved as run --kernel K -- TEST.
    spec = build_spec(opts, purpose="command", warm=False)
    result = run_bisect(repo, good, bad, spec, list(command), build=build, timeout=timeout,
                        crash_dir=crash_dir, continue_on_oops=continue_on_oops,
                        progress=lambda line: click.echo(line, err=True))
    if json_out is not None:
        with open(json_out, "w", encoding="utf-8") as out:
            json.dump(result.to_dict(), out, indent=2, default=str)
    if result.first_bad is None:
        click.echo("qemukit bisect: skipped commits hide the first bad one; it is one of:")
        for sha in result.candidates:
            click.echo(f"  {sha}")
        sys.exit(EXIT_REFUSED)
    click.echo(f"first bad commit: {result.first_bad} {result.subject or ''}".rstrip())
    if result.verdict is not None:
        click.echo(f"verdict: {result.verdict.answer} ({result.verdict.reason})")
        if result.verdict.crash_bundle:
            click.echo(f"crash bundle: {result.verdict.crash_bundle}")


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (bisect,)
