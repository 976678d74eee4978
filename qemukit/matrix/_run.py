"""One job's run and its verdict, and what both runners (the local pool, Dask) share.

:func:`run_attempt` runs a job once in this process and says whether what went
wrong was the job's (a result) or the machine's (worth a retry);
:class:`Tracker` counts the attempts and decides; the registry knows the VMs
each matrix has running here, so :func:`stop_matrix_here` can end them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import images
from .._fs import locked
from .._sync import run_sync
from ..arch import DEFAULT_ARCH
from ..errors import QemukitError, StateError
from ..kernel import KernelTestResult, run_in_vm
from ..paths import cache_dir
from ..results import Outcome, ReportCase
from ..vm import VM, _standby
from . import _slots
from ._file import Job

__all__ = ["REGISTRY", "Attempt", "Cancelled", "JobResult", "MatrixProgress", "Registry",
           "Tracker", "end_standbys_here", "ensure_image", "error_result", "run_attempt",
           "stop_matrix_here"]

log = logging.getLogger(__name__)

#: How long stopping the running VMs (after Ctrl-C or --fail-fast) may take, per VM.
STOP_TIMEOUT = 10.0


# -- results -------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobResult:
    """One job's verdict: the run's result, where it ran, and how many attempts it took.

    ``retried`` says why each earlier attempt did not count (an infrastructure
    failure: QEMU did not start, the worker was lost, ...).
    """

    job: Job
    result: KernelTestResult
    host: str
    worker: str
    attempts: int = 1
    retried: tuple[str, ...] = ()

    @property
    def outcome(self) -> Outcome:
        """The run's outcome: passed, failed, panic, oops, timeout or error."""
        return self.result.outcome

    def report_case(self) -> ReportCase:
        """This job as a JUnit test case: named by the job, with its axes and where it ran."""
        case = self.result.report_case(self.job.name)
        where = [*((f"axis.{k}", v) for k, v in self.job.axes.items()), ("host", self.host),
                 ("worker", self.worker), ("attempts", self.attempts),
                 *(("retried", r) for r in self.retried)]
        return dataclasses.replace(case, properties=[*where, *case.properties])

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the job's name and axes, where it ran, and the run's result."""
        return {"name": self.job.name, "axes": dict(self.job.axes), "outcome": self.outcome,
                "host": self.host, "worker": self.worker, "attempts": self.attempts,
                "retried": list(self.retried), "job": self.job.to_dict(),
                "result": self.result.to_dict()}


@dataclass(frozen=True)
class MatrixProgress:
    """Where a matrix run stands; handed to ``run_matrix``'s ``progress`` callback."""

    total: int
    done: int
    failed: int
    running: int
    elapsed: float

    @property
    def eta(self) -> float | None:
        """Seconds left at the pace so far (None before the first job is done)."""
        if not self.done:
            return None
        return self.elapsed / self.done * (self.total - self.done)


@dataclass(frozen=True)
class Attempt:
    """What one try of a job gave: a result, or an infrastructure failure (``infra``)."""

    result: KernelTestResult | None
    infra: str | None
    host: str
    worker: str


def error_result(job: Job, message: str, duration: float = 0.0) -> KernelTestResult:
    """The result of a job that did not run to a verdict: outcome ``error``, ``message``."""
    return KernelTestResult(command=job.command, outcome=Outcome.ERROR, exit_status=None, stdout="",
                            stderr="", boot_time=None, duration=round(duration, 3), panic=None,
                            error=message, accel=None, console_log=None, console_tail="")


# -- running one job (here or on a worker) -------------------------------------------------


class Cancelled(Exception):  # noqa: N818 - not an error: the matrix was stopped
    """Raised from ``on_starting``/``on_started`` when the matrix was stopped before."""


