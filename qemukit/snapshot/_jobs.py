"""Waiting on QEMU's jobs and events, bounded by one deadline per operation."""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import SnapshotError, WaitTimeout
from ..qmp import EventListener

if TYPE_CHECKING:
    from ..target import VMTarget


class Deadline:
    """One time budget shared by the steps of an operation."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._end = time.monotonic() + timeout

    def remaining(self, what: str) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise WaitTimeout(what, self.timeout)
        return left


async def next_event(
    vm: VMTarget, listener: EventListener, deadline: Deadline, what: str
) -> dict[str, Any]:
    """The next event from ``listener``; stops early if QEMU exits or the guest panics."""
    wait = vm.monitor.wait_event(listener, deadline.remaining(what), what)
    try:
        return await vm.guarded(wait, None, what)
    except WaitTimeout as exc:
        raise WaitTimeout(what, deadline.timeout, exc.console) from None


async def run_job(
    vm: VMTarget,
    command: str,
    arguments: Mapping[str, Any],
    *,
    what: str,
    deadline: Deadline,
    on_ready: Callable[[str], Awaitable[None]] | None = None,
) -> None:
    """Run a QMP job to its end and raise :class:`SnapshotError` with its error if it failed.

    The JOB_STATUS_CHANGE listener is registered before the command, so no
    status change can slip by; ``on_ready`` is called when the job reports
    ``ready`` (block jobs that wait for ``job-complete``).
    """
    job_id = f"qemukit-{command}-{secrets.token_hex(3)}"
    with vm.monitor.listen(
        "JOB_STATUS_CHANGE", match=lambda ev: ev.get("data", {}).get("id") == job_id
    ) as listener:
        await vm.qmp(command, {**arguments, "job-id": job_id})
        status = ""
        while status not in ("concluded", "null"):
            event = await next_event(
                vm, listener, deadline,
                f"job {job_id} ({what}) to conclude (last status: {status or 'created'})",
            )
            status = str(event["data"]["status"])
            if status == "ready" and on_ready is not None:
                await on_ready(job_id)
    jobs = await vm.qmp("query-jobs")
    error = next((j.get("error") for j in jobs if j.get("id") == job_id), None)
    if status == "concluded":
        await vm.qmp("job-dismiss", id=job_id)
    if error:
        raise SnapshotError(f"{what} failed: {error}", job_error=str(error))


async def complete_job(vm: VMTarget, job_id: str) -> None:
    """Tell QEMU to complete a job that reached ready (mirror, commit)."""
    await vm.qmp("job-complete", id=job_id)
