"""Private networks without QEMU: the spec's ``networks``, their argv, and the switch itself.

The switch is the real daemon (``python -m qemukit._launch.netswitch``) driven through
sockets speaking QEMU's stream framing, so what a hostile guest can send is tested here.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemukit import SpecError, VMSpec
from qemukit._launch.argv import build_argv
from qemukit._launch.netaddr import (
    NetworkMember,
    network_address,
    network_dir,
    network_mac,
    network_subnet,
)
from qemukit._launch.netswitch import MAX_FRAME, join
from tests.helpers import wait_until

from .test_argv import QEMU, check_golden, plumbing

TINY: dict[str, Any] = {"kernel": "/k", "initrd": "/i"}


@pytest.mark.parametrize("bad", ["a,b", "a/b", "../x", "a.b", "LAN", "", "-lan", "x" * 16, 7])
def test_a_bad_network_name_is_refused_naming_the_field(bad: object) -> None:
    with pytest.raises(SpecError) as err:
        VMSpec(networks=[bad])  # type: ignore[arg-type]
    assert err.value.field == "networks" and err.value.value == bad


def test_networks_are_checked_as_a_list_without_repeats() -> None:
    with pytest.raises(SpecError, match="must be a list"):
        VMSpec(networks="lan")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="twice"):
        VMSpec(networks=["lan", "lan"])  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="unique"):
        VMSpec(networks=["lan"], nics=[{"id": "net-lan"}])  # type: ignore[arg-type]


def test_networks_round_trip_through_toml(tmp_path: Path) -> None:
    spec = VMSpec(name="a", networks=["lan", "backend-2"])  # type: ignore[arg-type]
    assert spec.networks == ("lan", "backend-2")
    spec.dump(tmp_path / "a.toml")
    assert 'networks = ["lan", "backend-2"]' in (tmp_path / "a.toml").read_text()
    assert VMSpec.load(tmp_path / "a.toml") == spec


def test_golden_networks() -> None:
    spec = VMSpec(name="member", networks=("lan", "backend"), **TINY)
    argv = build_argv(spec, qemu=QEMU, accel="tcg", name="member",
                      plumbing=dataclasses.replace(plumbing("/run/user/1000/qemukit/member"),
                                                   network_fds=(7, 8)))
    check_golden("networks", argv)
    joined = " ".join(argv)
    assert f"mac={network_mac('lan', 'member')}" in joined and "addr.str=8" in joined


def test_a_network_without_its_connection_is_refused() -> None:
    with pytest.raises(SpecError, match="switch connection"):
        build_argv(VMSpec(networks=("lan",), **TINY), qemu=QEMU, accel="tcg",
                   plumbing=plumbing("/run/x"))


def test_macs_and_addresses_are_stable_and_private() -> None:
    mac = network_mac("lan", "web")
    assert mac == network_mac("lan", "web") != network_mac("lan", "db")
    first = int(mac.split(":")[0], 16)
    assert first & 2 and not first & 1  # locally administered, unicast
    subnet = network_subnet("lan")
    assert subnet.prefixlen == 24 and subnet.subnet_of(network_subnet("lan").supernet(16))
    assert not subnet.overlaps(network_subnet("lan").__class__("10.0.2.0/24"))  # QEMU's slirp
    assert network_address("lan", 3) == str(subnet.network_address + 3)


# -- the switch -------------------------------------------------------------------------------


def _frame(dst: str, src: str, payload: bytes = b"x" * 46) -> bytes:
    body = bytes.fromhex(dst.replace(":", "")) + bytes.fromhex(src.replace(":", "")) + b"\x08\x00"
    return struct.pack(">I", len(body + payload)) + body + payload


def _switch_pids(root: Path) -> list[int]:
    pids = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if ("qemukit._launch.netswitch" in cmd and str(root) in cmd
                and proc.info["status"] != psutil.STATUS_ZOMBIE):
            pids.append(proc.pid)
    return pids



@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for pid in _switch_pids(tmp_path):  # a failed test's switch: not left behind
        psutil.Process(pid).kill()


def _join(root: Path, name: str) -> tuple[socket.socket, NetworkMember]:
    sock, member = join(root, "lan", name)
    sock.settimeout(5)
    return sock, member


def test_members_get_indexes_frames_go_to_their_mac_and_nobody_poses_as_another(root: Path) -> None:
    a, ma = _join(root, "a")
    b, mb = _join(root, "b")
    c, mc = _join(root, "c")
    assert (ma.index, mb.index, mc.index) == (1, 2, 3)
    assert mc.hosts() == {n: network_address("lan", i) for n, i in (("a", 1), ("b", 2), ("c", 3))}
    directory = network_dir(root, "lan")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "switch.sock").stat().st_mode) == 0o600

    a.sendall(_frame(mb.mac, ma.mac))  # unicast: b only
    assert b.recv(4096) == _frame(mb.mac, ma.mac)
    a.sendall(_frame("ff:ff:ff:ff:ff:ff", ma.mac))  # broadcast: everyone else
    assert b.recv(4096) == c.recv(4096) == _frame("ff:ff:ff:ff:ff:ff", ma.mac)
    a.sendall(_frame(mb.mac, mc.mac))  # a posing as c: dropped
    a.sendall(_frame(mc.mac, ma.mac))  # and the next honest frame still flows
    assert c.recv(4096) == _frame(mc.mac, ma.mac)
    b.settimeout(0.5)
    with pytest.raises(TimeoutError):
        b.recv(4096)

    with pytest.raises(SpecError, match="already on network"):
        join(root, "lan", "a")
    # A VM that leaves frees its index for the next one.
    b.close()
    wait_until(lambda: join_index(root, "d") == 2, 20, 'join_index(root, "d") == 2', interval=0.05)
    for sock in (a, c):
        sock.close()


def join_index(root: Path, name: str) -> int | None:
    try:
        sock, member = join(root, "lan", name)
    except SpecError:
        return None
    sock.close()
    return member.index


def test_an_oversized_frame_ends_only_that_link(root: Path) -> None:
    a, ma = _join(root, "a")
    b, mb = _join(root, "b")
    a.sendall(struct.pack(">I", MAX_FRAME + 1) + b"\0" * 64)
    assert a.recv(4096) == b""  # the switch hung up on it
    c, mc = _join(root, "c")
    c.sendall(_frame(mb.mac, mc.mac))
    assert b.recv(4096) == _frame(mb.mac, mc.mac)
    for sock in (a, b, c):
        sock.close()


def test_the_switch_exits_and_cleans_up_with_its_last_member(root: Path) -> None:
    a, _ = _join(root, "a")
    b, _ = _join(root, "b")
    pids = _switch_pids(root)
    assert len(pids) == 1
    assert psutil.Process(pids[0]).ppid() != psutil.Process().pid  # init's, not ours to reap
    a.close()
    time.sleep(0.5)
    assert _switch_pids(root) == pids  # one member left: it stays
    b.close()
    wait_until(lambda: not _switch_pids(root), 20, "the switch outlived its last member", interval=0.05)
    wait_until(lambda: not (root / ".net").exists(), 20, "the network's files to go",
               interval=0.05)
    # The next join starts a new switch.
    c, mc = _join(root, "c")
    assert mc.index == 1
    c.close()
    wait_until(lambda: not _switch_pids(root), 20, 'not _switch_pids(root)', interval=0.05)


def test_a_second_user_of_the_state_dir_shares_the_switch_a_stale_socket_is_replaced(
        root: Path) -> None:
    directory = network_dir(root, "lan")
    directory.mkdir(parents=True, mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(directory / "switch.sock"))
    stale.close()  # a socket file nobody listens on: a switch that was killed
    a, ma = _join(root, "a")
    assert ma.index == 1
    code = ("import sys, json; from pathlib import Path; from qemukit._launch.netswitch import join;"
            " s, m = join(Path(sys.argv[1]), 'lan', 'other'); print(json.dumps(m.members))")
    out = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(out.stdout) == {"a": 1, "other": 2}
    a.close()
    wait_until(lambda: not _switch_pids(root), 20, 'not _switch_pids(root)', interval=0.05)


def test_another_user_cannot_reach_the_switch(root: Path) -> None:
    """The attack a multicast group on the loopback would allow: another local user joining."""
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    a, _ = _join(root, "a")
    path = str(network_dir(root, "lan") / "switch.sock")
    pid = os.fork()
    if pid == 0:  # the other user: nobody
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(path)
            except PermissionError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    a.close()
    assert os.waitstatus_to_exitcode(status) == 0, "another user connected to the switch"


def test_the_switch_refuses_another_user_even_where_its_directory_was_opened() -> None:
    """Defence in depth: with the network's directory and socket made world-accessible
    (a loosened umask, a chmod by hand), another user connects but the switch checks the
    peer's uid and closes without a welcome; the owner still joins."""
    import os
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    root = Path(tempfile.mkdtemp(prefix="qk-net-open-"))  # pytest's own tmp is 0700
    root.chmod(0o755)
    try:
        _switch_refuses_another_user(root)
    finally:
        for pid in _switch_pids(root):
            psutil.Process(pid).kill()
        shutil.rmtree(root, ignore_errors=True)


