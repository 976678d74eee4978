"""QEMU's gdb stub: on 127.0.0.1 only, answering gdb's remote protocol, halting when asked."""

from __future__ import annotations

import json
import socket
from typing import Any

import psutil
import pytest

from qemukit import VM, SpecError, VMSpec

pytestmark = pytest.mark.integration


def rsp(sock: socket.socket, packet: str) -> str:
    """Send one gdb remote-protocol packet; return the reply's payload (acks handled)."""
    checksum = sum(packet.encode()) % 256
    sock.sendall(f"${packet}#{checksum:02x}".encode())
    data = b""
    while not (b"$" in data and b"#" in data[data.index(b"$"):] and
               len(data) >= data.index(b"#", data.index(b"$")) + 3):
        chunk = sock.recv(4096)
        assert chunk, f"the stub closed the connection; got {data!r}"
        data += chunk
    sock.sendall(b"+")
    start = data.index(b"$") + 1
    return data[start:data.index(b"#", start)].decode()


def test_gdb_stub_answers_on_loopback_and_halts_with_gdb_wait(tiny_spec: VMSpec) -> None:
    with VM(tiny_spec.replace(gdb_port=0, gdb_wait=True)) as vm:
        host, port = vm.gdb_address()
        assert host == "127.0.0.1" and port > 0
        listening = [c.laddr for c in psutil.Process(vm.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", port)]
        assert vm.status() == "prelaunch"  # -S: nothing runs before the debugger says so
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.settimeout(30)
            assert "PacketSize=" in rsp(sock, "qSupported:multiprocess+")
            assert rsp(sock, "?").startswith("T")  # halted, with a stop reason


def test_gdb_wait_needs_a_port() -> None:
    with pytest.raises(SpecError, match="gdb_wait"):
        VMSpec(gdb_wait=True)
    with pytest.raises(SpecError, match="gdb_port"):
        VMSpec(gdb_port=70000)


def test_run_gdb_prints_the_gdb_command(qk: Any) -> None:
    out = qk("run", "--detach", "--name", "gdbvm", "--image", "tiny", "--accel", "tcg", "--gdb",
             "--json")
    try:
        assert out.returncode == 0, out.stderr
        address = json.loads(out.stdout)["gdb"]
        assert address.startswith("127.0.0.1:")
        assert f"gdb vmlinux -ex 'target remote {address}'" in out.stderr
    finally:
        assert qk("stop", "gdbvm").returncode == 0
