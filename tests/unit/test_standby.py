"""Standby clones without QEMU: the claim, the rename, what ends a standby, the settings.

A standby's "QEMU" here is a ``sleep`` process recorded in a fake ``vm.json``, so
ending one (gc, cache clear) can be checked by whether that process is gone.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from qemukit import VMSpec
from qemukit._launch import registry
from qemukit._launch.runtime import DATA_LINK, RuntimeDir
from qemukit._launch.standby import (
    MARKER,
    claim,
    end_standbys,
    list_standbys,
    make_info,
    move_runtime,
    read_marker,
    write_marker,
)
from qemukit.errors import SpecError
from qemukit.vm import _standby
from qemukit.warm import WarmCache, warm_spec


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def _standby_entry(root: Path, name: str, sleepers: list[subprocess.Popen[bytes]], *,
                   entry: Path, key: str = "k" * 20, fam: str = "f", owner_pid: int | None = None,
                   die_with_parent: bool = True, detached: bool = False) -> RuntimeDir:
    """A registry entry of a standby whose 'QEMU' is a sleep process."""
    proc = subprocess.Popen(["sleep", "600"])
    sleepers.append(proc)
    me = psutil.Process()
    rd = RuntimeDir(root / name)
    rd.path.mkdir(parents=True, mode=0o700)
    owner = me if owner_pid is None else psutil.Process(owner_pid)
    info = {"name": name, "pid": proc.pid, "start_time": psutil.Process(proc.pid).create_time(),
            "accel": "tcg", "accel_reason": "test", "owner_pid": owner.pid,
            "die_with_parent": die_with_parent, "created": 1.0, "argv": ["qemu-system-x86_64"],
            "owner_start_time": owner.create_time()}
    (rd.path / "vm.json").write_text(json.dumps(info))
    write_marker(rd, make_info(key, entry, fam, detached=detached))
    return rd


def _gone(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> bool:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


# -- the claim ---------------------------------------------------------------------------


def test_exactly_one_of_many_claims_a_standby(tmp_path: Path) -> None:
    rd = RuntimeDir(tmp_path / "standby-aaaaaa")
    rd.path.mkdir()
    for _ in range(20):  # many rounds: a race that one round would miss
        write_marker(rd, make_info("k" * 20, tmp_path, "f", detached=False))
        barrier = threading.Barrier(8)
        won: list[bool] = []

        def take(barrier: threading.Barrier = barrier, won: list[bool] = won) -> None:
            barrier.wait()
            won.append(claim(rd))

        threads = [threading.Thread(target=take) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(won) == [False] * 7 + [True]
        assert read_marker(rd) is None


def test_a_claimed_standby_is_no_longer_listed(tmp_path: Path,
                                               sleepers: list[subprocess.Popen[bytes]]) -> None:
    rd = _standby_entry(tmp_path / "state", "standby-a", sleepers, entry=tmp_path)
    assert [r.name for r, _, _ in list_standbys(tmp_path / "state")] == ["standby-a"]
    assert claim(rd)
    assert list_standbys(tmp_path / "state") == []


# -- the rename to the taker's name ------------------------------------------------------


def test_move_takes_the_data_directory_along(tmp_path: Path) -> None:
    state, data = tmp_path / "state", tmp_path / "data"
    rd = RuntimeDir(state / "standby-abc")
    rd.path.mkdir(parents=True)
    (data / "standby-abc").mkdir(parents=True)
    (data / "standby-abc" / "overlay-disk0.qcow2").write_text("overlay")
    os.symlink(data / "standby-abc", rd.path / DATA_LINK)
    (rd.path / "qmp.sock").write_text("")
    moved = move_runtime(rd, "vm-taker")
    assert moved.path == state / "vm-taker" and not rd.path.exists()
    assert os.readlink(moved.path / DATA_LINK) == str(data / "vm-taker")
    assert moved.overlay("disk0").read_text() == "overlay"
    assert not (data / "standby-abc").exists()
    moved.remove()  # the data directory goes with it, as for any VM
    assert not (data / "vm-taker").exists()


def test_move_never_replaces_an_existing_entry(tmp_path: Path) -> None:
    rd = RuntimeDir(tmp_path / "standby-abc")
    rd.path.mkdir()
    (tmp_path / "taken").mkdir()  # even an empty directory, which rename(2) would replace
    with pytest.raises(FileExistsError):
        move_runtime(rd, "taken")
    assert rd.path.is_dir()


# -- what ends a standby -----------------------------------------------------------------


def test_gc_ends_a_standby_whose_state_is_gone(tmp_path: Path,
                                               sleepers: list[subprocess.Popen[bytes]]) -> None:
    state = tmp_path / "state"
    entry = tmp_path / "cache" / ("a" * 20)
    entry.mkdir(parents=True)
    kept = _standby_entry(state, "standby-kept", sleepers, entry=entry)
    _standby_entry(state, "standby-old", sleepers, entry=tmp_path / "cache" / ("b" * 20))
    actions = registry.gc(state)
    assert [(a.name, a.action) for a in actions] == [("standby-old", "killed")]
    assert _gone(sleepers[1]) and not (state / "standby-old").exists()
    assert sleepers[0].poll() is None and kept.path.is_dir()


def test_gc_ends_the_standby_of_an_owner_killed(tmp_path: Path,
                                                 sleepers: list[subprocess.Popen[bytes]]) -> None:
    owner = subprocess.Popen(["sleep", "600"])
    owner_pid = owner.pid
    try:
        _standby_entry(tmp_path / "state", "standby-a", sleepers, entry=tmp_path,
                       owner_pid=owner_pid)
    finally:
        owner.kill()
        owner.wait()
    assert [a.action for a in registry.gc(tmp_path / "state")] == ["killed"]
    assert _gone(sleepers[0])


def test_ls_shows_a_standby(tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]) -> None:
    _standby_entry(tmp_path / "state", "standby-a", sleepers, entry=tmp_path)
    rows = registry.list_vms(tmp_path / "state", query=False)
    assert [(r.name, r.state) for r in rows] == [("standby-a", "standby")]


def test_cache_clear_ends_the_standbys_of_its_states_only(
        tmp_path: Path, sleepers: list[subprocess.Popen[bytes]]) -> None:
    state = tmp_path / "state"
    ours, other = tmp_path / "cache", tmp_path / "other-cache"
    (ours / ("a" * 20)).mkdir(parents=True)
    (other / ("b" * 20)).mkdir(parents=True)
    _standby_entry(state, "standby-ours", sleepers, entry=ours / ("a" * 20))
    _standby_entry(state, "standby-other", sleepers, entry=other / ("b" * 20))
    WarmCache(ours).clear(state_root=state)
    assert _gone(sleepers[0]) and not (state / "standby-ours").exists()
    assert sleepers[1].poll() is None and (state / "standby-other" / MARKER).exists()


def test_a_standby_being_taken_is_not_ended(tmp_path: Path,
                                            sleepers: list[subprocess.Popen[bytes]]) -> None:
    rd = _standby_entry(tmp_path / "state", "standby-a", sleepers, entry=tmp_path)
    assert claim(rd)  # a start took it a moment ago
    assert end_standbys(tmp_path / "state") == []
    assert sleepers[0].poll() is None


# -- the settings ------------------------------------------------------------------------


def test_standby_is_a_yes_or_no() -> None:
    with pytest.raises(SpecError, match="standby"):
        VMSpec(standby="yes")  # type: ignore[arg-type]
    assert VMSpec(standby=True).standby and VMSpec().standby is None
    assert "standby" not in VMSpec().to_dict()


def test_wanted_follows_the_spec_then_the_environment() -> None:
    assert _standby.wanted(VMSpec(standby=True), {})
    assert not _standby.wanted(VMSpec(), {})
    assert _standby.wanted(VMSpec(), {_standby.ENV: "1"})
    assert not _standby.wanted(VMSpec(standby=False), {_standby.ENV: "1"})
    assert not _standby.wanted(VMSpec(standby=True), {_standby.ENV: "0"})


def test_family_is_the_description_without_name_or_settings() -> None:
    base = VMSpec(memory=256, warm=True)
    assert _standby.family(base) == _standby.family(base.replace(name="x", standby=True))
    assert _standby.family(base) != _standby.family(base.replace(memory=512))


def test_the_saved_state_carries_no_standby_setting() -> None:
    assert warm_spec(VMSpec(standby=True, warm=True)).standby is None


def test_a_standby_made_for_a_spec_fits_only_that_spec() -> None:
    made = VMSpec(memory=256, name="standby-abc", extra_args=("-S",))
    assert _standby._same_clone(made, VMSpec(memory=256, name="vm-x"))
    assert not _standby._same_clone(made, VMSpec(memory=512, name="vm-x"))
    assert not _standby._same_clone(made, VMSpec(memory=256, tb_size=64))


def test_no_wait_when_nothing_is_made() -> None:
    import asyncio

    began = time.monotonic()
    asyncio.run(_standby.settle(5))
    assert time.monotonic() - began < 5


def test_kept_memory_counts_the_standbys_ready_and_being_made() -> None:
    """What ``qemukit mcp`` counts against its limits beside its running VMs."""
    from qemukit.vm import _standby

    async def go() -> list[int]:
        loop = asyncio.get_running_loop()
        blocker = loop.create_future()
        making = loop.create_task(asyncio.wait_for(blocker, 30))
        _standby._ready[loop] = {(Path("/r"), "k1"): (None, VMSpec(kernel="/k", memory=300))}  # type: ignore[dict-item]
        _standby._making[loop] = {(Path("/r"), "k2"): making}
        _standby._making_memory[loop] = {(Path("/r"), "k2"): 200, (Path("/r"), "gone"): 999}
        try:
            return sorted(_standby.kept_memory())
        finally:
            making.cancel()
            for table in (_standby._ready, _standby._making, _standby._making_memory):
                table.pop(loop, None)

    assert asyncio.run(go()) == [200, 300]
