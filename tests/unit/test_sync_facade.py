"""The sync classes are derived from the async ones: nothing missing, nothing drifted."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest

from qemukit import VM, AsyncVM, AsyncVMPool, VMPool
from qemukit.hotplug import AsyncHotplug, Hotplug
from qemukit.qga import AsyncGuest, SyncGuest
from qemukit.snapshot import Snapshots, SyncSnapshots

#: Coroutines with no sync twin, and why.
ASYNC_ONLY = {
    "guarded": "an awaitable in, an awaitable's result out: for async code and operations",
    "reset_agent": "used by operations inside the loop (a reverted guest reboots)",
    "frozen": "an async context manager; the sync class has its own context manager",
}
#: Methods that return VMs: the sync twin gives sync VMs (same parameters, its own return type).
FACTORY_METHODS = ("start", "fork")
PAIRS = [(VM, AsyncVM), (Hotplug, AsyncHotplug), (SyncSnapshots, Snapshots), (SyncGuest, AsyncGuest),
         (VMPool, AsyncVMPool)]


def _public_coroutines(cls: type) -> dict[str, Callable[..., Any]]:
    return {name: fn for name, fn in inspect.getmembers(cls, inspect.iscoroutinefunction)
            if not name.startswith("_")}


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS, ids=lambda c: c.__name__)
def test_every_coroutine_has_a_sync_twin_with_the_same_signature(sync_cls: type,
                                                                 async_cls: type) -> None:
    for name, coroutine in _public_coroutines(async_cls).items():
        if name in ASYNC_ONLY:
            continue
        twin = getattr(sync_cls, name, None)
        assert twin is not None, f"{sync_cls.__name__}.{name} is missing"
        expected = inspect.signature(coroutine)
        actual = inspect.signature(twin)
        if (isinstance(inspect.getattr_static(async_cls, name), classmethod)
                or name in FACTORY_METHODS):
            # A factory (or start, fork, which return VMs) gives the sync class: same parameters.
            assert list(actual.parameters.values()) == list(expected.parameters.values()), name
        else:
            assert actual == expected, f"{sync_cls.__name__}.{name}: {actual} != {expected}"


def test_sync_methods_are_not_written_by_hand() -> None:
    """Each non-factory twin is the ``blocking`` wrapper of the coroutine itself."""
    for sync_cls, async_cls in PAIRS:
        for name, coroutine in _public_coroutines(async_cls).items():
            raw = inspect.getattr_static(sync_cls, name, None)
            if name in ASYNC_ONLY or isinstance(inspect.getattr_static(async_cls, name),
                                                classmethod) or name in FACTORY_METHODS:
                continue
            assert getattr(raw, "__wrapped__", None) is coroutine, f"{sync_cls.__name__}.{name}"


def test_vm_takes_the_same_options_as_asyncvm() -> None:
    assert inspect.signature(VM.__init__) == inspect.signature(AsyncVM.__init__)
    assert inspect.signature(VMPool.__init__) == inspect.signature(AsyncVMPool.__init__)
