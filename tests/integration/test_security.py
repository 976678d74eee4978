"""Safe defaults, checked on a running QEMU: seccomp, loopback-only ports, private
runtime files, QMP on TCP only when asked, privileges dropped when asked."""

from __future__ import annotations

import json
import os
import pwd
import socket
import stat
from pathlib import Path
from typing import Any

import psutil
import pytest

from qemukit import VM, VMSpec

pytestmark = pytest.mark.integration


def _listening(pid: int) -> list[Any]:
    return [c for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN]


def test_defaults_sandbox_loopback_forwards_private_files(booted: Any, tmp_path: Path) -> None:
    vm = booted(nics=("user,hostfwd=0:22", "user,hostfwd=udp:0:53"),
                shares=(f"{tmp_path}:/mnt/h",))
    status = Path(f"/proc/{vm.pid}/status").read_text()
    assert "Seccomp:\t2" in status  # QEMU runs under its seccomp filter
    assert any(a.startswith("on,obsolete=deny,elevateprivileges=deny,spawn=deny")
               for a in vm.argv)
    listeners = _listening(vm.pid)
    assert listeners, "the forward should be listening"
    assert {c.laddr.ip for c in listeners} == {"127.0.0.1"}  # never 0.0.0.0, and no QMP on TCP
    for path in vm.runtime.path.iterdir():
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} is {oct(mode)}"


def test_qmp_on_tcp_only_when_asked_and_on_loopback(tiny_spec: VMSpec) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.warns(UserWarning, match="127.0.0.1"):
        vm = VM(tiny_spec.replace(qmp_tcp_port=port)).start()
    try:
        assert vm.pid is not None
        assert [(c.laddr.ip, c.laddr.port) for c in _listening(vm.pid)] == [("127.0.0.1", port)]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            assert "QMP" in json.loads(sock.makefile().readline())
    finally:
        vm.shutdown(timeout=10)


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can make QEMU switch to another user")
def test_run_as_drops_qemu_to_that_user(tiny_spec: VMSpec) -> None:
    nobody = pwd.getpwnam("nobody")
    with VM(tiny_spec.replace(run_as="nobody")) as vm:
        uids = psutil.Process(vm.pid).uids()
        assert (uids.real, uids.effective, uids.saved) == (nobody.pw_uid,) * 3
        assert vm.exec(["true"]).ok
    assert vm.last_shutdown is not None and vm.last_shutdown.rung.value == "acpi"
