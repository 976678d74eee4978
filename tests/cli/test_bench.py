"""The benchmark script runs, emits valid JSON, and runs the QEMU qemukit found on every side.

No timing assertions: these machines are noisy; the numbers go in the README, not in a test.
``QEMUKIT_QEMU`` points at a link with a path of its own, so a side that ran
qemu-system-x86_64 from PATH instead of the binary qemukit picked shows up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "scripts" / "bench"


def _bench(*args: str, env: dict[str, str] | None = None,
           timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture
def qemu_link(tmp_path: Path) -> Path:
    """A link to the real QEMU at a path of its own, named like QEMU (the leak check finds it)."""
    real = shutil.which("qemu-system-x86_64")
    assert real, "qemu-system-x86_64 is not installed"
    link = tmp_path / "bin" / "qemu-system-x86_64"
    link.parent.mkdir()
    link.symlink_to(real)
    return link


def _run_with_qemu(tmp_path: Path, qemu: Path, parts: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    env = dict(os.environ, QEMUKIT_QEMU=str(qemu))
    proc = _bench("--quick", "--only", parts, "--json", str(out), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["machine"]["qemu_binary"] == str(qemu)
    return data


def _assert_one_binary(part: dict[str, Any], qemu: Path, sides: set[str]) -> None:
    """Every side of the part recorded the binary, and it is the one qemukit found."""
    used = part["qemu_binary"]
    assert sides <= set(used), used
    assert set(used.values()) == {str(qemu)}, used


@pytest.mark.integration
def test_bench_quick_emits_json(tmp_path: Path, tiny_image: object, qemu_link: Path) -> None:
    data = _run_with_qemu(tmp_path, qemu_link, "launch,qmp,cli")
    assert data["launch"]["ratio"] > 0 and data["launch"]["raw_qemu"]["n"] == 2
    _assert_one_binary(data["launch"], qemu_link, {"found", "raw", "qemukit"})
    qmp = data["qmp"]
    assert qmp["qemukit_sync"]["median"] > 0 and qmp["qemu_qmp_async"]["median"] > 0
    assert len(qmp["ratios_per_run"]) == 2 and qmp["ratio_max"] == max(qmp["ratios_per_run"])
    assert qmp["chardevs"]["qmp-owner"].startswith("unix:")
    assert "qmp.sock" in qmp["chardevs"]["qmp-shared"]
    _assert_one_binary(qmp, qemu_link, {"found", "served_all"})
    assert data["cli"]["ls"]["n"] == 2 and data["cli"]["vms_listed"] == 2
    assert set(data["loadavg"]) == {"launch", "qmp", "cli"}


@pytest.mark.integration
def test_bench_loop_runs_qemukits_qemu_on_the_raw_side(
    tmp_path: Path, tiny_image: object, qemu_link: Path
) -> None:
    data = _run_with_qemu(tmp_path, qemu_link, "loop")
    assert data["loop"]["raw_microvm_to_init"]["n"] == 2
    _assert_one_binary(data["loop"], qemu_link,
                       {"found", "raw", "qemukit_run", "qemukit_run_microvm"})


def test_unknown_part_is_refused_before_anything_runs() -> None:
    proc = _bench("--only", "launch,nope", timeout=60)
    assert proc.returncode == 2
    assert "--only 'launch,nope': unknown part(s) nope" in proc.stderr
    assert "bench: launch" not in proc.stderr


def test_interleave_rotates_the_order_and_keeps_rounds_aligned(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from benchmarks.common import interleave, per_run_ratios

    calls: list[str] = []

    def contender(name: str, value: float) -> Any:
        def run() -> float:
            calls.append(name)
            return value + len(calls)
        return run

    res = interleave(3, a=contender("a", 0), b=contender("b", 100), c=contender("c", 1000))
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert res == {"a": [1, 6, 8], "b": [102, 104, 109], "c": [1003, 1005, 1007]}
    assert per_run_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]


def test_libvirt_domain_runs_the_given_emulator(monkeypatch: pytest.MonkeyPatch) -> None:
    # libvirt is not installed on every machine: the domain it would get is checked here.
    from xml.etree import ElementTree

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    from benchmarks.libvirt import domain_xml

    xml = domain_xml("d&1", "/opt/q/qemu-system-x86_64", Path("/k"), Path("/i"),
                     "console=ttyS0 a<b", Path("/c'.log"), 512)
    root = ElementTree.fromstring(xml)
    assert root.findtext("devices/emulator") == "/opt/q/qemu-system-x86_64"
    assert root.findtext("name") == "d&1" and root.findtext("os/cmdline") == "console=ttyS0 a<b"
    source = root.find("devices/serial/source")
    assert source is not None and source.get("path") == "/c'.log"
