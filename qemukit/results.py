r"""How a test ended, and the one JUnit and JSON writer for every result qemukit reports.

:class:`Outcome` is the one vocabulary: a kernel run (:mod:`qemukit.kernel`),
a matrix job (:mod:`qemukit.matrix`) and a KTAP test (:mod:`qemukit.ktap`)
each end as one of its members. It is a ``str`` enum, so an outcome compares
equal to its name (``Outcome.PASSED == "passed"``) and is written to JSON as
that name.

:func:`write_junit` writes one JUnit XML file from :class:`ReportCase`\ s;
:func:`write_json` writes strict JSON (or JSON lines). Both are valid whatever
the guest printed. XML 1.0 forbids most control characters (the busybox
shell's ``ESC [6n`` is on every console), so in the JUnit file each forbidden
character is written as a visible escape (``\x1b``, ``\x00``, ``\ufffe``);
JUnit text elements keep at most :data:`JUNIT_TEXT_LIMIT` characters, the
end, and say how much was cut; names and attributes keep 1000. The JSON keeps
everything: pure ASCII, control characters escaped by JSON, lone surrogates
(which strict parsers reject) written as ``\udcXX`` text.

Pure: no process, no socket; the writers write one file each.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from . import errors

__all__ = ["JUNIT_TEXT_LIMIT", "KTAP_OUTCOMES", "RUN_OUTCOMES", "Outcome", "ReportCase",
           "json_clean", "json_safe", "json_text", "write_json", "write_junit", "xml_safe"]

#: Characters kept (the last ones) per JUnit text element: system-out, system-err, failure.
JUNIT_TEXT_LIMIT = 1_000_000
#: Characters kept in a test name or an attribute (message=, property values).
_ATTR_LIMIT = 1000


class Outcome(enum.StrEnum):
    """How a test ended.

    ``passed``: it ran and succeeded (exit status 0, ``ok``). ``failed``: it ran
    and did not (a non-zero exit status, ``not ok``). ``panic``: the guest
    kernel panicked. ``oops``: the kernel oopsed or hit a BUG and the run was
    ended. ``timeout``: it did not finish in time. ``error``: it never got to a
    verdict (qemukit or QEMU failed, a share did not mount, a KTAP test never
    reported). ``skipped``: it chose not to run (KTAP's ``# SKIP``).
    """

    PASSED = "passed"
    FAILED = "failed"
    PANIC = "panic"
    OOPS = "oops"
    TIMEOUT = "timeout"
    ERROR = "error"
    SKIPPED = "skipped"

    @property
    def junit(self) -> Literal["failure", "error", "skipped"] | None:
        """The JUnit element this outcome is written as (None: the case passed)."""
        return _JUNIT[self]

    @property
    def error_class(self) -> type[errors.QemukitError] | None:
        """The error this outcome stands for, which gives its exit code (None: the test's own
        verdict, ``passed``, ``failed`` or ``skipped``)."""
        return _ERRORS.get(self)


_JUNIT: dict[Outcome, Literal["failure", "error", "skipped"] | None] = {
    Outcome.PASSED: None, Outcome.FAILED: "failure", Outcome.PANIC: "failure",
    Outcome.OOPS: "failure", Outcome.TIMEOUT: "error", Outcome.ERROR: "error",
    Outcome.SKIPPED: "skipped",
}
_ERRORS: dict[Outcome, type[errors.QemukitError]] = {
    Outcome.PANIC: errors.GuestPanic, Outcome.OOPS: errors.GuestOops,
    Outcome.TIMEOUT: errors.WaitTimeout, Outcome.ERROR: errors.QemukitError,
}

#: The outcomes of a run of a command in a VM (a kernel run, a matrix job), in report order.
RUN_OUTCOMES = (Outcome.PASSED, Outcome.FAILED, Outcome.PANIC, Outcome.OOPS, Outcome.TIMEOUT,
                Outcome.ERROR)
#: The outcomes of a KTAP test.
KTAP_OUTCOMES = (Outcome.PASSED, Outcome.FAILED, Outcome.SKIPPED, Outcome.ERROR)


# -- cleaning text for XML and JSON --------------------------------------------------------

_XML_FORBIDDEN = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_char(m: re.Match[str]) -> str:
    code = ord(m.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def xml_safe(text: str) -> str:
    """``text`` with every character XML 1.0 forbids written as ``\\xNN`` or ``\\uNNNN``.

    Tab, newline and carriage return stay; so does everything printable.
    """
    return _XML_FORBIDDEN.sub(_escape_char, text)


def json_safe(text: str) -> str:
    """``text`` with lone surrogates (which strict JSON parsers reject) written as ``\\udcXX``."""
    return _SURROGATE.sub(_escape_char, text)


def json_clean(value: Any) -> Any:
    """``value`` (str, list, tuple, dict, scalars) with every string :func:`json_safe`."""
    if isinstance(value, str):
        return json_safe(value)
    if isinstance(value, (list, tuple)):
        return [json_clean(v) for v in value]
    if isinstance(value, dict):
        return {json_safe(str(k)): json_clean(v) for k, v in value.items()}
    return value


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """``value`` as strict JSON text: ASCII only, no NaN, no lone surrogate."""
    return json.dumps(json_clean(value), indent=indent, allow_nan=False)


def write_json(value: Any, path: str | Path, *, lines: bool = False) -> None:
    """Write ``value`` to ``path`` as strict JSON (see :func:`json_text`).

    With ``lines``, ``value`` is an iterable of records, written one per line
    (JSON Lines).
    """
    if lines:
        text = "".join(json_text(record, indent=None) + "\n" for record in value)
    else:
        text = json_text(value) + "\n"
    Path(path).write_text(text, encoding="ascii")


# -- JUnit ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportCase:
    """One test case of a JUnit file, whatever produced it.

    ``message`` and ``details`` are the failure's, error's or skip's (the
    ``message=`` attribute and the element's text); ``properties`` are
    written as ``qemukit.<name>`` properties of the case, in order, those
    whose value is None left out (``qemukit.outcome`` always comes first).
    ``crash_bundle`` is a directory that keeps what is needed to look into a
    failure (a crash bundle): it is a property and the last line of the
    case's system-out.
    """

    name: str
    outcome: Outcome
    duration: float = 0.0
    message: str | None = None
    details: str = ""
    stdout: str = ""
    stderr: str = ""
    properties: Sequence[tuple[str, object]] = ()
    crash_bundle: str | Path | None = None


def _cap(text: str, limit: int = JUNIT_TEXT_LIMIT) -> str:
    if len(text) > limit:
        text = (f"[qemukit: the first {len(text) - limit} of {len(text)} characters were cut]\n"
                + text[-limit:])
    return xml_safe(text)


def _attr(text: str, limit: int = _ATTR_LIMIT) -> str:
    return xml_safe(text if len(text) <= limit else text[: limit - 1] + "\u2026")


def write_junit(cases: Iterable[ReportCase], path: str | Path, *, suite: str = "qemukit") -> None:
    """Write ``cases`` as one JUnit XML test suite named ``suite`` (always well-formed)."""
    import xml.etree.ElementTree as ET  # only here: the CLI imports this module at start

    ordered = list(cases)
    kinds = [case.outcome.junit for case in ordered]
    root = ET.Element("testsuites")
    ts = ET.SubElement(root, "testsuite", name=_attr(suite), tests=str(len(ordered)),
                       failures=str(kinds.count("failure")), errors=str(kinds.count("error")),
                       skipped=str(kinds.count("skipped")),
                       time=f"{sum(c.duration for c in ordered):.3f}")
    for case, kind in zip(ordered, kinds, strict=True):
        element = ET.SubElement(ts, "testcase", classname=_attr(suite), name=_attr(case.name),
                                time=f"{case.duration:.3f}")
        props = ET.SubElement(element, "properties")
        for name, value in [("outcome", case.outcome.value), *case.properties,
                            ("crash_bundle", case.crash_bundle)]:
            if value is not None:
                ET.SubElement(props, "property", name=_attr(f"qemukit.{name}"),
                              value=_attr(str(value)))
        if kind is not None:
            ET.SubElement(element, kind, message=_attr(case.message or case.outcome.value)
                          ).text = _cap(case.details)
        out = _cap(case.stdout)
        if case.crash_bundle is not None:  # after the cut: the one line a reader needs most
            out += "" if not out or out.endswith("\n") else "\n"
            out += xml_safe(f"[qemukit: crash bundle in {case.crash_bundle}]") + "\n"
        ET.SubElement(element, "system-out").text = out
        ET.SubElement(element, "system-err").text = _cap(case.stderr)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
