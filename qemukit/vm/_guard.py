"""The guarded wait: an await that ends early, with the right error, when the VM fails.

:meth:`qemukit.vm.AsyncVM.guarded` hands its parts to :func:`guarded_wait`:
QEMU's process (its exit ends the wait as :class:`LaunchError`), the console
watcher (a panic, an oops or a share that did not mount ends it with the
console's verdict) and, for waits that need the guest to run, the watch on
QEMU's BLOCK_IO_ERROR (a guest paused on a host disk error ends it as
:class:`GuestIOError`). Otherwise the wait ends at its deadline with
:class:`WaitTimeout`, showing the console's tail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from .._aio import cancel_and_wait
from .._launch.process import QemuProcess
from .._wire.console import ConsoleEvent, ConsoleWatcher, classify_text, console_verdict, first_fatal
from .._wire.io_errors import IOErrorWatch
from ..errors import LaunchError, WaitTimeout

__all__ = ["fatal_console_event", "guarded_wait"]

T = TypeVar("T")


def fatal_console_event(panic: asyncio.Future[ConsoleEvent] | None, console: ConsoleWatcher | None,
                        continue_on_oops: bool, console_tail: Callable[[int], str]
                        ) -> ConsoleEvent | None:
    """The console event that ends a wait (a panic, an oops unless continued past,
    a share that did not mount): seen live, else found in the console log (QEMU exited
    before the watcher read it)."""
    if panic is not None and panic.done() and not panic.cancelled():
        return panic.result()
    continue_on_oops = console.continue_on_oops if console else continue_on_oops
    return first_fatal(classify_text(console_tail(200)), continue_on_oops)


async def guarded_wait(
    aw: Awaitable[T], timeout: float | None, what: str, *, proc: QemuProcess,
    console: ConsoleWatcher | None, io_watch: IOErrorWatch | None, guest_faults: bool,
    continue_on_oops: bool, shares: Sequence[object], console_tail: Callable[[int], str],
    exited: Callable[[str], LaunchError],
) -> T:
    """Await ``aw`` but stop early if ``proc`` exits, the guest panics or (with an
    ``io_watch``) QEMU pauses it on a disk I/O error. ``exited`` makes the error for a
    QEMU that is gone; see :meth:`qemukit.vm.AsyncVM.guarded` for the rest."""
    task = asyncio.ensure_future(aw)
    # The long-lived futures (QEMU's exit, a panic, an I/O error) go to asyncio.wait
    # as they are: it removes its callbacks from them when it returns, so a VM that
    # serves many calls keeps none per call (an asyncio.shield here would leave one
    # on each until QEMU exits). asyncio.wait never cancels them.
    waiters: set[asyncio.Future[Any]] = {task, proc.exit_future()}
    panic = console.panic if console and guest_faults else None
    if panic is not None:
        waiters.add(panic)
    io_error = io_watch.error if io_watch is not None else None
    if io_error is not None:
        waiters.add(io_error)
    try:
        done, _ = await asyncio.wait(
            waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    except BaseException:
        # Our caller was cancelled (or interrupted): the call goes with it, and is
        # let finish unwinding first, so the cleanup after us (closing the monitor
        # a cancelled connect is still tearing down) does not race it.
        await cancel_and_wait(task)
        raise
    if task in done and task.exception() is not None and proc.alive():
        # A connection that broke (agent, monitor) often means QEMU is dying: it
        # closes its sockets before it exits. Let the exit, if any, show first.
        with contextlib.suppress(WaitTimeout):
            await proc.wait(0.5)
    def fault() -> ConsoleEvent | None:
        return (fatal_console_event(panic, console, continue_on_oops, console_tail)
                if guest_faults else None)

    if task in done and (task.exception() is None or (proc.alive() and fault() is None)):
        return task.result()
    await cancel_and_wait(task)
    if io_error is not None and io_error.done() and io_watch is not None:
        io_watch.rearm()  # reported once: later calls (on the paused VM) are not blocked
        raise io_error.result()
    console_event = fault()
    if console_event is not None:
        raise await console_verdict(console_event, console, proc.exit_future(), shares,
                                    console_tail)
    if not proc.alive():
        raise exited(f"QEMU exited while waiting for {what}")
    raise WaitTimeout(what, timeout or 0, console_tail(20) or proc.output_tail(10))
