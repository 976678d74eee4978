"""The pytest plugin, exercised the way a user's suite uses it (through pytester)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import qemu_processes_under

pytestmark = pytest.mark.integration
pytest_plugins = ["pytester"]

SAMPLE = '''
import pytest

def test_passes(qemu_vm):
    assert qemu_vm.exec(["echo", "hi"]).stdout_text == "hi\\n"

def test_fails_with_console(qemu_vm):
    qemu_vm.exec("echo console-marker-$((6*7)) > /dev/console")
    assert qemu_vm.exec(["false"]).ok

def test_factory(qemu_vm_factory):
    a = qemu_vm_factory(cpus=2)
    assert a.exec(["nproc"]).stdout_text.strip() == "2"
    raise RuntimeError("factory VMs must still be stopped")

def test_clean_first(qemu_clean_vm):
    assert qemu_clean_vm.exec("test -e /tmp/leftover").exit_status == 1
    assert qemu_clean_vm.exec("echo dirty > /tmp/leftover").ok

def test_clean_second(qemu_clean_vm):
    assert qemu_clean_vm.exec("test -e /tmp/leftover").exit_status == 1
'''


def test_fixtures_console_report_and_no_leftovers(pytester: pytest.Pytester,
                                                  state_root: Path) -> None:
    before = set(state_root.iterdir())
    pytester.makepyfile(test_sample=SAMPLE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA", timeout=600)
    result.assert_outcomes(passed=3, failed=2)
    out = result.stdout.str()
    assert "qemukit console of" in out
    assert "console-marker-42" in out  # the failing test's console tail is in its report
    assert set(state_root.iterdir()) == before
    assert qemu_processes_under(state_root) == []


SHAPE_CONFTEST = """
import pytest
from qemukit.pytest_plugin import qemukit_scope

@pytest.fixture(scope=qemukit_scope)
def qemukit_image():
    return "tiny"

# The plugin's own spec, parametrized: every test of qemu_vm runs once per CPU count.
@pytest.fixture(scope=qemukit_scope, params=[1, 2], ids=["1cpu", "2cpu"])
def qemukit_spec(qemukit_spec, request):
    return qemukit_spec.replace(cpus=request.param)
"""

SHAPE_TESTS = """
import json
import pytest

def record(test, vm, spec):
    with open("names.jsonl", "a") as fh:
        fh.write(json.dumps({"test": test, "vm": vm.name, "cpus": spec.cpus}) + "\\n")

def test_cpus(qemu_vm, qemukit_spec):
    record("cpus", qemu_vm, qemukit_spec)
    assert qemu_vm.exec(["nproc"]).stdout_text.strip() == str(qemukit_spec.cpus)

def test_shared(qemu_vm, qemukit_spec):
    record("shared", qemu_vm, qemukit_spec)

@pytest.mark.qemukit(memory="768M")
def test_marked(qemu_vm, qemukit_spec):
    record("marked", qemu_vm, qemukit_spec)
    kib = int(qemu_vm.exec("awk '/MemTotal/ {print $2}' /proc/meminfo").stdout_text)
    assert 600 * 1024 < kib <= 768 * 1024
    assert qemu_vm.exec(["nproc"]).stdout_text.strip() == str(qemukit_spec.cpus)

@pytest.mark.qemukit(memroy="1G")
def test_unknown_key(qemu_vm):
    pass

@pytest.mark.qemukit(memory="lots")
def test_bad_value(qemu_vm):
    pass

@pytest.mark.qemukit(image="nosuch")
def test_bad_image(qemu_vm):
    pass
"""


def test_users_shape_fixtures_scope_and_marker(pytester: pytest.Pytester,
                                               state_root: Path) -> None:
    """A conftest overrides qemukit_image and parametrizes qemukit_spec; the run picks the
    session scope; a marked test gets its own VM over the user's spec; bad markers fail
    their test's setup naming the key, before anything boots."""
    before = set(state_root.iterdir())
    pytester.makeconftest(SHAPE_CONFTEST)
    pytester.makepyfile(test_shape=SHAPE_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA",
                                           "--qemukit-scope", "session", timeout=900)
    result.assert_outcomes(passed=6, errors=6)
    out = result.stdout.str()
    assert "unknown key 'memroy'" in out
    assert "memory='lots': expected a size" in out
    assert "image='nosuch': unknown image" in out
    rows = [json.loads(line) for line in (pytester.path / "names.jsonl").read_text().splitlines()]
    by = {(r["test"], r["cpus"]): r["vm"] for r in rows}
    assert sorted(by) == [(t, c) for t in ("cpus", "marked", "shared") for c in (1, 2)]
    for cpus in (1, 2):
        assert by["cpus", cpus] == by["shared", cpus]  # session scope: one VM per parameter
        assert by["marked", cpus] != by["cpus", cpus]  # the marked test booted its own
    assert by["cpus", 1] != by["cpus", 2]
    assert not (pytester.path / "qemukit-artifacts").exists()  # errors before any VM
    assert set(state_root.iterdir()) == before
    assert qemu_processes_under(state_root) == []


ARTIFACT_TESTS = """
import pytest

def test_passes(qemu_vm):
    assert qemu_vm.exec(["true"]).ok

# PID 1 sleeps: the kernel boots, the agent never answers.
@pytest.mark.qemukit(image="tiny", append="console=ttyS0 panic=-1 rdinit=/bin/sleep -- 3600")
def test_never_ready(qemu_vm):
    raise AssertionError("a test on a guest that never became ready must not run")

def test_no_guest_left_running():
    import psutil
    running = [p for p in psutil.Process().children(recursive=True)
               if "qemu-system" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]
    assert running == [], "the never-ready guest is still running"

@pytest.mark.qemukit(extra_args=("-device", "VGA"))
def test_fails(qemu_vm):
    qemu_vm.exec("echo artifact-marker-$((6*7)) > /dev/console")
    assert qemu_vm.exec(["false"]).ok
"""