def _switch_refuses_another_user(root: Path) -> None:
    import os

    a, _ = _join(root, "a")
    directory = network_dir(root, "lan")
    for path, mode in ((root, 0o755), (root / ".net", 0o755), (directory, 0o755),
                       (directory / "switch.sock", 0o777)):
        if path.exists():
            path.chmod(mode)
    pid = os.fork()
    if pid == 0:  # nobody: connects, says hello as a member, must get no answer
        code = 1
        try:
            os.setgid(65534)
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            sock.connect(str(directory / "switch.sock"))
            try:
                sock.sendall(b'{"name": "intruder", "mac": "52:54:00:12:34:56"}\n')
                code = 0 if sock.recv(4096) == b"" else 2
            except (BrokenPipeError, ConnectionResetError):
                code = 0  # closed before the hello was read
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    b, mb = _join(root, "b")
    assert mb.members == {"a": 1, "b": 2}, mb.members
    a.close()
    b.close()
    assert os.waitstatus_to_exitcode(status) == 0, "the switch answered another user"


def test_the_switches_directory_is_no_vm_entry(root: Path) -> None:
    from qemukit._launch.runtime import list_entries

    a, _ = _join(root, "a")
    (root / "vm1").mkdir()
    assert [rd.name for rd, _ in list_entries(root)] == ["vm1"]
    a.close()


