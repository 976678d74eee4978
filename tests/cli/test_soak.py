"""The soak script's long loops run and emit their JSON report (tiny sizes: no verdict is
asserted here, the figures from a full run go in the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
EXIT_FLAT, EXIT_GROWING = 0, 3


def test_soak_long_loops_emit_json(tmp_path: Path, tiny_image: object) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak"), "--qmp", "20", "--exec", "3",
         "--hotplug", "2", "--attach", "2", "--cycles", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode in (EXIT_FLAT, EXIT_GROWING), proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["flat"] is (proc.returncode == EXIT_FLAT)
    loops = data["loops"]
    assert loops["qmp"]["iterations"] == 20 and loops["exec"]["iterations"] == 3
    for name in ("qmp", "exec", "hotplug", "attach"):
        assert loops[name]["verdict"] in ("flat", "growing"), name
        assert {"py_bytes", "objects", "callbacks"} <= set(loops[name]["growth"]), name
    # The long-lived futures of the one VM are reached, so a callback leak would show.
    assert set(loops["exec"]["end"]["callbacks"]) >= {"exit", "panic"}
    assert loops["exec"]["end"]["py_peak"] >= loops["exec"]["end"]["py_current"] > 0
    assert loops["attach"]["owner"]["verdict"] in ("flat", "growing")
    assert data["start_stop"]["iterations"] == 1
    assert data["start_stop"]["end"]["process"]["qemu_processes"] == 0
