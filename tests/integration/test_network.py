"""Private networks between VMs: real tiny guests talking by name over qemukit's switch.

Cold VMs (``booted``) get their NIC on the command line; the plugin's ``qemu_network``
boots warm clones, whose NICs are hot-plugged after the restore. As a normal user, two
detached VMs of the CLI share a network and nothing of it outlives them.
"""

from __future__ import annotations

import socket
import stat
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemukit._launch.netaddr import network_address, network_dir, network_mac
from tests.helpers import qemu_processes_under
from tests.integration.test_nonroot import NormalUser, normal_user  # noqa: F401 - a fixture

pytestmark = pytest.mark.integration

PAGE = "served over the private network"
#: How long the client's request may take (busybox's own ``wget -T`` segfaults in the
#: tiny image, so busybox ``timeout`` bounds it).
WGET_TIMEOUT = 5


def _switches(root: Path) -> list[psutil.Process]:
    """Live switch daemons serving networks under ``root`` (a zombie counts as gone)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            cmd = proc.info["cmdline"] or []
            if (proc.info["status"] != psutil.STATUS_ZOMBIE and "qemukit._launch.netswitch" in cmd
                    and str(root) in " ".join(cmd)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _host_fetch(address: str) -> str:
    """What the host gets asking ``address`` for the page: '' if it cannot reach it."""
    try:
        with socket.create_connection((address, 80), timeout=3) as conn:
            conn.settimeout(3)
            conn.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
            return conn.recv(4096).decode(errors="replace")
    except OSError:
        return ""


def _gone(check: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not check():
            return True
        time.sleep(0.2)
    return False


def test_client_reaches_server_by_name_block_cuts_it_and_the_host_is_not_on_it(
        booted: Any, state_root: Path) -> None:
    server = booted(name="web", networks=["lan"])
    client = booted(name="browser", networks=["lan"])
    lan = server.networks["lan"]
    assert lan.index == 1 and client.networks["lan"].index == 2
    assert lan.mac == network_mac("lan", "web")
    assert f"mac={lan.mac}" in ",".join(server.argv)  # stable: from the network and the name
    server.succeed(["sh", "-c", f"mkdir -p /www && echo '{PAGE}' >/www/index.html && "
                                "httpd -p 80 -h /www"])
    fetch = ["timeout", str(WGET_TIMEOUT), "wget", "-q", "-O", "-", "http://web/index.html"]
    assert client.succeed(fetch).strip() == PAGE
    # The server knows the client by name too (its line came after it was configured).
    server.succeed(["ping", "-c", "1", "-W", "5", "browser"])

    # The host has no interface on the network: the server's page cannot be had from here.
    # (Where the host's own network accepts any connection, the connect itself may succeed.)
    assert PAGE not in _host_fetch(lan.address)
    sock_dir = network_dir(state_root, "lan")
    assert stat.S_IMODE(sock_dir.stat().st_mode) == 0o700

    assert client.block("net-lan") == ["net-lan"]
    began = time.monotonic()
    failed = client.exec(fetch, timeout=60)
    assert failed.exit_status != 0
    assert time.monotonic() - began < WGET_TIMEOUT + 30  # the request's timeout, not ours
    client.unblock("net-lan")
    client.wait_until_succeeds(fetch, timeout=60)

    assert _switches(state_root)
    server.shutdown(timeout=10)
    client.shutdown(timeout=10)
    assert _gone(lambda: _switches(state_root)), "the switch outlived its last VM"
    assert _gone(sock_dir.exists), f"{sock_dir} outlived the switch"
    assert not (state_root / ".net").exists()


def test_warm_clones_join_a_network_after_restore(qemu_network: Any) -> None:
    """The plugin's fixture: warm clones (one saved state, no NIC in it) hot-plug theirs."""
    server, client = qemu_network("srv", "cli")
    network = next(iter(server.networks))
    assert client.networks[network].address != server.networks[network].address
    client.succeed(["ping", "-c", "1", "-W", "5", "srv"])
    server.succeed(["ping", "-c", "1", "-W", "5", "cli"])
    server.succeed(["sh", "-c", "echo hi | nc -l -p 7000 >/dev/null 2>&1 &"])
    client.wait_until_succeeds(["sh", "-c", "echo hello | nc -w 3 srv 7000"], timeout=60)


