"""Regression tests of the correctness sweep against real QEMU: kill, ownership of the
operations object, the operation lock, and cancellation of a real guest call."""

from __future__ import annotations

import asyncio
import gc
import json
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, AsyncVM, Drive, ShutdownRung, VMSpec, host
from tests.helpers import qemu_gone

pytestmark = pytest.mark.integration


def test_kill_is_sigkill_at_once(booted: Any) -> None:
    vm = booted()
    pid = vm.pid
    result = vm.kill()
    assert result.rung is ShutdownRung.SIGKILL
    assert result.tried == (ShutdownRung.SIGKILL,)
    # Killed by the signal, not by a QMP quit (exit 0) or SIGTERM.
    assert result.exit_status == -signal.SIGKILL
    assert result.elapsed < 5
    assert qemu_gone(pid)
    assert vm.kill() is result  # a second call returns the first result


def test_a_vm_that_used_hotplug_is_freed(tiny_spec: VMSpec) -> None:
    vm = VM(tiny_spec).start()
    assert vm.hotplug.aio is vm.hotplug.aio  # one operations object per VM, owned by it
    ref = weakref.ref(vm.aio)
    vm.kill()
    del vm
    gc.collect()
    assert ref() is None, gc.get_referrers(ref())


def test_concurrent_external_snapshots_keep_every_record(tiny_spec: VMSpec, tmp_path: Path) -> None:
    qemu = host.find_qemu("x86_64")
    base = tmp_path / "base.qcow2"
    subprocess.run([qemu.qemu_img or "qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"],
                   check=True)
    spec = tiny_spec.replace(drives=(Drive(str(base), overlay=True),))

    async def main() -> list[str]:
        async with AsyncVM(spec) as vm:
            await vm.wait_ready()
            await asyncio.gather(vm.snapshots.external("one"), vm.snapshots.external("two"),
                                 vm.snapshots.external("three"))
            assert vm.runtime is not None
            records = json.loads((vm.runtime.path / "external-snapshots.json").read_text())
            listed = [s.tag for s in await vm.snapshots.list() if s.kind == "external"]
            # Each froze the layer the one before had put on top: a chain, in lock order.
            chain = [r["disks"][0]["frozen_file"] for r in records]
            assert len(set(chain)) == 3, chain
            assert sorted(listed) == ["one", "three", "two"]
            return sorted(r["tag"] for r in records)

    assert asyncio.run(main()) == ["one", "three", "two"]


def test_an_operation_waits_for_another_process_holding_the_lock(booted: Any) -> None:
    """The operation lock is an flock: a holder in another process delays a hotplug here."""
    import sys
    import time

    vm = booted()
    assert vm.runtime is not None
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(vm.runtime.lock_file)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(1.5)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        vm.hotplug.nic()
        assert time.monotonic() - start >= 1.0  # it waited for the other process
    finally:
        holder.wait(10)
    assert [d.kind for d in vm.devices()] == ["nic"]


def test_asyncio_timeout_around_a_guest_command_propagates(tiny_spec: VMSpec) -> None:
    async def main() -> str:
        async with AsyncVM(tiny_spec) as vm:
            await vm.wait_ready()
            with pytest.raises(TimeoutError) as info:
                async with asyncio.timeout(1):
                    await vm.exec(["sleep", "30"])
            assert type(info.value) is TimeoutError  # the caller's, not a qemukit WaitTimeout
            return (await vm.exec(["echo", "still", "fine"])).stdout_text.strip()

    assert asyncio.run(main()) == "still fine"


def test_a_snapshot_load_puts_back_a_guest_from_before_an_oops(tiny_spec: VMSpec,
                                                              tmp_path: Path) -> None:
    """A session VM rolled back after a test oopsed its kernel is usable again."""
    from qemukit import GuestOops

    qemu = host.find_qemu("x86_64")
    base = tmp_path / "base.qcow2"
    subprocess.run([qemu.qemu_img or "qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"],
                   check=True)
    with VM(tiny_spec.replace(drives=(Drive(str(base), overlay=True),))) as vm:
        vm.wait_ready()
        vm.snapshots.save("clean")
        oops = "BUG: kernel NULL pointer dereference, address: 0000000000000000"
        with pytest.raises(GuestOops):  # at an emergency level, so it reaches the console
            vm.exec(["sh", "-c", f"echo '<0>{oops}' > /dev/kmsg; sleep 5"], timeout=60)
        with pytest.raises(GuestOops):  # the fault sticks to the VM...
            vm.exec(["true"])
        vm.snapshots.load("clean")  # ...until the guest from before it is put back
        assert vm.exec(["echo", "back"]).stdout_text.strip() == "back"


def test_a_script_that_exits_with_its_vm_running_stops_it_quietly(
    tiny_spec: VMSpec, state_root: Path, tmp_path: Path
) -> None:
    """The exit handler stops a forgotten VM in order: QEMU gone, entry gone, nothing printed.

    Before, QEMU was killed but the loop thread's tasks (the monitor's reader and
    writer, the I/O-error watch) were destroyed half-way at exit, and asyncio
    printed "Task was destroyed but it is pending!" and tracebacks on stderr.
    """
    script = (
        "import sys\n"
        "from qemukit import VM, VMSpec\n"
        "vm = VM(VMSpec.load(sys.argv[1]))\n"
        "vm.start(); vm.wait_ready()\n"
        "print(vm.pid, flush=True)\n"
    )
    spec_file = tmp_path / "vm.toml"
    spec_file.write_text(tiny_spec.replace(name="forgotten").dumps())
    done = subprocess.run([sys.executable, "-c", script, str(spec_file)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert qemu_gone(int(done.stdout.strip()))
    assert not (state_root / "forgotten").exists()
