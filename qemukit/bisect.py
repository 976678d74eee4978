"""``git bisect run`` with a qemukit verdict as the judge: find the commit that broke a test.

:func:`bisect` starts ``git bisect`` between a good and a bad revision of a
git tree and drives ``git bisect run`` with this module as the judge
(``python -m qemukit.bisect STATE``). At each commit the judge runs the
build command (if any), then the test command in a VM (:func:`qemukit.kernel.run_in_vm`)
and answers git:

===========================================  ======  =====================
verdict                                      answer  exit status to git
===========================================  ======  =====================
passed                                       good    0
failed, panic, oops, timeout (a hang)        bad     1
error (QEMU or qemukit failed; the VM could  skip    125
not start, a share could not be mounted),
the build failed
===========================================  ======  =====================

Every verdict is kept (one JSON file per commit in the state directory);
:class:`BisectResult` names the first bad commit with its verdict (and its
crash bundle, with ``crash_dir``), or the candidates git could not tell
apart when skipped commits hid the answer. The tree is left as it was
(``git bisect reset``) whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import HostError, QemukitError, SpecError
from .results import Outcome
from .spec import VMSpec

__all__ = ["BisectResult", "StepVerdict", "bisect", "default_build", "judge"]

#: ``git bisect run``'s answers.
GOOD, BAD, SKIP = 0, 1, 125
#: Any exit status above 127 makes ``git bisect run`` stop.
ABORT = 128
#: Seconds one build may take.
BUILD_TIMEOUT = 7200.0
_SHA = re.compile(r"\b([0-9a-f]{40})\b")


@dataclass(frozen=True)
class StepVerdict:
    """The judge's verdict on one commit: ``answer`` (good, bad, skip), why, and the run's result."""

    commit: str
    answer: str
    reason: str
    result: dict[str, Any] | None = None

    @property
    def crash_bundle(self) -> str | None:
        """The crash bundle of this commit's run, if it crashed and ``crash_dir`` was given."""
        return (self.result or {}).get("crash_bundle")


@dataclass(frozen=True)
class BisectResult:
    """What the bisection found.

    ``first_bad`` is the first bad commit (None when skipped commits left git
    unsure: ``candidates`` lists those it could not tell apart); ``steps`` is
    every commit judged, in order; ``log`` is ``git bisect log``.
    """

    first_bad: str | None
    subject: str | None
    steps: tuple[StepVerdict, ...]
    candidates: tuple[str, ...] = ()
    log: str = ""
    verdict: StepVerdict | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {"first_bad": self.first_bad, "subject": self.subject,
                "candidates": list(self.candidates),
                "verdict": _step_dict(self.verdict) if self.verdict else None,
                "steps": [_step_dict(s) for s in self.steps]}


def _step_dict(step: StepVerdict) -> dict[str, Any]:
    return {"commit": step.commit, "answer": step.answer, "reason": step.reason,
            "result": step.result}


def default_build(repo: str | Path) -> list[str] | None:
    """``make -jN`` for a kernel tree configured in place (a ``.config`` at its top), else None."""
    root = Path(repo)
    if (root / "Kbuild").is_file() and (root / "Makefile").is_file() and (root / ".config").is_file():
        return ["make", f"-j{os.cpu_count() or 1}"]
    return None


