"""KUnit on a real KUnit kernel: the suite's kernel built again with KUnit, its example suite
and its linked-list suite built in (:func:`tests.kernel_build.build_kunit_kernel`), booted by
``qemukit kunit --kernel TREE``. The suites run at boot and print KTAP on the console among the
kernel's other lines; qemukit's per-test verdicts, JSON lines and JUnit are checked, and compared
with the kernel's own ``kunit_parser`` and ``tools/testing/kunit/kunit.py parse`` on the same
console log. Slow tier: the build takes minutes on an empty cache (cached by its inputs)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import junitparser
import pytest

from tests.unit.test_ktap import kunit_parser, kunit_tool, theirs  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.integration]

#: The 6.1 example suite's cases, by design: two pass, two skip (kunit_skip, kunit_mark_skipped).
EXAMPLE = {"example_simple_test": "passed", "example_skip_test": "skipped",
           "example_mark_skipped_test": "skipped", "example_all_expect_macros_test": "passed"}


@pytest.fixture(scope="module")
def kunit_kernel() -> Path:
    """The suite's kernel with KUnit suites built in: built once, cached by its inputs."""
    from tests.kernel_build import build_kunit_kernel

    return build_kunit_kernel(progress=lambda msg: print(f"  {msg}", file=sys.stderr))


def test_kunit_kernel_results_match_kunit_py_parse(qk: Any, tmp_path: Path, kunit_kernel: Path,
                                                   kunit_tool: Path,  # noqa: F811
                                                   kunit_parser: ModuleType) -> None:  # noqa: F811
    log, jsonl, xml = tmp_path / "console.log", tmp_path / "r.jsonl", tmp_path / "r.xml"
    out = qk("kunit", "--kernel", str(kunit_kernel), "--accel", "tcg", "--console-log", str(log),
             "--json", str(jsonl), "--junit", str(xml), timeout=900)
    assert out.returncode == 0, out.stderr
    console = log.read_text(errors="replace")
    # Boot-time KTAP, interleaved with the kernel's other console lines.
    assert "KTAP version 1" in console and "Linux version" in console, console[-3000:]
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    ours = {tuple(d["name"].split("/")): d["outcome"] for d in lines if d["name"] != "qemukit.run"}
    assert {name: ours.get(("example", name)) for name in EXAMPLE} == EXAMPLE, ours
    listed = {k: v for k, v in ours.items() if k[0] == "list-kunit-test"}
    assert len(listed) > 10 and set(listed.values()) == {"passed"}, ours
    counts = lines[-1]["counts"]
    assert counts["passed"] > 0 and counts["skipped"] == 2 and counts["failed"] == 0, counts
    assert sum(counts.values()) == len(ours)
    # The kernel's own parser, on the same console log: the same tests, the same outcomes.
    their_counts, tests = theirs(kunit_parser, console)
    assert ours == dict(tests), (ours, tests)
    assert their_counts == counts
    cmd = subprocess.run([sys.executable, str(kunit_tool / "kunit.py"), "parse", str(log)],
                         capture_output=True, text=True, timeout=120, check=False)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", cmd.stdout)
    summary = re.search(r"Ran (\d+) tests?: passed: (\d+), skipped: (\d+)", plain)
    assert summary, plain[-3000:]
    assert [int(g) for g in summary.groups()] == [len(ours), counts["passed"], 2], plain[-3000:]
    assert cmd.returncode == 0, plain[-3000:]
    # JUnit: one case per test, skips as skips, valid for junitparser.
    (suite,) = junitparser.JUnitXml.fromfile(str(xml))
    kinds = {c.name: type(c.result[0]).__name__ if c.result else "passed" for c in suite}
    assert kinds["example/example_skip_test"] == "Skipped"
    assert kinds["example/example_simple_test"] == "passed"
    assert (suite.tests, suite.failures, suite.skipped, suite.errors) == (len(ours), 0, 2, 0)
