"""The matrix file, the retry rules of the local pool and the report, without QEMU.

The pool's error paths run against a fake attempt (``_local.run_attempt`` replaced): what
real VMs do is in tests/integration/test_matrix.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from qemukit import kconfig, matrix
from qemukit.errors import SpecError
from qemukit.kernel import KernelTestResult
from qemukit.matrix import Job, JobResult, _local, _run, _shipping, load_matrix, parse_matrix, run_matrix
from tests.unit.test_results import junit_read

FILE = """
[defaults]
image = "tiny"
accel = "tcg"
timeout = 60

[matrix.kernels]
stock = {}
quiet = { append = "console=ttyS0 quiet" }

[matrix.commands]
ok = ["true"]
fails = ["false"]
panics = { command = ["sh", "-c", "echo c > /proc/sysrq-trigger"], timeout = 30 }

[[job]]
name = "uname"
command = ["uname", "-r"]
memory = "256M"
"""


def _parse(text: str) -> list[Job]:
    return parse_matrix(tomllib.loads(text))


def test_product_defaults_and_single_jobs() -> None:
    jobs = {j.name: j for j in _parse(FILE)}
    assert list(jobs) == ["stock/ok", "stock/fails", "stock/panics", "quiet/ok", "quiet/fails",
                          "quiet/panics", "uname"]
    assert jobs["quiet/panics"].axes == {"kernels": "quiet", "commands": "panics"}
    assert jobs["quiet/panics"].command == ("sh", "-c", "echo c > /proc/sysrq-trigger")
    assert jobs["quiet/panics"].timeout == 30.0
    assert jobs["quiet/ok"].timeout == 60.0
    assert jobs["quiet/ok"].vm == {"accel": "tcg", "append": "console=ttyS0 quiet"}
    assert jobs["uname"].axes == {} and jobs["uname"].memory_mib == 256
    assert jobs["stock/ok"].image == "tiny" and jobs["stock/ok"].memory_mib == 512


def test_list_axes_and_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[[matrix.kernels]]\nname = "a"\nappend = "x"\n[[matrix.kernels]]\n'
                    'name = "b"\nappend = "y"\n[defaults]\nimage = "tiny"\ncommand = ["true"]\n')
    jobs = load_matrix(path)
    assert [(j.name, j.vm["append"]) for j in jobs] == [("a", "x"), ("b", "y")]


@pytest.mark.parametrize(("text", "field", "value"), [
    ('[[job]]\nname = "a"\ncommand = ["true"]\nmemroy = "1G"\n', "job[0].memroy", "1G"),
    ('[[job]]\nname = "a"\ncommand = "true"\n', "job 'a': command", "true"),
    ('[[job]]\nname = "a"\ncommand = []\n', "job 'a': command", ()),
    ('[[job]]\nname = "a"\ncommand = ["true"]\ntimeout = -1\n', "job 'a': timeout", -1),
    ('[[job]]\nname = "a"\ncommand = ["true"]\ntimeout = "1"\n', "job 'a': timeout", "1"),
    ('[[job]]\nname = "a"\ncommand = ["true"]\nimage = "arch"\n', "job 'a': image", "arch"),
    ('[[job]]\nname = "a"\ncommand = ["true"]\nmemory = "lots"\n', "job 'a': memory", "lots"),
    ('[[job]]\nname = "a"\ncommand = ["true"]\ncpus = 0\n', "job 'a': cpus", 0),
    ('[[job]]\nname = "a"\n', "job[0].command", None),
    ('[[job]]\ncommand = ["true"]\n', "job[0].name", None),
    ('[[job]]\nname = "a"\ncommand = ["true"]\n[[job]]\nname = "a"\ncommand = ["false"]\n',
     "job.name", "a"),
    ('[matrix.commands]\nok = ["true"]\n[[job]]\nname = "ok"\ncommand = ["true"]\n',
     "job.name", "ok"),
    ('[matrix.flavours]\nx = "y"\n', "matrix.flavours.x", "y"),
    ('[matrix]\ncommands = 3\n', "matrix.commands", 3),
    ('[matrix.commands]\n', "matrix.commands", {}),
    ('[matrix.commands]\nok = { command = ["true"], name = "x" }\n', "matrix.commands.ok.name",
     "x"),
    ('[defaults]\nname = "x"\n', "defaults.name", "x"),
    ('[jobs]\nx = 1\n', "jobs", {"x": 1}),
    ('', "job", []),
])
def test_mistakes_name_the_key_and_value(text: str, field: str, value: Any) -> None:
    with pytest.raises(SpecError) as info:
        _parse(text)
    assert info.value.field == field
    assert info.value.value == value


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="no-such.toml"):
        load_matrix(tmp_path / "no-such.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[job]\n")
    with pytest.raises(SpecError, match="invalid TOML"):
        load_matrix(bad)


def test_api_arguments_are_checked_before_anything_runs() -> None:
    job = Job("a", ("true",), image="tiny")
    with pytest.raises(SpecError, match="retries"):
        run_matrix([job], retries=-1)
    with pytest.raises(SpecError, match="jobs"):
        run_matrix([job], jobs_at_once=0)
    with pytest.raises(SpecError, match="scheduler"):
        run_matrix([job], scheduler="localhost")
    with pytest.raises(SpecError, match="two jobs"):
        run_matrix([job, job])


def test_parallelism_is_bounded_by_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    class Memory:
        available = 3 * 640 * 1024 * 1024  # room for three VMs of 512 MiB + overhead

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    monkeypatch.setattr("qemukit.matrix._local.os.sched_getaffinity", lambda pid: set(range(16)))
    jobs = [Job(f"j{i}", ("true",), image="tiny") for i in range(10)]
    assert matrix.default_parallelism(jobs) == 3
    assert matrix.default_parallelism(jobs[:2]) == 2
    big = [*jobs, Job("big", ("true",), image="tiny", vm={"memory": "2G"})]
    assert matrix.default_parallelism(big) == 1


def _result(job: Job, outcome: str, **fields: Any) -> KernelTestResult:
    base: dict[str, Any] = dict(command=job.command, outcome=outcome,
                                exit_status=0 if outcome == "passed" else 1, stdout="", stderr="",
                                boot_time=1.0, duration=2.0, panic=None, error=None, accel="tcg",
                                console_log=None, console_tail="")
    base.update(fields)
    return KernelTestResult(**base)


def test_infrastructure_failures_are_retried_and_test_failures_are_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, int] = {}
    lock = threading.Lock()

    def fake(job: Job, matrix_id: str, worker: str) -> Any:
        with lock:
            calls[job.name] = calls.get(job.name, 0) + 1
            n = calls[job.name]
        if job.name == "flaky" and n == 1:
            return _run.Attempt(_result(job, "error", error="no QEMU"), "QEMU did not start",
                                   "h", worker)
        if job.name == "broken":
            return _run.Attempt(None, "the run raised OSError", "h", worker)
        outcome = {"fails": "failed", "panics": "panic"}.get(job.name, "passed")
        return _run.Attempt(_result(job, outcome), None, "h", worker)

    monkeypatch.setattr(_local, "run_attempt", fake)
    jobs = [Job(n, ("true",), image="tiny") for n in ("ok", "flaky", "fails", "panics", "broken")]
    seen: list[matrix.MatrixProgress] = []
    results = {r.job.name: r for r in run_matrix(jobs, jobs_at_once=2, retries=2,
                                                 progress=seen.append)}
    assert calls == {"ok": 1, "flaky": 2, "fails": 1, "panics": 1, "broken": 3}
    assert results["flaky"].outcome == "passed" and results["flaky"].attempts == 2
    assert results["flaky"].retried == ("QEMU did not start",)
    assert results["fails"].outcome == "failed" and results["fails"].attempts == 1
    assert results["panics"].outcome == "panic" and results["panics"].attempts == 1
    assert results["broken"].outcome == "error" and results["broken"].attempts == 3
    assert results["broken"].result.error == "the run raised OSError"
    assert seen[-1].done == 5 and seen[-1].failed == 3 and seen[-1].running == 0
    assert max(p.running for p in seen) <= 2


def test_fail_fast_stops_at_the_first_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(job: Job, matrix_id: str, worker: str) -> Any:
        return _run.Attempt(_result(job, "failed" if job.name == "j0" else "passed"), None,
                               "h", worker)

    monkeypatch.setattr(_local, "run_attempt", fake)
    jobs = [Job(f"j{i}", ("true",), image="tiny") for i in range(20)]
    results = list(run_matrix(jobs, jobs_at_once=1, fail_fast=True))
    assert [r.job.name for r in results] == ["j0"]


def test_a_stop_cancels_the_starts_under_way_and_refuses_new_ones() -> None:
    """A VM still starting (a warm state being built) is cancelled by a stop, not waited for;
    a start that begins after the stop is refused before QEMU is launched."""
    registry = _run.Registry()
    cancelled: list[str] = []
    registry.start_begins("m", lambda: cancelled.append("a"))
    registry.start_begins("m", lambda: cancelled.append("b"))
    finished_first = lambda: cancelled.append("done")  # noqa: E731
    registry.start_begins("m", finished_first)
    registry.finished("m", None, finished_first)  # its run ended: nothing left to cancel
    registry.start_begins("other", lambda: cancelled.append("other"))
    assert registry.stop("m") == 2
    assert sorted(cancelled) == ["a", "b"]
    with pytest.raises(_run.Cancelled):
        registry.start_begins("m", lambda: None)
    assert registry.stop("other") == 1 and "other" in cancelled


def test_the_pool_bounds_each_vms_code_buffer_when_it_runs_several(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake(job: Job, matrix_id: str, worker: str) -> Any:
        seen[job.name] = job.vm.get("tb_size")
        return _run.Attempt(_result(job, "passed"), None, "h", worker)

    monkeypatch.setattr(_local, "run_attempt", fake)
    monkeypatch.setattr(_local, "tb_size_for", lambda n: 128 if n > 1 else None)
    jobs = [Job("a", ("true",), image="tiny"), Job("b", ("true",), image="tiny",
                                                     vm={"tb_size": "32M"})]
    list(run_matrix(jobs, jobs_at_once=2))
    assert seen == {"a": 128, "b": "32M"}  # a job's own tb_size wins
    seen.clear()
    list(run_matrix(jobs, jobs_at_once=1))
    assert seen == {"a": None, "b": "32M"}  # one VM at a time: QEMU's default


def test_the_pool_ends_standby_clones_after_the_matrix_and_after_a_stop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A job whose vm table asks for a standby leaves one: it ends once every job has, after a
    full run as after --fail-fast (and a Ctrl-C: the same finally)."""
    events: list[str] = []

    def fake(job: Job, matrix_id: str, worker: str) -> Any:
        events.append(job.name)
        return _run.Attempt(_result(job, "failed" if job.name == "b" else "passed"), None, "h",
                            worker)

    monkeypatch.setattr(_local, "run_attempt", fake)
    def end_standbys() -> int:
        events.append("end")
        return 0

    monkeypatch.setattr(_local, "end_standbys_here", end_standbys)
    jobs = [Job(n, ("true",), image="tiny") for n in "abc"]
    list(run_matrix(jobs, jobs_at_once=1))
    assert sorted(events[:-1]) == ["a", "b", "c"] and events[-1] == "end"
    events.clear()
    assert [r.job.name for r in run_matrix(jobs, jobs_at_once=1, fail_fast=True)][-1] == "b"
    assert events[-1] == "end" and events.count("end") == 1


