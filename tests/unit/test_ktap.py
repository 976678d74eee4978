"""qemukit.ktap against the kernel's own KTAP parser, on real KUnit and kselftest output.

The oracle is ``tools/testing/kunit/`` of Debian's ``linux-source-6.1`` tarball (what
``scripts/setup --test`` installs): its ``kunit_parser`` module for per-test statuses and its
``kunit.py parse`` command for the counts, on the real KUnit logs the tree ships in
``tools/testing/kunit/test_data/``; plus real kselftest runner output (ktap_samples/).
The tool is extracted once per tarball (path, size, mtime) into qemukit's cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from qemukit.ktap import KtapReport, parse_ktap
from qemukit.paths import cache_dir

TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
KUNIT_DIR = "linux-source-6.1/tools/testing/kunit"
SAMPLES = Path(__file__).parent / "ktap_samples"
#: kunit_parser's TestStatus names -> qemukit's outcomes (TEST_CRASHED: never finished).
STATUS = {"SUCCESS": "passed", "FAILURE": "failed", "SKIPPED": "skipped", "TEST_CRASHED": "error"}


@pytest.fixture(scope="session")
def kunit_tool() -> Path:
    """The kernel's tools/testing/kunit, extracted from the source tarball once."""
    assert TARBALL.is_file(), f"{TARBALL} is missing: scripts/setup --test installs linux-source-6.1"
    st = TARBALL.stat()
    key = hashlib.sha256(f"{TARBALL}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = cache_dir() / "kunit-tool" / key
    tool = root / KUNIT_DIR
    if not (tool / "kunit_parser.py").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
        try:
            subprocess.run(["tar", "-xJf", str(TARBALL), "-C", str(tmp), "--no-same-owner",
                            "--wildcards", f"{KUNIT_DIR}/*"], check=True, timeout=600)
            with contextlib.suppress(FileExistsError, OSError):
                tmp.rename(root)  # another worker may have won: either copy is the same
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    assert (tool / "kunit_parser.py").is_file()
    return tool


@pytest.fixture(scope="session")
def kunit_parser(kunit_tool: Path) -> Iterator[ModuleType]:
    """The kernel's kunit_parser module (it imports kunit_printer from its own directory)."""
    sys.path.insert(0, str(kunit_tool))
    try:
        yield importlib.import_module("kunit_parser")
    finally:
        sys.path.remove(str(kunit_tool))


def theirs(kunit_parser: ModuleType, text: str) -> tuple[dict[str, int], list[tuple[tuple[str, ...], str]]]:
    """The kernel parser's counts and its counted tests (path, outcome), as it bubbles them up."""
    with contextlib.redirect_stdout(io.StringIO()):
        main = kunit_parser.parse_run_tests(text.splitlines())

    def counted(test: Any, path: tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
        below = [c for i, sub in enumerate(test.subtests, 1)
                 for c in counted(sub, (*path, sub.name or f"(subtest {i} never reported)"))]
        if below or not path or test.status.name == "NO_TESTS":
            return below
        return [(path, STATUS[test.status.name])]

    c = main.counts
    counts = {"passed": c.passed, "failed": c.failed, "skipped": c.skipped, "error": c.crashed}
    return counts, counted(main, ())


def ours(report: KtapReport) -> list[tuple[tuple[str, ...], str]]:
    return [(case.path, case.outcome) for case in report.cases]


def test_same_verdicts_as_the_kernels_parser(kunit_tool: Path, kunit_parser: ModuleType) -> None:
    """Every KUnit log the tree ships: the same counts and the same status per counted test."""
    logs = sorted((kunit_tool / "test_data").glob("*.log"))
    assert len(logs) >= 20
    differ = {}
    for log in logs:
        text = log.read_text(errors="replace")
        counts, cases = theirs(kunit_parser, text)
        report = parse_ktap(text)
        if (report.counts(), ours(report)) != (counts, cases):
            differ[log.name] = ((report.counts(), ours(report)), (counts, cases))
    assert differ == {}


@pytest.mark.parametrize("name", ["test_skip_tests.log", "test_kernel_panic_interrupt.log",
                                  "test_is_test_passed-failure.log",
                                  "test_is_test_passed-all_passed_nested.log"])
def test_same_counts_as_kunit_py_parse(kunit_tool: Path, name: str) -> None:
    """The command itself, as a user runs it: its summary line against our counts."""
    path = kunit_tool / "test_data" / name
    out = subprocess.run([sys.executable, str(kunit_tool / "kunit.py"), "parse", str(path)],
                         capture_output=True, text=True, timeout=120, check=False)
    summary = re.search(r"Ran (\d+) tests?: (.*)", re.sub(r"\x1b\[[0-9;]*m", "", out.stdout))
    assert summary, out.stdout + out.stderr
    said = {k: int(v) for k, v in re.findall(r"(passed|failed|crashed|skipped): (\d+)",
                                              summary.group(2))}
    counts = parse_ktap(path.read_text(errors="replace")).counts()
    assert sum(counts.values()) == int(summary.group(1))
    assert {k: v for k, v in counts.items() if v} == {
        ("error" if k == "crashed" else k): v for k, v in said.items()}


def test_kunit_paths_skips_and_diagnostics(kunit_tool: Path) -> None:
    report = parse_ktap((kunit_tool / "test_data" / "test_skip_tests.log").read_text())
    assert report.found and report.complete and report.version == "TAP version 14"
    by_path = {r.path: r for r in report.results}
    skip = by_path[("example", "example_skip_test")]
    assert (skip.outcome, skip.directive) == ("skipped", "SKIP this test should be skipped")
    assert skip.diagnostics == ("# example_skip_test: initializing",)
    suite = by_path[("example",)]
    assert (suite.subtests, suite.planned, suite.case, suite.number) == (2, 2, False, 2)
    assert report.ok


def test_boot_messages_and_timestamps_are_stripped(kunit_tool: Path) -> None:
    text = (kunit_tool / "test_data" / "test_config_printk_time.log").read_text()
    assert text.startswith("[") and "] TAP version" in text
    report = parse_ktap(text)
    assert report.counts()["passed"] == 10 and all(not r.path[-1].startswith("[")
                                                    for r in report.results)


def test_a_panic_mid_stream_is_incomplete(kunit_tool: Path) -> None:
    report = parse_ktap((kunit_tool / "test_data" / "test_kernel_panic_interrupt.log").read_text())
    assert not report.complete and not report.ok
    missing = [r for r in report.cases if r.outcome == "error"]
    assert [r.path for r in missing] == [("string-stream-test", "(subtest 2 never reported)"),
                                         ("string-stream-test", "(subtest 3 never reported)")]
    assert "the kernel crashed before every test reported" in report.problems
    assert next(r for r in report.results if r.path == ("string-stream-test",)).outcome == "error"


def test_no_ktap_at_all() -> None:
    report = parse_ktap("just a boot log\nKernel panic - not syncing: VFS: Unable to mount\n")
    assert not report.found and not report.ok and report.results == ()


def test_kselftest_runner_output() -> None:
    """Each program is a test (what kunit.py and the runner count); its own TAP, behind
    ``# ``, is its nested report."""
    report = parse_ktap((SAMPLES / "kselftest-runner.txt").read_text())
    assert [(r.path, r.outcome, r.directive) for r in report.cases] == [
        (("selftests: demo: ktap_mix",), "failed", "exit=1"),
        (("selftests: demo: all_skip",), "skipped", "SKIP"),
        (("selftests: demo: passes",), "passed", None),
        (("selftests: demo: crashes",), "failed", "exit=134"),
    ]
    assert report.complete and report.counts() == {"passed": 1, "failed": 2, "skipped": 1,
                                                   "error": 0}
    mix = "selftests: demo: ktap_mix"
    crashes = "selftests: demo: crashes"
    assert [(r.path, r.outcome, r.diagnostics) for r in report.deep_cases()] == [
        ((mix, "first"), "passed", ("# checking the first thing",)),
        ((mix, "second"), "failed", ("# second: expected 1, got 2",)),
        # kselftest.h writes the name after the directive: "ok 3 # SKIP third: ..."
        ((mix, "third: needs CONFIG_DEMO"), "skipped", ()),
        ((mix, "fourth"), "passed", ()),  # ok 4 # XFAIL fourth: failed as expected
        # 1..0 # SKIP: nothing nested, the program itself is the case
        (("selftests: demo: all_skip",), "skipped", ("# selftests: demo: all_skip",
                                                      "# TAP version 13",
                                                      "# 1..0 # SKIP no demo device")),
        (("selftests: demo: passes", "alpha"), "passed", ()),
        (("selftests: demo: passes", "beta"), "passed", ()),
        ((crashes, "before the crash"), "passed", ()),
        ((crashes, "(subtest 2 never reported)"), "error", ("Aborted",)),
        ((crashes, "(subtest 3 never reported)"), "error", ()),
    ]
    crashed = report.cases[3].nested
    assert crashed is not None and not crashed.complete


def test_kselftest_output_matches_the_kernels_parser(kunit_parser: ModuleType) -> None:
    text = (SAMPLES / "kselftest-runner.txt").read_text()
    counts, cases = theirs(kunit_parser, text)
    report = parse_ktap(text)
    assert report.counts() == counts and ours(report) == cases


@pytest.mark.parametrize(("line", "outcome"), [
    ("ok 1 - a", "passed"), ("not ok 1 - a", "failed"), ("ok 1 - a # SKIP why", "skipped"),
    ("not ok 1 - a # SKIP why", "skipped"), ("ok 1 a # XFAIL", "passed"),
    ("not ok 1 a # TODO later", "skipped"), ("not ok 1 a # TIMEOUT 45 seconds", "error"),
    ("not ok 1 # error bad setup", "error"),
])
def test_directives(line: str, outcome: str) -> None:
    (case,) = parse_ktap(f"KTAP version 1\n1..1\n{line}\n").cases
    assert case.outcome == outcome and case.number == 1


def test_nonsense_is_reported_not_raised() -> None:
    report = parse_ktap("KTAP version 1\n1..3\nok 2 - b\n# Subtest: x\nrandom\n")
    assert not report.complete and report.problems
    assert parse_ktap("").found is False


def test_hostile_output_stays_cheap() -> None:
    """What the guest prints is hostile input: deep nesting and absurd plans neither recurse
    without bound nor allocate per announced test."""
    deep = "KTAP version 1\n1..1\n" + "KTAP version 1\n1..1\n" * 5000 + "ok 1 - x\n"
    report = parse_ktap(deep)
    assert not report.complete and max(len(r.path) for r in report.results) <= 33
    huge = parse_ktap("KTAP version 1\n1..999999999\nok 1 - a\n")
    assert len(huge.results) == 1000 and not huge.complete  # subtests 1..1000, then a count
    assert "the test list: 999998999 more subtests never reported" in huge.problems
    assert parse_ktap("TAP version 13\n" + "# Subtest: s\n" * 3000).found
