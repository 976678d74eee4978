"""The pytest plugin loads in every pytest run where qemukit is installed: it must stay light."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("asyncio", "qemu.qmp", "qemukit.vm", "qemukit.images", "qemukit.host", "psutil")


def test_plugin_module_imports_nothing_heavy() -> None:
    code = ("import sys, json, pytest\n"
            "before = set(sys.modules)\n"
            "import qemukit.pytest_plugin\n"
            "print(json.dumps(sorted(set(sys.modules) - before)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    added = set(json.loads(out.stdout))
    assert "qemukit.pytest_plugin" in added
    assert not added & set(HEAVY), sorted(added & set(HEAVY))


def test_a_pytest_run_that_uses_no_fixture_loads_no_vm_machinery(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        "import json, sys\n"
        "def pytest_sessionfinish(session):\n"
        f"    with open({str(tmp_path / 'modules.json')!r}, 'w') as fh:\n"
        "        json.dump(sorted(sys.modules), fh)\n"
    )
    (tmp_path / "test_plain.py").write_text("def test_one():\n    assert 1 + 1 == 2\n")
    # anyio's own pytest plugin (installed with the mcp SDK) imports asyncio: leave it out,
    # this test is about qemukit's plugin.
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-p", "no:anyio", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    modules = set(json.loads((tmp_path / "modules.json").read_text()))
    assert "qemukit.pytest_plugin" in modules  # the plugin was loaded (entry point) ...
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))  # ... and stayed light