def test_end_standbys_here_ends_what_the_sync_loop_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit.vm import _standby

    ended: list[bool] = []

    async def end_all() -> None:
        ended.append(True)

    monkeypatch.setattr(_standby, "kept_memory", lambda: [256, 384])
    monkeypatch.setattr(_standby, "end_all", end_all)
    assert _run.end_standbys_here() == 2 and ended == [True]


def test_a_job_that_ends_after_its_matrix_was_stopped_ends_the_standbys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A start that finished as the stop came may have left a standby after the runner ended
    them: the job's own end ends them again (Dask cannot wait for a cancelled task)."""
    ended: list[str] = []

    def run_in_vm(spec: Any, command: Any, **kwargs: Any) -> KernelTestResult:
        _run.REGISTRY.stop("stopped-matrix")
        return _result(Job("j", ("true",), image="tiny"), "passed")

    monkeypatch.setattr(_run, "run_in_vm", run_in_vm)
    monkeypatch.setattr(_run, "ensure_image", lambda *a: None)
    def end_standbys() -> int:
        ended.append("end")
        return 0

    monkeypatch.setattr(_run, "end_standbys_here", end_standbys)
    attempt = _run.run_attempt(Job("j", ("true",), image="tiny"), "stopped-matrix", "local")
    assert attempt.infra == "the matrix was stopped" and ended == ["end"]
    ended.clear()
    monkeypatch.setattr(_run, "run_in_vm", lambda *a, **k: _result(Job("k", ("true",),
                                                                       image="tiny"), "passed"))
    assert _run.run_attempt(Job("k", ("true",), image="tiny"), "running-matrix", "local").infra is None
    assert ended == []