def test_an_unknown_network_of_a_vm_says_which_it_is_on() -> None:
    from qemukit._launch.netaddr import Networks

    nets = Networks("web")
    nets["lan"] = NetworkMember("lan", "web", 1, network_mac("lan", "web"))
    with pytest.raises(KeyError, match="not on network 'wan'; its networks: lan"):
        nets["wan"]


def test_the_cli_refuses_a_bad_network_before_anything_starts(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from qemukit.cli import main

    result = CliRunner().invoke(main, ["cmdline", "--kernel", "/nonexistent", "--initrd", "/x",
                                       "--net", "a,b"])
    assert result.exit_code != 0
    assert "networks" in result.output and "'a,b'" in result.output


# -- every wait of a join has the join's deadline ----------------------------------------------

_JOIN_ELSEWHERE = """
import json, sys, time
from pathlib import Path
from qemukit._launch.netswitch import join
start = time.monotonic()
try:
    sock, member = join(Path(sys.argv[1]), "lan", "a", timeout=float(sys.argv[2]))
except Exception as exc:
    out = {"error": type(exc).__name__, "message": str(exc)}
else:
    out = {"index": member.index}
out["took"] = time.monotonic() - start
print(json.dumps(out))
"""


def _join_elsewhere(root: Path, timeout: float) -> dict[str, object]:
    """Join from another process: a join that hangs (the old bug) is killed, not waited for."""
    try:
        done = subprocess.run([sys.executable, "-c", _JOIN_ELSEWHERE, str(root), str(timeout)],
                              capture_output=True, text=True, timeout=timeout + 60, check=True)
    except subprocess.TimeoutExpired:
        pytest.fail(f"join(timeout={timeout}) was still blocked {timeout + 60:.0f} s later")
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_a_switch_that_stopped_accepting_costs_a_joiner_its_timeout_not_forever(
        root: Path) -> None:
    """A switch's socket whose backlog is full and which never accepts (a stopped switch)."""
    directory = network_dir(root, "lan")
    directory.mkdir(parents=True, mode=0o700)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(directory / "switch.sock"))
    listener.listen(0)
    backlog = []
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(str(directory / "switch.sock"))
        except BlockingIOError:
            client.close()
            break
        backlog.append(client)
    try:
        result = _join_elsewhere(root, 2)
        assert result["error"] == "WaitTimeout", result
        assert "network 'lan'" in str(result["message"]), result
        assert "switch.sock" in str(result["message"]), result
        # The lock went with the failed join.
        with (root / ".net" / "lan.lock").open("rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # Room for one more, which is never answered: the welcome has the same deadline.
        backlog.append(listener.accept()[0])
        result = _join_elsewhere(root, 2)
        assert result["error"] == "WaitTimeout" and "welcome VM 'a'" in str(result["message"])
    finally:
        listener.close()
        for client in backlog:
            client.close()


def test_a_lock_file_that_cannot_be_opened_is_waited_for_until_the_timeout(root: Path) -> None:
    (root / ".net").mkdir(mode=0o700)
    (root / ".net" / "lan.lock").symlink_to(root / "gone" / "lan.lock")  # open() gets ENOENT
    result = _join_elsewhere(root, 1)
    assert result["error"] == "WaitTimeout", result
    assert "lan.lock" in str(result["message"]), result


def test_starting_the_switch_gets_the_time_left_and_its_timeout_is_translated(
        root: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A switch's starter that never returns: the join ends with its timeout, as WaitTimeout."""
    from qemukit import WaitTimeout

    stuck = tmp_path_factory.mktemp("bin") / "python"
    stuck.write_text("#!/bin/sh\nexec sleep 600\n")
    stuck.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stuck))
    start = time.monotonic()
    with pytest.raises(WaitTimeout, match="network 'lan''s switch to start") as err:
        join(root, "lan", "a", timeout=2)
    assert err.value.timeout == 2
    assert time.monotonic() - start < 20  # not the 30 s of JOIN_TIMEOUT


