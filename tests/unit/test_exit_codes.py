"""One table maps every qemukit error to an exit code, the same for every command.

The commands run through click's test runner against a fake attached VM whose
operation raises the error under test: no QEMU is started. What a real VM does
is covered in tests/cli/test_errors.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from qemukit import errors
from qemukit.cli import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_PANIC,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    exit_code_for,
    exit_code_for_outcome,
    exit_code_for_outcomes,
    main,
)
from qemukit.results import Outcome

#: The page with the exit-code table (the README links to it).
EXIT_CODES_PAGE = Path(__file__).resolve().parents[2] / "docs" / "getting-started.md"


def _all_error_classes() -> list[type[errors.QemukitError]]:
    """QemukitError and every subclass below it, walking the class tree."""
    found: list[type[errors.QemukitError]] = []
    todo: list[type[errors.QemukitError]] = [errors.QemukitError]
    while todo:
        cls = todo.pop()
        if cls.__module__.startswith("qemukit") and cls not in found:
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda c: c.__name__)


ERROR_CLASSES = _all_error_classes()


def _instance(cls: type[errors.QemukitError]) -> errors.QemukitError:
    """An instance of ``cls`` with a recognisable message, whatever its constructor wants."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, f"{cls.__name__} raised for the test")
    return exc


def test_the_walk_sees_the_whole_tree() -> None:
    declared = {obj for _, obj in inspect.getmembers(errors, inspect.isclass)
                if issubclass(obj, errors.QemukitError)}
    assert declared <= set(ERROR_CLASSES)
    assert {errors.GuestPanic, errors.QMPCommandError, errors.AcceleratorError} <= set(ERROR_CLASSES)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_table_lists_every_error_class(cls: type[errors.QemukitError]) -> None:
    assert cls in EXIT_CODES, f"{cls.__name__} has no exit code in qemukit.cli.EXIT_CODES"


def test_codes_that_scripts_rely_on() -> None:
    assert exit_code_for(_instance(errors.WaitTimeout)) == EXIT_TIMEOUT == 124
    assert exit_code_for(_instance(errors.GuestPanic)) == EXIT_PANIC == 255
    for cls in (errors.SpecError, errors.LaunchError, errors.HostError, errors.StateError,
                errors.QMPConnectionError):
        assert exit_code_for(_instance(cls)) == EXIT_ERROR == 125
    for refused in (errors.HotplugError, errors.SnapshotError, errors.QMPCommandError):
        assert exit_code_for(_instance(refused)) == EXIT_REFUSED == 1


@pytest.mark.parametrize("outcome", list(Outcome), ids=str)
def test_a_runs_outcome_exits_through_the_same_table(outcome: Outcome) -> None:
    """run -- CMD: a panic exits as a GuestPanic does; a command that ran, with its status."""
    code = exit_code_for_outcome(outcome, 7)
    if outcome in (Outcome.PASSED, Outcome.FAILED, Outcome.SKIPPED):
        assert code == 7 and outcome.error_class is None
    else:
        assert outcome.error_class is not None
        assert code == exit_code_for(_instance(outcome.error_class))
    assert {o: exit_code_for_outcome(o) for o in Outcome if o.error_class} == {
        Outcome.PANIC: 255, Outcome.OOPS: 254, Outcome.TIMEOUT: 124, Outcome.ERROR: 125}


def test_a_matrix_exits_1_unless_every_job_ran_and_passed() -> None:
    assert exit_code_for_outcomes([Outcome.PASSED] * 3) == 0
    assert exit_code_for_outcomes([]) == 0
    assert exit_code_for_outcomes([Outcome.PASSED, Outcome.PANIC]) == EXIT_REFUSED
    assert exit_code_for_outcomes([Outcome.PASSED], complete=False) == EXIT_REFUSED


def test_a_new_subclass_takes_its_base_class_code() -> None:
    class Oddity(errors.GuestPanic):
        pass

    assert exit_code_for(Oddity("x")) == EXIT_PANIC


def test_no_code_a_command_could_also_return_is_given_to_an_error_run_can_raise() -> None:
    # run -- CMD / exec / ssh pass the command's status through: whatever those can
    # raise must exit above any ordinary status (124 and up, like timeout(1) and docker).
    operation_refusals = {errors.HotplugError, errors.SnapshotError, errors.QMPCommandError}
    for cls, code in EXIT_CODES.items():
        if cls not in operation_refusals:
            assert code >= 124, cls


def test_help_and_the_docs_show_the_table() -> None:
    """`qemukit --help` and the command-line page of the docs name every error class."""
    help_text = CliRunner().invoke(main, ["--help"]).stdout
    page = EXIT_CODES_PAGE.read_text()
    for cls in ERROR_CLASSES:
        if cls is errors.QemukitError:
            continue
        assert cls.__name__ in help_text, cls
        assert cls.__name__ in page, cls
    for code in ("124", "125", "130", "254", "255"):
        assert code in help_text


# -- every command reports through the table ----------------------------------------


