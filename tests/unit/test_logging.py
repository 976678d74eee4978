"""qemukit's logging: library practice (a NullHandler), qemu.qmp's records routed under
qemukit._wire.qmp, and no other library's logger touched."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from qemukit._wire.qmp import QMP


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_qemu_qmp_logger_level_is_untouched() -> None:
    _fresh("import logging, qemukit, qemukit._wire.qmp, qemukit.vm, qemukit.cli\n"
           "for name in ('qemu', 'qemu.qmp', 'qemu.qmp.protocol', 'qemu.qmp.qmp_client'):\n"
           "    assert logging.getLogger(name).level == logging.NOTSET, name\n")


def test_qemukit_logger_has_a_null_handler() -> None:
    _fresh("import logging, qemukit\n"
           "handlers = logging.getLogger('qemukit').handlers\n"
           "assert any(isinstance(h, logging.NullHandler) for h in handlers), handlers\n")


def test_client_records_go_to_qemukit_qmp_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    client = QMP("qemukit-vm1")._client
    with caplog.at_level(logging.DEBUG, logger="qemukit"):
        client.logger.error("Failed to establish session: %s", "EOFError")
        client.logger.debug("%d%% %s", 100, "done")
    first, second = [r for r in caplog.records if r.name == "qemukit._wire.qmp"]
    assert first.levelno == second.levelno == logging.DEBUG
    assert first.getMessage() == "qemukit-vm1: ERROR: Failed to establish session: EOFError"
    assert second.getMessage() == "qemukit-vm1: DEBUG: 100% done"


# What qemu.qmp logs when QEMU dies while a connect is being cancelled (CRITICAL, so it
# passed the old setLevel(CRITICAL)) and on every failed connect (ERROR).
NOISE = (
    "from qemukit._wire.qmp import QMP\n"
    "client = QMP('qemukit-vm1')._client\n"
    "client.logger.critical('Unexpected bottom half exception. This is a bug in the QMP library.')\n"
    "client.logger.error('Failed to establish session: EOFError')\n"
)


@pytest.mark.parametrize("setup", ["", "import logging\nlogging.basicConfig()\n"],
                         ids=["unconfigured", "warnings-shown"])
def test_qmp_noise_never_reaches_the_terminal(setup: str) -> None:
    assert _fresh(setup + NOISE).stderr == ""


def test_an_application_asking_for_qemukit_debug_sees_the_records() -> None:
    proc = _fresh("import logging\n"
                  "logging.basicConfig(format='%(name)s %(levelname)s %(message)s')\n"
                  "logging.getLogger('qemukit').setLevel(logging.DEBUG)\n" + NOISE)
    assert proc.stderr.splitlines() == [
        "qemukit._wire.qmp DEBUG qemukit-vm1: CRITICAL: Unexpected bottom half exception. "
        "This is a bug in the QMP library.",
        "qemukit._wire.qmp DEBUG qemukit-vm1: ERROR: Failed to establish session: EOFError",
    ]


def test_no_logger_is_registered_per_connection() -> None:
    before = set(logging.root.manager.loggerDict)
    for i in range(20):
        QMP(f"qemukit-leak-{i}")
    assert not {n for n in set(logging.root.manager.loggerDict) - before if "leak" in n}


def test_long_lived_objects_say_what_they_are() -> None:
    """repr of a VM (sync and async), before anything starts: its name and state."""
    from qemukit import VM, AsyncVM, VMSpec
    from qemukit._launch.process import QemuProcess

    spec = VMSpec(name="web", kernel="/k")
    assert repr(AsyncVM(spec)) == "<AsyncVM 'web' new>"
    assert repr(VM(spec)) == "<VM 'web' new>"
    # And what a VM is made of: its QEMU process and its QMP connection.
    proc = QemuProcess(4242, 0.0, ["/usr/bin/qemu-system-x86_64", "-S"], Path("/dev/null"))
    assert repr(proc) == "<QemuProcess pid=4242 adopted qemu-system-x86_64>"
    assert "qemukit-web" in repr(QMP("qemukit-web"))


def _spawn_command(tmp_path: Path) -> click.Command:
    """A command that spawns a process the way a VM's QEMU is spawned, and reaps it."""
    import asyncio

    from qemukit._launch.process import QemuProcess

    @click.command("spawn-for-test")
    def spawn() -> None:
        proc = QemuProcess.spawn(["true", "qemukit-test-marker"], log_path=tmp_path / "out.log",
                                 die_with_parent=False)
        asyncio.run(proc.wait(30))
        proc.close()

    return spawn


@pytest.mark.parametrize(("flags", "shown"), [(["-vv"], True), (["-v"], False), ([], False)])
def test_cli_vv_shows_each_spawns_argv_and_pid(tmp_path: Path, flags: list[str],
                                                shown: bool) -> None:
    from click.testing import CliRunner

    from qemukit.cli import main

    command = _spawn_command(tmp_path)
    main.add_command(command)
    try:
        result = CliRunner().invoke(main, [*flags, command.name or ""])
    finally:
        main.commands.pop(command.name or "")
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stderr.splitlines() if "qemukit-test-marker" in ln]
    if shown:
        assert len(lines) == 1, result.stderr
        assert re.fullmatch(r"qemukit: qemukit\._launch\.process: spawned pid \d+: "
                            r"true qemukit-test-marker", lines[0]), lines[0]
    else:
        assert lines == []
    # The command's logging ends with it: the library's logger is as it was.
    qemukit_logger = logging.getLogger("qemukit")
    assert qemukit_logger.level == logging.NOTSET
    assert all(isinstance(h, logging.NullHandler) for h in qemukit_logger.handlers)
