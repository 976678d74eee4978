"""Detached VMs controlled from separate ``qemukit`` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import qemu_gone, qemu_processes_under

pytestmark = pytest.mark.integration
TCG = ("--image", "tiny", "--accel", "tcg")



def test_detach_list_exec_stop(qk: Any, state_root: Path) -> None:
    out = qk("run", "--detach", "--name", "det1", *TCG, "--nic", "user,hostfwd=0:22")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "det1"
    try:
        listing = json.loads(qk("ls", "--json").stdout)
        entry = next(e for e in listing if e["name"] == "det1")
        assert entry["state"] == "running" and entry["alive"] is True
        assert entry["accel"] == "tcg" and entry["rss"] > 0 and entry["uptime"] >= 0
        # Host port 0 asks the kernel for a free port; ls shows the one QEMU got.
        (fwd,) = entry["forwards"]
        port = int(fwd.split(":")[1].split("->")[0])
        assert fwd == f"127.0.0.1:{port}->22/tcp" and port > 0
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # QEMU's slirp really listens there (on loopback only)
        assert psutil.Process(entry["pid"]).is_running()
        ran = qk("exec", "det1", "--", "sh", "-c", "echo from-guest; exit 5")
        assert ran.returncode == 5 and ran.stdout == "from-guest\n"
        reply = qk("qmp", "det1", "query-status")
        assert reply.returncode == 0 and json.loads(reply.stdout)["status"] == "running"
        bad = qk("qmp", "det1", "query-status", "{not json")
        assert bad.returncode == 2 and "not valid JSON" in bad.stderr
        err = qk("qmp", "det1", "no-such-command")
        assert err.returncode == 1 and "CommandNotFound" in err.stderr
        logs = qk("logs", "det1")
        assert "qemukit-init: ready" in logs.stdout
    finally:
        stopped = qk("stop", "det1", "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout)["rung"] == "acpi"
    assert qemu_gone(entry["pid"])
    assert not (state_root / "det1").exists()


def test_duplicate_name_is_refused(qk: Any) -> None:
    assert qk("run", "--detach", "--name", "dup", *TCG).returncode == 0
    try:
        again = qk("run", "--detach", "--name", "dup", *TCG)
        assert again.returncode == 125 and "already running" in again.stderr
    finally:
        assert qk("kill", "dup").returncode == 0


def test_killed_qemu_shows_gone_and_gc_removes_it(qk: Any, state_root: Path) -> None:
    assert qk("run", "--detach", "--name", "victim", *TCG).returncode == 0
    pid = json.loads((state_root / "victim" / "vm.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not qemu_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    entry = next(e for e in json.loads(qk("ls", "--json").stdout) if e["name"] == "victim")
    assert entry["alive"] is False and entry["state"] == "gone"
    cleaned = json.loads(qk("gc", "--json").stdout)
    assert {"name": "victim", "action": "removed"}.items() <= cleaned[0].items()
    assert not (state_root / "victim").exists()


def test_reused_pid_is_never_signalled(qk: Any, state_root: Path) -> None:
    """An entry whose pid now belongs to another program: gc and kill leave it alone."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        entry = state_root / "stale"
        entry.mkdir(mode=0o700)
        info = {
            "name": "stale", "pid": bystander.pid, "start_time": 1.0, "accel": "tcg",
            "accel_reason": "", "owner_pid": 1, "die_with_parent": True, "created": 1.0,
            "argv": ["qemu-system-x86_64"], "owner_start_time": 1.0,
        }
        (entry / "vm.json").write_text(json.dumps(info))
        assert json.loads(qk("ls", "--json").stdout)[0]["alive"] is False
        assert qk("kill", "stale").returncode == 0
        entry.mkdir(mode=0o700)
        (entry / "vm.json").write_text(json.dumps(info))
        assert qk("gc").returncode == 0
        assert bystander.poll() is None, "a process that merely reused the pid was signalled"
        assert not entry.exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_ten_parallel_detached_vms(qk: Any, state_root: Path) -> None:
    names = [f"par{i}" for i in range(10)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda n: qk("run", "--detach", "--name", n, *TCG,
                                             "--nic", "user,hostfwd=0:22"), names))
    try:
        assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
        listing = json.loads(qk("ls", "--json").stdout)
        assert sorted(e["name"] for e in listing) == names
        assert all(e["alive"] for e in listing)
        ports = {e["forwards"][0] for e in listing}
        assert len(ports) == 10 and not any(":0->" in p for p in ports)
        sockets = {str(state_root / n / "qmp.sock") for n in names}
        assert len(sockets) == 10 and all(Path(s).exists() for s in sockets)
    finally:
        with ThreadPoolExecutor(max_workers=10) as pool:
            stops = list(pool.map(lambda n: qk("stop", n, "--timeout", "5"), names))
    assert [s.returncode for s in stops] == [0] * 10, [s.stderr for s in stops]
    assert qemu_processes_under(state_root) == []
    assert list(state_root.iterdir()) == []


def test_console_interactive_and_detach_key(qk: Any, state_root: Path) -> None:
    import pty
    import select

    from tests.helpers import QEMUKIT

    assert qk("run", "--detach", "--name", "con1", *TCG, "--wait", "agent").returncode == 0
    master, slave = pty.openpty()
    proc = subprocess.Popen([QEMUKIT or "qemukit", "console", "con1"], stdin=slave,
                            stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 20) -> None:
        nonlocal seen
        deadline = time.monotonic() + timeout
        while marker not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {marker!r} on the console; saw {seen[-300:]!r}"
            seen += os.read(master, 4096)

    try:
        read_until(b"Ctrl-] detaches")
        os.write(master, b"echo hello-$((40+2))\r")
        read_until(b"hello-42")
        os.write(master, b"\x1d")  # Ctrl-] detaches; the VM keeps running
        assert proc.wait(timeout=10) == 0
        entry = next(e for e in json.loads(qk("ls", "--json").stdout) if e["name"] == "con1")
        assert entry["state"] == "running"
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
        assert qk("stop", "con1").returncode == 0


def test_kill_ends_helper_daemons_too(qk: Any, state_root: Path, tmp_path: Path) -> None:
    out = qk("run", "--detach", "--name", "withfs", *TCG, "--share", f"{tmp_path}:/mnt/h")
    assert out.returncode == 0, out.stderr
    try:
        info = json.loads((state_root / "withfs" / "vm.json").read_text())
        # Its helpers: the share's virtiofsd and the detached VM's watcher (it caps the log).
        helpers = [pid for pid, _ in info["helpers"]]
        daemons = [pid for pid in helpers if "virtiofsd" in " ".join(psutil.Process(pid).cmdline())]
        assert len(daemons) == 1, [psutil.Process(pid).cmdline() for pid in helpers]
        helper_pid = daemons[0]
        # A stopped virtiofsd cannot exit by itself when QEMU goes away: only kill's own
        # signal to the helper can end it.
        os.kill(helper_pid, signal.SIGSTOP)
        assert qk("kill", "withfs").returncode == 0
        deadline = time.monotonic() + 5
        while not (qemu_gone(info["pid"]) and all(map(qemu_gone, helpers))) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qemu_gone(info["pid"]) and all(map(qemu_gone, helpers))
        assert not (state_root / "withfs").exists()
    finally:  # a failure above must not leave the detached VM to the rest of the session
        if (state_root / "withfs").exists():
            qk("kill", "withfs")
