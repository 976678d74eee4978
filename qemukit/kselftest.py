"""The kernel's own test suites as per-test verdicts: kselftest and KUnit.

:func:`install_kselftests` builds and installs named kselftest targets from a
kernel source tree on the host (``make -C tools/testing/selftests
TARGETS=... install INSTALL_PATH=...``, the kernel's own install: the
runner ``run_kselftest.sh``, ``kselftest/runner.sh``, ``kselftest-list.txt``
and each target's programs). :func:`run_kselftests` shares that directory
into the guest (at :data:`GUEST_PATH`, writable: some tests write beside
themselves), runs the kernel's runner there and parses its KTAP.
:func:`run_kunit` boots a kernel (optionally running a command, such as
``modprobe`` of a KUnit test module) and parses the KTAP that KUnit printed
on the console.

Both return a :class:`SuiteRun`: the boot-and-run verdict
(:class:`~qemukit.kernel.KernelTestResult`, with its crash bundle if the
kernel crashed), the parsed :class:`~qemukit.ktap.KtapReport`, and one
:class:`TestCase` per test, which :meth:`SuiteRun.write_jsonl` and
:meth:`SuiteRun.write_junit` write as JSON lines and JUnit XML (one case per
test; skips as ``<skipped>``; a run that did not end normally, or KTAP
that stopped early, as one more case, ``qemukit.run``, with the kernel's
verdict).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HostError, SpecError
from .kernel import KernelTestResult, run_in_vm
from .ktap import KtapReport, parse_ktap
from .results import KTAP_OUTCOMES, Outcome, ReportCase, json_text, write_junit
from .spec import Share, VMSpec

__all__ = ["GUEST_PATH", "SuiteRun", "TestCase", "install_kselftests", "ktap_cases",
           "run_kselftests", "run_kunit", "selftests_dir"]

#: Where the installed selftests are mounted in the guest.
GUEST_PATH = "/kselftest"
#: Seconds a selftests build and install may take.
INSTALL_TIMEOUT = 3600.0
_TARGET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
_FAILED = {Outcome.FAILED, Outcome.ERROR}


@dataclass(frozen=True)
class TestCase:
    """One test's verdict: ``name`` (its KTAP path joined with ``/``; for kselftest the
    runner's ``selftests: TARGET: PROGRAM``), ``outcome`` (passed, failed, skipped,
    error), the directive (``SKIP reason``) and the lines it printed."""

    name: str
    outcome: Outcome
    directive: str | None = None
    diagnostics: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain data for a JSON line."""
        return {"name": self.name, "outcome": self.outcome, "directive": self.directive,
                "diagnostics": list(self.diagnostics)}


def ktap_cases(report: KtapReport) -> tuple[TestCase, ...]:
    """One :class:`TestCase` per test case of ``report`` (see :attr:`KtapReport.cases`)."""
    return tuple(TestCase("/".join(c.path), c.outcome, c.directive, c.diagnostics)
                 for c in report.cases)


