"""A matrix's report: JSON lines, one JUnit file (both :mod:`qemukit.results`' writers), and
the plain-text summary table."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ..results import RUN_OUTCOMES, write_json
from ..results import write_junit as write_cases
from ._file import Job
from ._run import JobResult

__all__ = ["summary", "write_jsonl", "write_junit"]


def write_jsonl(results: Iterable[JobResult], path: str | Path) -> None:
    """One JSON object per line and job (strict JSON, ASCII only)."""
    write_json((r.to_dict() for r in results), path, lines=True)


def write_junit(results: Iterable[JobResult], path: str | Path, *,
                suite: str = "qemukit.matrix") -> None:
    """One JUnit XML file, one test case per job named by its axes (always well-formed)."""
    ordered = sorted(results, key=lambda r: r.job.name)
    write_cases([r.report_case() for r in ordered], path, suite=suite)


def summary(results: Sequence[JobResult], slowest: int = 5,
            jobs: Sequence[Job] | None = None) -> str:
    """A plain-text table: per axis value the count of each outcome, then the slowest jobs.

    Axis values are listed in the order of ``jobs`` (the matrix file's) when given.
    """
    lines: list[str] = []
    header = f"{'':24} " + " ".join(f"{o:>7}" for o in RUN_OUTCOMES)
    axes: dict[str, list[str]] = {}
    for job in [*(jobs or ()), *(r.job for r in results)]:
        for axis, value in job.axes.items():
            values = axes.setdefault(axis, [])
            if value not in values:
                values.append(value)
    groups: list[tuple[str, list[JobResult]]] = [("all jobs", list(results))]
    for axis, values in axes.items():
        groups += [(f"{axis}={v}", [r for r in results if r.job.axes.get(axis) == v])
                   for v in values]
    lines.append(header)
    for label, members in groups:
        counts = [sum(r.outcome == o for r in members) for o in RUN_OUTCOMES]
        lines.append(f"{label[:24]:24} " + " ".join(f"{c:>7}" for c in counts))
    retried = [r for r in results if r.attempts > 1]
    if retried:
        lines.append("")
        lines.append("retried (infrastructure failures):")
        lines += [f"  {r.job.name}: {r.attempts} attempts; " + "; ".join(r.retried)
                  for r in retried]
    lines.append("")
    lines.append("slowest:")
    for r in sorted(results, key=lambda r: -r.result.duration)[:slowest]:
        lines.append(f"  {r.result.duration:8.1f}s  {r.outcome:7}  {r.job.name}  ({r.worker})")
    return "\n".join(lines)
