"""Warm starts against real QEMU and the tiny guest (TCG): the cache, clones, invalidation.

The module runs with its own ``QEMUKIT_CACHE`` (the tiny image linked in), so
its entries start from nothing and other tests' entries are not touched.
Each cold start costs a boot and a save, so the module keeps them few.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, Drive, Nic, PortForward, images
from qemukit.warm import WarmCache
from tests.helpers import QEMUKIT, run_qemukit

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("warm")]
pytest_plugins = ["pytester"]

READ_DISK = (
    "sync; blockdev --flushbufs /dev/vda; echo 3 > /proc/sys/vm/drop_caches; head -c 8 /dev/vda"
)


@pytest.fixture(scope="module")
def base_disk(private_cache: Path) -> Path:
    """A raw disk whose first 8 bytes are a marker; the warm VMs boot it under an overlay."""
    path = private_cache / "base.raw"
    with open(path, "wb") as fh:
        fh.write(b"BASE-001")
        fh.truncate(8 << 20)
    return path


def warm_spec(disk: Path, **changes: Any) -> Any:
    return images.spec("tiny", accel="tcg", memory=256, warm=True,
                       drives=(Drive(disk, format="raw", overlay=True),),
                       nics=(Nic(forwards=(PortForward(0, 22),)),), **changes)


def urandom(vm: VM) -> str:
    return vm.exec("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'", check=True).stdout_text


def test_clones_are_separate_machines(private_cache: Path, base_disk: Path) -> None:
    spec = warm_spec(base_disk)
    with VM(spec) as first:
        assert first.warm_start is not None and not first.warm_start.warm
        assert "first start of this spec" in first.warm_start.reason
        key = first.warm_start.key
    assert key is not None and WarmCache().get(key) is not None

    saved = time.time()  # the saved guest's clock stopped before this
    a, b = VM(spec), VM(spec)
    try:
        with ThreadPoolExecutor(2) as pool:  # both restored at once
            list(pool.map(lambda vm: vm.start(), (a, b)))
        assert a.warm_start is not None and b.warm_start is not None
        assert a.warm_start.warm and b.warm_start.warm
        assert a.warm_start.key == b.warm_start.key == key
        assert a.name != b.name and a.pid != b.pid
        assert a.status() == b.status() == "running"
        assert a.ssh_address() != b.ssh_address()  # each QEMU got its own forwarded port
        # Fresh entropy: the saved RNG state must not give both clones the same bytes.
        bytes_a, bytes_b = urandom(a), urandom(b)
        assert len(bytes_a) == 64 and bytes_a != bytes_b
        # The guest clock is the host's, not the save's: it reads a time after the restores
        # began (a TCG guest's clock may fall behind a loaded host's since, but not to the save).
        guest_now = int(a.exec("date +%s", check=True).stdout_text)
        assert saved - 1 <= guest_now <= time.time() + 1
        # Separate disks: a marker written in one is in neither the other nor the next clone.
        a.exec("printf %s CLONE-AA > /dev/vda && echo CLONE-AA > /tmp/marker && sync",
               check=True)
        assert a.exec(READ_DISK, check=True).stdout_text == "CLONE-AA"
        assert b.exec(READ_DISK, check=True).stdout_text == "BASE-001"
        assert b.exec("cat /tmp/marker 2>/dev/null || echo none").stdout_text.strip() == "none"
    finally:
        for vm in (a, b):
            if vm.state.value == "running":
                vm.shutdown(timeout=10)
    with VM(spec) as third:
        assert third.warm_start is not None and third.warm_start.warm
        assert third.exec(READ_DISK, check=True).stdout_text == "BASE-001"
        assert third.exec("cat /tmp/marker 2>/dev/null || echo none").stdout_text.strip() == "none"
    assert base_disk.read_bytes()[:8] == b"BASE-001"


def test_a_changed_disk_or_spec_starts_cold_with_a_new_entry(private_cache: Path,
                                                             base_disk: Path) -> None:
    spec = warm_spec(base_disk)
    with VM(spec) as vm:
        assert vm.warm_start is not None and vm.warm_start.warm
        old_key = vm.warm_start.key
    # The user's disk changes: the guest must see its current contents, never the cached ones.
    with open(base_disk, "r+b") as fh:
        fh.write(b"BASE-002")
    with VM(spec) as vm:
        assert vm.warm_start is not None and not vm.warm_start.warm
        assert vm.warm_start.key != old_key
        assert vm.exec(READ_DISK, check=True).stdout_text == "BASE-002"
    with VM(spec) as vm:  # and the new state is used from then on
        assert vm.warm_start is not None and vm.warm_start.warm
        assert vm.exec(READ_DISK, check=True).stdout_text == "BASE-002"
    with VM(spec.replace(memory=272)) as vm:  # a spec change
        assert vm.warm_start is not None and not vm.warm_start.warm
    with VM(spec.replace(name="renamed")) as vm:  # the name is not part of what is booted
        assert vm.warm_start is not None and vm.warm_start.warm
        assert vm.name == "renamed"
    keys = {e.key for e in WarmCache().entries()}
    assert old_key in keys and len(keys) >= 3


def test_cache_prune_keeps_within_its_limit(private_cache: Path, base_disk: Path) -> None:
    cache = WarmCache()
    entries = cache.entries()
    assert len(entries) >= 2, "the tests above leave several entries"
    newest = entries[-1]
    limit_mib = newest.size // 2**20 + 1
    out = run_qemukit("cache", "prune", "--max-size", f"{limit_mib}M")
    assert out.returncode == 0, out.stderr
    left = cache.entries()
    assert [e.key for e in left] == [newest.key]
    assert sum(e.size for e in left) <= limit_mib * 2**20
    listed = run_qemukit("cache", "ls")
    assert newest.key in listed.stdout and "1 entries" in listed.stdout


def test_two_processes_build_one_state(private_cache: Path) -> None:
    argv = [QEMUKIT or "qemukit", "run", "-v", "--image", "tiny", "--accel", "tcg",
            "--memory", "240M", "--", "true"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    lines = [line for _, err in results for line in err.splitlines() if ": warm: " in line
             or ": cold: " in line]
    assert len(lines) == 2, results
    assert sum("cold: first start of this spec" in line for line in lines) == 1, lines
    assert sum(": warm: restored" in line for line in lines) == 1, lines


def test_a_kill_while_saving_leaves_no_entry(private_cache: Path, state_root: Path) -> None:
    cache = WarmCache()
    before = {e.key for e in cache.entries()}
    argv = [QEMUKIT or "qemukit", "run", "--image", "tiny", "--accel", "tcg",
            "--memory", "232M", "--", "true"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    state = None
    try:
        # The save's partial bundle exists from the first byte of the stream to the rename;
        # with mapped RAM the stream itself is small (device state only) and soon written.
        while state is None:
            found = list(cache.root.glob(".tmp-*/.bundle.partial-*"))
            if found:
                state = found[0]
            elif proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no state being written within 120 s (exit {proc.poll()}): "
                            f"{proc.stderr.read().decode() if proc.stderr else ''}")
            else:
                time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert {e.key for e in cache.entries()} == before  # no entry, complete or not
    out = run_qemukit("run", "-v", "--image", "tiny", "--accel", "tcg", "--memory", "232M",
                      "--", "true")
    assert out.returncode == 0, out.stderr
    assert "cold: first start of this spec" in out.stderr
    assert not list(cache.root.glob(".tmp-*")), "the half entry was not cleaned up"
    run_qemukit("gc")  # the killed process's runtime directory


def test_the_kernel_loop_restores_until_the_kernel_changes(private_cache: Path,
                                                           tiny_image: images.TinyImage,
                                                           tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    shutil.copyfile(tiny_image.kernel, kernel)
    run = ("run", "-v", "--kernel", str(kernel), "--accel", "tcg", "--memory", "224M", "--",
           "uname", "-r")
    outs = [run_qemukit(*run) for _ in range(2)]
    assert [o.returncode for o in outs] == [0, 0], [o.stderr for o in outs]
    assert "cold: first start" in outs[0].stderr and "warm: restored" in outs[1].stderr
    assert outs[1].stdout.strip() == tiny_image.kernel_release
    with open(kernel, "ab") as fh:  # a rebuilt kernel: same path, other contents
        fh.write(b"\0" * 512)
    rebuilt = run_qemukit(*run)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "cold: first start" in rebuilt.stderr
    cold = run_qemukit(*run[:1], "--cold", *run[1:])
    assert cold.returncode == 0 and ": warm: " not in cold.stderr and ": cold: " not in cold.stderr


PLUGIN_SAMPLE = """
def test_first(qemu_vm):
    assert qemu_vm.exec(["true"]).ok
    print("START", qemu_vm.warm_start.describe())

