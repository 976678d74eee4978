"""The one JUnit and JSON writer (qemukit.results) and KernelTestResult's files: valid
whatever the guest printed, and read back by an outside JUnit parser (junitparser)."""

from __future__ import annotations

import json
import xml.dom.minidom
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from qemukit.kernel import JUNIT_TEXT_LIMIT, KernelTestResult, json_safe, xml_safe
from qemukit.results import RUN_OUTCOMES, Outcome, ReportCase, json_text, write_json, write_junit

EVERY_CHAR = "".join(chr(i) for i in range(256))
NASTY = ("tiny:/# \x1b[6n" + EVERY_CHAR + "\ud800 lone \udcff surrogates \ufffe\uffff"
         + " bad utf-8: " + b"\xff\xfe\xc3(".decode("utf-8", "replace") + " emoji \U0001f600")


def result(outcome: str = "failed", **kw: Any) -> KernelTestResult:
    fields: dict[str, Any] = dict(
        command=("sh", "-c", "printf '\x1b[31m\x00'"), outcome=outcome, exit_status=3,
        stdout=NASTY, stderr=NASTY, boot_time=3.2, duration=4.5, panic=None, error=None,
        accel="tcg", console_log=None, console_tail=NASTY,
        warnings=("watchdog: BUG: soft lockup - CPU#0 stuck for 21s! [sh:1]\x1b[0m",),
    )
    if outcome == "panic":
        fields.update(panic="Kernel panic - not syncing: \x1b\x00", exit_status=None)
    if outcome == "oops":
        fields.update(oops="BUG: kernel NULL pointer dereference\x07", exit_status=None)
    if outcome in ("timeout", "error"):
        fields.update(error="timed out \x1b[6n\x00 waiting", exit_status=None)
    fields.update(kw)
    return KernelTestResult(**fields)


def strict_json(path: Path) -> Any:
    """Parse as a strict consumer would: UTF-8 only, no NaN, no lone surrogates."""
    text = path.read_bytes().decode("utf-8", "strict")

    def no_constants(name: str) -> Any:
        raise ValueError(f"non-standard JSON constant {name}")

    data = json.loads(text, parse_constant=no_constants)

    def walk(value: Any) -> None:
        if isinstance(value, str):
            value.encode("utf-8", "strict")  # a lone surrogate raises here
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(k)
                walk(v)

    walk(data)
    return data


def strict_xml(path: Path) -> ET.Element:
    """Parse with two strict XML 1.0 parsers (both expat: any forbidden character fails)."""
    xml.dom.minidom.parse(str(path))
    return ET.parse(path).getroot()


OUTCOMES = [o.value for o in RUN_OUTCOMES]


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_junit_is_well_formed_for_any_output(outcome: str, tmp_path: Path) -> None:
    res = result(outcome)
    res.write_junit(tmp_path / "r.xml", suite="suite\x1b")
    root = strict_xml(tmp_path / "r.xml")
    suite = root.find("testsuite")
    assert suite is not None
    assert suite.get("failures") == str(int(outcome in ("failed", "panic", "oops")))
    assert suite.get("errors") == str(int(outcome in ("timeout", "error")))
    case = suite.find("testcase")
    assert case is not None and case.get("name") == "sh -c printf '\\x1b[31m\\x00'"
    out = case.findtext("system-out") or ""
    # Forbidden characters are written as visible escapes; everything else is kept.
    assert "tiny:/# \\x1b[6n" in out and "\\x00\\x01" in out and "\\udcff" in out
    assert "\\ufffe\\uffff" in out and "\U0001f600" in out and "\ufffd" in out
    assert "\t\n" in out and "".join(chr(i) for i in range(0x20, 0x7f)) in out
    assert "soft lockup - CPU#0 stuck for 21s! [sh:1]\\x1b[0m" in out  # the warnings block
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["qemukit.outcome"] == outcome
    warning = props["qemukit.warning"]
    assert warning is not None and warning.startswith("watchdog: BUG: soft lockup")
    if outcome == "panic":
        failure = case.find("failure")
        assert failure is not None
        assert failure.get("message") == "kernel panic: Kernel panic - not syncing: \\x1b\\x00"
        assert "\\x1b[6n" in (failure.text or "")
    if outcome == "oops":
        failure = case.find("failure")
        assert failure is not None and failure.get("message") == (
            "kernel oops: BUG: kernel NULL pointer dereference\\x07")
        assert props["qemukit.oops"] == "BUG: kernel NULL pointer dereference\\x07"
    if outcome in ("timeout", "error"):
        error = case.find("error")
        assert error is not None and error.get("message") == "timed out \\x1b[6n\\x00 waiting"


