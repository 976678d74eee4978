"""The pytest plugin, exercised the way a user's suite uses it (through pytester)."""

from __future__ import annotations

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


def test_fixtures_under_xdist(pytester: pytest.Pytester, state_root: Path) -> None:
    before = set(state_root.iterdir())
    pytester.makepyfile(test_sample=SAMPLE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", timeout=600)
    result.assert_outcomes(passed=3, failed=2)
    assert set(state_root.iterdir()) == before
    assert qemu_processes_under(state_root) == []


def test_keep_failed_leaves_vm_and_says_how_to_reach_it(pytester: pytest.Pytester,
                                                        state_root: Path) -> None:
    pytester.makepyfile(test_keep="def test_broken(qemu_vm):\n    assert False\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s",
                                           "--qemukit-keep-failed", timeout=300)
    result.assert_outcomes(failed=1)
    line = next(ln for ln in result.stdout.lines if "qemukit: kept VM" in ln)
    name = line.split("'")[1]
    from qemukit import VM

    vm = VM.attach(name)
    assert vm.exec(["true"]).ok  # still running, reachable from another process
    assert vm.shutdown(timeout=10).rung.value == "acpi"
