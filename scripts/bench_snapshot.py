#!/usr/bin/env python3
"""Restore-to-running against a cold boot of the same guest, in one run.

Both are measured to the same point: the guest agent answering. The guest
is the tiny image under TCG with one 32 MiB disk on an overlay (the same
spec both ways); the state bundle is saved once from a booted guest, then
each restore starts a fresh clone from it.

    python scripts/bench_snapshot.py [--runs N]      # prints JSON

``measure(runs)`` returns the same dict for other scripts (scripts/bench).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemukit import VM, Drive, VMSpec, images


def _spec(disk: Path) -> VMSpec:
    return images.spec("tiny", accel="tcg", drives=(Drive(disk, overlay=True),))


def _cold_boot(spec: VMSpec) -> float:
    start = time.monotonic()
    with VM(spec) as vm:
        vm.wait_ready(120)
        elapsed = time.monotonic() - start
        vm.kill()
    return elapsed


def _restore(bundle: Path) -> float:
    start = time.monotonic()
    vm = VM.restore(bundle)
    try:
        vm.wait_ready(120)
        elapsed = time.monotonic() - start
    finally:
        vm.kill()
    return elapsed


def measure(runs: int = 5) -> dict[str, Any]:
    """Median seconds from launch to the agent answering: cold boot vs restore, and the ratio."""
    images.build("tiny")
    with tempfile.TemporaryDirectory(prefix="qk-bench-snap-") as tmp:
        work = Path(tmp)
        disk = work / "base.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "32M"], check=True)
        spec = _spec(disk)
        with VM(spec) as vm:
            vm.wait_ready(120)
            save_start = time.monotonic()
            bundle = vm.save_state(work / "bundle", stop=True)
            save_seconds = time.monotonic() - save_start
        boots, restores = [], []
        for _ in range(runs):  # interleaved, so both see the same host load
            boots.append(_cold_boot(spec))
            restores.append(_restore(bundle.path))
        boot, restore = statistics.median(boots), statistics.median(restores)
        return {
            "runs": runs,
            "guest": "tiny, q35, TCG, 512 MiB, one 32 MiB qcow2 overlay",
            "point": "guest agent answering",
            "cold_boot_s": round(boot, 3),
            "restore_s": round(restore, 3),
            "ratio": round(boot / restore, 1),
            "cold_boot_all_s": [round(t, 3) for t in boots],
            "restore_all_s": [round(t, 3) for t in restores],
            "save_s": round(save_seconds, 3),
            "state_bytes": bundle.manifest.get("state_size"),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="boots and restores to time (median)")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