class _FakeStandbys:
    """The standby side as _slots sees it: keys kept (ready or being made), no QEMU."""

    def __init__(self) -> None:
        self.making: list[str] = []
        self.ready: list[str] = []
        self.log: list[str] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from qemukit.vm import _standby

        async def settle(timeout: float) -> None:
            self.log.append("settle")
            self.ready += self.making
            self.making = []

        async def end_kept(key: str) -> None:
            self.log.append(f"end {key}")
            self.making = [k for k in self.making if k != key]
            self.ready = [k for k in self.ready if k != key]

        def refill(vm: Any) -> bool:
            self.log.append(f"refill {vm.warm_start.key}")
            self.making.append(vm.warm_start.key)
            return True

        monkeypatch.setattr(_standby, "kept_keys", lambda: self.ready + self.making)
        monkeypatch.setattr(_standby, "ready_keys", lambda: list(self.ready))
        monkeypatch.setattr(_standby, "settle", settle)
        monkeypatch.setattr(_standby, "end_kept", end_kept)
        monkeypatch.setattr(_standby, "refill", refill)

    def take(self, key: str) -> None:  # what the taker's start does
        self.ready.remove(key)


class _FakeVM:
    def __init__(self, key: str) -> None:
        from qemukit.warm import WarmStart

        self.warm_start = WarmStart(warm=True, reason="", key=key)
        self.aio = self