@dataclass(frozen=True)
class SuiteRun:
    """A kernel test suite's run: the VM's verdict, the KTAP report, one case per test.

    ``ok`` is True when the run itself passed (or, for KUnit, booted and ran
    its command) and every test passed or was skipped, with the KTAP complete.
    """

    suite: str
    result: KernelTestResult
    report: KtapReport
    cases: tuple[TestCase, ...]

    @property
    def ok(self) -> bool:
        """No failed or errored test, the KTAP found and complete, and the kernel survived."""
        return (self.result.outcome in (Outcome.PASSED, Outcome.FAILED) and self.report.ok
                and not any(c.outcome in _FAILED for c in self.cases))

    def counts(self) -> dict[str, int]:
        """How many tests ended each way (passed, failed, skipped, error)."""
        out: dict[str, int] = {o: 0 for o in KTAP_OUTCOMES}
        for case in self.cases:
            out[case.outcome] += 1
        return out

    def _run_case(self) -> str | None:
        """Why the run itself deserves a case of its own, or None."""
        res = self.result
        if res.outcome not in (Outcome.PASSED, Outcome.FAILED):
            line = (res.panic if res.outcome is Outcome.PANIC else res.oops
                    if res.outcome is Outcome.OOPS else res.error)
            return f"{res.outcome}: {line}"
        if not self.report.found:
            return "no KTAP output found"
        if not self.report.complete:
            return "the KTAP output stopped before every test reported"
        return None

    def jsonl(self) -> str:
        """One JSON object a line per test, then one for the run (``"name": "qemukit.run"``)."""
        lines = [{"suite": self.suite, **case.to_dict()} for case in self.cases]
        lines.append({"suite": self.suite, "name": "qemukit.run", "outcome": self.result.outcome,
                      "counts": self.counts(), "complete": self.report.complete,
                      "problems": list(self.report.problems),
                      "crash_bundle": self.result.crash_bundle,
                      "panic": self.result.panic, "oops": self.result.oops,
                      "error": self.result.error})
        return "".join(json_text(line, indent=None) + "\n" for line in lines)

    def write_jsonl(self, path: str | Path) -> None:
        """Write :meth:`jsonl` to ``path`` (strict JSON, ASCII only)."""
        Path(path).write_text(self.jsonl(), encoding="ascii")

    def write_junit(self, path: str | Path) -> None:
        """JUnit XML: one test case per test (skips as ``<skipped>``), always well-formed;
        a run that went wrong itself (a panic, no KTAP) is one more case, ``qemukit.run``."""
        cases = [ReportCase(case.name, case.outcome,
                            message=case.directive or _MESSAGE.get(case.outcome),
                            details="\n".join(case.diagnostics),
                            stdout="\n".join(case.diagnostics)) for case in self.cases]
        trouble = self._run_case()
        if trouble is not None:
            cases.append(ReportCase("qemukit.run", Outcome.ERROR, self.result.duration,
                                    message=trouble, details=self.result.console_tail,
                                    crash_bundle=self.result.crash_bundle))
        write_junit(cases, path, suite=self.suite)


#: A test's JUnit message when its result line gave no directive.
_MESSAGE = {Outcome.SKIPPED: "SKIP", Outcome.FAILED: "not ok",
            Outcome.ERROR: "the test never finished"}


def selftests_dir(tree: str | Path) -> Path:
    """``tools/testing/selftests`` of a kernel source tree, or of the source of a ``make O=``
    build tree (its ``source`` link). Raises :class:`SpecError` when there is none."""
    root = Path(tree)
    for base in (root, root / "source"):
        candidate = base / "tools" / "testing" / "selftests"
        if (candidate / "Makefile").is_file():
            return candidate.resolve()
    raise SpecError("kselftest", str(tree), "not a kernel source tree (no "
                    "tools/testing/selftests/Makefile in it or in its source link)")


