"""VMPool against real QEMU and the tiny guest (TCG): the limit, the standby, nothing left.

The module runs with its own ``QEMUKIT_CACHE`` (conftest's ``private_cache``: its first
start builds the warm state) and its pool its own registry (``state_root``), so the QEMUs
counted under it are the pool's VMs and standbys only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qemukit import VMPool, images
from tests.helpers import qemu_processes_under

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("warm")]

URANDOM = "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'"


def test_a_pool_of_two_runs_four_clones_two_at_a_time(private_cache: Path,
                                                      tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir()
    spec = images.spec("tiny", accel="tcg", memory=256, warm=True)
    counts: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # how many QEMUs of the pool exist, sampled throughout
        while not stop.is_set():
            counts.append(len(qemu_processes_under(root)))
            stop.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with VMPool(spec, max_vms=2, state_root=root) as pool:
        def one(i: int) -> tuple[bool, str, int]:
            with pool.vm() as vm:
                assert pool.running <= 2
                assert vm.warm_start is not None  # (the first start builds its state)
                taken = vm.warm_start.standby
                out = vm.exec(URANDOM, check=True).stdout_text
                return taken, out, vm.pid or 0

        with ThreadPoolExecutor(2) as workers:
            results = list(workers.map(one, range(4)))
    stop.set()
    watcher.join(10)
    # The first restores (its state built first); each later one takes the standby the VM
    # before it left.
    assert sorted(taken for taken, _, _ in results) == [False, True, True, True], results
    # Each clone is its own: its RNG reseeded, its own QEMU.
    assert len({out for _, out, _ in results}) == 4 and all(len(out) == 64 for _, out, _ in
                                                           results), results
    assert len({pid for _, _, pid in results}) == 4
    # Never more than two QEMUs: the two VMs, or one and the standby.
    assert counts and max(counts) <= 2, counts
    deadline = time.monotonic() + 30
    while qemu_processes_under(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert qemu_processes_under(root) == []
    assert list(root.iterdir()) == []


OWNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from qemukit import VMPool, images

    spec = images.spec("tiny", accel="tcg", memory=256, warm=True)
    pool = VMPool(spec, max_vms=2, state_root=Path(sys.argv[1]))
    with pool.vm() as vm:
        print(vm.pid, flush=True)
        time.sleep(600)
""")


def wait_for(what: str, check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_nothing_is_left_when_the_owner_is_killed(private_cache: Path, tmp_path: Path) -> None:
    root = tmp_path / "state"
    root.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(root)], stdout=subprocess.PIPE,
                             text=True, env=os.environ.copy())
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line.strip().isdigit(), line
        # Its VM and the standby it leaves (restored in the background).
        wait_for("the VM and its standby", lambda: len(qemu_processes_under(root)) == 2, 180)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    wait_for("no QEMU of the killed owner", lambda: not qemu_processes_under(root), 30)