def test_a_matrix_standby_fits_in_the_slots_and_the_next_job_takes_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """--jobs 2, one description: the first job that ends leaves a standby (one job runs, so
    it fits), the next job of the description waits for it being made and takes it; the
    count never passes 2 (jobs admitted + standbys kept - standbys being taken)."""
    from qemukit.matrix import _slots

    fake = _FakeStandbys()
    fake.install(monkeypatch)
    slots = _slots.Slots(2)

    async def scenario() -> None:
        assert await slots.admit("d") is None and await slots.admit("d") is None
        assert slots._counted() == 2
        assert await slots.release("d", None, _FakeVM("k"), True) is True  # type: ignore[arg-type]
        assert fake.making == ["k"] and slots._counted() == 2
        assert await slots.admit("d") == "k"  # waited for it (settle), will take it
        assert fake.log == ["refill k", "settle"] and slots._counted() == 2
        fake.take("k")
        assert slots._counted() == 2
        # The taker ends: no room while the other job runs? One runs: room, one more standby.
        assert await slots.release("d", "k", _FakeVM("k"), True) is True  # type: ignore[arg-type]
        assert slots.relied == {} and slots._counted() == 2
        # A job of another description needs the slot: the standby ends first.
        assert await slots.admit("e") is None
        assert fake.log[-1] == "end k" and fake.ready + fake.making == []
        assert slots._counted() == 2
        # Both running: a job that ends leaves one (room again) unless it says not to...
        assert await slots.release("e", None, _FakeVM("ke"), False) is False  # type: ignore[arg-type]
        # ...and while a standby is kept, no second one (one a matrix).
        assert await slots.release("d", None, _FakeVM("k"), True) is True  # type: ignore[arg-type]
        assert await slots.admit("x") is None  # no job runs: room for it beside the standby
        assert slots.active == 1 and fake.ready + fake.making == ["k"]
        assert await slots.admit("y") is None  # the second needs the standby's slot
        assert fake.log[-1] == "end k" and fake.ready + fake.making == []

    asyncio.run(scenario())


def test_a_standby_is_left_only_where_it_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit.matrix import _slots

    fake = _FakeStandbys()
    fake.install(monkeypatch)

    async def scenario() -> None:
        one = _slots.Slots(1)  # a single-VM Dask worker: its standby between jobs
        assert await one.admit("d") is None
        assert await one.release("d", None, _FakeVM("k"), True) is True  # type: ignore[arg-type]
        assert await one.admit("d") == "k" and one._counted() == 1
        fake.take("k")
        assert await one.release("d", "k", None, True) is False  # no VM: nothing to refill
        three = _slots.Slots(3)
        for _ in range(3):
            await three.admit("d")
        fake.ready = ["other"]  # a standby of another description kept: no second one
        assert await three.release("d", None, _FakeVM("k"), True) is False  # type: ignore[arg-type]
        fake.ready = []
        assert await three.release("d", None, _FakeVM("k"), True) is True  # type: ignore[arg-type]
        # Two jobs of the description, one ready standby: one relies on it, the other
        # needs a slot of its own (there is one: 1 running + 1 standby + 1 < 3... then full).
        assert await three.admit("d") == "k"
        assert await three.admit("d") is None and three._counted() == 3

    asyncio.run(scenario())


