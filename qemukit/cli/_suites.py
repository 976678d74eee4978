"""The kernel's test suites from the command line: ``qemukit run --kselftest`` and ``qemukit kunit``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from ..results import Outcome
from ._common import (
    EXIT_REFUSED,
    build_spec,
    exit_code_for_outcome,
    spec_options,
)

if TYPE_CHECKING:
    from ..kselftest import SuiteRun
    from ..spec import VMSpec

_MARK = {Outcome.PASSED: "ok", Outcome.FAILED: "FAIL", Outcome.SKIPPED: "skip",
         Outcome.ERROR: "ERROR"}


def report_suite(run: SuiteRun, json_out: str | None, junit: str | None) -> None:
    """Write the suite's files, print one line per test and a summary, exit with its code.

    Exit codes: the run's own for a panic (255), an oops (254), a timeout (124)
    or an error (125); else 0 when every test passed or was skipped, 1 when not.
    """
    if junit is not None:
        run.write_junit(junit)
    if json_out == "-":
        sys.stdout.write(run.jsonl())
    else:
        if json_out is not None:
            run.write_jsonl(json_out)
        for case in run.cases:
            extra = f"  # {case.directive}" if case.directive else ""
            click.echo(f"{_MARK[case.outcome]:6} {case.name}{extra}")
    counts = run.counts()
    res = run.result
    click.echo(f"qemukit: {run.suite}: " + ", ".join(f"{n} {k}" for k, n in counts.items())
               + ("" if run.report.complete else " (the KTAP output stopped early)"), err=True)
    for problem in run.report.problems[:10]:
        click.echo(f"qemukit: {run.suite}: {problem}", err=True)
    if res.outcome in (Outcome.PANIC, Outcome.OOPS):
        line = res.panic if res.outcome is Outcome.PANIC else res.oops
        click.echo(f"qemukit: guest kernel {res.outcome}: {line}", err=True)
    elif res.outcome in (Outcome.TIMEOUT, Outcome.ERROR):
        click.echo(f"qemukit: {res.error}\n--- console ---\n{res.console_tail}", err=True)
    if res.crash_bundle is not None:
        click.echo(f"qemukit: crash bundle in {res.crash_bundle} (start with triage.txt)",
                   err=True)
    # The run's own code when it stands for an error (a panic exits 255, as run does).
    sys.exit(exit_code_for_outcome(res.outcome) if res.outcome.error_class is not None
             else 0 if run.ok else EXIT_REFUSED)


def run_kselftest_command(spec: VMSpec, targets: str, tree: str | None, *, timeout: float,
                          json_out: str | None, junit: str | None,
                          run_options: dict[str, Any]) -> None:
    """``qemukit run --kselftest TARGETS``: install from ``tree``, run, report, exit."""
    from .. import errors
    from ..kselftest import run_kselftests

    if tree is None:
        raise errors.SpecError("kselftest", targets, "needs a kernel tree: --kernel TREE or "
                               "--kselftest-src TREE")
    run = run_kselftests(spec.replace(warm=False), tree, targets, timeout=timeout, **run_options)
    report_suite(run, json_out, junit)


@click.command()
@spec_options
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds for boot plus command.")
@click.option("--filter", "filter_glob", metavar="GLOB",
              help="Run only the KUnit suites/tests GLOB matches (kunit.filter_glob=).")
@click.option("--json", "json_out", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
              help="Write one JSON line per test (then one for the run) to FILE, or stdout.")
@click.option("--junit", type=click.Path(dir_okay=False),
              help="Write a JUnit XML report, one case per test.")
@click.option("--console-log", type=click.Path(dir_okay=False),
              help="Keep a copy of the guest's whole console log here.")
@click.option("--crash-dir", type=click.Path(file_okay=False), metavar="DIR",
              help="On a kernel panic or oops, write a crash bundle under DIR.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def kunit(timeout: float, filter_glob: str | None, json_out: str | None, junit: str | None,
          console_log: str | None, crash_dir: str | None, command: tuple[str, ...],
          **opts: Any) -> None:
    """Boot a KUnit kernel (--kernel TREE or image) and report each KUnit test.

    \b
    Examples:
      qemukit kunit --kernel ~/linux/build
      qemukit kunit --kernel ~/linux/build -- modprobe kunit-example-test
    The KTAP that KUnit prints on the console (at boot for built-in tests, when a
    test module loads for the others; -- CMD runs after boot) is parsed as the
    kernel's kunit.py parse does: one result per test, skips as skips.
    Exit: 0 all passed or skipped; 1 a test failed or the KTAP stopped early;
    255/254/124/125 as for run.
    """
    # One cold boot (the KTAP is printed at boot), resolved as run --kernel K -- CMD.
    spec = build_spec(opts, purpose="command", warm=False)
    run_kunit_cli(spec, command, timeout=timeout, filter_glob=filter_glob, json_out=json_out,
                  junit=junit, console_log=console_log, crash_dir=crash_dir)


def run_kunit_cli(spec: VMSpec, command: tuple[str, ...], *, timeout: float,
                  filter_glob: str | None, json_out: str | None, junit: str | None,
                  console_log: str | None, crash_dir: str | None) -> None:
    """Run :func:`qemukit.kselftest.run_kunit` and report it."""
    from ..kselftest import run_kunit

    run = run_kunit(spec, list(command) or ["true"], timeout=timeout, filter_glob=filter_glob,
                    console_log=console_log, crash_dir=crash_dir)
    report_suite(run, json_out, junit)


#: The commands this module adds to ``qemukit`` (registered by :mod:`qemukit.cli`).
COMMANDS = (kunit,)