class Registry:
    """The VMs each matrix has starting or running in this process, so a stop ends them all.

    A VM is starting from the moment its start begins until it runs (a warm
    start boots and saves a state meanwhile): a stop cancels its start, which
    stops whatever it began. Once it runs, a stop kills it.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starting: dict[str, set[Callable[[], None]]] = {}
        self.running: dict[str, set[VM]] = {}
        self.stopped: set[str] = set()

    def start_begins(self, matrix: str, cancel: Callable[[], None]) -> None:
        """Note a start for ``matrix`` that ``cancel`` cancels; :class:`Cancelled` if the
        matrix was stopped."""
        with self.lock:
            if matrix in self.stopped:
                raise Cancelled(matrix)
            self.starting.setdefault(matrix, set()).add(cancel)

    def started(self, matrix: str, vm: VM, cancel: Callable[[], None] | None = None) -> None:
        """Note ``vm`` (whose start ``cancel`` was) as running for ``matrix``;
        :class:`Cancelled` if the matrix was stopped."""
        with self.lock:
            self.starting.get(matrix, set()).discard(cancel)
            if matrix in self.stopped:
                raise Cancelled(matrix)
            self.running.setdefault(matrix, set()).add(vm)

    def finished(self, matrix: str, vm: VM | None, cancel: Callable[[], None] | None = None
                 ) -> None:
        """Forget ``vm`` and its start (its run ended and stopped it)."""
        with self.lock:
            self.starting.get(matrix, set()).discard(cancel)
            if vm is not None:
                self.running.get(matrix, set()).discard(vm)

    def is_stopped(self, matrix: str) -> bool:
        """True once :meth:`stop` ran for ``matrix``."""
        with self.lock:
            return matrix in self.stopped

    def stop(self, matrix: str) -> int:
        """Refuse new VMs for ``matrix``, cancel the starting ones and SIGKILL the running
        ones; how many were cancelled or killed."""
        with self.lock:
            self.stopped.add(matrix)
            cancels = list(self.starting.pop(matrix, ()))
            vms = list(self.running.pop(matrix, ()))
        for cancel in cancels:
            cancel()  # the start cleans up on its own thread; its run then returns
        log.debug("matrix %s: stopping %d starting and %d running VMs", matrix, len(cancels),
                  len(vms))
        killed = len(cancels)
        for vm in vms:
            try:
                vm.kill(kill_timeout=STOP_TIMEOUT)
                killed += 1
            except StateError:
                pass  # it was already stopping: its own run finishes the cleanup
        return killed


REGISTRY = Registry()


def stop_matrix_here(matrix: str) -> int:
    """Stop matrix ``matrix``'s VMs in this process (what a Ctrl-C runs on each worker)."""
    return REGISTRY.stop(matrix)


def end_standbys_here(matrix: str | None = None) -> int:
    """End the standby clones this process keeps; how many were kept (ready or being made).

    A matrix's jobs leave one (:mod:`qemukit.matrix._slots`); what a matrix
    started must not outlive it, on this host or on a worker: the runners
    call this after the matrix (``matrix``: its jobs are counted no more here),
    after a stop (Ctrl-C, --fail-fast) and when a job ends after its matrix
    was stopped. The jobs' VMs run on the sync API's loop, so its standbys
    are theirs (and any other standby of this process's sync VMs: spare
    capacity, which the next start of theirs restores without).
    """
    if matrix is not None:
        _slots.forget(matrix)

    async def end() -> int:
        kept = len(_standby.kept_memory())
        await _standby.end_all()
        return kept

    kept = run_sync(end())
    if kept:
        log.debug("ended %d standby clones", kept)
    return kept


def _end_standbys_quietly() -> None:
    """:func:`end_standbys_here`, a failure logged (a runner's cleanup goes on)."""
    try:
        end_standbys_here()
    except Exception as exc:  # noqa: BLE001 - the process's exit ends them still
        log.warning("ending the standby clones failed: %r", exc)


def ensure_image(name: str, arch: str = DEFAULT_ARCH) -> None:
    """Build image ``name`` for ``arch`` unless it is cached; one builder at a time per cache."""
    if images.find_image(name, arch) is not None:
        return
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / f".matrix-build-{name}-{arch}.lock"):  # threads and processes alike
        images.build(name, arch=arch)  # the second comer finds it built and returns


