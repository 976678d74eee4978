"""One private event loop in a daemon thread, behind qemukit's sync API.

The sync facade never borrows the caller's event loop, so it works the same
from plain scripts, from pytest, and from code already inside asyncio. QEMU
processes spawned from this thread get a parent-death signal tied to it; the
thread lives as long as the interpreter.

The sync classes are derived from the async ones, not written again: each
method is ``blocking(AsyncClass.method)``, which keeps the async method's
signature, types and docstring and runs it on the loop thread. A unit test
checks that every public coroutine of an async class has its sync twin.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import queue
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar

from .errors import StateError

__all__ = ["WORKERS", "SyncFacade", "blocking", "delegated", "finish_at_exit", "is_own_loop",
           "passthrough", "run_sync"]

T = TypeVar("T")
P = ParamSpec("P")

#: Threads for blocking work behind the loop (shared by every VM of the process; a
#: waiting attach holds one while another client has the socket, so not too few).
WORKERS = 16
#: How long an interrupted call waits for its coroutine to finish cancelling.
_CANCEL_GRACE = 5.0

log = logging.getLogger("qemukit")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            # Blocking helpers (qemu-img, connects) run here: a small, named, bounded pool.
            loop.set_default_executor(
                ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="qemukit-worker")
            )
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            _thread = threading.Thread(target=run, name="qemukit-loop", daemon=True)
            _thread.start()
            ready.wait()
            _loop = loop
        return _loop


def _reset_after_fork() -> None:
    """In a child of ``os.fork()``: the parent's loop thread does not exist here.

    The child inherited the loop object but not the thread running it, so a
    first sync call would wait forever. Start afresh: the child's first call
    makes its own loop and thread.
    """
    global _lock, _loop, _thread
    _lock = threading.Lock()
    _loop = None
    _thread = None


os.register_at_fork(after_in_child=_reset_after_fork)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on qemukit's loop thread and return its result.

    An exception from ``coro`` is raised here. If the caller is interrupted
    (KeyboardInterrupt), the coroutine is cancelled and given a moment to
    finish cancelling before the interrupt is re-raised.

    This is the hand-off every sync call pays, so it is kept small: one
    ``call_soon_threadsafe`` to start a task on the loop and one
    ``SimpleQueue`` (a single lock, implemented in C) to hand back the
    finished task, instead of ``run_coroutine_threadsafe``'s chained futures.
    """
    loop = _get_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise StateError("qemukit's sync API was called from its own event loop; use AsyncVM")
    done: queue.SimpleQueue[asyncio.Task[T]] = queue.SimpleQueue()
    started: list[asyncio.Task[T]] = []

    def start() -> None:
        task = loop.create_task(coro)
        started.append(task)
        task.add_done_callback(done.put)

    loop.call_soon_threadsafe(start)
    try:
        finished = done.get()
    except BaseException:
        loop.call_soon_threadsafe(lambda: started and started[0].cancel())
        try:
            done.get(timeout=_CANCEL_GRACE)
        except queue.Empty:
            pass
        raise
    return finished.result()


def is_own_loop(loop: asyncio.AbstractEventLoop) -> bool:
    """True if ``loop`` is the sync API's own loop (so its thread can still run work)."""
    return loop is _loop and _thread is not None and _thread.is_alive()


def finish_at_exit(coros: list[Coroutine[Any, Any, Any]], timeout: float) -> None:
    """At interpreter exit: run ``coros`` on the loop thread together, at most ``timeout`` s.

    The loop thread is a daemon: whatever still runs on it when the interpreter
    exits is destroyed half-way (asyncio then prints "Task was destroyed but it
    is pending!" for each task). The exit handler that stops leftover VMs ends
    them here instead, in order. A failure is logged, not raised: the caller
    kills what remains anyway.
    """
    loop = _loop
    if not coros:
        return
    if loop is None or not is_own_loop(loop):
        for coro in coros:
            coro.close()
        return

    async def together() -> None:
        for outcome in await asyncio.gather(*coros, return_exceptions=True):
            if isinstance(outcome, BaseException):
                log.debug("exit cleanup failed: %r", outcome)

    future = asyncio.run_coroutine_threadsafe(together(), loop)
    try:
        future.result(timeout)
    except BaseException as exc:  # a timeout or a second Ctrl-C: the caller kills the rest
        log.debug("exit cleanup did not finish: %r", exc)
        future.cancel()


class SyncFacade:
    """Base of the sync classes: a blocking view of one async object (:attr:`aio`)."""

    def __init__(self, aio: Any) -> None:
        self._aio = aio

    @property
    def aio(self) -> Any:
        """The async object behind this sync one."""
        return self._aio

    def __repr__(self) -> str:
        inner = repr(self._aio)
        name = type(self._aio).__name__
        # <AsyncVM 'x' running> reads <VM 'x' running>: the same object, seen blocking.
        if inner.startswith(f"<{name}"):
            return f"<{type(self).__name__}{inner[len(name) + 1:]}"
        return f"<{type(self).__name__} of {inner}>"


def blocking(
    method: Callable[Concatenate[Any, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[Any, P], T]:
    """The sync twin of the coroutine method ``method``, for a :class:`SyncFacade` class.

    Same signature, types and docstring (``inspect.signature`` shows the
    async one's); calling it runs ``method`` on the facade's async object on
    qemukit's loop thread.
    """

    @functools.wraps(method)
    def call(self: SyncFacade, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return run_sync(method(self._aio, *args, **kwargs))

    call.__qemukit_blocking__ = True  # type: ignore[attr-defined]
    return call


def passthrough(method: Callable[Concatenate[Any, P], T]) -> Callable[Concatenate[Any, P], T]:
    """A plain (non-async) method of the async class, called on the facade's async object."""

    @functools.wraps(method)
    def call(self: SyncFacade, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return method(self._aio, *args, **kwargs)

    return call


class delegated(Generic[T]):  # lower case: used like ``property``
    """A read-only attribute of the async object, read through the facade.

    ``name = delegated(AsyncVM.name)``: a property (or any one-argument
    getter) of the async class; its docstring is kept.
    """

    def __init__(self, getter: Callable[[Any], T], doc: str | None = None) -> None:
        self._get: Callable[[Any], T] = getattr(getter, "fget", getter)
        self.__doc__ = doc or inspect.getdoc(getter)

    def __get__(self, obj: SyncFacade | None, owner: type | None = None) -> T:
        if obj is None:
            return self  # type: ignore[return-value]  # the descriptor itself, for introspection
        return self._get(obj._aio)
