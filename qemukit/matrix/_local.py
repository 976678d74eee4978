"""The local pool: a matrix's jobs on this machine, a thread per VM slot."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import uuid
from collections.abc import Callable, Generator, Sequence

from ..host._tcg import tb_size_for
from ..results import Outcome
from . import _slots
from ._file import Job
from ._run import (
    REGISTRY,
    Attempt,
    JobResult,
    MatrixProgress,
    Tracker,
    end_standbys_here,
    run_attempt,
)

__all__ = ["default_parallelism", "run_local"]

log = logging.getLogger(__name__)

#: Memory a VM costs beyond its guest RAM (QEMU itself, TCG's code buffer), in MiB.
VM_OVERHEAD_MIB = 128


def default_parallelism(jobs: Sequence[Job]) -> int:
    """VMs this machine can run at once: its CPUs, and available memory over the largest VM."""
    import psutil

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    per_vm = max((j.memory_mib for j in jobs), default=512) + VM_OVERHEAD_MIB
    by_memory = psutil.virtual_memory().available // (per_vm * 1024 * 1024)
    return max(1, min(cpus, by_memory, len(jobs) or 1))


def run_local(jobs: Sequence[Job], jobs_at_once: int, retries: int, fail_fast: bool,
              progress: Callable[[MatrixProgress], None] | None
              ) -> Generator[JobResult, None, None]:
    """Run ``jobs`` on at most ``jobs_at_once`` threads here, yielding results as they end."""
    matrix = uuid.uuid4().hex
    tb_size = tb_size_for(jobs_at_once)
    if tb_size is not None:  # several TCG VMs at once: each a bounded code buffer (host/_tcg.py)
        jobs = [job if "tb_size" in job.vm
                else dataclasses.replace(job, vm={**job.vm, "tb_size": tb_size}) for job in jobs]
    _slots.register(matrix, _slots.Slots(jobs_at_once))  # its standby counted in --jobs
    tracker = Tracker(len(jobs), retries, progress, jobs_at_once)
    pool = cf.ThreadPoolExecutor(max_workers=jobs_at_once, thread_name_prefix="qemukit-matrix")
    pending: dict[cf.Future[Attempt], Job] = {}
    stopped = False

    def submit(job: Job) -> None:
        tracker.submitted(job)
        pending[pool.submit(run_attempt, job, matrix, "local")] = job

    try:
        for job in jobs:
            submit(job)
        tracker.report()
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                outcome = tracker.finish(job, future.result())
                if outcome is None:
                    submit(job)
                    continue
                tracker.report()
                yield outcome
                if fail_fast and outcome.outcome is not Outcome.PASSED:
                    stopped = True
                    return
    except BaseException:
        stopped = True
        raise
    finally:
        if stopped or pending:
            for future in pending:
                future.cancel()
            REGISTRY.stop(matrix)
        pool.shutdown(wait=True, cancel_futures=True)
        # Every job has ended: the standby clone the last ones left ends with the matrix.
        _slots.forget(matrix)
        try:
            end_standbys_here()
        except Exception as exc:  # noqa: BLE001 - the process's exit ends them still
            log.warning("matrix %s: ending the standby clones failed: %r", matrix, exc)

