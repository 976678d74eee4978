"""Forking a running tiny guest in real QEMU (TCG): what each clone has, checked inside it.

The module runs with its own ``QEMUKIT_CACHE`` (the tiny image linked in), so the
fork states it makes are its own to count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemukit import VM, Drive, Nic, PortForward, images
from qemukit._launch.registry import list_vms
from qemukit.errors import SpecError, StateError
from qemukit.vm import _fork
from qemukit.warm import WarmCache
from tests.helpers import private_warm_cache, qemu_gone, qemu_processes_under

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("fork")]

READ_DISK = (
    "sync; blockdev --flushbufs /dev/vda; echo 3 > /proc/sys/vm/drop_caches; head -c 8 /dev/vda"
)
WAIT_TWO_CPUS = ("for i in $(seq 500); do [ \"$(cat /sys/devices/system/cpu/online)\" = 0-1 ] "
                 "&& break; sleep 0.02; done; cat /sys/devices/system/cpu/online")


@pytest.fixture(scope="module")
def private_cache(tiny_image: images.TinyImage, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Path]:
    with private_warm_cache(tmp_path_factory.mktemp("fork-cache")) as root:
        yield root


@pytest.fixture
def base_disk(tmp_path: Path) -> Path:
    """A raw disk whose first 8 bytes are a marker; the parent boots it under an overlay."""
    path = tmp_path / "base.raw"
    with open(path, "wb") as fh:
        fh.write(b"BASE-001")
        fh.truncate(8 << 20)
    return path


@pytest.fixture
def parent(base_disk: Path, private_cache: Path) -> Iterator[VM]:
    """A running tiny guest with a hot-added CPU, a disk written after boot and a RAM marker."""
    spec = images.spec("tiny", accel="tcg", max_cpus=4,
                       drives=(Drive(base_disk, format="raw", overlay=True),),
                       nics=(Nic(forwards=(PortForward(0, 22),)),)).replace(name="forkme")
    vm = VM(spec)
    vm.start()
    try:
        vm.wait_ready(180)
        (cpu,) = vm.hotplug.cpu()
        assert vm.exec(WAIT_TWO_CPUS, check=True).stdout_text.strip() == "0-1"
        vm.exec("printf %s PARENT-1 > /dev/vda && sync && echo from-parent > /tmp/marker",
                check=True)
        yield vm
    finally:
        if vm.state.value == "running":
            vm.shutdown(timeout=10)


def _stop(vms: list[VM]) -> None:
    for vm in vms:
        if vm.state.value == "running":
            vm.shutdown(timeout=10)


def test_clones_have_the_cpu_disk_and_memory_of_the_fork_point(parent: VM, base_disk: Path,
                                                               private_cache: Path) -> None:
    before = parent.exec("cat /proc/sys/kernel/random/boot_id", check=True).stdout_text
    clones = parent.fork(2)
    try:
        assert [c.name for c in clones] == ["forkme-1", "forkme-2"]
        # The parent runs on, and what it writes from now on is its own.
        assert parent.status() == "running"
        parent.exec("printf %s PARENT-2 > /dev/vda && sync && echo later > /tmp/marker",
                    check=True)
        assert parent.exec(READ_DISK, check=True).stdout_text == "PARENT-2"
        seen: dict[str, tuple[str, ...]] = {}
        for clone in clones:
            # Inside each clone: the hot-added CPU online, the disk as written, the RAM marker.
            assert clone.exec("cat /sys/devices/system/cpu/online",
                              check=True).stdout_text.strip() == "0-1"
            assert clone.exec("nproc", check=True).stdout_text.strip() == "2"
            assert clone.exec(READ_DISK, check=True).stdout_text == "PARENT-1"
            assert clone.exec("cat /tmp/marker", check=True).stdout_text.strip() == "from-parent"
            # The same booted kernel (a fork, not a boot), the hot-plug ledger carried over.
            assert clone.exec("cat /proc/sys/kernel/random/boot_id",
                              check=True).stdout_text == before
            assert [d.id for d in clone.devices()] == ["cpu1"]
            ident = clone.exec("hostname; cat /etc/machine-id; head -c 16 /dev/urandom | "
                               "od -An -tx1 | tr -d ' \\n'", check=True).stdout_text.split()
            assert ident[0] == clone.name
            seen[clone.name] = tuple(ident)
        a, b = clones
        assert seen[a.name][1] != seen[b.name][1], "same machine id"
        assert seen[a.name][2] != seen[b.name][2], "same random bytes"
        ports = {vm.ssh_address() for vm in (parent, a, b)}
        assert len(ports) == 3, ports
        # Each clone's disk is its own: a marker written in one is not in the other.
        a.exec("printf %s CLONE-AA > /dev/vda && sync", check=True)
        assert a.exec(READ_DISK, check=True).stdout_text == "CLONE-AA"
        assert b.exec(READ_DISK, check=True).stdout_text == "PARENT-1"
        assert parent.exec(READ_DISK, check=True).stdout_text == "PARENT-2"
        # Normal VMs: listed in the registry, by pid.
        listed = {e.name: e for e in list_vms() if e.alive}
        assert {"forkme", "forkme-1", "forkme-2"} <= set(listed)
        # The fork's state is held while its clones run.
        entries = WarmCache(private_cache / _fork.FORKS_DIR).entries()
        assert len(entries) == 1
        assert WarmCache(private_cache / _fork.FORKS_DIR).in_use(entries[0])
    finally:
        _stop(clones)
    assert parent.exec("cat /tmp/marker", check=True).stdout_text.strip() == "later"
    assert base_disk.read_bytes()[:8] == b"BASE-001"


def test_a_fork_failing_half_way_leaves_the_parent_running_and_no_clone(
        parent: VM, private_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _fork.give_identity
    started: list[int] = []

    async def fails_for_the_second(clone: Any) -> None:
        started.append(clone.pid)
        if clone.name.endswith("-2"):
            raise StateError("giving the clone its identity failed (injected)")
        await real(clone)

    monkeypatch.setattr(_fork, "give_identity", fails_for_the_second)
    with pytest.raises(StateError, match="injected"):
        parent.fork(3)
    assert len(started) == 3, "every clone got as far as its identity"
    for pid in started:  # every clone's QEMU is gone, the one that failed and the others
        try:
            psutil.Process(pid).wait(timeout=30)
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            assert qemu_gone(pid), f"clone QEMU {pid} still runs"
    names = {e.name for e in list_vms() if e.alive}
    assert not {n for n in names if n.startswith("forkme-")}, names
    assert WarmCache(private_cache / _fork.FORKS_DIR).entries() == []
    assert parent.status() == "running"
    assert parent.exec("cat /tmp/marker", check=True).stdout_text.strip() == "from-parent"


def test_a_fork_beyond_the_limit_starts_nothing(parent: VM, state_root: Path) -> None:
    before = {p.pid for p in qemu_processes_under(state_root)}
    with pytest.raises(SpecError, match="1 to 16") as err:
        parent.fork(17)
    assert err.value.field == "n"
    assert parent.status() == "running"
    assert {p.pid for p in qemu_processes_under(state_root)} == before
    assert not [e.name for e in list_vms() if e.name.startswith("forkme-")]


def test_the_cli_forks_a_detached_vm(qk: Any, private_cache: Path) -> None:
    name = "clifork"
    assert qk("run", "--detach", "--name", name, "--image", "tiny", "--accel", "tcg",
              "--wait", "agent", "--timeout", "240").returncode == 0
    try:
        assert qk("exec", name, "--", "sh", "-c", "echo cli-parent > /tmp/marker").returncode == 0
        out = qk("fork", name, "2", "--json")
        assert out.returncode == 0, out.stderr
        forks = [f["name"] for f in json.loads(out.stdout)["forks"]]
        assert forks == [f"{name}-1", f"{name}-2"]
        listed = json.loads(qk("ls", "--json").stdout)
        assert {name, *forks} <= {v["name"] for v in listed}
        for clone in forks:  # detached clones outlive the command, each its own machine
            got = qk("exec", clone, "--", "sh", "-c", "hostname; cat /tmp/marker")
            assert got.stdout.split() == [clone, "cli-parent"], got
        bad = qk("fork", name, "0")
        assert bad.returncode != 0 and "1 to 16" in bad.stderr
        for clone in forks:
            assert qk("stop", clone).returncode == 0
        # Its clones ended: cache clear removes the fork's saved state.
        cleared = qk("cache", "clear")
        assert cleared.returncode == 0 and "fork states removed" in cleared.stdout, cleared
        assert WarmCache(private_cache / _fork.FORKS_DIR).entries() == []
    finally:
        for vm in (name, f"{name}-1", f"{name}-2"):
            qk("kill", vm)
