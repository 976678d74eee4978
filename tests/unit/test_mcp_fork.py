"""qemukit mcp's checkpoint_vm, rollback_vm and fork_vm against a hostile client, without QEMU.

Every argument comes from the client: names, checkpoint ids and counts are checked
before anything is asked of a VM, and forks count against the operator's limits.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qemukit import images
from qemukit import mcp as qmcp
from qemukit.errors import SpecError
from qemukit.spec import VMSpec
from tests.unit.test_mcp_limits import FakeVM


class FakeSnapshots:
    def __init__(self, vm: ForkableVM) -> None:
        self.vm = vm

    async def checkpoint(self, tag: str) -> None:
        self.vm.calls.append(("checkpoint", tag))

    async def rollback(self, tag: str) -> None:
        self.vm.calls.append(("rollback", tag))

    async def drop_checkpoint(self, tag: str) -> None:
        self.vm.calls.append(("drop", tag))


class ForkableVM(FakeVM):
    def __init__(self, spec: VMSpec, **kwargs: Any) -> None:
        super().__init__(spec, **kwargs)
        self.calls: list[tuple[str, Any]] = []

    @property
    def snapshots(self) -> FakeSnapshots:
        return FakeSnapshots(self)

    async def fork(self, n: int) -> list[ForkableVM]:
        self.calls.append(("fork", n))
        clones = [ForkableVM(self.spec.replace(name=f"{self.name}-{i}")) for i in range(1, n + 1)]
        for clone in clones:
            clone.state.value = "running"
        return clones


@pytest.fixture
def vms(monkeypatch: pytest.MonkeyPatch) -> list[FakeVM]:
    FakeVM.made = []
    monkeypatch.setattr(qmcp, "AsyncVM", ForkableVM)
    monkeypatch.setattr(images, "spec", lambda name: VMSpec(kernel="/k", initrd="/i"))
    return FakeVM.made


async def _refused(call: Any) -> SpecError:
    with pytest.raises(SpecError) as err:
        await call
    return err.value


@pytest.mark.parametrize("n", [0, -3, 17, True, "2", 2.5, None, [1], 10**12])
def test_fork_refuses_a_bad_count_before_asking_the_vm(vms: list[FakeVM], n: Any) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_vms=20, max_total_memory_mib=1 << 20))

    async def go() -> None:
        started = await box.start(name="p")
        err = await _refused(box.fork(started["name"], n))
        assert err.field == "n"
        await box.stop_all()

    asyncio.run(go())
    assert [c for vm in vms for c in vm.calls] == []  # type: ignore[attr-defined]


def test_forks_count_against_the_vm_limit(vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_vms=3, max_total_memory_mib=1 << 20))

    async def go() -> None:
        await box.start(name="p")
        err = await _refused(box.fork("p", 3))
        assert err.field == "n" and "at most 3" in err.reason and "--max-vms" in err.reason
        out = await box.fork("p", 2)
        assert out["forks"] == ["p-1", "p-2"]
        err = await _refused(box.start(name="q"))
        assert err.field == "vms"
        await box.stop_all()

    asyncio.run(go())


def test_fork_registers_each_clone_with_the_parents_lifetime(vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_vms=4, max_total_memory_mib=1 << 20))

    async def go() -> None:
        await box.start(name="p")
        await box.fork("p", 2)
        listed = {v["name"]: v for v in box.list()}
        assert set(listed) == {"p", "p-1", "p-2"}
        assert abs(box._running["p-1"].deadline - box._running["p"].deadline) < 1e-9
        err = await _refused(box.fork("p-1", 2))  # 3 run, at most 4
        assert err.field == "n" and "3 VMs run" in err.reason
        await box.stop("p-1")
        assert {v["name"] for v in box.list()} == {"p", "p-2"}
        await box.stop_all()

    asyncio.run(go())
    assert all(vm.killed for vm in vms)


def test_fork_memory_cap(vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_vms=10, max_memory_mib=1024, max_total_memory_mib=1536))

    async def go() -> None:
        await box.start(name="p", memory="512M")
        err = await _refused(box.fork("p", 3))
        assert err.field == "n" and "1536 MiB" in err.reason and "--max-total-memory" in err.reason
        out = await box.fork("p", 2)
        assert len(out["forks"]) == 2
        await box.stop_all()

    asyncio.run(go())


@pytest.mark.parametrize("name", ["nope", "", "../p", "p; rm -rf /", "p\x00"])
def test_unknown_names_are_refused(vms: list[FakeVM], name: str) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_vms=4))

    async def go() -> None:
        await box.start(name="p")
        for call in (box.checkpoint(name), box.rollback(name, "cp1"), box.fork(name, 1)):
            err = await _refused(call)
            assert err.field == "name"
        await box.stop_all()

    asyncio.run(go())


@pytest.mark.parametrize("cid", ["cp2", "cp-1", "mcp-cp1", "../cp1", "", None, 1, ["cp1"],
                                 {"id": "cp1"}, "CP1", "cp1 ", "q1"])
def test_rollback_takes_only_ids_this_server_gave_for_this_vm(vms: list[FakeVM], cid: Any) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_vms=4))

    async def go() -> None:
        await box.start(name="p")
        await box.start(name="q")
        assert (await box.checkpoint("p"))["id"] == "cp1"
        if cid != "cp1":
            assert (await box.checkpoint("q"))["id"] == "cp1"  # q's own cp1
        err = await _refused(box.rollback("p", cid))
        assert err.field == "id" and "cp1" in err.reason
        await box.stop_all()

    asyncio.run(go())
    p = next(vm for vm in vms if vm.name == "p")
    assert ("rollback", "mcp-cp1") not in p.calls  # type: ignore[attr-defined]


def test_checkpoints_are_tagged_by_the_server_and_the_oldest_is_dropped(vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_vms=4))

    async def go() -> list[dict[str, Any]]:
        await box.start(name="p")
        outs = [await box.checkpoint("p") for _ in range(qmcp.MAX_CHECKPOINTS + 1)]
        await box.rollback("p", "cp9")
        err = await _refused(box.rollback("p", "cp1"))
        assert err.field == "id"
        await box.stop_all()
        return outs

    outs = asyncio.run(go())
    assert [o["id"] for o in outs] == [f"cp{i}" for i in range(1, 10)]
    assert outs[-1]["dropped"] == "cp1" and "dropped" not in outs[0]
    calls = vms[0].calls  # type: ignore[attr-defined]
    assert calls[:2] == [("checkpoint", "mcp-cp1"), ("checkpoint", "mcp-cp2")]
    assert ("drop", "mcp-cp1") in calls and calls[-1] == ("rollback", "mcp-cp9")


def test_the_new_tools_refuse_unknown_arguments() -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    server = qmcp.build_server(qmcp.Sandbox())
    for tool, args in (("fork_vm", {"name": "x", "n": 1, "names": ["a"]}),
                       ("rollback_vm", {"name": "x", "id": "cp1", "tag": "t"}),
                       ("checkpoint_vm", {"name": "x", "tag": "../t"})):
        with pytest.raises(ToolError) as err:
            asyncio.run(server.call_tool(tool, args))
        assert "takes only" in str(err.value)
