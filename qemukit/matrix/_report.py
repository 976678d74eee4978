"""A matrix's report: JSON lines, one JUnit file, and the plain-text summary table."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..kernel import JUNIT_TEXT_LIMIT, json_safe, xml_safe
from ._file import Job
from ._run import JobResult

__all__ = ["summary", "write_jsonl", "write_junit"]

#: The outcomes a summary counts, in this order.
_OUTCOMES = ("passed", "failed", "panic", "oops", "timeout", "error")


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return json_safe(value)
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {json_safe(str(k)): _clean(v) for k, v in value.items()}
    return value


def write_jsonl(results: Iterable[JobResult], path: str | Path) -> None:
    """One JSON object per line and job (strict JSON, ASCII only)."""
    lines = [json.dumps(_clean(r.to_dict()), allow_nan=False) for r in results]
    Path(path).write_text("".join(line + "\n" for line in lines), encoding="ascii")


def _text(text: str) -> str:
    if len(text) > JUNIT_TEXT_LIMIT:
        text = (f"[qemukit: the first {len(text) - JUNIT_TEXT_LIMIT} of {len(text)} characters "
                f"were cut]\n" + text[-JUNIT_TEXT_LIMIT:])
    return xml_safe(text)


def _attr(text: str, limit: int = 1000) -> str:
    return xml_safe(text if len(text) <= limit else text[: limit - 1] + "\u2026")


def write_junit(results: Iterable[JobResult], path: str | Path, *,
                suite: str = "qemukit.matrix") -> None:
    """One JUnit XML file, one test case per job named by its axes (always well-formed)."""
    ordered = sorted(results, key=lambda r: r.job.name)
    failures = sum(r.outcome in ("failed", "panic", "oops") for r in ordered)
    errors = sum(r.outcome in ("timeout", "error") for r in ordered)
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=_attr(suite), tests=str(len(ordered)),
                       failures=str(failures), errors=str(errors),
                       time=f"{sum(r.result.duration for r in ordered):.3f}")
    for item in ordered:
        res = item.result
        case = ET.SubElement(ts, "testcase", classname=_attr(suite), name=_attr(item.job.name),
                             time=f"{res.duration:.3f}")
        props = ET.SubElement(case, "properties")
        values: list[tuple[str, Any]] = [(f"axis.{k}", v) for k, v in item.job.axes.items()]
        values += [("outcome", res.outcome), ("command", " ".join(res.command)),
                   ("exit_status", res.exit_status), ("host", item.host),
                   ("worker", item.worker), ("attempts", item.attempts),
                   ("accel", res.accel), ("boot_time", res.boot_time), ("panic", res.panic),
                   ("oops", res.oops), *(("retried", r) for r in item.retried)]
        for name, value in values:
            if value is not None:
                ET.SubElement(props, "property", name=_attr(f"qemukit.{name}"),
                              value=_attr(str(value)))
        if res.outcome == "failed":
            ET.SubElement(case, "failure", message=f"exit status {res.exit_status}").text = (
                _text(res.stderr))
        elif res.outcome in ("panic", "oops"):
            line = res.panic if res.outcome == "panic" else res.oops
            ET.SubElement(case, "failure", message=_attr(f"kernel {res.outcome}: {line}")).text = (
                _text(res.console_tail))
        elif res.outcome in ("timeout", "error"):
            ET.SubElement(case, "error", message=_attr(res.error or res.outcome)).text = (
                _text(res.console_tail))
        ET.SubElement(case, "system-out").text = _text(res.stdout)
        ET.SubElement(case, "system-err").text = _text(res.stderr)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def summary(results: Sequence[JobResult], slowest: int = 5,
            jobs: Sequence[Job] | None = None) -> str:
    """A plain-text table: per axis value the count of each outcome, then the slowest jobs.

    Axis values are listed in the order of ``jobs`` (the matrix file's) when given.
    """
    lines: list[str] = []
    header = f"{'':24} " + " ".join(f"{o:>7}" for o in _OUTCOMES)
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
        counts = [sum(r.outcome == o for r in members) for o in _OUTCOMES]
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