def _targets(targets: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    names = [t for t in names if t]
    if not names:
        raise SpecError("kselftest", targets, "name at least one target (e.g. size,timers)")
    for name in names:
        if not _TARGET.fullmatch(name) or ".." in name.split("/"):
            raise SpecError("kselftest", name, "not a selftests target name")
    return names


def install_kselftests(tree: str | Path, targets: str | Sequence[str], dest: str | Path, *,
                       build_dir: str | Path | None = None, jobs: int | None = None,
                       timeout: float = INSTALL_TIMEOUT) -> Path:
    """Build and install ``targets`` of ``tree``'s selftests into the new directory ``dest``.

    Runs the kernel's ``make -C tools/testing/selftests TARGETS="..." install
    INSTALL_PATH=dest`` (objects under ``build_dir``, default ``dest/.build``,
    which is removed afterwards) and returns ``dest``; a target with no test
    listed is an error. Raises :class:`SpecError` for a bad tree or target
    name, :class:`HostError` with the build's last lines when make fails.
    """
    source = selftests_dir(tree)
    names = _targets(targets)
    for name in names:
        if not (source / name).is_dir():
            raise SpecError("kselftest", name, f"no such target in {source}")
    out = Path(dest)
    if out.exists() and any(out.iterdir()):
        raise SpecError("kselftest install", str(out), "exists and is not empty")
    build = Path(build_dir) if build_dir is not None else out / ".build"
    argv = ["make", "-C", str(source), f"-j{jobs or os.cpu_count() or 1}",
            f"TARGETS={' '.join(names)}", f"O={build.absolute()}",
            f"INSTALL_PATH={out.absolute()}", "install"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise HostError("cannot build the selftests: make is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"building the selftests took more than {timeout:.0f} s") from exc
    finally:
        if build_dir is None:
            shutil.rmtree(build, ignore_errors=True)
    listed = out / "kselftest-list.txt"
    if proc.returncode != 0 or not listed.is_file():
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise HostError(f"building the selftests failed (exit {proc.returncode}): "
                        f"{' '.join(argv)}\n{tail}")
    found = {line.split(":", 1)[0] for line in listed.read_text().splitlines() if ":" in line}
    missing = [n for n in names if n not in found]
    if missing:
        raise HostError(f"the selftests install lists no test of {', '.join(missing)} "
                        f"(in {listed}); did it build?")
    return out


#: The runner calls ``/usr/bin/timeout --foreground``; busybox's timeout (the tiny image's)
#: has no --foreground and fails every test. Where it refuses the option, a shim that drops it
#: takes its place (busybox's link in the guest's root, which is in RAM; a coreutils timeout,
#: as on Debian or the host's root, is left alone).
_TIMEOUT_SHIM = (
    "if [ -x /usr/bin/timeout ] && ! /usr/bin/timeout --foreground 5 true 2>/dev/null; then "
    "printf '#!/bin/sh\\n[ \"$1\" = --foreground ] && shift\\nexec busybox timeout \"$@\"\\n' "
    "> /run/qemukit-timeout && chmod 755 /run/qemukit-timeout && "
    "ln -sf /run/qemukit-timeout /usr/bin/timeout; fi; ")


def kselftest_command(targets: Sequence[str]) -> list[str]:
    """The guest command: the kernel's runner over the installed targets, in order."""
    collections = " ".join(f"-c {t}" for t in targets)
    return ["sh", "-c", f"{_TIMEOUT_SHIM}cd {GUEST_PATH} && ./run_kselftest.sh {collections}"]


def run_kselftests(spec: VMSpec, tree: str | Path, targets: str | Sequence[str], *,
                   timeout: float = 1800.0, **run_options: Any) -> SuiteRun:
    """Install ``targets`` of ``tree``'s selftests, run them in a VM of ``spec``, parse the KTAP.

    ``run_options`` are :func:`~qemukit.kernel.run_in_vm`'s (``console_log``,
    ``crash_dir``, ``modules``, ...). The installed tree lives in a temporary
    directory shared with the guest and removed afterwards.
    """
    names = _targets(targets)
    work = Path(tempfile.mkdtemp(prefix="qemukit-kselftest-"))
    try:
        installed = install_kselftests(tree, names, work / "install", build_dir=work / "build")
        share = Share(host_path=installed, guest_path=GUEST_PATH, tag="kselftest")
        vm_spec = spec.replace(shares=(*spec.shares, share))
        result = run_in_vm(vm_spec, kselftest_command(names), timeout=timeout, **run_options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = parse_ktap(result.stdout)
    return SuiteRun("kselftest", result, report, ktap_cases(report))


def run_kunit(spec: VMSpec, command: str | Sequence[str] = ("true",), *,
              timeout: float = 600.0, filter_glob: str | None = None,
              console_log: str | Path | None = None, **run_options: Any) -> SuiteRun:
    """Boot ``spec`` (a kernel with KUnit tests built in), run ``command`` (e.g. ``modprobe``
    of a test module), and parse the KTAP KUnit printed on the console.

    ``filter_glob`` runs only the suites (``suite.test``) it matches
    (``kunit.filter_glob=``). ``loglevel=7`` is appended to the kernel command line:
    KUnit prints its results at ``KERN_INFO``. ``run_options`` as for :func:`~qemukit.kernel.run_in_vm`.
    """
    if filter_glob is not None:
        if not filter_glob or any(c.isspace() for c in filter_glob):
            raise SpecError("kunit filter", filter_glob, "a glob without spaces")
        spec = spec.replace(append=f"{spec.append or ''} kunit.filter_glob={filter_glob}".strip())
    # KUnit prints at KERN_INFO: shown on the console whatever quiet said (the last wins).
    spec = spec.replace(append=f"{spec.append or ''} loglevel=7".strip())
    work = Path(tempfile.mkdtemp(prefix="qemukit-kunit-"))
    log = Path(console_log) if console_log is not None else work / "console.log"
    try:
        result = run_in_vm(spec, command, timeout=timeout, console_log=log, **run_options)
        text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = parse_ktap(text)
    return SuiteRun("kunit", result, report, ktap_cases(report))

