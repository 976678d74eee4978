"""bisect, kunit and run --kselftest resolve their kernel as the one-shot run they are.

They resolved with purpose "interactive" (a VM for the console), so their kernels booted
q35 where ``run --kernel K -- CMD`` boots microvm. Driven through click with the runs
replaced by recorders (no QEMU), each against a cache of its own (see test_resolve.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qemukit import VMSpec
from qemukit.cli import main

from .test_kconfig import base_initrd, fake_tree, full_config
from .test_resolve import _own_cache, recorded  # noqa: F401  (the fixture)


def _spec_of(monkeypatch: pytest.MonkeyPatch, target: str, seen: list[VMSpec],
             position: int) -> None:
    """Replace ``target`` by a recorder of the spec it is given (argument ``position``)."""
    def fake(*args: Any, **kwargs: Any) -> Any:
        seen.append(args[position] if len(args) > position else kwargs["spec"])
        raise SystemExit(0)

    monkeypatch.setattr(target, fake)


def test_bisect_kunit_and_kselftest_boot_the_machine_run_kernel_boots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        recorded: list[VMSpec]) -> None:  # noqa: F811
    tree = fake_tree(tmp_path / "tree", config=full_config())
    initrd = base_initrd(tmp_path / "initrd.img")
    kernel = ["--accel", "tcg", "--kernel", str(tree), "--initrd", str(initrd)]
    _spec_of(monkeypatch, "qemukit.bisect.bisect", recorded, 3)
    _spec_of(monkeypatch, "qemukit.kselftest.run_kunit", recorded, 0)
    _spec_of(monkeypatch, "qemukit.cli._suites.run_kselftest_command", recorded, 0)
    got: dict[str, VMSpec] = {}
    for name, args in (
            ("run", ["run", *kernel, "--", "true"]),
            ("bisect", ["bisect", "--good", "v1", "--bad", "v2", "--repo", str(tmp_path),
                        *kernel, "--", "true"]),
            ("kunit", ["kunit", *kernel]),
            ("kselftest", ["run", *kernel, "--kselftest", "size"])):
        _own_cache(tmp_path, monkeypatch)
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 0, (name, out.output, out.exception)
        got[name] = recorded[-1]
        recorded.clear()
    run = got["run"]
    assert run.machine == "microvm" and not run.warm
    for name, spec in got.items():
        # Before: bisect, kunit and kselftest resolved for the console and got q35.
        assert spec.machine == run.machine, name
        assert spec == run, name

