"""KTAP and TAP output (kselftest's, KUnit's) turned into per-test results. Pure: text in, data out.

:func:`parse_ktap` reads what a kernel test suite printed, from the first
``KTAP version N`` (or ``TAP version N``) line on, wherever it starts (after
boot messages, behind printk timestamps, which are stripped), and returns a
:class:`KtapReport`: one :class:`KtapResult` per test at every level of
nesting, each with its name path (``("example", "example_skip_test")``), its
outcome and the diagnostic lines printed before its result line.

The structure follows the KTAP specification (Documentation/dev-tools/ktap.rst)
and what the kernel's own parser (``tools/testing/kunit/kunit_parser.py``)
accepts: a test with subtests opens with a version line and/or a ``# Subtest:
NAME`` header, then its plan ``1..N``, its subtests, and its own result line;
indentation is not relied on. Outcomes:

``passed``
    ``ok N name``, or ``ok N name # XFAIL ...`` (failed as expected).
``failed``
    ``not ok N name``.
``skipped``
    a ``# SKIP`` directive (with ``ok`` or ``not ok``), or ``# TODO``.
``error``
    the test never finished: its result line is missing, the plan announced
    subtests that never came (a crash mid-stream: the report is then
    ``complete=False``), or a ``# TIMEOUT``/``# ERROR`` directive.

kselftest's runner prefixes each program's own TAP with ``# `` (6.1's
``run_kselftest.sh``); those lines are that test's diagnostics, as the
kernel's parser reads them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .results import KTAP_OUTCOMES, Outcome

__all__ = ["KtapOutcome", "KtapReport", "KtapResult", "parse_ktap"]

#: A KTAP test's outcome: one of :data:`~qemukit.results.KTAP_OUTCOMES`.
KtapOutcome = Outcome

_VERSION = re.compile(r"^\s*(K?TAP) version (\d+)\s*$")
# The first version line may follow anything: a printk timestamp, a program's prefix.
_START = re.compile(r"(K?TAP) version (\d+)\s*$")
_SUBTEST = re.compile(r"^\s*# Subtest: (.*?)\s*$")
_PLAN = re.compile(r"^\s*1\.\.(\d+)")
_RESULT = re.compile(r"^\s*(ok|not ok) (\d+)(?: -)?(?: ([^#]*?))?\s*(?:#\s*(.*?))?\s*$")
# What ends a test run's output for the kernel's parser: the kernel went on to mount a root.
_END = re.compile(r"^\s*(?:List of all partitions:|Kernel panic - not syncing: VFS:|reboot: System halted)")
_CRASH = re.compile(r"Kernel panic - not syncing|\bOops\b.*\[#\d+\]|\bBUG: |---\[ end trace")
_STAMP = re.compile(r"^\[\s*\d+\.\d+\](?:\[\s*[CT]\d+\])? ?")
_NESTED_START = re.compile(r"^#\s*K?TAP version \d+\s*$")
#: kselftest programs do not run kselftest runners: one level of nesting is all there is.
_MAX_NESTING = 2
# The output comes from the guest: bounds that keep hostile or broken output cheap. Deeper
# subtests are read as diagnostics; a plan's missing subtests are listed up to a number.
_MAX_DEPTH = 32
_MAX_MISSING = 1000


@dataclass(frozen=True)
class KtapResult:
    """One test: where it is, how it ended and what it printed.

    ``path`` is the names from the outermost suite down to this test (the
    top-level test list itself has no name). ``number`` is its number in its
    parent's list (None for a subtest that never reported). ``directive``
    is the text after ``#`` on its result line (``SKIP reason``, ``XFAIL``).
    ``diagnostics`` are the lines it printed (``# ...`` and others) before
    its result line. ``subtests`` counts its direct subtests; ``planned`` is
    the count its plan line announced (None: no plan, as for a test case).
    A subtest that never reported is named ``(subtest N never reported)``.
    ``case`` says it is counted in :meth:`KtapReport.counts`: a test with no
    counted subtests, except a suite that ran none (a header or version line,
    no subtests, and passed), as the kernel's parser counts.
    """

    path: tuple[str, ...]
    outcome: KtapOutcome
    number: int | None = None
    directive: str | None = None
    diagnostics: tuple[str, ...] = ()
    subtests: int = 0
    planned: int | None = None
    case: bool = True
    #: The test's own KTAP, when its diagnostics hold one: kselftest's runner prints each
    #: program's TAP behind ``# `` before the program's result line.
    nested: KtapReport | None = None

    @property
    def name(self) -> str:
        """The test's own name (the last of its path)."""
        return self.path[-1] if self.path else ""


@dataclass(frozen=True)
class KtapReport:
    """Every test of a KTAP stream, outer suites before their subtests, in output order.

    ``complete`` is False when the stream stopped before every announced test
    reported (the kernel crashed or the program died mid-stream); ``found``
    is False when there was no KTAP at all. ``problems`` lists what did not
    fit the format (a number out of order, a missing result line).
    """

    results: tuple[KtapResult, ...]
    complete: bool
    found: bool = True
    version: str | None = None
    problems: tuple[str, ...] = ()

    @property
    def cases(self) -> tuple[KtapResult, ...]:
        """The test cases (see :attr:`KtapResult.case`), in output order."""
        return tuple(r for r in self.results if r.case)

    def counts(self) -> dict[str, int]:
        """How many test cases ended each way (all four outcomes, zeros included)."""
        out: dict[str, int] = {o: 0 for o in KTAP_OUTCOMES}
        for case in self.cases:
            out[case.outcome] += 1
        return out

    def deep_cases(self) -> tuple[KtapResult, ...]:
        """The test cases, each replaced by its own nested cases where it has a nested
        report (a kselftest program's), their paths prefixed with the program's."""
        out: list[KtapResult] = []
        for case in self.cases:
            if case.nested is None or not case.nested.cases:
                out.append(case)
                continue
            out += [replace(inner, path=(*case.path, *inner.path))
                    for inner in case.nested.deep_cases()]
        return tuple(out)

    @property
    def ok(self) -> bool:
        """True when KTAP was found, it is complete, and no test case failed or errored."""
        counts = self.counts()
        return self.found and self.complete and counts[Outcome.FAILED] == 0 and counts[Outcome.ERROR] == 0


@dataclass
class _Node:
    name: str = ""
    number: int | None = None
    outcome: KtapOutcome = Outcome.ERROR
    directive: str | None = None
    diagnostics: list[str] = field(default_factory=list)
    children: list[_Node] = field(default_factory=list)
    plan: int | None = None
    parent: bool = False
    position: int = 0


class _Lines:
    """The KTAP part of the output, one line at a time, with lookahead."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.pos = 0

    def __bool__(self) -> bool:
        return self.pos < len(self.lines)

    def peek(self) -> str:
        return self.lines[self.pos] if self else ""

    def pop(self) -> str:
        line = self.peek()
        self.pos += 1
        return line


def _ktap_lines(lines: list[str]) -> tuple[list[str], str | None, bool]:
    """The lines from the first version line to the end marker, prefixes removed; the version;
    whether the stream stopped at a crash (a panic or oops after the start)."""
    for start, line in enumerate(lines):
        m = _START.search(line)
        if m is None:
            continue
        prefix = line[: line.index(m.group(1) + " version")]
        stamped = bool(_STAMP.match(prefix))
        out: list[str] = []
        crashed = False
        for raw in lines[start:]:
            body = _STAMP.sub("", raw, count=1) if stamped else raw[len(prefix):]
            if _CRASH.search(body):
                crashed = True
            if _END.search(body):
                break
            out.append(body.rstrip())
        return out, f"{m.group(1)} version {m.group(2)}", crashed
    return [], None, False


def _is_structure(line: str) -> bool:
    return bool(_RESULT.match(line) or _SUBTEST.match(line) or _VERSION.match(line))


def _diagnostics(lines: _Lines) -> list[str]:
    out = []
    while lines and not _is_structure(lines.peek()):
        out.append(lines.pop().strip())
    return out


def _own_result(lines: _Lines, node: _Node) -> bool:
    """Whether the next line is ``node``'s own result line (its name, or any for a nameless one)."""
    m = _RESULT.match(lines.peek()) if lines else None
    return m is not None and (m.group(3) or "") == node.name


def _outcome(verdict: str, directive: str | None) -> KtapOutcome:
    word = (directive or "").split(maxsplit=1)[0].upper() if directive else ""
    if word in ("SKIP", "SKIPPED", "TODO"):
        return Outcome.SKIPPED
    if word in ("TIMEOUT", "ERROR"):
        return Outcome.ERROR
    return Outcome.PASSED if verdict == "ok" else Outcome.FAILED


class _Parser:
    def __init__(self, lines: _Lines) -> None:
        self.lines = lines
        self.problems: list[str] = []
        self.missing = False

    def test(self, number: int, before: list[str], top: bool, depth: int = 0) -> _Node:
        lines = self.lines
        node = _Node(number=number, diagnostics=list(before), position=number)
        node.diagnostics += _diagnostics(lines)
        if depth >= _MAX_DEPTH:
            # Too deep to be real: what is left up to a result line is this test's text.
            while lines and not _RESULT.match(lines.peek()):
                node.diagnostics.append(lines.pop().strip())
        version = bool(lines) and _VERSION.match(lines.peek()) is not None
        if version:
            lines.pop()
        header = _SUBTEST.match(lines.peek()) if lines else None
        if header and not top:
            node.name = header.group(1)
            lines.pop()
        node.parent = top or version or header is not None
        if node.parent:
            plan = _PLAN.match(lines.peek()) if lines else None
            if plan:
                node.plan = int(plan.group(1))
                lines.pop()
            self._subtests(node, top, depth)
        if not top:
            node.diagnostics += _diagnostics(lines)
            m = _RESULT.match(lines.peek()) if lines else None
            if m is None or (node.name and (m.group(3) or "") != node.name):
                self.problems.append(f"{node.name or f'test {number}'}: no result line")
                self.missing = True
            else:
                lines.pop()
                node.directive = m.group(4) or None
                # kselftest.h writes "ok 3 # SKIP name": the name follows the directive word.
                node.name = m.group(3) or node.name or (node.directive or "").partition(" ")[2]
                node.outcome = _outcome(m.group(1), node.directive)
                if int(m.group(2)) != number:
                    self.problems.append(f"{node.name}: numbered {m.group(2)}, expected {number}")
                    node.number = int(m.group(2))
        if node.children and any(c.outcome is Outcome.ERROR for c in node.children):
            node.outcome = Outcome.ERROR  # a subtest crashed: so did its suite
        return node

    def _subtests(self, node: _Node, top: bool, depth: int) -> None:
        lines = self.lines
        number = 1
        while node.plan is None or number <= node.plan:
            before = _diagnostics(lines)
            if not lines or (not top and _own_result(lines, node)):
                if node.plan is not None and number <= node.plan:
                    # Announced, never run: the stream stopped, or the suite ended early.
                    self.missing = True
                    if number > _MAX_MISSING:
                        self.problems.append(f"{node.name or 'the test list'}: "
                                             f"{node.plan - number + 1} more subtests never reported")
                        node.diagnostics += before
                        break
                    self.problems.append(f"{node.name or 'the test list'}: subtest {number} "
                                         f"of {node.plan} never reported")
                    node.children.append(_Node(number=None, diagnostics=before, position=number))
                    number += 1
                    continue
                node.diagnostics += before
                break
            start = lines.pos
            node.children.append(self.test(number, before, False, depth + 1))
            if lines.pos == start:
                # Nothing fitted (a version line too deep to nest, say): keep it as text and
                # move on, so every turn of this loop reads at least one line.
                node.children[-1].diagnostics.append(lines.pop().strip())
            number += 1


def _nested(diagnostics: list[str], depth: int) -> KtapReport | None:
    """A test's own KTAP printed behind ``# `` among its diagnostics (kselftest's runner)."""
    if depth >= _MAX_NESTING or not any(_NESTED_START.match(d) for d in diagnostics):
        return None
    inner = [d[2:] if d.startswith("# ") else d[1:] if d.startswith("#") else d
             for d in diagnostics]
    return _parse(inner, depth + 1)


def _flatten(node: _Node, path: tuple[str, ...], depth: int) -> list[KtapResult]:
    """The results of ``node``'s subtests (each before its own subtests)."""
    out: list[KtapResult] = []
    for child in node.children:
        name = child.name or (f"(subtest {child.position} never reported)"
                              if child.number is None else "")
        child_path = (*path, name)
        below = _flatten(child, child_path, depth)
        ran_nothing = child.parent and not child.children and child.outcome in (Outcome.PASSED, Outcome.ERROR)
        case = not any(r.case for r in below) and not ran_nothing
        out.append(KtapResult(child_path, child.outcome, child.number, child.directive,
                              tuple(child.diagnostics), len(child.children), child.plan, case,
                              _nested(child.diagnostics, depth)))
        out += below
    return out


def parse_ktap(output: str | Iterable[str]) -> KtapReport:
    """Parse the KTAP/TAP in ``output`` (a string, or its lines) into per-test results.

    Anything before the first version line (boot messages) is ignored, and so
    is what follows the kernel's own end markers (``List of all partitions:``).
    Never raises on bad input: what does not fit is reported in
    :attr:`KtapReport.problems` and as ``error`` outcomes.
    """
    text = output if isinstance(output, str) else "\n".join(line.rstrip("\n") for line in output)
    return _parse(text.replace("\r", "").splitlines(), 0)


def _parse(all_lines: list[str], depth: int) -> KtapReport:
    lines, version, crashed = _ktap_lines(all_lines)
    if not lines:
        return KtapReport((), complete=False, found=False, problems=("no KTAP output found",))
    parser = _Parser(_Lines(lines))
    root = parser.test(0, [], True)
    results = _flatten(root, (), depth)
    complete = not parser.missing and (root.plan is None or len(root.children) >= root.plan)
    if crashed and parser.missing:
        parser.problems.append("the kernel crashed before every test reported")
    return KtapReport(tuple(results), complete=complete, found=True, version=version,
                      problems=tuple(parser.problems))