def _git(repo: Path, *args: str, check: bool = True, timeout: float = 120.0
         ) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              errors="replace", timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        raise HostError("git is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"git {' '.join(args)} took more than {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        raise HostError(f"git {' '.join(args)} failed (exit {proc.returncode}): "
                        f"{proc.stderr.strip()[-800:]}")
    return proc


def bisect(repo: str | Path, good: str, bad: str, spec: VMSpec, command: Sequence[str], *,
           build: str | Sequence[str] | None = None, timeout: float = 300.0,
           crash_dir: str | Path | None = None, continue_on_oops: bool = False,
           progress: Any = None) -> BisectResult:
    """Find the first commit between ``good`` and ``bad`` of the git tree ``repo`` where
    ``command`` in a VM of ``spec`` stops passing (see the module's docstring).

    ``build`` (an argv, or a string split as a shell would split it, never run
    by one) runs in the tree before each test; default :func:`default_build`.
    ``timeout`` bounds each test's boot plus command. ``progress`` gets each
    line git prints. Raises :class:`SpecError` for a bad revision or a tree
    that is not a git work tree, :class:`HostError` when git fails.
    """
    root = Path(repo)
    if not command:
        raise SpecError("command", list(command), "give the test command to run in the guest")
    top = _git(root, "rev-parse", "--show-toplevel", check=False)
    if top.returncode != 0:
        raise SpecError("repo", str(repo), "not a git work tree")
    root = Path(top.stdout.strip())
    revs = {}
    for name, rev in (("good", good), ("bad", bad)):
        found = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
        if found.returncode != 0:
            raise SpecError(name, rev, "not a commit of this tree")
        revs[name] = found.stdout.strip()
    if _git(root, "bisect", "log", check=False).returncode == 0:
        raise SpecError("repo", str(root), "a bisection is already under way here "
                        "(git bisect reset ends it)")
    build_argv = (shlex.split(build) if isinstance(build, str) else list(build)
                  if build is not None else default_build(root))
    state = Path(tempfile.mkdtemp(prefix="qemukit-bisect-"))
    try:
        spec.replace(warm=False).dump(state / "spec.toml")
        (state / "settings.json").write_text(json.dumps({
            "command": list(command), "build": build_argv, "timeout": timeout,
            "crash_dir": str(Path(crash_dir).absolute()) if crash_dir is not None else None,
            "continue_on_oops": continue_on_oops}))
        (state / "steps").mkdir()
        _git(root, "bisect", "start", revs["bad"], revs["good"])
        try:
            lines = _run_bisect(root, state, progress)
            log = _git(root, "bisect", "log", check=False).stdout
        finally:
            _git(root, "bisect", "reset", check=False)
        steps = tuple(_read_steps(state / "steps"))
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return _conclude(root, lines, steps, log)


def _run_bisect(root: Path, state: Path, progress: Any) -> list[str]:
    argv = ["git", "-C", str(root), "bisect", "run", sys.executable, "-m", "qemukit.bisect",
            str(state)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if progress is not None:
            progress(line.rstrip("\n"))
    # Each step has its own deadlines (build, boot and command): git itself only waits on them.
    proc.wait()
    if proc.returncode not in (0, 1) and not any("first bad commit" in x for x in lines):
        tail = "\n".join(lines[-15:])
        raise HostError(f"git bisect run failed (exit {proc.returncode}):\n{tail}")
    return lines


def _read_steps(directory: Path) -> list[StepVerdict]:
    out = []
    for path in sorted(directory.glob("*.json"), key=lambda p: int(p.stem.split("-")[0])):
        data = json.loads(path.read_text())
        out.append(StepVerdict(data["commit"], data["answer"], data["reason"], data["result"]))
    return out


def _conclude(root: Path, lines: list[str], steps: tuple[StepVerdict, ...], log: str
              ) -> BisectResult:
    text = "\n".join(lines)
    m = re.search(r"^([0-9a-f]{40}) is the first bad commit", text, re.M)
    if m is None:
        candidates = tuple(dict.fromkeys(_SHA.findall(
            text.split("could be any of:", 1)[1]))) if "could be any of:" in text else ()
        return BisectResult(None, None, steps, candidates, log)
    first = m.group(1)
    subject = _git(root, "log", "-1", "--format=%s", first, check=False).stdout.strip() or None
    verdict = next((s for s in reversed(steps) if s.commit == first), None)
    return BisectResult(first, subject, steps, (), log, verdict)


# -- the judge: one step, run by git bisect run ------------------------------------------


def judge(state: str | Path) -> int:
    """Judge the checked-out commit (git bisect run's command): build, run, answer git.

    Writes the verdict to ``STATE/steps/N-<commit>.json``; returns 0 (good),
    1 (bad) or 125 (skip). Never raises for a failed build or run: that is a
    verdict.
    """
    from .kernel import run_in_vm

    root = Path(state)
    settings = json.loads((root / "settings.json").read_text())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False, timeout=60).stdout.strip()
    number = len(list((root / "steps").glob("*.json"))) + 1
    result: dict[str, Any] | None = None
    if settings["build"]:
        try:
            built = subprocess.run(settings["build"], capture_output=True, text=True,
                                   errors="replace", timeout=BUILD_TIMEOUT, check=False,
                                   stdin=subprocess.DEVNULL)
            failed = (f"the build failed (exit {built.returncode}): "
                      f"{(built.stdout + built.stderr).strip()[-500:]}"
                      if built.returncode != 0 else None)
        except (OSError, subprocess.TimeoutExpired) as exc:
            failed = f"the build could not run: {exc}"
        if failed is not None:
            return _answer(root, number, commit, "skip", failed, None)
    try:
        spec = VMSpec.load(root / "spec.toml")
        run = run_in_vm(spec, settings["command"], timeout=settings["timeout"],
                        crash_dir=settings["crash_dir"],
                        continue_on_oops=settings["continue_on_oops"])
    except QemukitError as exc:
        return _answer(root, number, commit, "skip", f"qemukit could not run the test: {exc}",
                       None)
    result = json.loads(json.dumps(run.to_dict(), default=str))
    if run.outcome is Outcome.PASSED:
        return _answer(root, number, commit, "good", Outcome.PASSED, result)
    if run.outcome is Outcome.ERROR:
        return _answer(root, number, commit, "skip", f"infrastructure: {run.error}", result)
    line = {Outcome.FAILED: f"exit status {run.exit_status}",
            Outcome.PANIC: f"kernel panic: {run.panic}", Outcome.OOPS: f"kernel oops: {run.oops}",
            Outcome.TIMEOUT: f"timeout: {run.error}"}
    return _answer(root, number, commit, "bad", line.get(run.outcome, run.outcome), result)


def _answer(state: Path, number: int, commit: str, answer: str, reason: str,
            result: dict[str, Any] | None) -> int:
    (state / "steps" / f"{number}-{commit}.json").write_text(json.dumps(
        {"commit": commit, "answer": answer, "reason": reason, "result": result}))
    print(f"qemukit bisect: {commit[:12]}: {answer} ({reason.splitlines()[0][:200]})",
          flush=True)
    return {"good": GOOD, "bad": BAD, "skip": SKIP}[answer]


def _main(argv: Sequence[str]) -> int:
    """git bisect run's command. A judge that breaks itself answers 128: git stops there,
    rather than take the breakage for a bad commit."""
    try:
        return judge(argv[0])
    except Exception:  # noqa: BLE001 - any bug of the judge ends the bisection, said once
        import traceback

        traceback.print_exc()
        return ABORT


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