class FakeVM:
    """What the CLI touches on an attached VM; every operation raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error
        self.detached = False
        self.hotplug = self
        self.snapshots = self

    def _raise(self, *args: Any, **kwargs: Any) -> Any:
        raise self.error

    pause = resume = exec = shutdown = cpu = devices = qmp = save = _raise

    def detach(self) -> None:
        self.detached = True

    @property
    def state(self) -> Any:
        class _State:
            value = "detached" if self.detached else "running"

        return _State()


@pytest.fixture
def fake_attach(monkeypatch: pytest.MonkeyPatch) -> Callable[[BaseException], FakeVM]:
    """``fake_attach(error)``: ``VM.attach`` returns a FakeVM whose operations raise ``error``."""
    from qemukit.vm import VM

    def install(error: BaseException) -> FakeVM:
        vm = FakeVM(error)
        monkeypatch.setattr(VM, "attach", classmethod(lambda cls, name, **kw: vm))
        return vm

    return install


COMMANDS = {
    "stop": ["stop", "vm1"],
    "exec": ["exec", "vm1", "--", "true"],
    "hotplug": ["hotplug", "vm1", "cpu"],
    "devices": ["devices", "vm1"],
    "pause": ["pause", "vm1"],
    "qmp": ["qmp", "vm1", "query-status"],
    "snapshot": ["snapshot", "vm1", "save", "t1"],
}


def _invoke(args: list[str], tmp_path: Path) -> Result:
    env = {"QEMUKIT_STATE": str(tmp_path / "state"), "QEMUKIT_CACHE": str(tmp_path / "cache")}
    return CliRunner().invoke(main, args, env=env)


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_command_exits_with_the_table_code(
    command: str, cls: type[errors.QemukitError], fake_attach: Any, tmp_path: Path
) -> None:
    exc = _instance(cls)
    vm = fake_attach(exc)
    result = _invoke(COMMANDS[command], tmp_path)
    assert result.exit_code == EXIT_CODES[cls], result.output
    assert result.stderr == f"qemukit: {cls.__name__} raised for the test\n"
    assert result.exception is None or isinstance(result.exception, SystemExit)
    if command != "stop":  # stop lets go of the VM by stopping it
        assert vm.detached


def test_hotplug_launch_error_and_panic_use_the_table(fake_attach: Any, tmp_path: Path) -> None:
    # These two differed from run/exec before the table: LaunchError 1 (run: 125),
    # GuestPanic 1 (exec: 255).
    fake_attach(errors.LaunchError("QEMU exited", returncode=1))
    assert _invoke(COMMANDS["hotplug"], tmp_path).exit_code == 125
    fake_attach(errors.GuestPanic("Kernel panic - not syncing: test"))
    result = _invoke(COMMANDS["hotplug"], tmp_path)
    assert result.exit_code == 255
    assert result.stderr.startswith("qemukit: guest kernel panic: Kernel panic - not syncing")


def test_stop_of_a_vm_that_cannot_be_stopped(fake_attach: Any, tmp_path: Path) -> None:
    fake_attach(errors.StateError("QEMU pid 4242 survived SIGKILL for 5s"))
    result = _invoke(["stop", "vm1"], tmp_path)
    assert result.exit_code == EXIT_ERROR
    assert result.stderr == "qemukit: QEMU pid 4242 survived SIGKILL for 5s\n"
    assert "Traceback" not in result.output


@pytest.mark.parametrize("error", [
    errors.QMPConnectionError("cannot connect to /x/vm1/qmp.sock: No such file or directory"),
    errors.WaitTimeout("QMP", 30),
], ids=["socket-gone", "qemu-stopped"])
def test_stop_without_qmp_says_how_to_end_it(
    error: errors.QemukitError, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from qemukit.vm import VM

    def refuse(cls: type[VM], /, name: str, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(VM, "attach", classmethod(refuse))
    result = _invoke(["stop", "vm1"], tmp_path)
    assert result.exit_code == exit_code_for(error)
    first, hint = result.stderr.splitlines()
    assert first == f"qemukit: {error}"
    assert "'qemukit kill vm1'" in hint


def test_ctrl_c_exits_130(fake_attach: Any, tmp_path: Path) -> None:
    fake_attach(KeyboardInterrupt())
    result = _invoke(COMMANDS["exec"], tmp_path)
    assert result.exit_code == EXIT_INTERRUPTED == 130


def test_usage_errors_exit_2_before_any_vm_is_touched(fake_attach: Any, tmp_path: Path) -> None:
    fake_attach(AssertionError("the VM must not be attached"))
    bad_json = _invoke(["qmp", "vm1", "query-status", "{not json"], tmp_path)
    assert bad_json.exit_code == 2 and "not valid JSON" in bad_json.stderr
    not_object = _invoke(["qmp", "vm1", "query-status", "[1]"], tmp_path)
    assert not_object.exit_code == 2 and "JSON object" in not_object.stderr
    no_tag = _invoke(["snapshot", "vm1", "save"], tmp_path)
    assert no_tag.exit_code == 2 and "needs a TAG" in no_tag.stderr
    bad_tag = _invoke(["snapshot", "vm1", "save", "bad tag!"], tmp_path)
    assert bad_tag.exit_code == 2 and "bad tag!" in bad_tag.stderr


def test_missing_vm_is_one_line(tmp_path: Path) -> None:
    for args in (["stop", "ghost"], ["kill", "ghost"], ["logs", "ghost"], ["console", "ghost"]):
        result = _invoke(args, tmp_path)
        assert result.exit_code == EXIT_ERROR, (args, result.output)
        assert result.stderr.startswith("qemukit: ") and "ghost" in result.stderr, args
        assert result.exception is None or isinstance(result.exception, SystemExit), args


def test_a_file_error_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "state" / "vm1" / "console.log").mkdir(parents=True)  # unreadable as a file
    result = _invoke(["logs", "vm1"], tmp_path)
    assert result.exit_code == EXIT_ERROR
    assert result.stderr == f"qemukit: {tmp_path}/state/vm1/console.log: Is a directory\n"


def test_an_os_error_without_a_path_keeps_its_traceback(fake_attach: Any, tmp_path: Path) -> None:
    fake_attach(ConnectionResetError(104, "Connection reset by peer"))
    result = _invoke(COMMANDS["pause"], tmp_path)
    assert isinstance(result.exception, ConnectionResetError)
