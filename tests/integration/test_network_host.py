"""The host on a private network only when asked, and qemu_network under two xdist workers.

Real tiny guests: the host fetches a page a VM on the network serves only after
``network_forward``; the guests still cannot reach the host's loopback through the
gateway; the gateway goes with the network. Two pytest-xdist workers run network
tests with the same VM names at the same time.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemukit import StateError, network_forward
from qemukit._launch.netaddr import GATEWAY_INDEX, network_address
from tests.helpers import qemu_processes_under
from tests.integration.test_network import PAGE, WGET_TIMEOUT, _gone, _host_fetch, _switches

pytestmark = pytest.mark.integration
pytest_plugins = ["pytester"]

SECRET = "the host's loopback only"


def _gateways(root: Path) -> list[psutil.Process]:
    return [p for p in qemu_processes_under(root) if "gateway.pid" in " ".join(p.cmdline())]


def _fetch(port: int, path: str = "/index.html", timeout: float = 120.0) -> str:
    """The page at 127.0.0.1:port (retried: the guest's server may take a moment under load)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as reply:
                return str(reply.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


class _Loopback:
    """An HTTP server on the host's 127.0.0.1 that a guest must not reach through the gateway."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                self.send_response(200)
                self.end_headers()
                self.wfile.write(SECRET.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_host_reaches_a_vm_only_when_asked_and_the_vms_gain_no_way_out(
        booted: Any, state_root: Path) -> None:
    server = booted(name="hweb", networks=["hostnet"])
    client = booted(name="hcli", networks=["hostnet"])
    server.succeed(["sh", "-c", f"mkdir -p /www && echo '{PAGE}' >/www/index.html && "
                                "httpd -p 80 -h /www"])
    address = server.networks["hostnet"].address
    # Not asked: no gateway, and the host has no way onto the network.
    assert PAGE not in _host_fetch(address)
    assert _gateways(state_root) == []
    with pytest.raises(StateError, match="no VM named 'nobody'"):
        network_forward("hostnet", "nobody", 80)
    assert _gateways(state_root) == []

    port = network_forward("hostnet", server, 80)
    assert _fetch(port).strip() == PAGE
    gateways = _gateways(state_root)
    assert len(gateways) == 1
    listening = {(c.laddr.ip, c.laddr.port) for c in gateways[0].net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {("127.0.0.1", port)}  # the host's loopback only, not 0.0.0.0
    # By the name it has on the network, a second forward, the same gateway.
    again = network_forward("hostnet", "hweb", 80)
    assert again != port and _fetch(again).strip() == PAGE
    assert _gateways(state_root) == gateways
    # The network works as before for the VMs.
    fetch = ["timeout", str(WGET_TIMEOUT), "wget", "-q", "-O", "-", "http://hweb/index.html"]
    assert client.succeed(fetch).strip() == PAGE

    # A VM cannot use the gateway to reach the host: the host's address on the network
    # (.254, which an unrestricted user network maps to the host's loopback) refuses it,
    # while the same server is there on the host's loopback.
    loopback = _Loopback()
    try:
        assert _fetch(loopback.port, "/") == SECRET
        host = network_address("hostnet", GATEWAY_INDEX)
        for vm in (client, server):
            out = vm.exec(["timeout", str(WGET_TIMEOUT), "wget", "-q", "-O", "-",
                           f"http://{host}:{loopback.port}/"], timeout=60)
            assert out.exit_status != 0 and SECRET not in out.stdout.decode(errors="replace")
            # Nor through a forward's port seen from inside.
            out = vm.exec(["timeout", str(WGET_TIMEOUT), "wget", "-q", "-O", "-",
                           f"http://{host}:{port}/index.html"], timeout=60)
            assert out.exit_status != 0
    finally:
        loopback.close()

    server.shutdown(timeout=10)
    assert _gateways(state_root) == gateways  # one VM left: the network and its gateway stay
    client.shutdown(timeout=10)
    assert _gone(lambda: _gateways(state_root)), "the gateway outlived its network"
    assert _gone(lambda: _switches(state_root)), "the switch outlived its last VM"
    assert not (state_root / ".net").exists()


XDIST_NETWORK_TESTS = """
import json, os, time
from pathlib import Path

WORKER = os.environ["PYTEST_XDIST_WORKER"]

def test_network(qemu_network):
    net = qemu_network("server", "client")
    server, client = net
    assert net.vm("server") is server
    server.succeed(["sh", "-c", f"mkdir -p /www && echo {WORKER} >/www/id && httpd -p 80 -h /www"])
    got = client.succeed(["timeout", "5", "wget", "-q", "-O", "-", "http://server/id"]).strip()
    port = net.forward("server", 80)
    Path(f"net-{WORKER}.json").write_text(json.dumps(
        {"worker": WORKER, "network": net.name, "vms": [server.name, client.name],
         "got": got, "port": port,
         "hosts": client.succeed(["cat", "/etc/hosts"])}))
    # Both workers' networks run at the same time: wait (bounded) for the other's record.
    deadline = time.monotonic() + 600
    while len(list(Path().glob("net-gw*.json"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(list(Path().glob("net-gw*.json"))) == 2
    # Still our own server, by the same name, with the other worker's one running.
    assert client.succeed(["timeout", "5", "wget", "-q", "-O", "-", "http://server/id"]).strip() \\
        == WORKER
"""


def test_two_xdist_workers_run_networks_with_the_same_names_at_once(
        pytester: pytest.Pytester, state_root: Path) -> None:
    """``--dist each``: both workers boot "server" and "client" on a network at once."""
    before = set(state_root.iterdir())
    pytester.makepyfile(test_nets=XDIST_NETWORK_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--dist", "each",
                                           timeout=900)
    result.assert_outcomes(passed=2)
    records = [json.loads((pytester.path / f"net-gw{i}.json").read_text()) for i in (0, 1)]
    for rec in records:
        assert rec["got"] == rec["worker"]  # "server" was this worker's own
        assert rec["vms"] == [f"{rec['worker']}-server", f"{rec['worker']}-client"]
        assert rec["network"].startswith(rec["worker"] + "-")
        assert " server # qemukit-net" in rec["hosts"] and " client # qemukit-net" in rec["hosts"]
    assert len({r["network"] for r in records}) == 2
    assert len({r["port"] for r in records}) == 2
    assert set(state_root.iterdir()) == before
    assert qemu_processes_under(state_root) == []
    assert _gone(lambda: _switches(state_root))
