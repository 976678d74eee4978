"""``qemukit matrix FILE``: run a test matrix here or on a Dask cluster, write one report."""

from __future__ import annotations

import contextlib
import signal
import sys
from typing import Any

import click

from ..results import Outcome
from ._common import exit_code_for_outcomes


def _format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "ETA -"
    minutes, secs = divmod(int(seconds + 0.5), 60)
    return f"ETA {minutes}:{secs:02d}"


@click.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--junit", type=click.Path(dir_okay=False),
              help="Write one JUnit XML file, a test case per job.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Write the results as JSON lines, one per job.")
@click.option("--jobs", "-j", "jobs_at_once", type=click.IntRange(min=1),
              help="VMs at once on the local pool [default: CPUs, bounded by free memory].")
@click.option("--scheduler", metavar="tls://HOST:PORT",
              help="Run on this Dask scheduler's workers (pip install 'qemukit[dask]'). "
                   "tcp:// runs code for anyone who reaches the scheduler: use tls://.")
@click.option("--tls-ca-file", type=click.Path(dir_okay=False),
              help="For tls://: the CA that signed the cluster's certificates "
                   "[default: Dask's distributed.comm.tls.ca-file].")
@click.option("--tls-cert", type=click.Path(dir_okay=False),
              help="For tls://: this client's certificate (PEM; may hold the key too) "
                   "[default: distributed.comm.tls.client.cert].")
@click.option("--tls-key", type=click.Path(dir_okay=False),
              help="For tls://: this client's private key [default: "
                   "distributed.comm.tls.client.key].")
@click.option("--retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="More attempts for a job whose VM could not start or whose worker was lost.")
@click.option("--fail-fast", is_flag=True, help="Stop (and stop every VM) at the first job "
              "that does not pass.")
@click.option("--crash-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="A job whose kernel panics or oopses writes a crash bundle in a new "
              "directory under DIR (on the host that ran it); jobs may set crash_dir.")
def matrix(file: str, junit: str | None, json_out: str | None, jobs_at_once: int | None,
           scheduler: str | None, tls_ca_file: str | None, tls_cert: str | None,
           tls_key: str | None, retries: int, fail_fast: bool, crash_dir: str | None) -> None:
    """Run every job of the matrix FILE (TOML) and report; exit 1 if any job did not pass.

    \b
    Example FILE:
      [defaults]
      image = "tiny"
      timeout = 120
      [matrix.kernels]
      stock = {}
      quiet = { append = "console=ttyS0 panic=-1 quiet" }
      [matrix.commands]
      ok = ["true"]
      fails = ["false"]

    Progress is shown on a terminal; the summary table goes to stdout.
    Ctrl-C (or SIGTERM) stops every VM the matrix started, on every worker, and
    exits 130.
    """
    from .. import errors
    from ..matrix import (
        MatrixProgress,
        dask_security,
        load_matrix,
        run_matrix,
        summary,
        write_jsonl,
        write_junit,
    )

    jobs = load_matrix(file)
    security = None
    if scheduler is not None:
        security = dask_security(scheduler, ca_file=tls_ca_file, cert=tls_cert, key=tls_key)
    elif tls_ca_file or tls_cert or tls_key:
        raise errors.SpecError("scheduler", None, "--tls-* options are for --scheduler tls://...")
    live = sys.stderr.isatty()

    def show(p: MatrixProgress) -> None:
        if live:
            click.echo(f"\r\x1b[K{p.done}/{p.total} done, {p.running} running, {p.failed} failed, "
                       f"{_format_eta(p.eta)}", err=True, nl=False)

    results: list[Any] = []
    running = run_matrix(jobs, jobs_at_once=jobs_at_once, scheduler=scheduler, security=security,
                         retries=retries, fail_fast=fail_fast, progress=show, crash_dir=crash_dir)

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # a CI runner's cancel: stop every VM, as Ctrl-C does

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        # closing(): a Ctrl-C between two results still stops every VM before we return.
        with contextlib.closing(running):
            for result in running:
                results.append(result)
                if live and result.outcome is not Outcome.PASSED:
                    why = result.result.error or f"exit status {result.result.exit_status}"
                    click.echo(f"\r\x1b[K{result.outcome}: {result.job.name}: {why}", err=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if live:
            click.echo("", err=True)
        # Whatever finished is reported, also after Ctrl-C or --fail-fast.
        if junit is not None:
            write_junit(results, junit)
        if json_out is not None:
            write_jsonl(results, json_out)
    click.echo(summary(results, jobs=jobs))
    missing = len(jobs) - len(results)
    if missing:
        click.echo(f"qemukit: {missing} of {len(jobs)} jobs did not run (--fail-fast)", err=True)
    code = exit_code_for_outcomes((r.outcome for r in results), complete=not missing)
    if code:
        sys.exit(code)


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (matrix,)
