"""A pool of warm clones of one spec, for a test harness or a service (the sync
:class:`~qemukit.vm.VMPool` is derived from it in :mod:`qemukit.vm._facade`).

``async with AsyncVMPool(spec, max_vms=4) as pool: async with pool.vm() as vm: ...``
starts a warm clone of ``spec`` for the block and stops it when the block ends.

The limit. At most ``max_vms`` of the pool's QEMUs run at once, its standby clone
(:mod:`qemukit.vm._standby`) counted as one of them: a caller of :meth:`AsyncVMPool.vm`
waits (up to its ``timeout``) for a free place. Starts run one at a time, each counting
what the last one left: a start takes the pool's standby when there is one (no new
QEMU), leaves a new one only if it still fits, and a VM that ends leaves one in its
place (:func:`~qemukit.vm._standby.refill`) when there is room. So with ``max_vms=2``
and two callers at a time, the first start restores, the second takes the standby the
first left, and each later one the standby the VM before it left as it ended.

Lifetime. The pool's VMs die with the process that made them (QEMU's parent-death
signal), as its standbys do; :meth:`AsyncVMPool.close` (the end of the ``async with``)
stops them and ends the standbys in order first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Self

from ..errors import SpecError, StateError, WaitTimeout
from ..host._tcg import tb_size_for
from ..spec import VMSpec
from ..timeouts import BOOT_TIMEOUT, SAVE_TIMEOUT
from . import _standby
from ._core import AsyncVM
from ._state import VMState

__all__ = ["POOL_WAIT_TIMEOUT", "AsyncVMPool"]

log = logging.getLogger("qemukit")

#: How long :meth:`AsyncVMPool.vm` waits for a free place by default (seconds).
POOL_WAIT_TIMEOUT = 600.0


def _seconds(**values: object) -> list[float]:
    """Each value as a positive number of seconds, or a SpecError naming its keyword."""
    for field, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise SpecError(field, value, "must be a positive number of seconds")
    return [float(value) for value in values.values()]  # type: ignore[arg-type]


class AsyncVMPool:
    """Warm clones of one spec, at most ``max_vms`` QEMUs at once (see the module).

    ``spec`` must have ``warm`` on and no ``name`` (the pool's VMs are named
    each their own). Standby clones are on unless ``spec.standby`` is False:
    the next clone is restored while the current one runs, and counts against
    ``max_vms`` (so with ``max_vms=1`` there is never room for one).
    ``wait_timeout`` bounds how long :meth:`vm` waits for a free place;
    ``boot_timeout`` how long a VM's agent may take to answer. Bad input is a
    :class:`~qemukit.errors.SpecError` raised here, before anything starts.
    """

    def __init__(self, spec: VMSpec, *, max_vms: int = 2,
                 wait_timeout: float = POOL_WAIT_TIMEOUT, boot_timeout: float = BOOT_TIMEOUT,
                 state_root: Path | None = None) -> None:
        if not isinstance(spec, VMSpec):
            raise SpecError("spec", type(spec).__name__, "must be a VMSpec")
        if isinstance(max_vms, bool) or not isinstance(max_vms, int) or max_vms < 1:
            raise SpecError("max_vms", max_vms, "must be a whole number of VMs, at least 1")
        if not spec.warm:
            raise SpecError("warm", spec.warm, "a pool starts warm clones: give a spec with "
                            "warm = true (spec.replace(warm=True))")
        if spec.name is not None:
            raise SpecError("name", spec.name, "a pool names each of its VMs: leave it unset")
        tb_size = tb_size_for(max_vms) if spec.tb_size is None else None
        # Several TCG VMs at once: each a bounded code buffer, as the matrix pool does.
        self.spec = spec if tb_size is None else spec.replace(tb_size=tb_size)
        self.max_vms = max_vms
        self.wait_timeout, self.boot_timeout = _seconds(wait_timeout=wait_timeout,
                                                        boot_timeout=boot_timeout)
        self.state_root = state_root
        #: Standby clones: on unless the spec says ``standby = false``.
        self.standby = spec.standby is not False
        self._closed = False
        self._places = 0  # places taken: VMs starting or running (waiters queue for one)
        self._running: list[AsyncVM] = []  # the pool's VMs, from their start to their end
        self._key: str | None = None  # the warm state the pool's clones are restored from
        self._cond = asyncio.Condition()
        self._start_lock = asyncio.Lock()  # one start (or refill) at a time: exact counts

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._running)}/{self.max_vms} running"
        return f"<AsyncVMPool {state}{' +standby' if self.standby else ''}>"

    @property
    def running(self) -> int:
        """How many of the pool's VMs are starting or running now (standbys not counted)."""
        return len(self._running)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called: :meth:`vm` refuses from then on."""
        return self._closed

    @contextlib.asynccontextmanager
    async def vm(self, timeout: float | None = None) -> AsyncIterator[AsyncVM]:
        """A running warm clone for the ``async with`` block, stopped when the block ends.

        Waits up to ``timeout`` seconds (default :attr:`wait_timeout`) for a
        free place, then :class:`~qemukit.errors.WaitTimeout`. The VM's agent
        answers when the block begins; ``vm.warm_start.standby`` says whether
        it took the pool's standby clone.
        """
        vm = await self._acquire(self.wait_timeout if timeout is None else timeout)
        try:
            yield vm
        finally:
            await self._release(vm)

    async def close(self) -> None:
        """Stop every VM of the pool and end its standby clones; waiters get a StateError.

        Idempotent; the end of ``async with`` calls it.
        """
        self._closed = True
        async with self._cond:
            self._cond.notify_all()
        outcomes = await asyncio.gather(*(_stop(vm) for vm in list(self._running)),
                                        return_exceptions=True)
        if self._key is not None:
            await _standby.end_kept(self._key)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                log.debug("pool: a VM did not stop cleanly: %r", outcome)

    async def __aenter__(self) -> Self:
        self._require_open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- the places ------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._closed:
            raise StateError("the VM pool is closed")

    async def _acquire(self, timeout: float) -> AsyncVM:
        """Take a place (waiting up to ``timeout``) and start a VM in it, its agent answering."""
        (timeout,) = _seconds(timeout=timeout)
        self._require_open()
        async with self._cond:
            try:
                await asyncio.wait_for(self._cond.wait_for(
                    lambda: self._closed or self._places < self.max_vms), timeout)
            except TimeoutError:
                raise WaitTimeout(f"a free place in the VM pool (all {self.max_vms} in use)",
                                  timeout) from None
            self._require_open()
            self._places += 1
        try:
            vm = await self._start()
        except BaseException:
            await self._give_back()
            raise
        return vm

    async def _start(self) -> AsyncVM:
        async with self._start_lock:
            self._require_open()
            spec = await self._next_spec()
            vm = self._new_vm(spec)
            self._running.append(vm)
            try:
                await vm.start()
                if vm.warm_start is not None and vm.warm_start.key is not None:
                    self._key = vm.warm_start.key
            except BaseException:
                self._running.remove(vm)
                raise
        try:
            self._require_open()  # closed while it started: close() may have missed it
            await vm.wait_ready(self.boot_timeout)
        except BaseException:
            try:
                await _stop(vm)
            except Exception as exc:  # noqa: BLE001 - the first error is the one raised
                log.debug("pool: %s did not stop cleanly after a failed start: %r", vm.name, exc)
            if vm in self._running:
                self._running.remove(vm)
            if self._closed and self._key is not None:
                await _standby.end_kept(self._key)
            raise
        return vm

    def _new_vm(self, spec: VMSpec) -> AsyncVM:
        """The pool's next VM, not started (a seam: unit tests return a fake)."""
        return AsyncVM(spec, die_with_parent=True, state_root=self.state_root,
                       boot_timeout=self.boot_timeout)

    def _own_standbys(self) -> int:
        """How many standbys of the pool's warm state this loop keeps or makes."""
        return 0 if self._key is None else _standby.kept_keys().count(self._key)

    async def _next_spec(self) -> VMSpec:
        """The spec of the next VM: with a standby only if one more QEMU still fits."""
        if not self.standby:
            return self.spec
        if (self._key is not None and self._key in _standby.kept_keys()
                and self._key not in _standby.ready_keys()):
            await _standby.settle(SAVE_TIMEOUT)  # the standby being made is taken, not raced
        # A ready standby is taken by this start: it becomes this VM, no new QEMU.
        taken = self._key is not None and self._key in _standby.ready_keys()
        after = len(self._running) + 1 + self._own_standbys() - taken
        if after > self.max_vms and self._key is not None:  # one still being made (slow host)
            await _standby.end_kept(self._key)
            after = len(self._running) + 1
        return self.spec.replace(standby=after + 1 <= self.max_vms)

    async def _release(self, vm: AsyncVM) -> None:
        """Stop ``vm``, leave a standby in its place if there is room, give its place back."""
        try:
            await _stop(vm)
        finally:
            async with self._start_lock:
                if vm in self._running:
                    self._running.remove(vm)
                if (self.standby and not self._closed and self._own_standbys() == 0
                        and len(self._running) + 1 <= self.max_vms):
                    _standby.refill(vm)
            await self._give_back()

    async def _give_back(self) -> None:
        async with self._cond:
            self._places -= 1
            self._cond.notify()


async def _stop(vm: AsyncVM) -> None:
    """Stop ``vm`` as the end of ``async with vm`` does (the shutdown ladder)."""
    if vm.state == VMState.RUNNING:
        await vm.shutdown()
