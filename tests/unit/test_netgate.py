"""The host on a private network when asked: the switch's gateway QEMU, without guests.

Members are sockets speaking QEMU's stream framing (as in test_network.py); the gateway
is the real QEMU (``-machine none``, no guest), so what it answers on the network and
where it listens on the host are checked here; real guests in tests/integration.
"""

from __future__ import annotations

import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from qemukit import SpecError, StateError
from qemukit._launch.netaddr import (
    GATEWAY_INDEX,
    MAX_MEMBERS,
    gateway_macs,
    network_address,
    network_dir,
)
from qemukit._launch.netgate import _forwards, gateway_argv
from qemukit._launch.netswitch import forward, join
from tests.helpers import qemu_processes_under, wait_until

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")


def _switches(root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if ("qemukit._launch.netswitch" in cmd and str(root) in cmd
                and proc.info["status"] != psutil.STATUS_ZOMBIE):
            found.append(proc)
    return found



@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    for proc in (*_switches(tmp_path), *qemu_processes_under(tmp_path)):  # a failed test's
        proc.kill()


def _arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    mac = bytes.fromhex(src_mac.replace(":", ""))
    body = (b"\xff" * 6 + mac + b"\x08\x06"
            + struct.pack(">HHBBH", 1, 0x0800, 6, 4, 1) + mac + socket.inet_aton(src_ip)
            + b"\0" * 6 + socket.inet_aton(target_ip))
    body += b"\0" * (60 - len(body))
    return struct.pack(">I", len(body)) + body


def _read_frame(sock: socket.socket) -> bytes:
    header = b""
    while len(header) < 4:
        chunk = sock.recv(4 - len(header))
        assert chunk, "the switch closed the link"
        header += chunk
    (size,) = struct.unpack(">I", header)
    frame = b""
    while len(frame) < size:
        chunk = sock.recv(size - len(frame))
        assert chunk
        frame += chunk
    return frame


def test_the_top_of_each_subnet_is_the_hosts() -> None:
    assert MAX_MEMBERS == 223 and GATEWAY_INDEX == 254
    macs = gateway_macs("lan")
    host = network_address("lan", GATEWAY_INDEX)
    assert "52:55:" + ":".join(f"{int(b):02x}" for b in host.split(".")) in macs
    argv = gateway_argv("/usr/bin/qemu-system-x86_64", "lan", Path("/s/.net/lan/gateway.pid"), 5, 6)
    joined = " ".join(argv)
    assert "restrict=on" in joined and f"host={host}" in joined and "-machine none" in joined
    assert "hostfwd" not in joined  # nothing forwarded until asked
    assert "-sandbox" in argv and "addr.str=5" in joined and "fd=6" in joined


def test_forwards_are_read_from_info_usernet() -> None:
    listing = ("Hub 0 (host):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address  "
               "Port RecvQ SendQ\r\n  TCP[HOST_FORWARD]  13       127.0.0.1 45747       10.70.1.2"
               "    22     0     0\r\n  TCP[ESTABLISHED]   9       10.70.1.254 41667  10.70.1.1"
               "    80     0     0\r\n")
    assert _forwards(listing) == {(45747, "10.70.1.2", 22)}


def test_a_forward_needs_a_running_network_a_member_and_a_sane_request(root: Path) -> None:
    qemu = QEMU or "/usr/bin/qemu-system-x86_64"
    with pytest.raises(StateError, match="no VM running"):
        forward(root, "lan", "web", 80, qemu)
    with pytest.raises(SpecError) as err:
        forward(root, "lan", "web", 0, qemu)
    assert err.value.field == "port"
    with pytest.raises(SpecError):
        forward(root, "la,n", "web", 80, qemu)
    a, _ = join(root, "lan", "web")
    try:
        with pytest.raises(StateError, match="no VM named 'db'.*its VMs: web"):
            forward(root, "lan", "db", 80, qemu)
        with pytest.raises(StateError, match="bad QEMU"):
            forward(root, "lan", "web", 80, "/bin/sh")
        assert not qemu_processes_under(root)  # refused requests start no gateway
    finally:
        a.close()
    wait_until(lambda: not _switches(root), 30, 'not _switches(root)', interval=0.05)


def test_a_member_name_that_would_inject_hosts_lines_is_refused(root: Path) -> None:
    """Names go into guests' /etc/hosts: a newline in one would add a line of its choosing."""
    with pytest.raises(SpecError, match="bad introduction"):
        join(root, "lan", "web\n10.0.0.1 bank")


@needs_qemu
def test_a_forward_starts_one_gateway_on_127_0_0_1_that_goes_with_the_network(root: Path) -> None:
    assert QEMU is not None
    a, member = join(root, "lan", "web")
    a.settimeout(10)
    try:
        port = forward(root, "lan", "web", 80, QEMU)
        gateways = qemu_processes_under(root)
        assert len(gateways) == 1  # found by the suite's leak check: the state dir is on its line
        gateway = gateways[0]
        assert gateway.ppid() == _switches(root)[0].pid  # the switch's child
        listening = [c.laddr for c in gateway.net_connections("tcp") if c.status == "LISTEN"]
        assert [(addr.ip, addr.port) for addr in listening] == [("127.0.0.1", port)]
        second = forward(root, "lan", "web", 22, QEMU)
        assert second != port and qemu_processes_under(root) == [gateway]

        # The gateway is on the network: it answers ARP for the host's address, from its MAC.
        host = network_address("lan", GATEWAY_INDEX)
        a.sendall(_arp_request(member.mac, member.address, host))
        deadline = time.monotonic() + 20
        while True:
            frame = _read_frame(a)
            if frame[12:14] == b"\x08\x06" and frame[28:32] == socket.inet_aton(host):
                break
            assert time.monotonic() < deadline, "no ARP answer from the gateway"
        assert ":".join(f"{b:02x}" for b in frame[6:12]) in gateway_macs("lan")
    finally:
        a.close()
    wait_until(lambda: not qemu_processes_under(root), 30, "the gateway outlived its network",
               interval=0.05)
    wait_until(lambda: not _switches(root), 30, 'not _switches(root)', interval=0.05)
    wait_until(lambda: not network_dir(root, "lan").exists(), 30, "the network's directory to go",
               interval=0.05)


def test_the_switch_lists_who_is_on_the_network_now(root: Path) -> None:
    """A VM configured after others joined reads them here (its welcome predates them)."""
    from qemukit._launch.netswitch import members

    assert members(root, "lan") == {}  # no switch: nobody
    a, _ = join(root, "lan", "web")
    b, _ = join(root, "lan", "db", "02:00:00:00:00:0b")  # an alias's MAC is its VM's
    try:
        assert members(root, "lan") == {"web": 1, "db": 2}
    finally:
        a.close()
        b.close()
    wait_until(lambda: not _switches(root), 30, 'not _switches(root)', interval=0.05)


def test_a_vm_cannot_pose_as_the_hosts_gateway(root: Path) -> None:
    """The gateway's MACs are its own: a member sending from one is dropped like any spoof."""
    from tests.unit.test_network import _frame

    a, ma = join(root, "lan", "web")
    b, mb = join(root, "lan", "db")
    b.settimeout(0.5)
    try:
        for mac in sorted(gateway_macs("lan")):
            a.sendall(_frame(mb.mac, mac))
        with pytest.raises(TimeoutError):
            b.recv(4096)
        a.sendall(_frame(mb.mac, ma.mac))  # its own MAC still goes through
        b.settimeout(10)
        assert b.recv(4096) == _frame(mb.mac, ma.mac)
    finally:
        a.close()
        b.close()
    wait_until(lambda: not _switches(root), 30, 'not _switches(root)', interval=0.05)
