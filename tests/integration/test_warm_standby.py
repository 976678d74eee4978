"""Standby clones against real QEMU and the tiny guest (TCG): taken, refused, reaped.

The module runs with its own ``QEMUKIT_CACHE`` (conftest's ``private_cache``) and its
own ``QEMUKIT_STATE``, so the registry it looks at holds its VMs and standbys only.
Each new warm key costs a cold boot and a save, so the module keeps them few.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemukit import VM, Drive, images
from qemukit._launch.registry import gc, list_vms
from qemukit._launch.standby import list_standbys
from qemukit._sync import run_sync
from qemukit.vm import _standby
from qemukit.warm import WarmCache
from tests.helpers import qemu_gone, run_qemukit

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("warm")]

READ_DISK = (
    "sync; blockdev --flushbufs /dev/vda; echo 3 > /proc/sys/vm/drop_caches; head -c 8 /dev/vda"
)
#: How long a standby may take to be restored in the background on a loaded machine.
READY_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def standby_registry(private_cache: Path, tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[Path]:
    """A registry (``QEMUKIT_STATE``) of this module's own, beside its own cache
    (``private_cache``): what it lists are this module's VMs and standbys only."""
    state = tmp_path_factory.mktemp("standby-state")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QEMUKIT_STATE", str(state))
        try:
            yield state
        finally:
            run_sync(_standby.end_all())


@pytest.fixture(scope="module")
def base_disk(private_cache: Path, standby_registry: Path) -> Path:
    path = private_cache / "base.raw"
    with open(path, "wb") as fh:
        fh.write(b"BASE-001")
        fh.truncate(8 << 20)
    return path


@pytest.fixture(autouse=True)
def no_standby_left_over(standby_registry: Path) -> Iterator[None]:
    """Each test starts with no standby of this process (the last test's ends here)."""
    run_sync(_standby.end_all())
    yield


def spec_of(disk: Path, **changes: Any) -> Any:
    return images.spec("tiny", accel="tcg", memory=256, warm=True, standby=True,
                       drives=(Drive(disk, format="raw", overlay=True),), **changes)


def urandom(vm: VM) -> str:
    return vm.exec("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'", check=True).stdout_text


def wait_standby(key: str | None, timeout: float = READY_TIMEOUT) -> tuple[str, int]:
    """The name and QEMU pid of the standby of ``key``, once it is ready."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for rd, info, marker in list_standbys():
            if marker.key == key:
                return rd.name, info.pid
        time.sleep(0.2)
    raise AssertionError(f"no standby of {key} within {timeout} s: {list_vms(query=False)}")


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if qemu_gone(pid):
            return True
        time.sleep(0.1)
    return False


def test_the_next_start_takes_the_standby_and_is_its_own_clone(base_disk: Path) -> None:
    spec = spec_of(base_disk)
    with VM(spec) as first:  # (its first start builds the state)
        key = first.warm_start.key if first.warm_start else None
        name, pid = wait_standby(key)
        made = time.time()
        with VM(spec) as second:
            assert second.warm_start is not None and second.warm_start.warm
            assert second.warm_start.standby and "standby clone taken" in second.warm_start.describe()
            # The standby's QEMU became this VM, under this VM's name and runtime directory.
            assert second.pid == pid and second.name != name
            assert second.runtime is not None and second.runtime.path.name == second.name
            assert not (second.runtime.path.parent / name).exists()
            assert second.runtime.overlay("disk0").exists() or any(
                p.name.startswith("overlay-") for p in second.runtime.data_path.iterdir())
            # Its identity is made after the take, as for every warm clone: its own random
            # bytes, and the host's clock (the standby waited paused since it was made).
            assert urandom(first) != urandom(second)
            guest_now = int(second.exec("date +%s", check=True).stdout_text)
            assert made - 1 <= guest_now <= time.time() + 1
            ident = "hostname; cat /etc/machine-id 2>/dev/null || echo none"
            # (The tiny guest's host name and machine-id are not per clone: a warm clone keeps the
            # saved ones, and a standby's taker gets what any warm clone gets.)
            assert (second.exec(ident, check=True).stdout_text
                    == first.exec(ident, check=True).stdout_text)
            # Its disk is its own: the overlay made for the standby is this VM's alone.
            second.exec("printf %s CLONE-BB > /dev/vda && sync", check=True)
            assert second.exec(READ_DISK, check=True).stdout_text == "CLONE-BB"
            assert first.exec(READ_DISK, check=True).stdout_text == "BASE-001"
            # The taker left a new standby for the start after it.
            new_name, new_pid = wait_standby(key)
            assert new_name != name and new_pid not in (first.pid, second.pid)
        assert base_disk.read_bytes()[:8] == b"BASE-001"
        with VM(spec) as third:
            assert third.warm_start is not None and third.warm_start.standby
            assert third.exec(READ_DISK, check=True).stdout_text == "BASE-001"


def test_a_standby_of_another_state_is_never_taken(base_disk: Path, tmp_path: Path) -> None:
    spec = spec_of(base_disk)
    with VM(spec) as vm:
        key = vm.warm_start.key if vm.warm_start else None
    name, pid = wait_standby(key)
    # A spec change is another key: not taken (the standby stays for its own spec).
    with VM(spec.replace(memory=272)) as vm:
        assert vm.warm_start is not None and not vm.warm_start.standby
        assert vm.pid != pid
    assert not qemu_gone(pid)
    # Another QEMU binary (another path, so another key): not taken, and the standby of
    # the same description's older key is outdated: it is ended.
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.symlink_to(vm.qemu.path)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QEMUKIT_QEMU", str(qemu))
        with VM(spec) as vm:
            assert vm.warm_start is not None and not vm.warm_start.standby
            assert vm.warm_start.key != key and vm.pid != pid
    assert wait_gone(pid), "the outdated standby still runs"
    assert name not in [v.name for v in list_vms(query=False)]
    # The user's disk changes (another key again): the standby made meanwhile is outdated.
    with VM(spec) as vm:
        key = vm.warm_start.key if vm.warm_start else None
    name, pid = wait_standby(key)
    with open(base_disk, "r+b") as fh:
        fh.write(b"BASE-002")
    try:
        with VM(spec) as vm:
            assert vm.warm_start is not None and not vm.warm_start.standby
            assert vm.exec(READ_DISK, check=True).stdout_text == "BASE-002"
        assert wait_gone(pid), "the outdated standby still runs"
    finally:
        with open(base_disk, "r+b") as fh:
            fh.write(b"BASE-001")


OWNER = """
import json, sys, time
from qemukit import VM, Drive, images
from qemukit._launch.standby import list_standbys
spec = images.spec("tiny", accel="tcg", memory=256, warm=True, standby=True,
                   drives=(Drive(sys.argv[1], format="raw", overlay=True),))