def test_second(qemu_vm):
    assert qemu_vm.exec(["true"]).ok
    print("START", qemu_vm.warm_start.describe())
"""


def test_the_qemu_vm_fixture_starts_warm(private_cache: Path, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sample=PLUGIN_SAMPLE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", timeout=600)
    result.assert_outcomes(passed=2)
    starts = [line for line in result.stdout.lines if "START " in line]
    assert len(starts) == 2 and "cold: first start" in starts[0] and "warm:" in starts[1], starts


def test_many_vms_of_one_process_share_one_build(private_cache: Path) -> None:
    # More VMs than the default executor has workers (cores + 4): each waiting for the
    # build in a worker thread would leave the builder none, and the start hang.
    count = min(32, (os.cpu_count() or 1) + 4) + 2
    spec = images.spec("tiny", accel="tcg", memory=248, warm=True)

    async def start_all() -> list[Any]:
        from qemukit.vm import AsyncVM

        vms = [AsyncVM(spec) for _ in range(count)]
        try:
            await asyncio.wait_for(asyncio.gather(*(vm.start() for vm in vms)), 120)
            return [vm.warm_start for vm in vms]
        finally:
            await asyncio.gather(*(vm.kill() for vm in vms if vm.state.value == "running"))

    starts = asyncio.run(start_all())
    assert sum(not s.warm for s in starts) == 1, starts
    assert "first start of this spec" in next(s.reason for s in starts if not s.warm)


def test_a_damaged_state_is_removed_and_the_vm_boots_instead(private_cache: Path) -> None:
    spec = images.spec("tiny", accel="tcg", memory=264, warm=True)
    with VM(spec) as vm:
        assert vm.warm_start is not None and not vm.warm_start.warm
        key = vm.warm_start.key
    entry = WarmCache().get(key or "")
    assert entry is not None
    state = entry.bundle_path / "state.bin"
    os.chmod(state, 0o600)
    with open(state, "r+b") as fh:  # the stream ends half-way
        fh.truncate(state.stat().st_size // 2)
    with VM(spec) as vm:  # QEMU cannot load it: this start boots, and says why
        assert vm.warm_start is not None and not vm.warm_start.warm
        assert "could not load the warm state" in vm.warm_start.reason
        assert "removed, so the next start boots" in vm.warm_start.reason
        assert "booted instead" in vm.warm_start.reason
        assert vm.exec(["true"]).ok
        assert "-incoming" not in vm.argv
    assert WarmCache().get(key or "") is None
    with VM(spec) as vm:  # and the next start builds a new state
        assert vm.warm_start is not None and not vm.warm_start.warm
        assert "first start of this spec" in vm.warm_start.reason
        assert vm.exec(["true"]).ok