@pytest.mark.parametrize("outcome", OUTCOMES)
def test_json_is_strict_for_any_output(outcome: str, tmp_path: Path) -> None:
    result(outcome).write_json(tmp_path / "r.json")
    data = strict_json(tmp_path / "r.json")
    assert data["outcome"] == outcome
    # Control characters survive exactly (JSON escapes them); lone surrogates become text.
    assert data["stdout"].startswith("tiny:/# \x1b[6n" + EVERY_CHAR)
    assert "\\ud800 lone \\udcff surrogates \ufffe\uffff" in data["stdout"]
    assert data["warnings"] == ["watchdog: BUG: soft lockup - CPU#0 stuck for 21s! [sh:1]\x1b[0m"]
    assert data["command"] == ["sh", "-c", "printf '\x1b[31m\x00'"]
    assert (tmp_path / "r.json").read_bytes().isascii()


def test_megabytes_of_output_are_capped_in_junit_and_whole_in_json(tmp_path: Path) -> None:
    big = "".join(f"line {i:07d}\x1b\n" for i in range(400_000))  # 5.2 MB
    res = result("failed", stdout=big, stderr=big, console_tail="")
    res.write_junit(tmp_path / "r.xml")
    case = strict_xml(tmp_path / "r.xml").find("testsuite/testcase")
    assert case is not None
    for tag in ("system-out", "system-err", "failure"):
        text = case.findtext(tag) or ""
        assert text.startswith("[qemukit: the first ")
        assert "characters were cut]" in text.split("\n", 1)[0]
        assert len(text) < JUNIT_TEXT_LIMIT * 1.5  # the limit is taken before escaping
    assert (case.findtext("system-err") or "").endswith("line 0399999\\x1b\n")
    res.write_json(tmp_path / "r.json")
    assert strict_json(tmp_path / "r.json")["stdout"] == big


def test_a_huge_test_name_is_shortened(tmp_path: Path) -> None:
    res = result("passed", command=("sh", "-c", "echo x; " * 10_000))
    res.write_junit(tmp_path / "r.xml")
    case = strict_xml(tmp_path / "r.xml").find("testsuite/testcase")
    assert case is not None and len(case.get("name") or "") <= 1000
    assert (case.get("name") or "").endswith("\u2026")


def test_escaping_helpers() -> None:
    assert xml_safe("a\x00b\x1bc\td\ne\rf\x7f\x80") == "a\\x00b\\x1bc\td\ne\rf\x7f\x80"
    assert xml_safe("\ud800\ufffe\U0010ffff") == "\\ud800\\ufffe\U0010ffff"
    assert json_safe("\x00\x1b\ud800\udfff ok") == "\x00\x1b\\ud800\\udfff ok"


def test_result_fields_are_in_the_json(tmp_path: Path) -> None:
    res = result("passed", oops="BUG: x", warnings=("WARNING: y", "rcu: INFO: z"))
    data = res.to_dict()
    assert data["oops"] == "BUG: x" and data["warnings"] == ["WARNING: y", "rcu: INFO: z"]


# -- one writer for every result, checked by an outside JUnit reader -----------------------

JUNIT_KIND = {"failure": "Failure", "error": "Error", "skipped": "Skipped"}


def junit_read(path: Path) -> Any:
    """The file as junitparser (xunit2, the Jenkins/pytest dialect) reads it, each suite's
    counts checked against the ones it computes from the cases themselves."""
    from junitparser import xunit2

    xml = xunit2.JUnitXml.fromfile(str(path))
    for suite in xml:
        written = (suite.tests, suite.failures, suite.errors, suite.skipped)
        suite.update_statistics()
        assert written == (suite.tests, suite.failures, suite.errors, suite.skipped)
    return xml


