"""A test's fresh guest two ways: ``snapshots.load`` of a booted state against a boot.

The first is what the pytest plugin's ``qemu_clean_vm`` does before each test;
the second is what ``qemu_vm`` (a VM per test) costs. Both are timed until the
guest agent answers; both are qemukit, so both run the QEMU it found.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from qemukit import VM, Drive, VMState

from .common import Result, create_disk, interleave, summary, tiny_spec


def bench_rollback(runs: int) -> Result:
    """Median seconds to a clean guest: snapshot rollback vs boot to ready, and the speed-up."""
    spec = tiny_spec()
    tmp = Path(tempfile.mkdtemp(prefix="qk-rollback-"))
    scratch = tmp / "scratch.qcow2"  # internal snapshots need a qcow2 disk to live on
    create_disk(scratch, "64M")
    session = VM(spec.replace(drives=(Drive(scratch, format="qcow2", id="scratch"),)))
    try:
        session.start()
        session.wait_ready()
        session.snapshots.save("clean")

        def rollback() -> float:
            session.exec("echo dirty > /tmp/dirt")
            t0 = time.perf_counter()
            session.snapshots.load("clean")
            if session.exec("test -e /tmp/dirt").exit_status != 1:
                raise RuntimeError("the rollback left /tmp/dirt in the guest")
            return time.perf_counter() - t0

        def boot() -> float:
            vm = VM(spec)
            t0 = time.perf_counter()
            vm.start()
            try:
                vm.wait_ready()
                return time.perf_counter() - t0
            finally:
                vm.kill()

        res = interleave(runs, boot_per_test=boot, snapshot_rollback=rollback)
    finally:
        if session.state is VMState.RUNNING:
            session.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    b, r = summary(res["boot_per_test"]), summary(res["snapshot_rollback"])
    return {"boot_per_test": b, "snapshot_rollback": r,
            "speedup": round(b["median"] / r["median"], 2)}
