"""The QEMUs a matrix runs in this process, its standby clone counted: at most ``cap``.

A matrix worker runs job after job of few VM descriptions, so it keeps a
standby clone (:mod:`qemukit.vm._standby`) by default, within the promise it
makes: the local pool runs at most ``--jobs`` QEMUs at once, a Dask worker
at most its ``vm`` resource. Jobs start without leaving a standby (at a
start every other slot is usually busy); a job whose VM has stopped leaves
one in its place (:func:`~qemukit.vm._standby.refill`) when it fits: fewer
jobs running than ``cap`` and no standby kept yet. The next job of the same
description takes it (a standby still being made is waited for, not raced);
a job of another description that needs the slot ends the standby first.

Every decision runs on qemukit's sync loop (where the jobs' VMs and their
standbys live), one at a time under a lock, so the count cannot race. The
bound counted: every admitted job (at most one QEMU each) plus every standby
kept or being made, less the ready standbys that admitted jobs will take
(each becomes its taker's QEMU, no new one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from dataclasses import dataclass, field

from .._sync import run_sync
from ..spec import VMSpec
from ..timeouts import SAVE_TIMEOUT
from ..vm import VM, _standby

__all__ = ["Slots", "description", "for_matrix", "forget", "register", "wanted",
           "worker_slots"]

log = logging.getLogger(__name__)

#: The slots each matrix running here counts in (the local pool's own; a Dask worker's one).
_by_matrix: dict[str, Slots] = {}
_registry_lock = threading.Lock()
#: A Dask worker's slots: its ``vm`` resource, shared by every matrix it runs jobs of.
_worker: Slots | None = None


def description(spec: VMSpec) -> str:
    """What two jobs share when one may take the other's standby: the spec, name aside."""
    data = spec.to_dict()
    data.pop("name", None)
    data.pop("standby", None)
    return json.dumps(data, sort_keys=True, default=str)


def wanted(spec: VMSpec) -> bool:
    """Whether a job of ``spec`` leaves a standby: unless its spec says ``standby = false``
    or ``QEMUKIT_STANDBY=0``, and only for a warm start."""
    return bool(spec.warm) and spec.standby is not False and os.environ.get(
        _standby.ENV) != "0"


@dataclass
class Slots:
    """At most ``cap`` QEMUs of matrix jobs at once in this process, standbys counted."""

    cap: int
    #: Jobs admitted and not yet released (each at most one QEMU).
    active: int = 0
    #: A description's warm key, learnt from its last restored VM.
    keys: dict[str, str] = field(default_factory=dict)
    #: Warm keys whose ready standby an admitted job will take.
    relied: dict[str, int] = field(default_factory=dict)
    _lock: asyncio.Lock | None = None

    def _counted(self) -> int:
        """QEMUs at most, now: admitted jobs, standbys kept, less the ones being taken."""
        ready = _standby.ready_keys()
        taking = sum(min(n, ready.count(key)) for key, n in self.relied.items())
        return self.active + len(_standby.kept_keys()) - taking

    def _lock_here(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    async def admit(self, desc: str) -> str | None:
        """Count a job of description ``desc`` about to start; make room for its QEMU.

        Returns the warm key whose ready standby it will take, or None.
        """
        async with self._lock_here():
            key = self.keys.get(desc)
            if key is not None and key in _standby.kept_keys() and (
                    key not in _standby.ready_keys()):
                await _standby.settle(SAVE_TIMEOUT)  # one being made: taken, not raced
            ready = _standby.ready_keys()
            if key is not None and ready.count(key) > self.relied.get(key, 0):
                self.relied[key] = self.relied.get(key, 0) + 1
                self.active += 1
                return key
            full = self._counted() + 1 > self.cap
            self.active += 1
            if full:
                # The slot is a standby's (another description's, or one nobody can take):
                # end the standbys no admitted job will take.
                for other in set(_standby.kept_keys()) - set(self.relied):
                    log.debug("matrix: a job needs the slot of the standby of %s: ended", other)
                    try:
                        await _standby.end_kept(other)
                    except Exception as exc:  # noqa: BLE001 - the job's own start goes on
                        log.warning("matrix: ending the standby of %s failed: %r", other, exc)
            return None

    async def release(self, desc: str, relied: str | None, vm: VM | None,
                      leave_standby: bool) -> bool:
        """A job admitted as ``desc`` ended (its ``vm``, if any, stopped); with
        ``leave_standby``, leave a standby in its place if one fits. True if one was asked."""
        async with self._lock_here():
            self.active -= 1
            if relied is not None:
                self.relied[relied] -= 1
                if not self.relied[relied]:
                    del self.relied[relied]
            started = vm.warm_start if vm is not None else None
            if started is not None and started.warm and started.key is not None:
                self.keys[desc] = started.key
            if vm is None or not leave_standby:
                return False
            if _standby.kept_keys() or self._counted() + 1 > self.cap:
                return False  # one is kept already (one a matrix), or no room
            return _standby.refill(vm.aio)

    def admit_here(self, desc: str) -> str | None:
        """:meth:`admit` from a job's thread."""
        return run_sync(self.admit(desc))

    def release_here(self, desc: str, relied: str | None, vm: VM | None,
                     leave_standby: bool) -> bool:
        """:meth:`release` from a job's thread."""
        return run_sync(self.release(desc, relied, vm, leave_standby))


def register(matrix: str, slots: Slots) -> None:
    """Count the jobs of ``matrix`` run in this process in ``slots``."""
    with _registry_lock:
        _by_matrix[matrix] = slots


def forget(matrix: str) -> None:
    """``matrix`` is over here: its jobs are counted no more."""
    with _registry_lock:
        _by_matrix.pop(matrix, None)


def for_matrix(matrix: str) -> Slots | None:
    """The slots ``matrix``'s jobs count in here (None: not counted, no standby)."""
    with _registry_lock:
        return _by_matrix.get(matrix)


def worker_slots(cap: int) -> Slots:
    """This Dask worker's slots (``cap``: its ``vm`` resource), made at its first job."""
    global _worker
    with _registry_lock:
        if _worker is None:
            _worker = Slots(cap)
        _worker.cap = cap
        return _worker
