"""QEMU's gdb stub: a Unix socket only the VM's owner reaches, TCP only when asked (and
warned about), answering gdb's remote protocol, halting when asked.

The door: the stub passes gdb's ``monitor`` packets (``qRcmd``) to QEMU's human
monitor, so whoever connects runs ``dump-guest-memory FILE`` and the like as the
VM's owner. Another local user must not get that far.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
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


# What another local user runs: connect to the stub and ask QEMU's monitor for its version
# through gdb's `monitor info version` (qRcmd, hex-encoded, framed with its checksum).
# Prints "refused ERRNO" or "answered TEXT" (the monitor's output, decoded).
ATTACKER = r"""
import socket, sys
addr = sys.argv[1]
try:
    if addr.startswith("/"):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(60)
        s.connect(addr)
    else:
        host, port = addr.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=60)
except OSError as exc:
    print("refused", exc.errno)
    sys.exit(0)
cmd = "qRcmd," + b"info version".hex()
s.sendall(("$%s#%02x" % (cmd, sum(cmd.encode()) % 256)).encode())
data = b""
while b"$OK#" not in data and b"$E" not in data:
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
s.sendall(b"+")
text = ""
for part in data.split(b"$")[1:]:
    payload = part.split(b"#", 1)[0]
    if payload.startswith(b"O") and payload != b"OK":
        text += bytes.fromhex(payload[1:].decode()).decode(errors="replace")
print("answered", text.strip())
"""


@pytest.fixture(scope="module")
def other_user() -> Iterator[str]:
    """A second local user (created for the test; needs root)."""
    if os.geteuid() != 0:
        pytest.skip("making a second local user needs root (useradd)")
    if shutil.which("useradd") is None or shutil.which("runuser") is None:
        pytest.skip("running as root without useradd/runuser: cannot make a second user")
    name = f"qkgdb{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", name],
                   check=True, capture_output=True, text=True)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


def attack(user: str, address: str) -> str:
    """``ATTACKER`` run as ``user`` against the stub at ``address``: its one line of output."""
    out = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-I", "-c", ATTACKER,
                          address], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_gdb_stub_is_a_private_socket_and_halts_with_gdb_wait(tiny_spec: VMSpec) -> None:
    with VM(tiny_spec.replace(gdb=True, gdb_wait=True)) as vm:
        address = vm.gdb_address()
        assert vm.runtime is not None
        assert address == str(vm.runtime.gdb_socket)
        assert stat.S_ISSOCK(os.stat(address).st_mode)
        # Only the owner can reach it: the socket sits in the owner's 0700 directory.
        assert stat.S_IMODE(os.stat(Path(address).parent).st_mode) == 0o700
        assert Path(address).parent.stat().st_uid == os.geteuid()
        # ...and nothing listens on the network for it.
        assert [c for c in psutil.Process(vm.pid).net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN] == []
        assert vm.status() == "prelaunch"  # -S: nothing runs before the debugger says so
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(address)
            assert "PacketSize=" in rsp(sock, "qSupported:multiprocess+")
            assert rsp(sock, "?").startswith("T")  # halted, with a stop reason


def test_real_gdb_attaches_over_the_socket(tiny_spec: VMSpec) -> None:
    """The printed command line's `target remote PATH`, with Debian's gdb."""
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed (apt-get install gdb)")
    with VM(tiny_spec.replace(gdb=True, gdb_wait=True)) as vm:
        out = subprocess.run([gdb, "-nx", "-batch", "-ex", f"target remote {vm.gdb_address()}",
                              "-ex", "info registers rip"],
                             capture_output=True, text=True, timeout=120, check=False)
        assert out.returncode == 0, out.stderr
        assert re.search(r"^rip\s+0x[0-9a-f]+", out.stdout, re.MULTILINE), out.stdout + out.stderr


def test_another_local_user_cannot_reach_the_stub(tiny_spec: VMSpec, other_user: str) -> None:
    """The attack: a second local user connects and sends `monitor info version`."""
    with VM(tiny_spec.replace(gdb=True)) as vm:
        result = attack(other_user, vm.gdb_address())
        assert result.startswith("refused"), result
        assert vm.status() == "running"  # and nothing it did stopped the guest


def test_tcp_stub_only_when_asked_warns_and_is_open_to_every_local_user(
        tiny_spec: VMSpec, other_user: str) -> None:
    """What the warning says is true: on TCP the same attack gets QEMU's monitor."""
    with pytest.warns(UserWarning, match="any local user who can connect there controls the VM"):
        vm = VM(tiny_spec.replace(gdb_port=0))
        vm.start()
    try:
        host, port = vm.gdb_address().rsplit(":", 1)
        assert host == "127.0.0.1" and int(port) > 0
        listening = [c.laddr for c in psutil.Process(vm.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
        assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", int(port))]
        result = attack(other_user, vm.gdb_address())
        assert result.startswith("answered"), result
        assert re.search(r"\d+\.\d+\.\d+", result), result  # QEMU's version, e.g. 7.2.22
    finally:
        vm.kill()


def test_gdb_spec_fields() -> None:
    with pytest.raises(SpecError, match="gdb_wait"):
        VMSpec(gdb_wait=True)
    with pytest.raises(SpecError, match="gdb_port"):
        VMSpec(gdb_port=70000)
    assert VMSpec(gdb_port=0).gdb  # an older spec's port still means a (TCP) stub
    assert VMSpec(gdb=True, gdb_wait=True).gdb_port is None


def test_run_gdb_prints_the_gdb_command(qk: Any) -> None:
    out = qk("run", "--detach", "--name", "gdbvm", "--image", "tiny", "--accel", "tcg", "--gdb",
             "--json")
    try:
        assert out.returncode == 0, out.stderr
        address = json.loads(out.stdout)["gdb"]
        assert address.endswith("/gdbvm/gdb.sock") and os.path.isabs(address)
        assert f"gdb vmlinux -ex 'target remote {address}'" in out.stderr
        assert "any local user" not in out.stderr
    finally:
        assert qk("stop", "gdbvm").returncode == 0


def test_run_gdb_tcp_warns_in_one_line(qk: Any) -> None:
    out = qk("run", "--detach", "--name", "gdbtcp", "--image", "tiny", "--accel", "tcg",
             "--gdb", "tcp:0", "--json")
    try:
        assert out.returncode == 0, out.stderr
        address = json.loads(out.stdout)["gdb"]
        assert address.startswith("127.0.0.1:")
        assert f"gdb vmlinux -ex 'target remote {address}'" in out.stderr
        warning = [line for line in out.stderr.splitlines() if "any local user" in line]
        assert len(warning) == 1, out.stderr
    finally:
        assert qk("stop", "gdbtcp").returncode == 0
