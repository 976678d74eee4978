"""Small asyncio helpers shared by the modules that run on qemukit's loop."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .errors import WaitTimeout

__all__ = ["cancel_and_wait", "file_lock"]

log = logging.getLogger("qemukit")


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has finished, keeping our own cancellation.

    The task's own outcome (its ``CancelledError`` or another exception) is
    consumed: the caller cancelled it because it no longer wants it. If the
    *calling* task is cancelled meanwhile (an ``asyncio.timeout()`` around it,
    Ctrl-C through the sync facade), that ``CancelledError`` propagates.
    """
    if task.done():
        if not task.cancelled() and task.exception() is not None:
            log.debug("abandoned task failed: %r", task.exception())
        return
    current = asyncio.current_task()
    # Cancellations of the caller already under way (cleanup after its own
    # cancellation) are not new: only one that arrives during this wait is raised.
    before = current.cancelling() if current is not None else 0
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        if current is not None and current.cancelling() > before:
            raise
    except Exception as exc:  # the abandoned task's failure is not the caller's
        log.debug("abandoned task failed while cancelled: %r", exc)


@contextlib.asynccontextmanager
async def file_lock(path: Path, timeout: float, what: str) -> AsyncIterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the ``async with`` body.

    ``flock`` locks belong to an open file, so two holders in one process
    exclude each other as two processes do. An uncontended lock is taken at
    once; a contended one is waited for in a worker thread, bounded by
    ``timeout`` (:class:`WaitTimeout` naming ``what``). A wait that is
    abandoned (timeout, cancellation) never leaves the lock held: the worker
    releases it as soon as it gets it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        await _wait_for_flock(fd, timeout, what)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


async def _wait_for_flock(fd: int, timeout: float, what: str) -> None:
    """Block in a worker thread until ``fd`` is locked; on giving up, hand the fd to it."""
    guard = threading.Lock()
    abandoned = False

    def acquire() -> None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with guard:
            if abandoned:
                os.close(fd)

    waiter = asyncio.get_running_loop().run_in_executor(None, acquire)
    try:
        await asyncio.wait_for(asyncio.shield(waiter), timeout)
    except BaseException as exc:
        with guard:
            if waiter.done():
                os.close(fd)  # it got the lock just now: release it ourselves
            else:
                abandoned = True  # the worker closes the fd once it holds the lock
        if isinstance(exc, TimeoutError):
            raise WaitTimeout(what, timeout) from None
        raise