def test_failed_tests_leave_artifacts_and_a_never_ready_guest_is_stopped(
        pytester: pytest.Pytester, state_root: Path) -> None:
    """Artifacts for a failing test (logs, screenshot, verdict), none for a passing one; under
    --qemukit-keep-failed the failing test's VM stays, the never-ready guest is stopped by its
    fixture (the old one left it running through the next tests, until pytest exited)."""
    pytester.makepyfile(test_art=ARTIFACT_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-s", "--qemukit-keep-failed", "--qemukit-cold",
        "--qemukit-boot-timeout", "40", timeout=900)
    result.assert_outcomes(passed=2, failed=1, errors=1)
    out = result.stdout.str()
    kept_lines = [ln for ln in result.stdout.lines if "qemukit: kept VM" in ln]
    assert len(kept_lines) == 1 and "test_fails" in kept_lines[0]
    kept = kept_lines[0].split("'")[1]
    from qemukit import VM

    vm = VM.attach(kept)
    try:
        assert vm.exec(["true"]).ok  # still running, reachable from another process
    finally:
        vm.shutdown(timeout=10)
    assert qemu_processes_under(state_root) == []  # the never-ready guest is gone

    root = pytester.path / "qemukit-artifacts"
    assert sorted(p.name for p in root.iterdir()) == ["test_art.py__test_fails",
                                                      "test_art.py__test_never_ready"]
    fails = root / "test_art.py__test_fails"
    assert sorted(p.name for p in fails.iterdir()) == sorted(
        [f"{kept}.console.log", f"{kept}.qemu.log", f"{kept}.screenshot.png", "verdict.json"])
    assert "artifact-marker-42" in (fails / f"{kept}.console.log").read_text()
    assert (fails / f"{kept}.screenshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verdict = json.loads((fails / "verdict.json").read_text())
    assert verdict["test"] == "test_art.py::test_fails"
    assert (verdict["outcome"], verdict["when"]) == ("failed", "call")
    assert "assert False" in verdict["error"]
    assert [v["name"] for v in verdict["vms"]] == [kept]
    assert "qemukit artifacts" in out and str(fails) in out  # the report names the directory

    never = root / "test_art.py__test_never_ready"
    verdict = json.loads((never / "verdict.json").read_text())
    assert (verdict["outcome"], verdict["when"]) == ("failed", "setup")
    assert "WaitTimeout" in verdict["error"] or "timed out" in verdict["error"]
    (name,) = [v["name"] for v in verdict["vms"]]
    assert "Linux version" in (never / f"{name}.console.log").read_text(errors="replace")
    assert "screenshot" in verdict["vms"][0]  # it has no display: the verdict says so


XDIST_TESTS = """
import json, os, time, urllib.request
from pathlib import Path
import pytest
from qemukit import Nic, PortForward

WORKER = os.environ["PYTEST_XDIST_WORKER"]

@pytest.mark.qemukit(nics=(Nic(forwards=(PortForward(0, 8080),)),))
def test_own_vm(qemu_vm):
    qemu_vm.succeed(f"mkdir -p /tmp/www && echo {WORKER} > /tmp/www/id && httpd -p 8080 -h /tmp/www")
    host, port = qemu_vm.ssh_address(8080)
    with urllib.request.urlopen(f"http://{host}:{port}/id", timeout=60) as reply:
        served = reply.read().decode().strip()
    Path(f"vm-{WORKER}.json").write_text(json.dumps(
        {"worker": WORKER, "vm": qemu_vm.name, "pid": qemu_vm.pid, "port": port,
         "served": served}))
    # Both workers' VMs run at the same time: wait (bounded) for the other's record.
    deadline = time.monotonic() + 600
    while len(list(Path().glob("vm-gw*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(list(Path().glob("vm-gw*.json"))) == 2

def test_fails(qemu_vm):
    assert qemu_vm.exec(["false"]).ok
"""


def test_two_xdist_workers_each_have_their_own_vms(pytester: pytest.Pytester,
                                                   state_root: Path) -> None:
    """``--dist each``: both workers run the same tests at once; their VMs' names, ports, pids
    and a failed test's artifacts are each worker's own."""
    before = set(state_root.iterdir())
    pytester.makepyfile(test_workers=XDIST_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "each",
                                           timeout=900)
    result.assert_outcomes(passed=2, failed=2)
    records = [json.loads((pytester.path / f"vm-gw{i}.json").read_text()) for i in (0, 1)]
    for rec in records:
        assert rec["served"] == rec["worker"]  # the port led to this worker's own guest
        assert rec["vm"].startswith(rec["worker"] + "-")
    assert len({r["vm"] for r in records}) == 2
    assert len({r["pid"] for r in records}) == 2
    assert len({r["port"] for r in records}) == 2
    root = pytester.path / "qemukit-artifacts"
    assert sorted(p.name for p in root.iterdir()) == ["test_workers.py__test_fails@gw0",
                                                      "test_workers.py__test_fails@gw1"]
    for worker in ("gw0", "gw1"):
        verdict = json.loads((root / f"test_workers.py__test_fails@{worker}" /
                              "verdict.json").read_text())
        assert verdict["worker"] == worker
        assert verdict["vms"][0]["name"].startswith(worker + "-")
    assert set(state_root.iterdir()) == before
    assert qemu_processes_under(state_root) == []
