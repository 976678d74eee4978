#!/usr/bin/env python3
"""Warm against cold against raw QEMU: ``qemukit run --image tiny -- true``, interleaved.

- warm: ``qemukit run --image tiny -- true`` (restores the saved ready state),
- cold: the same with ``--cold`` (boots),
- raw: QEMU booting the same kernel and initrd (q35, TCG, 512 MiB, the tiny
  image's command line) until the tiny init prints ``qemukit-init: ready``.

Each run of the three is one round; rounds are interleaved so load drifts
hit all three alike. The warm state is built once before the rounds (not
counted). Prints JSON with medians, min and max, the ratios, and the split
of a warm run (restore seconds from ``-v``, the CLI's import time).

Then 16 (``--many``) warm VMs are started at once from one process: all
must be ready; the total time and the failures are reported.

    python scripts/bench_warm.py [--runs N] [--many N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qemukit import host, images
from qemukit.images import TINY_APPEND

QEMUKIT = shutil.which("qemukit", path=str(Path(sys.executable).parent)) or "qemukit"
RUN = [QEMUKIT, "run", "-v", "--image", "tiny", "--accel", "tcg", "--", "true"]


def _timed(argv: list[str]) -> tuple[float, str]:
    start = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL, check=False)
    elapsed = time.monotonic() - start
    if out.returncode != 0:
        raise SystemExit(f"{argv} failed ({out.returncode}): {out.stderr}")
    return elapsed, out.stderr


def _raw() -> float:
    tiny = images.build("tiny")
    argv = [host.find_qemu().path, "-M", "q35", "-accel", "tcg", "-m", "512", "-nographic",
            "-nodefaults", "-no-user-config", "-serial", "stdio", "-kernel", str(tiny.kernel),
            "-initrd", str(tiny.initrd), "-append", TINY_APPEND]
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends at QEMU's exit at the latest
            if b"qemukit-init: ready" in line:
                return time.monotonic() - start
            if time.monotonic() - start > 120:
                break
        raise SystemExit("raw QEMU: no 'qemukit-init: ready' within 120 s")
    finally:
        proc.kill()
        proc.wait(10)


def _import_time() -> float:
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import qemukit.cli"], check=True)
    return time.monotonic() - start


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def measure(runs: int) -> dict[str, Any]:
    """The three medians and their ratios (the dict the script prints)."""
    _timed(RUN)  # builds the warm state if there is none
    warm, cold, raw, restore, imports = [], [], [], [], []
    for _ in range(runs):
        elapsed, err = _timed(RUN)
        found = re.search(r"warm: restored \S+ in ([0-9.]+) s", err)
        if not found:
            raise SystemExit(f"a warm run did not restore: {err}")
        warm.append(elapsed)
        restore.append(float(found.group(1)))
        cold.append(_timed([*RUN[:2], "--cold", *RUN[2:]])[0])
        raw.append(_raw())
        imports.append(_import_time())
    w, c, r = (statistics.median(x) for x in (warm, cold, raw))
    return {
        "runs": runs,
        "warm": _stats(warm), "cold": _stats(cold), "raw_to_init": _stats(raw),
        "warm_restore_to_ready": _stats(restore), "cli_import": _stats(imports),
        "cold_over_warm": round(c / w, 2), "raw_over_warm": round(r / w, 2),
    }


async def _many(count: int) -> dict[str, Any]:
    from qemukit.vm import AsyncVM

    spec = images.spec("tiny", accel="tcg", warm=True)
    vms = [AsyncVM(spec) for _ in range(count)]
    start = time.monotonic()
    results = await asyncio.gather(*(vm.start() for vm in vms), return_exceptions=True)
    ready = await asyncio.gather(
        *(vm.exec(["true"]) for vm, r in zip(vms, results, strict=True)
          if not isinstance(r, BaseException)), return_exceptions=True)
    elapsed = time.monotonic() - start
    failures = [repr(r) for r in (*results, *ready) if isinstance(r, BaseException)]
    warm = sum(1 for vm in vms if vm.warm_start is not None and vm.warm_start.warm)
    await asyncio.gather(*(vm.kill() for vm in vms if vm.state.value == "running"),
                         return_exceptions=True)
    return {"count": count, "all_ready_seconds": round(elapsed, 3), "warm": warm,
            "failures": failures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--many", type=int, default=16)
    args = parser.parse_args()
    out = measure(args.runs)
    out["many"] = asyncio.run(_many(args.many))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