def test_two_cli_vms_share_a_network_as_a_normal_user(normal_user: NormalUser) -> None:  # noqa: F811
    """``qemukit run --detach --net``: two VMs of a normal user on one network, by name both
    ways (the second one's start tells the first, another process's VM, its name), and
    ``qemukit net forward`` gives the host a port into one of them."""
    try:
        for name in ("alpha", "beta"):
            out = normal_user.run("run", "--image", "tiny", "--accel", "tcg", "--name", name,
                                  "--net", "lan", "--detach")
            assert out.returncode == 0, out.stderr
        ping = normal_user.run("exec", "beta", "--", "ping", "-c", "1", "-W", "5", "alpha")
        assert ping.returncode == 0, ping.stderr + ping.stdout
        assert "1 packets received" in ping.stdout
        # The first VM learned the later one's name though another process started it.
        ping = normal_user.run("exec", "alpha", "--", "ping", "-c", "1", "-W", "5", "beta")
        assert ping.returncode == 0, ping.stderr + ping.stdout
        assert "1 packets received" in ping.stdout

        serve = normal_user.run("exec", "beta", "--", "sh", "-c",
                                f"mkdir -p /www && echo '{PAGE}' >/www/index.html && "
                                "httpd -p 80 -h /www")
        assert serve.returncode == 0, serve.stderr
        assert PAGE not in _host_fetch(network_address("lan", 2))
        fwd = normal_user.run("net", "forward", "lan", "beta:80")
        assert fwd.returncode == 0, fwd.stderr
        host, port = fwd.stdout.strip().rsplit(":", 1)
        assert host == "127.0.0.1"
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.settimeout(30)
            conn.sendall(b"GET /index.html HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := conn.recv(4096):
                reply += chunk
        assert PAGE in reply.decode(errors="replace")
    finally:
        for name in ("alpha", "beta"):
            normal_user.run("stop", name)
    state = normal_user.base / "state"
    assert _gone(lambda: _switches(state)), "the switch outlived its last VM"
    assert _gone(lambda: qemu_processes_under(state)), "a QEMU (the gateway?) outlived the network"
    assert _gone(lambda: (state / ".net").exists())


def test_two_cli_starts_at_once_know_each_other_by_name(qk: Any, state_root: Path) -> None:
    """Two ``run --detach`` whose starts overlap: each welcome predates the other VM, so the
    names come from the switch's list when each guest is configured (or the other's telling)."""
    import subprocess

    from tests.helpers import QEMUKIT

    assert QEMUKIT
    names = ("gamma", "delta")
    try:
        starts = [subprocess.Popen([QEMUKIT, "run", "--image", "tiny", "--accel", "tcg",
                                    "--name", name, "--net", "both", "--detach"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for name in names]
        for start in starts:
            out, err = start.communicate(timeout=300)
            assert start.returncode == 0, err
        for one, other in (names, names[::-1]):
            ping = qk("exec", one, "--", "ping", "-c", "1", "-W", "5", other)
            assert ping.returncode == 0, ping.stderr + ping.stdout
    finally:
        for name in names:
            qk("stop", name)
    assert _gone(lambda: _switches(state_root))



def test_a_start_that_fails_after_joining_leaves_no_switch(tiny_spec: Any, state_root: Path) -> None:
    """QEMU refuses its command line after the VM joined: the membership and the switch go."""
    from qemukit import VM, LaunchError

    vm = VM(tiny_spec.replace(name="doomed", networks=["gone"], extra_args=("-no-such-option",)))
    with pytest.raises(LaunchError):
        vm.start()
    assert _gone(lambda: _switches(state_root)), "the switch outlived a failed start"
    assert _gone(lambda: network_dir(state_root, "gone").exists())
