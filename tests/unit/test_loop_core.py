"""The event-loop core without QEMU: guarded waits, cancellation, file locks, fork safety.

``AsyncVM.guarded`` needs only a process to watch, so these tests give it a
real ``sleep`` process in place of QEMU: what is tested is the waiting logic.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemukit import AsyncVM, VMSpec, WaitTimeout
from qemukit._aio import cancel_and_wait, file_lock
from qemukit._launch.process import QemuProcess

PACKAGE = Path(__file__).resolve().parents[2] / "qemukit"


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[AsyncVM]:
    """An AsyncVM whose 'QEMU' is a sleeping process: enough for guarded()."""
    vm = AsyncVM(VMSpec())
    proc = QemuProcess.spawn(["sleep", "300"], log_path=tmp_path / "log")
    vm._proc = proc
    yield vm
    proc.kill()
    assert proc._popen is not None
    proc._popen.wait(10)
    proc.close()


def _callbacks(fut: asyncio.Future[Any]) -> int:
    return len(fut._callbacks or ())


def test_guard_keeps_no_callback_per_call(watched: AsyncVM) -> None:
    async def calls() -> None:
        assert watched._proc is not None
        exit_future = watched._proc.exit_future()
        await watched.guarded(asyncio.sleep(0), 5, "warm-up")
        before = _callbacks(exit_future)
        for i in range(500):
            assert await watched.guarded(asyncio.sleep(0, i), 5, "a call") == i
        assert _callbacks(exit_future) == before

    asyncio.run(calls())


def test_caller_cancellation_is_not_turned_into_a_timeout(watched: AsyncVM) -> None:
    """An asyncio.timeout() that fires while the guard cancels its own task still wins."""

    async def slow_to_cancel() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # cleanup that takes a while
            raise

    async def main() -> BaseException:
        try:
            async with asyncio.timeout(0.3):
                # The guard's own deadline (0.1 s) passes first; while it waits for the
                # task's cleanup, the caller's deadline (0.3 s) cancels the caller.
                await watched.guarded(slow_to_cancel(), 0.1, "a slow task")
        except BaseException as exc:  # noqa: B036 - the type is what is checked
            return exc
        raise AssertionError("no exception")

    exc = asyncio.run(main())
    assert type(exc) is TimeoutError, repr(exc)


def test_cancel_and_wait_consumes_the_tasks_cancellation_only() -> None:
    async def main() -> None:
        task = asyncio.ensure_future(asyncio.sleep(60))
        await asyncio.sleep(0)
        await cancel_and_wait(task)  # returns: the cancellation was the task's own
        assert task.cancelled()

        async def failing() -> None:
            raise OSError("boom")

        failed = asyncio.ensure_future(failing())
        await asyncio.sleep(0)
        await cancel_and_wait(failed)  # a finished task's failure is consumed, not raised

    asyncio.run(main())


def test_cancel_and_wait_in_the_cleanup_of_a_cancelled_task_waits_for_the_other() -> None:
    """Cleanup after the caller's own cancellation: the wait is not cut short by it.

    A cancelled ``start`` cleans up (stop the I/O watch, close the monitor); the
    old check ("is the caller cancelling?") was true all through that cleanup, so
    the first cancel_and_wait raised and the rest of the cleanup never ran.
    """
    steps: list[str] = []

    async def main() -> None:
        helper = asyncio.ensure_future(asyncio.sleep(60))

        async def start() -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await cancel_and_wait(helper)
                steps.append("helper stopped")
                await asyncio.sleep(0)
                steps.append("rest of cleanup")
                raise

        task = asyncio.ensure_future(start())
        await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert helper.cancelled() and task.cancelled()

    asyncio.run(main())
    assert steps == ["helper stopped", "rest of cleanup"]


def test_cancel_and_wait_raises_a_cancellation_that_arrives_while_it_waits() -> None:
    async def main() -> None:
        async def stubborn() -> None:  # takes a while to finish cancelling
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                await asyncio.sleep(0.2)
                raise

        other = asyncio.ensure_future(stubborn())
        await asyncio.sleep(0)
        waiter = asyncio.ensure_future(cancel_and_wait(other))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
        assert waiter.cancelled()

    asyncio.run(main())


def test_no_module_suppresses_base_exception() -> None:
    """``suppress(BaseException)`` around an await eats the caller's cancellation."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "suppress"
                    and any(getattr(a, "id", None) == "BaseException" for a in node.args)):
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert offenders == []


def test_file_lock_excludes_holders_and_times_out(tmp_path: Path) -> None:
    lock = tmp_path / "ops.lock"

    async def main() -> None:
        order: list[str] = []

        async def holder(name: str, hold: float) -> None:
            async with file_lock(lock, 10, "the test lock"):
                order.append(f"{name}+")
                await asyncio.sleep(hold)
                order.append(f"{name}-")

        await asyncio.gather(holder("a", 0.3), holder("b", 0))
        assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])
        async with file_lock(lock, 10, "the test lock"):
            with pytest.raises(WaitTimeout, match="the test lock"):
                async with file_lock(lock, 0.2, "the test lock"):
                    pass
        # The abandoned waiter released what it got: the lock is free again at once.
        start = time.monotonic()
        async with file_lock(lock, 5, "the test lock"):
            pass
        assert time.monotonic() - start < 2
        assert (lock.stat().st_mode & 0o777) == 0o600

    asyncio.run(main())


def test_forked_child_gets_its_own_loop_and_leaves_the_parents_vms(
    tmp_path: Path, watched: AsyncVM
) -> None:
    """A child of os.fork() must not hang on its first sync call nor kill the parent's VMs."""
    from qemukit import _sync
    from qemukit.vm import _core as vm

    _sync.run_sync(asyncio.sleep(0))  # the parent's loop thread exists
    vm._live.add(watched)  # as a started VM is: the atexit hook would kill its process
    marker = tmp_path / "child-ran"
    pid = os.fork()
    if pid == 0:  # the child: a sync call, then a normal interpreter exit (atexit hooks)
        try:
            _sync.run_sync(asyncio.sleep(0))
            assert len(vm._live) == 0
            marker.write_text("ok")
            import atexit

            atexit._run_exitfuncs()
        finally:
            os._exit(0)
    deadline = time.monotonic() + 20
    while True:  # bounded: a hung child is killed and the test fails
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on its first sync call")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
    assert marker.read_text() == "ok"
    assert watched._proc is not None and watched._proc.alive(), "the child killed our VM"
    vm._live.discard(watched)


def test_prctl_is_resolved_before_any_fork() -> None:
    """The preexec_fn of a spawn must not dlopen (deadlock-prone in a threaded parent)."""
    import inspect

    from qemukit._launch import process

    source = inspect.getsource(process._die_with_parent)
    assert "CDLL" not in source and "dlopen" not in source
    assert callable(process._prctl)
    assert sys.platform == "linux"


def test_qemu_qmps_default_listener_keeps_no_event() -> None:
    """qemu.qmp's all-events listener is never read by qemukit: it must not queue events."""
    from qemu.qmp.message import Message

    from qemukit._wire.qmp import QMP

    async def main() -> None:
        qmp = QMP("test")
        default = qmp._client.events
        for i in range(100):
            await qmp._client._event_dispatch(Message({"event": "RESUME", "data": {"i": i}}))
        assert default.empty() and not default.history

    asyncio.run(main())
