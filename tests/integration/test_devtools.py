"""cp, shell and self-forwarding ports against a real tiny guest, detached as a developer runs it.

One VM for the module, started the way a user starts it (``qemukit run
--detach --forward-auto``), so the port watcher left behind is the real one,
and stopped at the end, which must end the watcher too.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemukit import VM
from tests.helpers import qemu_gone, run_qemukit, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("devtools")]



@pytest.fixture(scope="module")
def dev_vm(tiny_image: Any) -> Iterator[str]:
    name = f"devtools-{secrets.token_hex(3)}"
    r = run_qemukit("run", "--image", "tiny", "--accel", "tcg", "--name", name, "--nic", "user",
                    "--detach", "--wait", "agent", "--forward-auto", "--timeout", "240")
    assert r.returncode == 0, r.stderr
    watcher = _watcher_pid(name)
    yield name
    r = run_qemukit("stop", name)
    assert r.returncode == 0, r.stderr
    wait_until(lambda: qemu_gone(watcher), 30, "the port watcher to end with the VM")


def _watcher_pid(name: str) -> int:
    info = json.loads((Path(os.environ["QEMUKIT_STATE"]) / name / "vm.json").read_text())
    (pid, _start), = info["helpers"]
    assert "--watch" in psutil.Process(pid).cmdline()
    return int(pid)


def _guest(name: str, script: str) -> str:
    r = run_qemukit("exec", name, "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_cp_of_a_20mb_binary_file_both_ways_is_byte_identical(dev_vm: str, tmp_path: Path) -> None:
    data = os.urandom(20 * 1024 * 1024)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    src.chmod(0o640)
    r = run_qemukit("cp", str(src), f"{dev_vm}:/tmp/")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no terminal: no progress line
    out = _guest(dev_vm, "md5sum /tmp/blob.bin; stat -c %a /tmp/blob.bin; ls -a /tmp")
    assert out.split()[0] == hashlib.md5(data).hexdigest()
    assert out.split()[2] == "640"
    assert "qemukit-tmp" not in out
    back = tmp_path / "back.bin"
    r = run_qemukit("cp", f"{dev_vm}:/tmp/blob.bin", str(back))
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == data
    assert back.stat().st_mode & 0o777 == 0o640


def test_cp_r_copies_a_nested_tree_keeping_modes(dev_vm: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "a" / "b" / "run.sh").chmod(0o750)
    (tree / "a" / "zero").write_bytes(bytes(range(256)))
    (tree / "a" / "zero").chmod(0o600)
    (tree / "a").chmod(0o711)
    vm = VM.attach(dev_vm)
    try:
        assert vm.copy_in(tree, "/root", recursive=True) == "/root/tree"
        out = vm.exec("cd /root/tree && stat -c '%n %a' a a/b/run.sh a/zero && a/b/run.sh",
                      check=True).stdout_text
        assert out.split("\n")[:4] == ["a 711", "a/b/run.sh 750", "a/zero 600", "hi"]
        back = vm.copy_out("/root/tree", tmp_path / "back", recursive=True)
    finally:
        vm.detach()
    assert back == tmp_path / "back"
    assert (back / "a" / "zero").read_bytes() == bytes(range(256))
    assert (back / "a" / "b" / "run.sh").stat().st_mode & 0o777 == 0o750
    assert (back / "a").stat().st_mode & 0o777 == 0o711


def test_a_missing_path_on_either_side_is_a_clear_error_and_changes_nothing(
        dev_vm: str, tmp_path: Path) -> None:
    before_guest = _guest(dev_vm, "ls -la /tmp")
    r = run_qemukit("cp", f"{dev_vm}:/tmp/no-such-file", str(tmp_path / "x"))
    assert r.returncode == 125
    assert "no such file or directory in the guest: /tmp/no-such-file" in r.stderr
    r = run_qemukit("cp", str(tmp_path / "no-such-file"), f"{dev_vm}:/tmp/")
    assert r.returncode == 125
    assert "no such file or directory on the host" in r.stderr
    (tmp_path / "f").write_bytes(b"x")
    r = run_qemukit("cp", str(tmp_path / "f"), f"{dev_vm}:/no/such/dir/f")
    assert r.returncode == 125
    assert "no such directory in the guest: /no/such/dir" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    assert _guest(dev_vm, "ls -la /tmp") == before_guest
    assert "vport" not in _guest(dev_vm, "ls /dev | grep vport | grep -v vport1p1 || true")


def _forwards(name: str) -> list[dict[str, Any]]:
    r = run_qemukit("ports", name, "--json")
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def test_a_guest_listener_is_forwarded_by_itself_and_the_forward_goes_with_it(
        dev_vm: str) -> None:
    _guest(dev_vm, "setsid nc -l -p 8123 </dev/null >/tmp/nc.out 2>&1 &")

    def forwarded() -> dict[str, Any] | None:
        return next((f for f in _forwards(dev_vm) if f["guest_port"] == 8123), None)

    fw = wait_until(forwarded, 60, "a forward of guest port 8123 in qemukit ports")
    assert fw["proto"] == "tcp" and fw["kind"] == "auto" and fw["host_addr"] == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", fw["host_port"]), timeout=30) as conn:
        conn.sendall(b"through-the-auto-forward\n")
    wait_until(lambda: "through-the-auto-forward" in _guest(dev_vm, "cat /tmp/nc.out"), 30,
               "the guest's nc to receive the line")
    # busybox nc -l serves one connection and exits: the forward must go.
    wait_until(lambda: forwarded() is None, 60, "the forward of 8123 to be removed")
    table = run_qemukit("ports", dev_vm).stdout
    assert "8123" not in table


def test_shell_one_shot_propagates_the_exit_status(dev_vm: str) -> None:
    r = run_qemukit("shell", dev_vm, "--", "sh", "-c", "echo from-shell; exit 7")
    assert r.returncode == 7
    assert r.stdout == "from-shell\n"
