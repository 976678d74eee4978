"""Mapped warm restores (VM templating) against copied ones, cold boots and raw QEMU.

- run: ``qemukit run -v --image tiny -- true`` warm with the RAM mapped
  (``QEMUKIT_WARM_MAP=1``) against warm with the RAM copied into each clone
  (``QEMUKIT_WARM_MAP=0``, the restore before mapping) against ``--cold``
  against raw QEMU booting the same kernel to the tiny init, interleaved.
- split: restore to the first command's output, in one process, by step:
  choosing the state (key and cache), QEMU's spawn to QMP, loading the state,
  the clock and RNG command, the first command (``echo``) answered; each with
  the wall time and QEMU's CPU time (TCG: the guest's work), mapped and copied.
- memory: ``clones`` clones of one state running at once, each after one
  command: the sum of their QEMUs' PSS (psutil), mapped against copied.

Both warm states are built before the rounds (not counted).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .common import QEMUKIT_CMD, Result, interleave, ratio, summary
from .warm import _raw_q35

RUN = [QEMUKIT_CMD, "run", "-v", "--image", "tiny", "--accel", "tcg"]
MAP_ENV = "QEMUKIT_WARM_MAP"


def _run_true(mapped: bool | None, *extra: str) -> tuple[float, str]:
    env = dict(os.environ)
    if mapped is not None:
        env[MAP_ENV] = "1" if mapped else "0"
    t0 = time.perf_counter()
    out = subprocess.run([*RUN, *extra, "--", "true"], capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL, check=False, env=env)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"qemukit run {' '.join(extra)} -- true failed ({out.returncode}): "
                           f"{out.stderr[-2000:]}")
    return elapsed, out.stderr


def bench_run(runs: int) -> Result:
    """Warm mapped, warm copied, cold and raw, interleaved."""
    restores: dict[str, list[float]] = {"mapped": [], "copied": []}

    def warm(mapped: bool) -> float:
        elapsed, err = _run_true(mapped)
        kind = "mapped" if mapped else "copied"
        found = re.search(r"warm: restored \S+ in ([0-9.]+) s \(memory (\w+)", err)
        if not found or found.group(2) != kind:
            raise RuntimeError(f"a warm run ({kind}) did not restore so: {err[-2000:]}")
        restores[kind].append(float(found.group(1)))
        return elapsed

    for mapped in (True, False):  # build both states
        _run_true(mapped)
    res = interleave(runs, warm_mapped=lambda: warm(True), warm_copied=lambda: warm(False),
                     cold=lambda: _run_true(None, "--cold")[0], raw_to_init=_raw_q35)
    m, c, cold, raw = (summary(res[k]) for k in ("warm_mapped", "warm_copied", "cold",
                                                 "raw_to_init"))
    return {"warm_mapped": m, "warm_copied": c, "cold": cold, "raw_to_init": raw,
            "restore_to_ready": {k: summary(v) for k, v in restores.items()},
            "copied_over_mapped": ratio(c, m), "cold_over_mapped": ratio(cold, m),
            "raw_over_mapped": ratio(raw, m), "raw_over_copied": ratio(raw, c),
            "goal": "raw/warm >= 20 (about 0.35 s here)"}


class _StepLog(logging.Handler):
    """Collects the warm start's step lines (qemukit.warm at debug)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.perf_counter(), record.getMessage()))


@contextmanager
def _map_env(mapped: bool) -> Iterator[None]:
    was = os.environ.get(MAP_ENV)
    os.environ[MAP_ENV] = "1" if mapped else "0"
    try:
        yield
    finally:
        if was is None:
            os.environ.pop(MAP_ENV, None)
        else:
            os.environ[MAP_ENV] = was