def test_a_switch_stopped_by_sigterm_removes_its_files(root: Path) -> None:
    import os
    import signal

    a, _ = _join(root, "a")
    (pid,) = _switch_pids(root)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not _switch_pids(root), 20, "the switch ignored SIGTERM", interval=0.05)
    assert a.recv(4096) == b""  # its members were disconnected
    a.close()
    assert not (root / ".net").exists(), sorted(str(p) for p in (root / ".net").rglob("*"))
    # And the network works again: a new switch starts.
    b, mb = _join(root, "b")
    assert mb.index == 1
    b.close()
    wait_until(lambda: not _switch_pids(root), 20, 'not _switch_pids(root)', interval=0.05)


def test_a_warm_clones_nics_are_awaited_within_their_timeout(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each check in the guest gets only the time left of NIC_APPEAR_TIMEOUT."""
    import asyncio
    from types import SimpleNamespace

    from qemukit import WaitTimeout
    from qemukit._launch.netaddr import Networks
    from qemukit.vm import _net

    monkeypatch.setattr(_net, "NIC_APPEAR_TIMEOUT", 1.0)

    class Clone:
        """What plug_after_restore uses of a VM; its guest never shows the NIC."""

        name = "clone"

        def __init__(self) -> None:
            self.networks = Networks("clone")
            self.spec = SimpleNamespace(hotplug_ports=1, networks=())
            self.monitor = SimpleNamespace(hand_over_fd=self.hand_over_fd)
            self.timeouts: list[float] = []

        async def hand_over_fd(self, fd: int, name: str) -> str:
            return name

        async def qmp(self, command: str, arguments: object = None) -> object:
            if command == "query-pci":
                return [{"devices": [{"qdev_id": "hp0", "pci_bridge": {"devices": []}}]}]
            return {}

        async def exec(self, argv: list[str], timeout: float) -> object:
            self.timeouts.append(timeout)
            await asyncio.sleep(min(timeout, 3.0))
            return SimpleNamespace(exit_status=1)

    clone = Clone()
    with pytest.raises(WaitTimeout, match="hot-plugged NICs of networks lan"):
        asyncio.run(_net.plug_after_restore(clone, root, ("lan",)))  # type: ignore[arg-type]
    assert clone.timeouts and max(clone.timeouts) <= 1.0, clone.timeouts
    wait_until(lambda: not _switch_pids(root), 20, 'not _switch_pids(root)', interval=0.05)


def test_gc_removes_the_files_of_a_killed_switch_and_never_a_live_ones(root: Path) -> None:
    """A switch killed with SIGKILL leaves its socket, log and lock file; ``gc`` removes
    them (the suite's leak check counts them as runtime entries left behind). A live
    switch and one whose lock is held are left alone."""
    from qemukit._launch.registry import gc

    a, _ = _join(root, "a")
    assert [x.name for x in gc(root)] == [], "gc touched a live switch"
    assert (network_dir(root, "lan") / "switch.sock").exists()
    pids = _switch_pids(root)
    assert pids
    for pid in pids:
        psutil.Process(pid).kill()
    wait_until(lambda: not _switch_pids(root), 20, 'not _switch_pids(root)', interval=0.05)
    a.close()
    assert (root / ".net").exists(), "the killed switch cleaned up after itself"
    held = os.open(root / ".net" / "lan.lock", os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # a joiner at work: not stale yet
        assert [x.name for x in gc(root)] == []
    finally:
        os.close(held)
    assert [(x.name, x.action) for x in gc(root)] == [(".net/lan", "removed")]
    assert not (root / ".net").exists()
    b, mb = _join(root, "b")  # the network starts again from nothing
    assert mb.index == 1
    b.close()
    wait_until(lambda: not _switch_pids(root), 20, 'not _switch_pids(root)', interval=0.05)
