"""Is this pid still the process we started? (psutil only: ``qemukit ls`` imports this, not asyncio.)"""

from __future__ import annotations

import psutil

__all__ = ["is_same_process", "process_start_time"]


def process_start_time(pid: int) -> float | None:
    """The process's start time as psutil reports it, or None if there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_same_process(pid: int, start_time: float) -> bool:
    """True if ``pid`` is alive, not a zombie, and started at ``start_time``.

    The start time guards against pid reuse: a pid that now belongs to some
    other program is never taken for the process we started.
    """
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - start_time) < 0.05
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
