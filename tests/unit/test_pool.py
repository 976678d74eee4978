"""AsyncVMPool's limits, waits and errors, with fake VMs (no QEMU): tests/integration/test_pool.py
runs the real thing."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qemukit import AsyncVMPool, SpecError, StateError, VMPool, VMSpec, WaitTimeout
from qemukit.vm import AsyncVM, VMState
from qemukit.warm import WarmStart

T = TypeVar("T")
SPEC = VMSpec(kernel="/boot/vmlinuz", warm=True)


class FakeVM:
    """The least of an AsyncVM a pool uses: a lifecycle, counted by its pool."""

    _standby_source = None  # never restored from a warm state: nothing to refill from

    def __init__(self, pool: FakePool, spec: VMSpec) -> None:
        self.pool = pool
        self.spec = spec
        self.state = VMState.NEW
        self.warm_start: WarmStart | None = None

    async def start(self) -> FakeVM:
        if self.pool.fail_starts:
            self.pool.fail_starts -= 1
            raise OSError("no QEMU today")
        await asyncio.sleep(0.01)
        self.state = VMState.RUNNING
        self.pool.alive += 1
        self.pool.most = max(self.pool.most, self.pool.alive)
        self.warm_start = WarmStart(True, "", "key1")
        return self

    async def wait_ready(self, timeout: float | None = None) -> float:
        return 0.0

    async def shutdown(self) -> None:
        await asyncio.sleep(0.01)
        self.state = VMState.STOPPED
        self.pool.alive -= 1


class FakePool(AsyncVMPool):
    """A pool whose VMs are fakes (through the pool's ``_new_vm`` seam)."""

    def __init__(self, spec: VMSpec = SPEC, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.alive = 0
        self.most = 0
        self.fail_starts = 0
        self.specs: list[VMSpec] = []

    def _new_vm(self, spec: VMSpec) -> AsyncVM:
        self.specs.append(spec)
        return FakeVM(self, spec)  # type: ignore[return-value]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"max_vms": 0}, "max_vms"),
    ({"max_vms": -2}, "max_vms"),
    ({"max_vms": True}, "max_vms"),
    ({"max_vms": "2"}, "max_vms"),
    ({"wait_timeout": 0}, "wait_timeout"),
    ({"boot_timeout": -1.0}, "boot_timeout"),
])
def test_bad_limits_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as info:
        AsyncVMPool(SPEC, **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize(("spec", "field"), [
    (SPEC.replace(warm=False), "warm"),
    (SPEC.replace(name="web"), "name"),
])
def test_a_spec_a_pool_cannot_clone_is_refused(spec: VMSpec, field: str) -> None:
    for cls in (AsyncVMPool, VMPool):
        with pytest.raises(SpecError) as info:
            cls(spec)
        assert info.value.field == field


def test_not_a_spec_is_refused() -> None:
    with pytest.raises(SpecError) as info:
        AsyncVMPool("tiny")  # type: ignore[arg-type]
    assert info.value.field == "spec"


def test_standby_is_on_unless_the_spec_says_false() -> None:
    assert AsyncVMPool(SPEC).standby and AsyncVMPool(SPEC.replace(standby=True)).standby
    assert not AsyncVMPool(SPEC.replace(standby=False)).standby
    assert VMPool(SPEC, max_vms=3).max_vms == 3


def test_several_vms_at_once_get_a_bounded_tcg_code_buffer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As the matrix pool: QEMU's default 1 GiB code buffer per VM only for a pool of one;
    a spec's own tb_size is kept."""
    monkeypatch.setattr("qemukit.host._tcg._host_memory_mib", lambda: 2048)
    assert AsyncVMPool(SPEC, max_vms=1).spec.tb_size is None
    sizes = [AsyncVMPool(SPEC, max_vms=n).spec.tb_size for n in (2, 4, 8)]
    assert sizes == [256, 128, 64]  # a quarter of the host's memory, shared
    assert AsyncVMPool(SPEC.replace(tb_size=32), max_vms=8).spec.tb_size == 32


def test_at_most_max_vms_run_at_once_and_each_is_stopped() -> None:
    async def main() -> FakePool:
        async with FakePool(max_vms=2) as pool:
            async def use() -> None:
                async with pool.vm() as vm:
                    assert vm.state is VMState.RUNNING and pool.running <= 2
                    await asyncio.sleep(0.05)
            await asyncio.gather(*(use() for _ in range(6)))
        return pool

    pool = run(main())
    assert len(pool.specs) == 6 and pool.most == 2 and pool.alive == 0 and pool.running == 0


def test_the_standby_counts_as_one_of_max_vms() -> None:
    async def main(max_vms: int) -> list[bool | None]:
        async with FakePool(max_vms=max_vms) as pool:
            if max_vms == 1:
                async with pool.vm():
                    pass
            else:
                async with pool.vm(), pool.vm():
                    pass
        return [spec.standby for spec in pool.specs]

    # The first VM leaves one only if a second QEMU fits; the second (two running) only if
    # a third does.
    assert run(main(1)) == [False]
    assert run(main(2)) == [True, False]
    assert run(main(3)) == [True, True]


def test_standby_off_in_the_spec_stays_off() -> None:
    async def main() -> list[bool | None]:
        async with FakePool(SPEC.replace(standby=False), max_vms=4) as pool, pool.vm():
            pass
        return [spec.standby for spec in pool.specs]

    assert run(main()) == [False]


def test_a_waiter_times_out_with_a_clear_error() -> None:
    async def main() -> None:
        async with FakePool(max_vms=1) as pool, pool.vm():
            with pytest.raises(WaitTimeout, match="free place in the VM pool"):
                async with pool.vm(timeout=0.2):
                    pass

    run(main())


def test_a_waiter_gets_the_place_a_vm_gives_back() -> None:
    async def main() -> list[str]:
        order: list[str] = []
        async with FakePool(max_vms=1) as pool:
            async def first() -> None:
                async with pool.vm():
                    order.append("first in")
                    await asyncio.sleep(0.1)
                order.append("first out")

            async def second() -> None:
                await asyncio.sleep(0.02)
                async with pool.vm(timeout=10):
                    order.append("second in")
            await asyncio.gather(first(), second())
        return order

    assert run(main()) == ["first in", "first out", "second in"]


def test_a_failed_start_gives_its_place_back() -> None:
    async def main() -> FakePool:
        async with FakePool(max_vms=1) as pool:
            pool.fail_starts = 1
            with pytest.raises(OSError, match="no QEMU today"):
                async with pool.vm():
                    pass
            async with pool.vm(timeout=1) as vm:
                assert vm.state is VMState.RUNNING
        return pool

    pool = run(main())
    assert pool.running == 0 and pool.alive == 0


def test_close_stops_the_vms_and_refuses_waiters_and_new_vms() -> None:
    async def main() -> FakePool:
        pool = FakePool(max_vms=1)
        entered = asyncio.Event()

        async def holder() -> None:
            async with pool.vm():
                entered.set()
                await asyncio.sleep(5)

        async def waiter() -> None:
            await entered.wait()
            async with pool.vm(timeout=10):
                pass

        held = asyncio.create_task(holder())
        waiting = asyncio.create_task(waiter())
        await entered.wait()
        await asyncio.sleep(0.05)
        await pool.close()
        assert pool.alive == 0 and pool.closed
        with pytest.raises(StateError, match="closed"):
            await waiting
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        with pytest.raises(StateError, match="closed"):
            async with pool.vm():
                pass
        await pool.close()  # idempotent
        return pool

    pool = run(main())
    assert pool.running == 0 and "closed" in repr(pool)


def test_a_bad_wait_timeout_is_refused_before_waiting() -> None:
    async def main() -> None:
        async with FakePool() as pool:
            with pytest.raises(SpecError) as info:
                async with pool.vm(timeout=-1):
                    pass
            assert info.value.field == "timeout" and pool.specs == []

    run(main())


def test_the_sync_pool_is_a_view_of_the_async_one(tmp_path: Path) -> None:
    pool = VMPool(SPEC, max_vms=2, state_root=tmp_path)
    assert pool.aio.state_root == tmp_path and pool.spec.replace(tb_size=None) == SPEC and pool.standby
    assert pool.running == 0 and not pool.closed
    with pool:
        pass
    assert pool.closed and repr(pool).startswith("<VMPool closed")
    with pytest.raises(StateError):
        pool.__enter__()


def test_refill_needs_a_vm_restored_from_a_warm_state() -> None:
    from qemukit.vm import _standby

    async def main() -> tuple[bool, list[str]]:
        refilled = _standby.refill(AsyncVM(SPEC))  # never started: nothing to clone
        await _standby.end_kept("no-such-key")  # nothing kept: nothing ended, no error
        return refilled, _standby.kept_keys()

    assert run(main()) == (False, [])
