"""`import qemukit`, `qemukit --help` and `qemukit ls` import only what they use.

Each case runs in a fresh interpreter (a subprocess) and looks at ``sys.modules``
afterwards: a module-level import of asyncio, qemu.qmp, psutil, pycdlib or click
creeping back into a module on these paths fails here, with the chain that
pulled it in left to ``python -X importtime`` to find.
"""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

#: Never imported by `import qemukit`: the VM machinery and the CLI's and the spec's dependencies.
HEAVY = ("asyncio", "qemu", "psutil", "pycdlib", "click", "concurrent", "ssl", "subprocess",
         "dataclasses", "inspect", "tomllib", "ipaddress", "json", "socket")


def _modules_after(code: str, tmp_path: Path) -> set[str]:
    """The modules a fresh interpreter holds after running ``code`` (QEMUKIT_* dirs in tmp_path)."""
    env = dict(os.environ, QEMUKIT_STATE=str(tmp_path / "state"),
               QEMUKIT_CACHE=str(tmp_path / "cache"), QEMUKIT_DATA=str(tmp_path / "data"))
    probe = f"{code}\nimport sys\nsys.__stdout__.write('\\n@@' + repr(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return set(ast.literal_eval(out.stdout.rsplit("\n@@", 1)[1]))


def _heavy(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in names)


def test_import_qemukit_loads_only_the_errors(tmp_path: Path) -> None:
    modules = _modules_after("import qemukit", tmp_path)
    assert sorted(m for m in modules if m.startswith("qemukit")) == ["qemukit", "qemukit.errors"]
    assert _heavy(modules, HEAVY) == []


def test_a_public_name_loads_its_module_on_first_use(tmp_path: Path) -> None:
    modules = _modules_after("import qemukit\nqemukit.VMSpec()", tmp_path)
    assert "qemukit.spec" in modules
    assert _heavy(modules, ("asyncio", "qemu", "psutil", "pycdlib", "click")) == []
    modules = _modules_after("from qemukit import VM", tmp_path)
    assert {"qemukit.vm", "asyncio"} <= modules


def _cli(args: list[str]) -> str:
    return f"import sys\nsys.argv = ['qemukit', *{args!r}]\nfrom qemukit.cli import main\n" \
           "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"


def test_help_imports_no_command_module(tmp_path: Path) -> None:
    modules = _modules_after(_cli(["--help"]), tmp_path)
    assert sorted(m for m in modules if m.startswith("qemukit.cli.")) == ["qemukit.cli._common"]
    assert _heavy(modules, ("asyncio", "qemu", "psutil", "pycdlib", "concurrent", "ssl",
                            "dataclasses", "tomllib", "ipaddress")) == []
    assert "qemukit.spec" not in modules


def test_ls_imports_the_registry_and_nothing_of_the_vm(tmp_path: Path) -> None:
    modules = _modules_after(_cli(["ls"]), tmp_path)
    assert sorted(m for m in modules if m.startswith("qemukit.cli.")) == [
        "qemukit.cli._common", "qemukit.cli._detached"]
    assert "qemukit._launch.registry" in modules
    assert _heavy(modules, ("asyncio", "qemu", "pycdlib", "ssl")) == []
    assert not {"qemukit.vm", "qemukit._launch.process", "qemukit.spec"} & modules


def test_a_subcommand_imports_its_module_only(tmp_path: Path) -> None:
    modules = _modules_after(_cli(["kconfig", "--help"]), tmp_path)
    assert sorted(m for m in modules if m.startswith("qemukit.cli.")) == [
        "qemukit.cli._common", "qemukit.cli._kernel"]


def _real_commands() -> dict[str, click.Command]:
    """Every command of every CLI module, imported the eager way."""
    import importlib
    import pkgutil

    import qemukit.cli

    found: dict[str, click.Command] = {}
    for info in pkgutil.iter_modules(qemukit.cli.__path__):
        module = importlib.import_module(f"qemukit.cli.{info.name}")
        for command in getattr(module, "COMMANDS", ()):
            assert command.name not in found, command.name
            found[command.name] = command
    return found


def test_the_lazy_table_matches_the_commands() -> None:
    """LAZY_COMMANDS names every command, in its module, with the help --help would show."""
    from qemukit.cli import LAZY_COMMANDS

    real = _real_commands()
    want = {name: (cmd.callback.__module__.rsplit(".", 1)[1] if cmd.callback else "",
                   " ".join(inspect.cleandoc(cmd.help or "").split("\n\n")[0].split()))
            for name, cmd in real.items()}
    assert LAZY_COMMANDS == want, "regenerate LAZY_COMMANDS in qemukit/cli/__init__.py: " + \
        "\n".join(f"    {n!r}: {v!r}," for n, v in sorted(want.items()))
    for name, cmd in real.items():
        for limit in (30, 45, 60, 200):
            stand_in = click.Command(name, help=LAZY_COMMANDS[name][1])
            assert stand_in.get_short_help_str(limit) == cmd.get_short_help_str(limit), name


@pytest.mark.parametrize("width", [60, 100])
def test_help_lists_every_command_as_the_eager_group_would(width: int) -> None:
    from click.testing import CliRunner

    from qemukit.cli import main

    fresh = CliRunner().invoke(main, ["--help"], terminal_width=width)
    assert fresh.exit_code == 0, fresh.output
    for name in _real_commands():
        assert f"\n  {name} " in fresh.output
        main.get_command(click.Context(main), name)  # now every command is imported
    loaded = CliRunner().invoke(main, ["--help"], terminal_width=width)
    assert loaded.output == fresh.output