vm = VM(spec)
vm.start()
deadline = time.monotonic() + 180
while not list_standbys() and time.monotonic() < deadline:
    time.sleep(0.2)
[(rd, info, _)] = list_standbys()
print(json.dumps({"vm": vm.pid, "standby": info.pid, "name": rd.name}), flush=True)
time.sleep(600)
"""


def test_killing_the_owner_leaves_no_qemu(base_disk: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(base_disk)], env=os.environ.copy(),
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()
        assert line, f"the owner exited ({owner.wait(10)}) before its standby was ready"
        pids = json.loads(line)
        assert psutil.pid_exists(pids["standby"])
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
    assert wait_gone(pids["standby"]), "the standby outlived its SIGKILLed owner"
    assert wait_gone(pids["vm"])
    names = [a.name for a in gc()]
    assert pids["name"] in names
    assert list_standbys() == [] and pids["name"] not in [v.name for v in list_vms(query=False)]


def test_cache_clear_ends_a_standby(base_disk: Path) -> None:
    spec = spec_of(base_disk)
    with VM(spec) as vm:
        key = vm.warm_start.key if vm.warm_start else None
    name, pid = wait_standby(key)
    out = run_qemukit("cache", "clear")
    assert out.returncode == 0, out.stderr
    assert wait_gone(pid), "cache clear left the standby running"
    assert key is not None and WarmCache().get(key) is None  # nothing held it in use any more
    assert name not in [v.name for v in list_vms(query=False)]
    with VM(spec) as vm:  # the ended standby is not taken: the state is built anew
        assert vm.warm_start is not None and not vm.warm_start.standby
        assert vm.warm_start.key == key and vm.warm_start.build_seconds > 0


def test_two_starts_race_for_one_standby(base_disk: Path) -> None:
    spec = spec_of(base_disk)
    with VM(spec) as vm:
        key = vm.warm_start.key if vm.warm_start else None
    wait_standby(key)
    a, b = VM(spec), VM(spec)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda v: v.start(), (a, b)))
        taken = [v.warm_start.standby for v in (a, b) if v.warm_start is not None]
        assert sorted(taken) == [False, True]
    finally:
        for v in (a, b):
            if v.state.value == "running":
                v.shutdown(timeout=10)


def test_cli_standby_is_taken_by_one_of_two_racing_runs() -> None:
    """``run --standby`` leaves a standby behind; of two runs racing for it, one takes it."""
    out = run_qemukit("run", "--standby", "--image", "tiny", "--", "true")
    assert out.returncode == 0, out.stderr
    [(_, info, marker)] = list_standbys()
    assert marker.detached and not qemu_gone(info.pid)
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: run_qemukit("run", "-v", "--image", "tiny", "--", "true"),
                             range(2)))
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert sum("standby clone taken" in r.stderr for r in runs) == 1
    assert wait_gone(info.pid)  # the taker stopped it, as any VM it ran
    assert list_standbys() == [] and list_vms(query=False) == []
