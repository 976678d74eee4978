"""kselftest/KUnit suite reports without QEMU: targets checked before anything runs, the
source found through a build tree's link, JSON lines and JUnit per test from real runner output."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from qemukit import kselftest
from qemukit.errors import SpecError
from qemukit.kernel import KernelTestResult
from qemukit.ktap import parse_ktap

RUNNER = """\
TAP version 13
1..3
# selftests: qkdemo: pass.sh
ok 1 selftests: qkdemo: pass.sh
# selftests: qkdemo: fail.sh
not ok 2 selftests: qkdemo: fail.sh # exit=1
# selftests: qkdemo: skip.sh
ok 3 selftests: qkdemo: skip.sh # SKIP
"""


def _result(outcome: str = "passed", stdout: str = RUNNER, **kw: object) -> KernelTestResult:
    fields: dict[str, Any] = dict(command=("sh",), outcome=outcome, exit_status=0, stdout=stdout, stderr="",
                        boot_time=1.0, duration=2.0, panic=None, error=None, accel="tcg",
                        console_log=None, console_tail="tail\x1b")
    fields.update(kw)
    return KernelTestResult(**fields)


def _run(result: KernelTestResult) -> kselftest.SuiteRun:
    report = parse_ktap(result.stdout)
    return kselftest.SuiteRun("kselftest", result, report, kselftest.ktap_cases(report))


def test_cases_json_lines_and_junit(tmp_path: Path) -> None:
    run = _run(_result())
    assert run.counts() == {"passed": 1, "failed": 1, "skipped": 1, "error": 0} and not run.ok
    run.write_jsonl(tmp_path / "r.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [d["outcome"] for d in lines] == ["passed", "failed", "skipped", "passed"]
    assert lines[-1]["name"] == "qemukit.run"
    run.write_junit(tmp_path / "r.xml")
    suite = ET.parse(tmp_path / "r.xml").getroot()[0]
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    assert [[c.tag for c in case if c.tag in ("failure", "error", "skipped")] for case in suite] == [
        [], ["failure"], ["skipped"]]


def test_a_panic_mid_run_is_a_case_of_its_own(tmp_path: Path) -> None:
    run = _run(_result("panic", RUNNER.split("# selftests: qkdemo: fail.sh")[0].replace(
        "1..3", "1..3"), panic="Kernel panic - not syncing: x", crash_bundle="/b"))
    assert not run.report.complete and not run.ok
    run.write_junit(tmp_path / "r.xml")
    suite = ET.parse(tmp_path / "r.xml").getroot()[0]
    last = list(suite)[-1]
    assert last.get("name") == "qemukit.run" and last.find("error") is not None
    props = {p.get("name"): p.get("value") for p in last.iter("property")}
    assert props["qemukit.crash_bundle"] == "/b"
    assert "\\x1b" in last.find("error").text  # type: ignore[union-attr,operator]


def test_targets_are_checked(tmp_path: Path) -> None:
    for bad in ("", "a,../b", "-rf", "a b"):
        with pytest.raises(SpecError):
            kselftest._targets(bad)
    assert kselftest._targets("size, timers") == ["size", "timers"]
    with pytest.raises(SpecError, match="not a kernel source tree"):
        kselftest.selftests_dir(tmp_path)
    src = tmp_path / "src"
    (src / "tools/testing/selftests").mkdir(parents=True)
    (src / "tools/testing/selftests/Makefile").write_text("")
    build = tmp_path / "build"
    build.mkdir()
    (build / "source").symlink_to(src)
    assert kselftest.selftests_dir(build) == (src / "tools/testing/selftests").resolve()
    with pytest.raises(SpecError, match="no such target"):
        kselftest.install_kselftests(src, "size", tmp_path / "out")
