"""One private event loop in a daemon thread, behind qemukit's sync API.

The sync facade never borrows the caller's event loop, so it works the same
from plain scripts, from pytest, and from code already inside asyncio. QEMU
processes spawned from this thread get a parent-death signal tied to it; the
thread lives as long as the interpreter.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .errors import StateError

T = TypeVar("T")

#: Threads for blocking work behind the loop (shared by every VM of the process; a
#: waiting attach holds one while another client has the socket, so not too few).
WORKERS = 16

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

    An exception from ``coro`` is raised here; if the caller is interrupted
    (KeyboardInterrupt), the coroutine is cancelled before re-raising.
    """
    loop = _get_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise StateError("qemukit's sync API was called from its own event loop; use AsyncVM")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise
