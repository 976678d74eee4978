"""Many TCG VMs per host: ``count`` VMs booted at once with QEMU's default code buffer
(1 GiB each) against smaller ``tb_size`` values, interleaved round by round.

Per side and round: seconds until every guest's agent answers (a cold boot: the part
that translates the most code), then a short workload in each guest, then the sum of
the QEMUs' RSS and PSS, how much translated code each holds and how often each
flushed its buffer (QEMU's ``info jit``: ``gen code size``, ``TB flush count``).

QEMU maps the buffer lazily: only the code a guest has translated is resident, so a
small guest (the tiny image translates about 50 MiB to boot and run this) costs
the same under any buffer larger than that; a smaller one bounds it, at the price
of flushes. ``image`` picks the guest (``tiny`` or ``debian``).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from typing import Any

import psutil

from qemukit import AsyncVM, VMState, images

from .common import Result

#: Some of the guest's own code paths (shell, /proc readers), as a test would run them.
WORKLOAD = ["sh", "-c", "i=0; while [ $i -lt 50 ]; do ls -R /proc/self >/dev/null 2>&1; "
            "cat /proc/meminfo /proc/cpuinfo >/dev/null; i=$((i+1)); done; uname -a"]


async def _jit(vm: AsyncVM) -> tuple[float, int]:
    """(MiB of translated code held, buffer flushes so far) from ``info jit``."""
    text = str(await vm.qmp("human-monitor-command", {"command-line": "info jit"}))
    code = re.search(r"gen code size\s+(\d+)/", text)
    flushes = re.search(r"TB flush count\s+(\d+)", text)
    return (int(code.group(1)) / 2**20 if code else -1.0,
            int(flushes.group(1)) if flushes else -1)


async def _side(image: str, count: int, tb_size: int | None, tag: str) -> dict[str, Any]:
    spec = images.spec(image, accel="tcg", warm=False, tb_size=tb_size)
    vms = [AsyncVM(spec.replace(name=f"bench-tb-{tag}-{i}")) for i in range(count)]
    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(vm.start() for vm in vms))
        await asyncio.gather(*(vm.wait_ready(900) for vm in vms))
        booted = time.perf_counter() - t0
        t1 = time.perf_counter()
        await asyncio.gather(*(vm.exec(WORKLOAD, timeout=900) for vm in vms))
        worked = time.perf_counter() - t1
        rss = pss = 0
        for vm in vms:
            assert vm.pid is not None
            info = psutil.Process(vm.pid).memory_full_info()
            rss += info.rss
            pss += info.pss
        jit = [await _jit(vm) for vm in vms]
    finally:
        await asyncio.gather(*(vm.kill() for vm in vms if vm.state is VMState.RUNNING))
    return {"boot": booted, "workload": worked, "rss_mib": rss / 2**20, "pss_mib": pss / 2**20,
            "code_mib_per_vm": statistics.mean(c for c, _ in jit),
            "flushes_per_vm": statistics.mean(f for _, f in jit)}


def bench_tbsize(runs: int, count: int = 4, sizes: tuple[int, ...] = (64, 16),
                 image: str = "tiny") -> Result:
    """``count`` VMs at once, QEMU's default code buffer vs each of ``sizes`` (MiB)."""
    contenders: list[tuple[str, int | None]] = [("default", None),
                                                *((f"tb_size_{s}", s) for s in sizes)]
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in contenders}
    for round_no in range(runs):
        shift = round_no % len(contenders)
        for name, size in contenders[shift:] + contenders[:shift]:
            rounds[name].append(asyncio.run(_side(image, count, size, f"{round_no}{name[-2:]}")))
    out: Result = {"image": image, "vms_at_once": count, "runs": runs}
    keys = ("boot", "workload", "rss_mib", "pss_mib", "code_mib_per_vm", "flushes_per_vm")
    for name, results in rounds.items():
        out[name] = {key: round(statistics.median(r[key] for r in results), 3) for key in keys}
    for name, _ in contenders[1:]:
        out[f"{name}_over_default"] = {
            key: round(out[name][key] / out["default"][key], 3)
            for key in ("boot", "workload", "rss_mib", "pss_mib")}
    return out