def run_attempt(job: Job, matrix: str, worker: str) -> Attempt:
    """Run ``job`` once in this process; classify what went wrong."""
    host = socket.gethostname()
    start = time.monotonic()
    if REGISTRY.is_stopped(matrix):
        return Attempt(None, "the matrix was stopped", host, worker)
    started: list[VM] = []
    cancels: list[Callable[[], None]] = []

    def on_starting(cancel: Callable[[], None]) -> None:
        cancels.append(cancel)
        REGISTRY.start_begins(matrix, cancel)

    def on_started(vm: VM) -> None:
        started.append(vm)
        REGISTRY.started(matrix, vm, cancels[0] if cancels else None)

    try:
        image = job.needs_image()
        if image is not None:
            ensure_image(image, str(job.vm.get("arch", DEFAULT_ARCH)))
        spec = job.spec()
    except QemukitError as exc:  # a bad job: its result, not worth a retry
        return Attempt(error_result(job, str(exc), time.monotonic() - start), None, host, worker)
    # A standby clone, within the QEMUs the runner promises (see _slots): left when the job's
    # VM has stopped, if it fits, never by the start (spec.standby False) beyond the count.
    slots = _slots.for_matrix(matrix)
    leave = slots is not None and _slots.wanted(spec)
    desc = _slots.description(spec)
    relied = slots.admit_here(desc) if slots is not None else None
    spec = spec.replace(standby=False) if slots is not None else spec
    try:
        result = run_in_vm(spec, job.command, timeout=job.timeout, modules=job.modules,
                           on_started=on_started, continue_on_oops=job.continue_on_oops,
                           on_starting=on_starting, crash_dir=job.crash_dir)
    except (Cancelled, asyncio.CancelledError):  # the matrix was stopped: this start too
        return Attempt(None, "the matrix was stopped", host, worker)
    except QemukitError as exc:
        return Attempt(error_result(job, str(exc), time.monotonic() - start), None, host, worker)
    except Exception as exc:  # the runner itself broke: worth another try
        text = "".join(traceback.format_exception_only(exc)).strip()
        return Attempt(None, f"the run raised {text}", host, worker)
    finally:
        REGISTRY.finished(matrix, started[0] if started else None,
                          cancels[0] if cancels else None)
        stopped = REGISTRY.is_stopped(matrix)
        if slots is not None:
            slots.release_here(desc, relied, started[0] if started else None,
                               leave and not stopped)
        if stopped:  # a standby its start left after the stop: ended
            _end_standbys_quietly()
    if result.outcome is Outcome.ERROR and not started:
        # The VM never started (LaunchError, out of memory, no QEMU): the machine's fault.
        return Attempt(result, f"QEMU did not start on {host}: {result.error}", host, worker)
    if REGISTRY.is_stopped(matrix):
        return Attempt(None, "the matrix was stopped", host, worker)
    return Attempt(result, None, host, worker)

class Tracker:
    """Attempts, retry reasons and progress for one matrix run."""

    def __init__(self, total: int, retries: int,
                 progress: Callable[[MatrixProgress], None] | None, slots: int | None) -> None:
        self.total, self.retries, self.progress, self.slots = total, retries, progress, slots
        self.attempts: dict[str, int] = {}
        self.retried: dict[str, list[str]] = {}
        self.done = self.failed = self.running = 0
        self.begin = time.monotonic()

    def submitted(self, job: Job) -> None:
        """Count one more attempt of ``job``, now running."""
        self.attempts[job.name] = self.attempts.get(job.name, 0) + 1
        self.running += 1

    def report(self) -> None:
        """Tell the progress callback, if any, where the run stands."""
        if self.progress is not None:
            running = self.running if self.slots is None else min(self.running, self.slots)
            self.progress(MatrixProgress(self.total, self.done, self.failed, running,
                                         time.monotonic() - self.begin))

    def finish(self, job: Job, attempt: Attempt, extra_retried: Sequence[str] = (),
               extra_attempts: int = 0) -> JobResult | None:
        """The job's result, or None when it should be tried again."""
        self.running -= 1
        reasons = self.retried.setdefault(job.name, [])
        reasons.extend(extra_retried)
        self.attempts[job.name] += extra_attempts
        if attempt.infra is not None:
            if self.attempts[job.name] <= self.retries:
                reasons.append(attempt.infra)
                return None
            result = attempt.result or error_result(job, attempt.infra)
            if attempt.result is not None:
                result = dataclasses.replace(result, error=attempt.infra)
        else:
            assert attempt.result is not None
            result = attempt.result
        self.done += 1
        self.failed += result.outcome is not Outcome.PASSED
        return JobResult(job, result, attempt.host, attempt.worker, self.attempts[job.name],
                         tuple(reasons))


