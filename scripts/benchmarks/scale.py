"""Many VMs at once: ``count`` tiny VMs started concurrently from one process (AsyncVM).

Runs in a fresh event loop of its own (``asyncio.run``), as an asyncio program
using qemukit would; reports the time until all run, the failures, and the
Python memory each VM costs this process.
"""

from __future__ import annotations

import asyncio
import time

import psutil

from qemukit import AsyncVM, VMState

from .common import Result, tiny_spec


async def _start_all(count: int) -> Result:
    spec = tiny_spec()
    rss0 = psutil.Process().memory_info().rss
    vms = [AsyncVM(spec.replace(name=f"bench-scale-{i}")) for i in range(count)]
    t0 = time.perf_counter()
    try:
        results = await asyncio.gather(*(vm.start() for vm in vms), return_exceptions=True)
        all_running = time.perf_counter() - t0
        rss = psutil.Process().memory_info().rss
    finally:
        await asyncio.gather(*(vm.kill() for vm in vms if vm.state is VMState.RUNNING))
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    return {"vms": count, "seconds_until_all_running": round(all_running, 3),
            "failures": failures,
            "python_rss_per_vm_kib": round((rss - rss0) / 1024 / count, 1)}


def bench_scale(count: int) -> Result:
    """Start ``count`` VMs with one ``asyncio.gather``; time, failures, RSS per VM."""
    return asyncio.run(_start_all(count))