def test_standby_is_wanted_unless_the_job_or_the_environment_says_no(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit import VMSpec
    from qemukit.matrix import _slots

    spec = VMSpec(kernel="/k", warm=True)
    monkeypatch.delenv("QEMUKIT_STANDBY", raising=False)
    assert _slots.wanted(spec) and _slots.wanted(spec.replace(standby=True))
    assert not _slots.wanted(spec.replace(standby=False))
    assert not _slots.wanted(spec.replace(warm=False))
    monkeypatch.setenv("QEMUKIT_STANDBY", "0")
    assert not _slots.wanted(spec)
    assert _slots.description(spec) == _slots.description(spec.replace(name="x", standby=False))
    assert _slots.description(spec) != _slots.description(spec.replace(memory=384))


def _job_results() -> list[JobResult]:
    nasty = "ok \x1b[6n \x00 \ufffe \udc80 end"
    out = []
    for name, outcome, extra in (
            ("k1/ok", "passed", {}),
            ("k1/fails", "failed", {"stderr": nasty}),
            ("k2/panics", "panic", {"panic": "Kernel panic - not syncing: " + nasty,
                                    "console_tail": nasty}),
            ("k2/hangs", "timeout", {"error": "timed out " + nasty})):
        job = Job(name, ("sh", "-c", nasty), image="tiny",
                  axes=dict(zip(("kernels", "commands"), name.split("/"), strict=True)))
        out.append(JobResult(job, _result(job, outcome, stdout=nasty, **extra), "host\x07",
                             "w1", attempts=2 if outcome == "timeout" else 1,
                             retried=("worker w2 on h was lost",) if outcome == "timeout" else ()))
    return out


def test_junit_is_valid_and_has_a_case_per_job(tmp_path: Path) -> None:
    path = tmp_path / "j.xml"
    matrix.write_junit(_job_results(), path)
    root = ET.parse(path).getroot()  # expat: rejects any character XML 1.0 forbids
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("4", "2", "1")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert set(cases) == {"k1/ok", "k1/fails", "k2/panics", "k2/hangs"}
    assert cases["k1/ok"].find("failure") is None and cases["k1/ok"].find("error") is None
    failure = cases["k1/fails"].find("failure")
    assert failure is not None and "\\x1b[6n" in (failure.text or "")
    panic = cases["k2/panics"].find("failure")
    assert panic is not None and "Kernel panic" in panic.get("message", "")
    assert cases["k2/hangs"].find("error") is not None
    props = {p.get("name"): p.get("value") for p in cases["k2/hangs"].iter("property")}
    assert props["qemukit.axis.kernels"] == "k2" and props["qemukit.attempts"] == "2"
    assert props["qemukit.worker"] == "w1" and props["qemukit.host"] == "host\\x07"
    assert props["qemukit.retried"] == "worker w2 on h was lost"
    # An outside reader agrees: counts, a result per failing job, the axes as properties.
    read = {case.name: case for case in next(iter(junit_read(path)))}
    assert [type(r).__name__ for r in read["k2/panics"].result] == ["Failure"]
    assert [type(r).__name__ for r in read["k2/hangs"].result] == ["Error"]
    assert read["k1/ok"].is_passed
    assert {p.name: p.value for p in read["k1/fails"].properties()}["qemukit.axis.commands"] == (
        "fails")


def test_json_lines_are_strict(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    matrix.write_jsonl(_job_results(), path)
    lines = path.read_text(encoding="ascii").splitlines()
    assert len(lines) == 4
    for line in lines:
        data = json.loads(line)
        json.dumps(data).encode("utf-8")  # no lone surrogate survived
        assert {"name", "axes", "outcome", "host", "worker", "attempts", "retried"} <= set(data)
    assert json.loads(lines[3])["attempts"] == 2


def test_summary_counts_per_axis_and_lists_the_slowest() -> None:
    text = matrix.summary(_job_results())
    rows = {line[:24].strip(): line[24:].split() for line in text.splitlines()[1:8]}
    assert rows["all jobs"] == ["1", "1", "1", "0", "1", "0"]
    assert rows["kernels=k1"] == ["1", "1", "0", "0", "0", "0"]
    assert rows["commands=panics"] == ["0", "0", "1", "0", "0", "0"]
    assert "retried (infrastructure failures):" in text and "k2/hangs: 2 attempts" in text
    assert "slowest:" in text


def test_an_image_is_built_once_when_many_jobs_ask_at_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QEMUKIT_CACHE", str(tmp_path))
    built: list[str] = []
    inside = threading.Event()

    def find_image(name: str, arch: str = "x86_64") -> Any:
        return "image" if (tmp_path / "built").exists() else None

    def build(name: str, arch: str = "x86_64") -> Any:
        # images.build looks in the cache first, as the real one does.
        if find_image(name):
            return "image"
        inside.set()
        threading.Event().wait(0.3)  # a build that takes a while: others arrive meanwhile
        built.append(name)
        (tmp_path / "built").touch()
        return "image"

    monkeypatch.setattr("qemukit.matrix._run.images.find_image", find_image)
    monkeypatch.setattr("qemukit.matrix._run.images.build", build)
    threads = [threading.Thread(target=_run.ensure_image, args=("tiny",)) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert inside.is_set() and built == ["tiny"]


def test_shipped_files_are_kept_once_under_their_hash(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QEMUKIT_CACHE", str(tmp_path / "cache"))
    modules = tmp_path / "mods" / "lib" / "modules" / "6.1.0"
    modules.mkdir(parents=True)
    (modules / "modules.dep").write_text("kernel/a.ko:\n")
    data = _shipping.read_for_shipping("modules", tmp_path / "mods")
    paths: list[str] = []

    digest = hashlib.sha256(data).hexdigest()

    def put() -> None:
        paths.append(_shipping.materialize("modules", digest, "mods", data))

    threads = [threading.Thread(target=put) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(set(paths)) == 1 and len(paths) == 4
    placed = Path(paths[0])
    assert (placed / "lib" / "modules" / "6.1.0" / "modules.dep").read_text() == "kernel/a.ko:\n"
    assert sorted(p.name for p in (tmp_path / "cache" / "matrix-files").iterdir()) == [digest]
    kernel = _shipping.materialize("kernel", hashlib.sha256(b"kernel bytes").hexdigest(),
                                   "vmlinuz", b"kernel bytes")
    assert Path(kernel).read_bytes() == b"kernel bytes"
    with pytest.raises(SpecError, match="modules"):
        _shipping.read_for_shipping("modules", tmp_path / "nothing-here")


def test_the_same_content_under_two_names_is_kept_under_both_whoever_ships_first(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Two jobs' kernels with the same bytes but other file names (vmlinuz, bzImage), and a
    modules tree under two names, shipped by many tasks at once: every task gets its file.
    (The rename of a whole digest directory failed for every name after the first, and
    the job was retried into the same failure.)"""
    monkeypatch.setenv("QEMUKIT_CACHE", str(tmp_path / "cache"))
    kernel = b"the same kernel image" * 1000
    modules = tmp_path / "mods" / "lib" / "modules" / "6.1.0"
    modules.mkdir(parents=True)
    (modules / "modules.dep").write_text("kernel/a.ko:\n")
    tree = _shipping.read_for_shipping("modules", tmp_path / "mods")
    shipments = [("kernel", kernel, name) for name in ("vmlinuz", "bzImage", "vmlinuz-6.1")]
    shipments += [("modules", tree, name) for name in ("modules-0", "modules-1")]
    got: list[tuple[str, str, str]] = []
    failed: list[BaseException] = []
    go = threading.Barrier(len(shipments) * 3)

    def ship(key: str, data: bytes, name: str) -> None:
        go.wait(30)
        try:
            got.append((key, name, _shipping.materialize(
                key, hashlib.sha256(data).hexdigest(), name, data)))
        except BaseException as exc:
            failed.append(exc)

    threads = [threading.Thread(target=ship, args=shipment) for shipment in shipments * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert failed == [] and len(got) == len(shipments) * 3
    for key, name, path in got:
        assert Path(path).name == name
        if key == "kernel":
            assert Path(path).read_bytes() == kernel
        else:
            assert (Path(path) / "lib/modules/6.1.0/modules.dep").read_text() == "kernel/a.ko:\n"
    shipped = tmp_path / "cache" / "matrix-files"
    kept = {p.name: sorted(q.name for q in p.iterdir()) for p in shipped.iterdir()}
    assert kept == {hashlib.sha256(kernel).hexdigest(): ["bzImage", "vmlinuz", "vmlinuz-6.1"],
                    hashlib.sha256(tree).hexdigest(): ["modules-0", "modules-1"]}
    # Again, now that everything is there: the same paths, nothing written.
    again = _shipping.materialize("kernel", hashlib.sha256(kernel).hexdigest(), "bzImage", b"")
    assert Path(again).read_bytes() == kernel
    for bad in ("..", "a/b", ""):
        with pytest.raises(ValueError, match="not a file name"):
            _shipping.materialize("kernel", "0" * 64, bad, b"x")
    with pytest.raises(ValueError, match="not a SHA-256"):
        _shipping.materialize("kernel", "../../etc", "x", b"x")


def test_a_client_cannot_plant_bytes_under_another_digest(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On a shared cluster the first writer of a digest's name wins: it must have its bytes."""
    monkeypatch.setenv("QEMUKIT_CACHE", str(tmp_path / "cache"))
    good = b"the victim's kernel"
    digest = hashlib.sha256(good).hexdigest()
    with pytest.raises(ValueError, match=f"bzImage.*not the digest {digest}"):
        _shipping.materialize("kernel", digest, "bzImage", b"the attacker's kernel")
    assert not (tmp_path / "cache" / "matrix-files" / digest / "bzImage").exists()
    placed = _shipping.materialize("kernel", digest, "bzImage", good)
    assert Path(placed).read_bytes() == good


def test_a_job_names_its_files_and_moves_them() -> None:
    job = Job("a", ("true",), image="tiny", vm={"kernel": "/k/bzImage"}, modules="/m")
    assert job.files() == {"kernel": Path("/k/bzImage"), "modules": Path("/m")}
    moved = job.with_files({"kernel": "/cache/x/bzImage", "modules": "/cache/y/m"})
    assert moved.vm["kernel"] == "/cache/x/bzImage" and moved.modules == "/cache/y/m"
    assert moved.name == job.name and moved.command == job.command


def test_a_kernel_tree_ships_as_its_image_and_its_modules_installed_once(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import tarfile

    from tests.unit.test_kconfig import RELEASE, full_config, tree_with_modules

    monkeypatch.setattr("qemukit.kconfig._depmod", lambda: "/bin/true")  # the fake make's
    tree = tree_with_modules(tmp_path / "tree")
    jobs = [Job(n, ("true",), vm={"kernel": str(tree)}) for n in ("a", "b")]
    installed: dict[Path, Path] = {}
    shipped = [_shipping.files_to_ship(job, tmp_path / "work", installed) for job in jobs]
    assert shipped[0] == shipped[1]
    # The image with its .config beside it (one bundle for both jobs).
    bundle = shipped[0]["kernel"]
    assert sorted(p.name for p in bundle.iterdir()) == [".config", "bzImage"]
    assert (bundle / "bzImage").read_bytes() == (tree / "arch/x86/boot/bzImage").read_bytes()
    assert (tree / "installs.log").read_text() == "installed\n"  # once for both jobs
    data = _shipping.read_for_shipping("modules", shipped[0]["modules"])
    with tarfile.open(fileobj=__import__("io").BytesIO(data)) as tar:
        names = tar.getnames()
    assert f"./lib/modules/{RELEASE}/kernel/b.ko" in names
    assert f"./lib/modules/{RELEASE}/build" not in names  # a link into the tree: left out
    monkeypatch.setenv("QEMUKIT_CACHE", str(tmp_path / "cache"))
    placed = Path(_shipping.materialize("modules", hashlib.sha256(data).hexdigest(), "modules-0",
                                        data))
    assert (placed / "lib" / "modules" / RELEASE / "modules.dep").exists()
    # On a worker the job boots the image with its config beside it: the result keeps the
    # config's digest (and the machine is chosen from the same config as on the client).
    shipped_kernel = _shipping.read_for_shipping("kernel", bundle)
    placed_kernel = _shipping.materialize("kernel", hashlib.sha256(shipped_kernel).hexdigest(),
                                          bundle.name, shipped_kernel)
    on_worker = _shipping.bundled_image(Path(placed_kernel))
    assert kconfig.kernel_config(on_worker) == on_worker.parent / ".config"
    assert kconfig.config_sha256(on_worker.parent / ".config") == kconfig.config_sha256(
        tree / ".config")
    # The job's own modules win, as in a local run: nothing is installed for it.
    own = tmp_path / "own" / "lib" / "modules" / RELEASE
    own.mkdir(parents=True)
    (own / "modules.dep").write_text("")
    job = Job("c", ("true",), vm={"kernel": str(tree)}, modules=str(tmp_path / "own"))
    files = _shipping.files_to_ship(job, tmp_path / "work", {})
    assert files["modules"] == tmp_path / "own"
    assert (tree / "installs.log").read_text() == "installed\n"
    # A tree whose config lacks what the job needs is refused on the client, naming the job.
    (tree / ".config").write_text(full_config(without=("CONFIG_VIRTIO_FS",)))
    share = Job("d", ("true",), vm={"kernel": str(tree), "shares": [f"{tmp_path}:/mnt/s"]})
    with pytest.raises(SpecError, match=r"job 'd': kernel.*lacks CONFIG_VIRTIO_FS"):
        _shipping.files_to_ship(share, tmp_path / "work", {})


# -- Dask's TLS ----------------------------------------------------------------------------


def test_tls_options_are_for_a_tls_scheduler(tmp_path: Path) -> None:
    from qemukit.matrix import dask_security

    assert dask_security("tcp://127.0.0.1:8786") is None
    with pytest.raises(SpecError, match="tls_ca_file.*is for a tls:// scheduler"):
        dask_security("tcp://127.0.0.1:8786", ca_file=tmp_path / "ca.pem")


def test_a_tls_scheduler_needs_a_ca_and_a_certificate(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("distributed")
    from qemukit.matrix import dask_security

    for variable in ("CA_FILE", "CLIENT__CERT", "CLIENT__KEY"):
        monkeypatch.delenv(f"DASK_DISTRIBUTED__COMM__TLS__{variable}", raising=False)
    with pytest.raises(SpecError, match="tls_ca_file.*needs the CA"):
        dask_security("tls://127.0.0.1:8786")
    with pytest.raises(SpecError, match=r"tls_ca_file.*no such file"):
        dask_security("tls://127.0.0.1:8786", ca_file=tmp_path / "missing.pem")
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    with pytest.raises(SpecError, match="tls_cert.*this client's certificate"):
        dask_security("tls://127.0.0.1:8786", ca_file=ca)
    security = dask_security("tls://127.0.0.1:8786", ca_file=ca, cert=ca)
    assert security.tls_ca_file == str(ca) and security.tls_client_cert == str(ca)
    assert security.require_encryption


def test_the_cli_refuses_tls_options_without_a_scheduler(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from qemukit.cli import EXIT_ERROR, main

    path = tmp_path / "m.toml"
    path.write_text('[defaults]\nimage = "tiny"\n[matrix.commands]\nok = ["true"]\n')
    result = CliRunner().invoke(main, ["matrix", str(path), "--tls-cert", str(path)])
    assert result.exit_code == EXIT_ERROR and "--tls-* options are for" in result.stderr


def _tar(*members: tuple[str, str, bytes | str]) -> bytes:
    """A tar of (kind, name, data-or-link-target) members: kind is file, dir, sym or dev."""
    import io
    import tarfile

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for kind, name, payload in members:
            info = tarfile.TarInfo(name)
            info.mode = 0o6777
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "dev": tarfile.CHRTYPE}[kind]
            if kind == "sym":
                assert isinstance(payload, str)
                info.linkname = payload
            tar.addfile(info)
    return out.getvalue()


@pytest.mark.parametrize("has_filter", [True, False], ids=["python-3.11.4+", "python-3.11.2"])
def test_a_shipped_module_tree_unpacks_only_inside_its_target(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, has_filter: bool) -> None:
    """Debian 12's own python3 (3.11.2) has no tarfile filter: the same rules hold there."""
    import io
    import tarfile

    if not has_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    good = _tar(("dir", "lib", b""), ("file", "lib/a.ko", b"ko"), ("sym", "lib/b.ko", "a.ko"))
    with tarfile.open(fileobj=io.BytesIO(good)) as tar:
        _shipping.extract_tree(tar, tmp_path / "ok")
    assert (tmp_path / "ok/lib/a.ko").read_bytes() == b"ko"
    assert (tmp_path / "ok/lib/a.ko").stat().st_mode & 0o7022 == 0  # no set-ID, no g/o write
    assert (tmp_path / "ok/lib/b.ko").readlink() == Path("a.ko")
    bad_trees: list[tuple[str, str, bytes | str]] = [
        ("file", "../escape", b"x"), ("sym", "l", "/etc/passwd"), ("sym", "d/l", "../../x"),
        ("dev", "tty", b"")]
    for n, bad in enumerate(bad_trees):
        with tarfile.open(fileobj=io.BytesIO(_tar(bad))) as tar, pytest.raises(tarfile.TarError):
            _shipping.extract_tree(tar, tmp_path / f"bad{n}")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "x").exists()


def test_a_shipped_tree_that_is_not_a_tar_fails_the_attempt_not_the_worker(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A modules payload whose digest matches but which is no tar archive (a client's bug or
    a hostile client) ends this attempt with a message naming the worker; the task does not
    raise tarfile's error into Dask, where it would be retried into the same failure."""
    import sys
    import types

    from qemukit.matrix import _dask

    class FakeWorker:
        name = "w-1"

        def log_event(self, topic: str, msg: object) -> None:
            pass

    fake = types.ModuleType("distributed")
    fake.get_worker = FakeWorker  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "distributed", fake)
    monkeypatch.setenv("QEMUKIT_CACHE", str(tmp_path / "cache"))
    junk = b"this is not a tar archive" * 40
    job = Job(name="j", command=("true",))
    files = {"modules": (hashlib.sha256(junk).hexdigest(), "modules-0", junk)}
    attempt = _dask.run_job_on_worker(job, files, "m", "key-1")
    assert attempt.result is None
    assert attempt.infra is not None and "worker w-1" in attempt.infra, attempt.infra
