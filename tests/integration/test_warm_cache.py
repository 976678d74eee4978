"""A warm cache that cannot wedge, against real QEMU and the tiny guest (TCG).

- ``qemukit cache clear`` while a detached clone runs keeps that clone's entry
  (its disk copy backs the clone's overlay; the clone's QEMU holds the entry's
  lock), the clone works on, and the entry goes with the first clear after
  the clone has stopped;
- a key directory left half deleted by a kill (an older qemukit deleted in
  place; today a delete renames first) is rebuilt on the next start, never a
  permanent "QEMU cannot save this VM's state";
- ``--timeout`` of a first start that must build the warm state: the build
  is reported apart (``warm_build_time``) and the command keeps its time.

The module has its own ``QEMUKIT_CACHE`` (the tiny image linked in).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, Drive, images
from qemukit.warm import WarmCache
from tests.helpers import run_qemukit

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("warm")]

READ_DISK = (
    "sync; blockdev --flushbufs /dev/vda; echo 3 > /proc/sys/vm/drop_caches; head -c 8 /dev/vda"
)


def _spec(disk: Path, memory: int, **changes: Any) -> Any:
    return images.spec("tiny", accel="tcg", memory=memory, warm=True,
                       drives=(Drive(disk, format="raw", overlay=True),), **changes)


def _disk(root: Path, name: str) -> Path:
    path = root / name
    with open(path, "wb") as fh:
        fh.write(b"BASE-002")
        fh.truncate(8 << 20)
    return path


def _lock_fds(pid: int, lock: Path) -> int:
    fd_dir = Path(f"/proc/{pid}/fd")
    return sum(1 for fd in fd_dir.iterdir() if os.path.realpath(fd) == str(lock))


def test_clear_while_a_detached_clone_runs(private_cache: Path) -> None:
    spec = _spec(_disk(private_cache, "clear.raw"), 248)
    with VM(spec) as first:  # builds the state
        assert first.warm_start is not None and first.warm_start.key is not None
        key = first.warm_start.key
    cache = WarmCache()
    clone = VM(spec.replace(name="wedge-clone"), die_with_parent=False)
    clone.start()
    try:
        clone.wait_ready(120)
        assert clone.warm_start is not None and clone.warm_start.warm
        pid = clone.pid
        assert pid is not None
        clone.detach()  # this process lets go; the clone's QEMU keeps the entry's lock
        assert _lock_fds(pid, cache.use_lock_path(key)) == 1
        entry = cache.get(key)
        assert entry is not None and cache.in_use(entry)
        files_before = sorted(str(p.relative_to(entry.path)) for p in entry.path.rglob("*"))

        out = run_qemukit("cache", "clear")
        assert out.returncode == 0, out.stderr
        assert "0 removed" in out.stdout and "1 kept, in use by running VMs" in out.stdout
        assert key in out.stdout
        assert sorted(str(p.relative_to(entry.path)) for p in entry.path.rglob("*")) \
            == files_before  # whole, not half deleted
        listed = json.loads(run_qemukit("cache", "ls", "--json").stdout)
        assert [(e["key"], e["in_use"]) for e in listed] == [(key, True)]

        # The clone works on, its disk read through the overlay from the entry's copy.
        read = run_qemukit("exec", "wedge-clone", "--", "sh", "-c", READ_DISK)
        assert read.returncode == 0 and read.stdout == "BASE-002", read
        wrote = run_qemukit("exec", "wedge-clone", "--", "sh", "-c",
                            "echo hello > /tmp/x && cat /tmp/x")
        assert wrote.stdout.strip() == "hello", wrote
    finally:
        stopped = run_qemukit("stop", "wedge-clone")
        if stopped.returncode != 0:
            run_qemukit("kill", "wedge-clone")
    # Its QEMU gone, the lock is free: the next clear removes the entry.
    out = run_qemukit("cache", "clear")
    assert out.returncode == 0 and "1 removed" in out.stdout and "kept" not in out.stdout, out
    assert cache.get(key) is None and not (cache.root / key).exists()


def test_a_half_deleted_key_directory_is_rebuilt(private_cache: Path) -> None:
    spec = _spec(_disk(private_cache, "half.raw"), 252)
    with VM(spec) as vm:
        assert vm.warm_start is not None and not vm.warm_start.warm
        key = vm.warm_start.key
    assert key is not None
    path = WarmCache().root / key
    # A kill in the middle of an in-place delete: meta.json and the state gone, the rest left.
    (path / "meta.json").unlink()
    for state in path.rglob("state.bin"):
        state.unlink()
    assert path.is_dir() and WarmCache().get(key) is None
    with VM(spec) as vm:
        assert vm.warm_start is not None and not vm.warm_start.warm
        assert "first start of this spec" in vm.warm_start.reason, vm.warm_start.reason
        assert vm.exec(READ_DISK).stdout_text == "BASE-002"
    with VM(spec) as vm:  # and the rebuilt entry serves the next start
        assert vm.warm_start is not None
        assert vm.warm_start.warm, vm.warm_start.reason
        assert vm.exec(READ_DISK).stdout_text == "BASE-002"
    # A kill while deleting today leaves only a hidden directory, removed by the next prune.
    shutil.copytree(path, WarmCache().root / f".tmp-{key}-gone999-1")
    entry = WarmCache().get(key)
    assert entry is not None
    assert WarmCache().prune(1 << 40) == []
    assert not list(WarmCache().root.glob(".tmp-*"))
    assert WarmCache().get(key) is not None


def test_a_first_start_reports_its_build_apart_from_the_timeout(private_cache: Path,
                                                                tmp_path: Path) -> None:
    """The build (a cold boot and a save) does not eat the command's --timeout.

    The build takes more than 10 s here (a TCG boot of about 8 s, then a save), so the
    old budget (40 s from the start, build included) left the 30 s command too little.
    """
    out = run_qemukit("run", "--json", "--image", "tiny", "--accel", "tcg", "--memory", "244M",
                      "--timeout", "40", "--", "sh", "-c", "sleep 30; echo done", timeout=400)
    result = json.loads(out.stdout)
    assert result["outcome"] == "passed", result
    assert result["stdout"].strip() == "done"
    assert result["warm_build_time"] and result["warm_build_time"] > 0
    again = json.loads(run_qemukit("run", "--json", "--image", "tiny", "--accel", "tcg",
                                   "--memory", "244M", "--", "true").stdout)
    assert again["outcome"] == "passed" and again["warm_build_time"] is None