def test_junitparser_reads_every_outcome_as_what_it_is(tmp_path: Path) -> None:
    from junitparser import xunit2

    cases = [result(o.value).report_case(f"case-{o.value}") for o in RUN_OUTCOMES]
    cases.append(ReportCase("ktap/skipped\x1b", Outcome.SKIPPED, message="SKIP no \x00 device",
                            details=NASTY))
    write_junit(cases, tmp_path / "r.xml", suite="mixed\x07")
    xml = junit_read(tmp_path / "r.xml")
    suites = list(xml)
    assert len(suites) == 1 and suites[0].name == "mixed\\x07"
    read = {case.name: case for case in suites[0]}
    assert list(read) == [*(f"case-{o.value}" for o in RUN_OUTCOMES), "ktap/skipped\\x1b"]
    for outcome in [*RUN_OUTCOMES, Outcome.SKIPPED]:
        case = read[f"case-{outcome.value}" if outcome is not Outcome.SKIPPED
                    else "ktap/skipped\\x1b"]
        assert isinstance(case, xunit2.TestCase)
        kinds = [type(r).__name__ for r in case.result]
        assert kinds == ([] if outcome.junit is None else [JUNIT_KIND[outcome.junit]])
        assert case.is_passed == (outcome is Outcome.PASSED)
        props = {p.name: p.value for p in case.properties()}
        assert props["qemukit.outcome"] == outcome.value
        assert (case.system_out or "").startswith("tiny:/# \\x1b[6n") or outcome is Outcome.SKIPPED
    assert read["case-panic"].result[0].message == (
        "kernel panic: Kernel panic - not syncing: \\x1b\\x00")
    assert read["case-failed"].result[0].message == "exit status 3"
    assert read["ktap/skipped\\x1b"].result[0].message == "SKIP no \\x00 device"
    assert {p.name for p in read["case-failed"].properties()} >= {
        "qemukit.command", "qemukit.exit_status", "qemukit.accel", "qemukit.warning"}


def test_a_crash_bundle_is_named_by_a_property_and_the_last_line_of_system_out(
        tmp_path: Path) -> None:
    big = "x" * (JUNIT_TEXT_LIMIT + 10)
    res = result("panic", stdout=big, crash_bundle=str(tmp_path / "bundle\x1b-1"))
    res.write_junit(tmp_path / "r.xml")
    case = next(iter(next(iter(junit_read(tmp_path / "r.xml")))))
    props = {p.name: p.value for p in case.properties()}
    assert props["qemukit.crash_bundle"] == f"{tmp_path}/bundle\\x1b-1"
    out = case.system_out or ""
    assert out.startswith("[qemukit: the first ")  # cut, but the bundle line survives the cut
    assert out.splitlines()[-1] == f"[qemukit: crash bundle in {tmp_path}/bundle\\x1b-1]"
    assert strict_json_of(res, tmp_path)["crash_bundle"] == f"{tmp_path}/bundle\x1b-1"
    plain = result("passed")
    plain.write_junit(tmp_path / "p.xml")
    case = next(iter(next(iter(junit_read(tmp_path / "p.xml")))))
    assert "qemukit.crash_bundle" not in {p.name for p in case.properties()}
    assert "crash bundle" not in (case.system_out or "")


def strict_json_of(res: KernelTestResult, tmp_path: Path) -> Any:
    res.write_json(tmp_path / "r.json")
    return strict_json(tmp_path / "r.json")


def test_an_outcome_is_the_enum_whatever_it_was_given_as() -> None:
    res = result("oops")
    # An Outcome is a str: it equals its value (mypy's strict equality does not know that).
    assert res.outcome is Outcome.OOPS and res.outcome == "oops"  # type: ignore[comparison-overlap]
    assert res.to_dict()["outcome"] == "oops" and json.dumps(res.to_dict()["outcome"]) == '"oops"'
    with pytest.raises(ValueError, match="'crashed' is not a valid Outcome"):
        result("crashed")


def test_json_lines_and_json_text_are_strict(tmp_path: Path) -> None:
    write_json([{"a": NASTY}, {"b": ["\udcff", 1.5]}], tmp_path / "r.jsonl", lines=True)
    lines = (tmp_path / "r.jsonl").read_bytes().decode("ascii").splitlines()
    assert len(lines) == 2 and json.loads(lines[1]) == {"b": ["\\udcff", 1.5]}
    assert json.loads(json_text({"x": "\ud800"})) == {"x": "\\ud800"}
    with pytest.raises(ValueError):
        json_text({"nan": float("nan")})
