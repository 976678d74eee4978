"""Restore-to-running against a cold boot of the same guest, in one run.

Both are measured to the same point: the guest agent answering. The guest is
the tiny image under TCG with one 32 MiB disk on an overlay (the same spec
both ways); the state bundle is saved once from a booted guest, then each
restore starts a fresh clone from it. Both sides are qemukit, so both run the
QEMU it found. ``scripts/bench_snapshot.py`` runs this part alone.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from qemukit import VM, Drive, VMSpec, images

from .common import Result, create_disk, interleave, tiny_spec


def _spec(disk: Path) -> VMSpec:
    return tiny_spec(drives=(Drive(disk, overlay=True),))


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
        return time.monotonic() - start
    finally:
        vm.kill()


def measure(runs: int = 5) -> Result:
    """Median seconds from launch to the agent answering: cold boot vs restore, and the ratio."""
    images.build("tiny")
    with tempfile.TemporaryDirectory(prefix="qk-bench-snap-") as tmp:
        work = Path(tmp)
        disk = work / "base.qcow2"
        create_disk(disk, "32M")
        spec = _spec(disk)
        with VM(spec) as vm:
            vm.wait_ready(120)
            save_start = time.monotonic()
            bundle = vm.save_state(work / "bundle", stop=True)
            save_seconds = time.monotonic() - save_start
        res = interleave(runs, boot=lambda: _cold_boot(spec), restore=lambda: _restore(bundle.path))
        boots, restores = res["boot"], res["restore"]
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


def bench_restore(runs: int) -> Result:
    """The restore part of scripts/bench: :func:`measure`."""
    return measure(runs)
