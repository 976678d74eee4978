"""Forking a VM without QEMU: the checks before anything starts, names, the clone's spec, and
the clean-up after a clone that fails half-way (the parent and clones are faked)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from qemukit import Drive, VMSpec
from qemukit.errors import SnapshotError, SpecError, StateError
from qemukit.snapshot import Bundle
from qemukit.snapshot._bundle import private_ram_args
from qemukit.spec import NAME_RE, Nic, PortForward
from qemukit.vm import _fork
from qemukit.vm._warm import WarmPlan
from qemukit.warm import WarmCache


@pytest.mark.parametrize("n", [0, -1, 17, 10**9, True, False, "2", 2.0, None, [2], {"n": 2}])
def test_a_bad_count_is_refused_naming_n(n: object) -> None:
    with pytest.raises(SpecError) as err:
        _fork.check_count(n)
    assert err.value.field == "n"
    assert "1 to 16" in err.value.reason


@pytest.mark.parametrize("n", [1, 4, 16])
def test_a_count_within_the_limit(n: int) -> None:
    assert _fork.check_count(n) == n


def test_clone_names_derive_from_the_parent_and_skip_taken_ones() -> None:
    taken = {"web-2"}
    assert _fork.clone_names("web", 3, taken.__contains__) == ("web-1", "web-3", "web-4")


def test_clone_names_of_a_long_parent_stay_valid() -> None:
    parent = "a" * 39 + "b"
    names = _fork.clone_names(parent, 12, lambda _: False)
    assert len(set(names)) == 12
    assert all(NAME_RE.fullmatch(n) for n in names), names
    assert names[0] == "a" * 38 + "-1" and names[11] == "a" * 37 + "-12"


def test_hostname_of_a_clone() -> None:
    assert _fork.hostname_of("My_VM.2-1") == "my-vm-2-1"
    assert _fork.hostname_of("__") == "clone"


class FakeState:
    def __init__(self, value: str) -> None:
        self.value = value


class FakeQemu:
    version = (7, 2, 0)


class FakeClone:
    def __init__(self, name: str) -> None:
        self.name = name
        self.killed = False

    async def kill(self) -> None:
        self.killed = True


class FakeParent:
    """What fork_vm uses of an AsyncVM; save_state writes a real (tiny) bundle."""

    def __init__(self, spec: VMSpec, state: str = "running") -> None:
        self.spec = spec
        self.name = spec.name or "parent"
        self.state = FakeState(state)
        self.networks: dict[str, Any] = {}
        self.qemu = FakeQemu()
        self.saves = 0

    async def qmp(self, command: str, **arguments: Any) -> Any:
        assert command == "query-migrate-capabilities"
        return [{"capability": "x-ignore-shared", "state": False}]

    async def save_state(self, path: Path, *, timeout: float) -> Bundle:
        self.saves += 1
        write_bundle(path, self.spec)
        return Bundle.open(path)


def write_bundle(path: Path, spec: VMSpec) -> None:
    path.mkdir(parents=True)
    spec.dump(path / "spec.toml")
    (path / "state.bin").write_bytes(b"state")
    (path / "manifest.json").write_text(json.dumps(
        {"format": 1, "qemu": "7.2.0", "guest": "running", "disks": [], "state_size": 5}))


def tiny(**changes: Any) -> VMSpec:
    return VMSpec(name="par", kernel="/k", initrd="/i").replace(**changes)


@pytest.mark.parametrize(("changes", "state", "field"), [
    ({"agent": "none"}, "running", "agent"),
    ({"networks": ("lan",)}, "running", "networks"),
    ({"gdb_port": 1234}, "running", "gdb"),
    ({"qmp_tcp_port": 4444}, "running", "qmp_tcp_port"),
    ({}, "stopped", None),
])
def test_a_parent_that_cannot_fork_is_refused_before_anything(
        tmp_path: Path, changes: dict[str, Any], state: str, field: str | None) -> None:
    parent = FakeParent(tiny(**changes), state)
    started: list[WarmPlan] = []

    async def start(plan: WarmPlan) -> Any:
        started.append(plan)
        return FakeClone(plan.spec.name or "")

    with pytest.raises((SpecError, StateError)) as err:
        asyncio.run(_fork.fork_vm(parent, 2, start, taken=lambda _: False,  # type: ignore[arg-type]
                                  cache=WarmCache(tmp_path / "forks")))
    if field is None:
        assert isinstance(err.value, StateError) and "only a running VM forks" in str(err.value)
    else:
        assert isinstance(err.value, SpecError) and err.value.field == field
    assert parent.saves == 0 and started == []


def test_a_clone_failing_half_way_stops_the_others_and_removes_the_state(tmp_path: Path) -> None:
    parent = FakeParent(tiny())
    cache = WarmCache(tmp_path / "forks")
    clones: list[FakeClone] = []

    async def start(plan: WarmPlan) -> Any:
        assert plan.hold is not None and plan.hold.fd >= 0  # held while it starts
        if plan.spec.name == "par-2":
            raise SnapshotError("QEMU could not load the state")
        clone = FakeClone(plan.spec.name or "")
        clones.append(clone)
        return clone

    with pytest.raises(SnapshotError, match="could not load"):
        asyncio.run(_fork.fork_vm(parent, 3, start, taken=lambda _: False,  # type: ignore[arg-type]
                                  cache=cache))
    assert [c.name for c in clones] == ["par-1", "par-3"] and all(c.killed for c in clones)
    assert cache.entries() == []
    assert not any(p.name.startswith(".tmp") for p in cache.root.iterdir())


def test_a_fork_holds_its_state_while_clones_run_and_the_next_fork_prunes_it(
        tmp_path: Path) -> None:
    parent = FakeParent(tiny())
    cache = WarmCache(tmp_path / "forks")
    plans: list[WarmPlan] = []

    async def start(plan: WarmPlan) -> Any:
        plans.append(plan)
        return FakeClone(plan.spec.name or "")

    clones = asyncio.run(_fork.fork_vm(parent, 2, start, taken=lambda _: False,  # type: ignore[arg-type]
                                       cache=cache))
    assert [c.name for c in clones] == ["par-1", "par-2"]
    [entry] = cache.entries()
    assert not (entry.bundle_path / "state.bin").exists(), "the loaded state is dropped"
    # The clones' QEMUs would hold the entry (inherited lock); here nobody does any more.
    assert all(p.hold is not None and p.hold.fd == -1 for p in plans)
    asyncio.run(_fork.fork_vm(parent, 1, start, taken=lambda _: False,  # type: ignore[arg-type]
                              cache=cache))
    [newer] = cache.entries()
    assert newer.key != entry.key
    # The ended fork's lock files go with it; the running one's stay.
    left = sorted(p.name for p in cache.root.iterdir() if not p.is_dir())
    assert left == [f"{newer.key}.lock", f"{newer.key}.use"]


def test_the_clone_spec_gets_free_ports_and_ram_of_its_own(tmp_path: Path) -> None:
    mapped = private_ram_args(512, tmp_path / "ram", (7, 2, 0))
    spec = tiny(nics=(Nic(forwards=(PortForward(2222, 22),)),),
                extra_args=("-device", "vmgenid", *mapped))
    write_bundle(tmp_path / "b", spec)
    clone = _fork.clone_spec(Bundle.open(tmp_path / "b"), "par-1", (7, 2, 0))
    assert clone.name == "par-1"
    assert [fw.host_port for fw in clone.nics[0].forwards] == [0]
    assert clone.nics[0].forwards[0].guest_port == 22
    assert "memory-backend-ram,id=qemukit-ram,size=512M" in clone.extra_args
    assert "memory-backend=qemukit-ram" in clone.extra_args
    assert not any("mem-path" in a for a in clone.extra_args)
    assert clone.extra_args[:2] == ("-device", "vmgenid")


def test_the_clone_spec_of_a_parent_with_its_own_ram_is_unchanged(tmp_path: Path) -> None:
    spec = tiny(drives=(Drive(str(tmp_path / "d.qcow2"), format="qcow2", overlay=True),))
    write_bundle(tmp_path / "b", spec)
    clone = _fork.clone_spec(Bundle.open(tmp_path / "b"), "par-1", (7, 2, 0))
    assert clone.extra_args == ()


def test_a_cloud_init_clone_is_named_after_itself(tmp_path: Path) -> None:
    from qemukit.spec import CloudInit

    spec = tiny(agent="qga", cloud_init=CloudInit(hostname="web", ssh_user="debian"))
    write_bundle(tmp_path / "b", spec)
    clone = _fork.clone_spec(Bundle.open(tmp_path / "b"), "par-1", (7, 2, 0))
    assert clone.cloud_init is not None
    assert clone.cloud_init.hostname is None and clone.cloud_init.ssh_user == "debian"