def _cpu(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def _split_once(mapped: bool) -> dict[str, float]:
    """One clone: wall seconds (and QEMU CPU seconds) of each step, start() to first output."""
    from qemukit import AsyncVM, images
    from qemukit.vm import _warm

    spec = images.spec("tiny", accel="tcg", warm=True)
    handler = _StepLog()
    logger = logging.getLogger("qemukit.warm")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    marks: dict[str, float] = {}
    cpu: dict[str, float] = {}
    finish = _warm.finish_warm

    async def timed_finish(vm: Any, plan: Any, seed: Any = None) -> Any:
        marks["launched"] = time.perf_counter()
        cpu["launched"] = _cpu(vm.pid)
        real_clock = _warm.set_guest_clock

        async def clock(target: Any) -> None:
            marks["loaded"] = time.perf_counter()
            cpu["loaded"] = _cpu(vm.pid)
            await real_clock(target)

        setattr(_warm, "set_guest_clock", clock)  # noqa: B010 (timing hook)
        try:
            return await finish(vm, plan, seed)
        finally:
            setattr(_warm, "set_guest_clock", real_clock)  # noqa: B010

    vm = AsyncVM(spec)
    try:
        with _map_env(mapped):
            _warm.finish_warm = timed_finish
            t0 = time.perf_counter()
            await vm.start()
        ready = time.perf_counter()
        assert vm.pid is not None
        cpu_ready = _cpu(vm.pid)
        result = await vm.exec("echo first")
        first = time.perf_counter()
        cpu_first = _cpu(vm.pid)
        assert result.stdout_text.strip() == "first", result
        assert vm.warm_start is not None and vm.warm_start.warm, vm.warm_start
        chosen = next(t for t, line in handler.lines if "chosen" in line)
    finally:
        _warm.finish_warm = finish
        logger.removeHandler(handler)
        logger.setLevel(level)
        if vm.state.value == "running":
            await vm.kill()
    return {"choose_state": chosen - t0, "spawn_to_qmp": marks["launched"] - chosen,
            "load_state": marks["loaded"] - marks["launched"],
            "clock_and_reseed": ready - marks["loaded"], "first_command": first - ready,
            "total": first - t0,
            "cpu_load_state": cpu["loaded"] - cpu["launched"],
            "cpu_clock_and_reseed": cpu_ready - cpu["loaded"],
            "cpu_first_command": cpu_first - cpu_ready}


def bench_split(runs: int) -> Result:
    """Restore to first output by step, mapped and copied, interleaved (medians)."""
    samples: dict[str, list[dict[str, float]]] = {"mapped": [], "copied": []}
    for _ in range(runs):
        for mapped in (True, False):
            samples["mapped" if mapped else "copied"].append(asyncio.run(_split_once(mapped)))
    out: Result = {}
    for kind, rows in samples.items():
        out[kind] = {step: summary([row[step] for row in rows]) for step in rows[0]}
    out["goal"] = "restore to the first command's output <= 0.15 s"
    return out


async def _clones_pss(mapped: bool, count: int) -> dict[str, Any]:
    import psutil

    from qemukit import AsyncVM, images

    spec = images.spec("tiny", accel="tcg", warm=True)
    vms = [AsyncVM(spec) for _ in range(count)]
    try:
        with _map_env(mapped):
            await asyncio.gather(*(vm.start() for vm in vms))
        await asyncio.gather(*(vm.exec("echo hi") for vm in vms))
        pss = rss = 0
        for vm in vms:
            assert vm.pid is not None
            info = psutil.Process(vm.pid).memory_full_info()
            pss += info.pss
            rss += info.rss
        warm = [vm.warm_start.memory for vm in vms if vm.warm_start is not None]
    finally:
        await asyncio.gather(*(vm.kill() for vm in vms if vm.state.value == "running"),
                             return_exceptions=True)
    return {"clones": count, "pss_sum_mib": round(pss / (1 << 20), 1),
            "rss_sum_mib": round(rss / (1 << 20), 1), "memory": sorted(set(warm))}


def bench_memory(clones: int) -> Result:
    """Sum of PSS of ``clones`` clones at once: mapped against copied."""
    mapped = asyncio.run(_clones_pss(True, clones))
    copied = asyncio.run(_clones_pss(False, clones))
    return {"mapped": mapped, "copied": copied,
            "mapped_over_copied": round(mapped["pss_sum_mib"] / copied["pss_sum_mib"], 3),
            "goal": "mapped at most 30% of copied"}


def bench_mapped(runs: int, clones: int) -> Result:
    """The three comparisons of mapped restores, in one part."""
    return {"run": bench_run(runs), "split": bench_split(runs), "memory": bench_memory(clones)}
