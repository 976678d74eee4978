"""The benchmark script runs and emits valid JSON (no timing assertions: these
machines are noisy; the numbers go in the README, not in a test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_bench_quick_emits_json(tmp_path: Path, tiny_image: object) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench"), "--quick", "--only", "launch,qmp,cli",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["launch"]["ratio"] > 0 and data["launch"]["raw_qemu"]["n"] == 2
    assert data["qmp"]["qemukit_sync"]["median"] > 0
    assert data["cli"]["ls"]["n"] == 2 and data["cli"]["vms_listed"] == 2
