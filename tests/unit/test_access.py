"""ssh, copies and the gdb stub as functions of a small target (qemukit._access), against a fake.

The real paths (a guest, sshd, the agent's port) run in tests/integration
(test_copy_race, test_hostile_copy, test_images_import, test_gdb); these
cover the choices made before anything moves, and what is asked of QEMU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qemukit import _access
from qemukit._launch.argv import GDB_CHARDEV
from qemukit._launch.runtime import RuntimeDir
from qemukit._launch.seed import KNOWN_HOSTS_FILE
from qemukit._wire.agent import ExecResult
from qemukit.errors import SpecError, StateError
from qemukit.guest import AsyncGuest
from qemukit.identity import CloneIdentity
from qemukit.spec import CloudInit, VMSpec

T = TypeVar("T")

USERNET = """Hub -1 (net0):
  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
  TCP[HOST_FORWARD]  13       0.0.0.0 40022       10.0.2.15    22     0     0
  TCP[HOST_FORWARD]  14     127.0.0.1 48080       10.0.2.15  8080     0     0
"""


class FakeTarget:
    """The least _access needs (AccessTarget): a spec, a runtime directory, QMP answers."""

    def __init__(self, spec: VMSpec, runtime: Path, chardevs: list[dict[str, Any]] | None = None
                 ) -> None:
        self.spec = spec
        self.name = "fake"
        self.runtime: RuntimeDir | None = RuntimeDir(runtime)
        self.identity: CloneIdentity | None = None
        self.chardevs = chardevs or []
        self.asked: list[str] = []

    @property
    def guest(self) -> AsyncGuest:
        raise AssertionError("no agent call expected")

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = 30.0, **kwargs: Any) -> Any:
        self.asked.append(command)
        if command == "human-monitor-command":
            return USERNET
        if command == "query-chardev":
            return self.chardevs
        raise AssertionError(command)

    async def guarded(self, aw: Awaitable[T], timeout: float | None, what: str) -> T:
        return await aw

    async def wait_ready(self, timeout: float | None = None) -> float:
        return 0.0

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = 60.0
                   ) -> ExecResult:
        raise AssertionError("no agent call expected")


def _target(tmp_path: Path, **spec: Any) -> FakeTarget:
    return FakeTarget(VMSpec(kernel="/vmlinuz", **spec), tmp_path)


def test_ssh_address_reads_the_forward_qemu_bound(tmp_path: Path) -> None:
    target = _target(tmp_path)
    assert asyncio.run(_access.ssh_address(target)) == ("127.0.0.1", 40022)
    assert asyncio.run(_access.ssh_address(target, 8080)) == ("127.0.0.1", 48080)
    with pytest.raises(StateError, match="forwards no host port to guest port 2222"):
        asyncio.run(_access.ssh_address(target, 2222))


def test_ssh_argv_logs_in_through_the_forward_and_quotes_each_word(tmp_path: Path) -> None:
    target = _target(tmp_path, cloud_init=CloudInit(ssh_user="alice"))
    argv = asyncio.run(_access.ssh_argv(target, ["echo", "a b"]))
    assert argv[:5] == ["ssh", "-p", "40022", "-l", "alice"]
    assert argv[-3:] == ["127.0.0.1", "--", "echo 'a b'"]
    assert "StrictHostKeyChecking=no" in argv  # qemukit knows no host key of this guest


def test_ssh_argv_pins_the_host_keys_qemukit_gave_the_guest(tmp_path: Path) -> None:
    (tmp_path / KNOWN_HOSTS_FILE).write_text("fake ssh-ed25519 AAAA\n")
    argv = asyncio.run(_access.ssh_argv(_target(tmp_path, cloud_init=CloudInit()), ["true"]))
    assert f"UserKnownHostsFile={tmp_path / KNOWN_HOSTS_FILE}" in argv
    assert "StrictHostKeyChecking=yes" in argv


@pytest.mark.parametrize(("agent", "cloud_init", "via", "expected"), [
    ("qemukit", False, "auto", "agent"),
    ("qemukit", True, "ssh", "ssh"),
    ("none", True, "auto", "ssh"),
])
def test_copy_via_picks_the_agent_when_there_is_one(tmp_path: Path, agent: str, cloud_init: bool,
                                                    via: str, expected: str) -> None:
    target = _target(tmp_path, agent=agent, cloud_init=CloudInit() if cloud_init else None)
    assert _access.copy_via(target, via) == expected


@pytest.mark.parametrize(("agent", "cloud_init", "via", "error", "message"), [
    ("qemukit", False, "scp", SpecError, "via"),
    ("none", True, "agent", StateError, "has no guest agent"),
    ("none", False, "auto", StateError, "no cloud-init seed"),
    ("qemukit", False, "ssh", StateError, "no cloud-init seed"),
])
def test_copy_via_refuses_before_anything_moves(tmp_path: Path, agent: str, cloud_init: bool,
                                                via: str, error: type[Exception],
                                                message: str) -> None:
    target = _target(tmp_path, agent=agent, cloud_init=CloudInit() if cloud_init else None)
    with pytest.raises(error, match=message):
        asyncio.run(_access.copy_in(target, tmp_path, "/tmp", via=via))  # type: ignore[arg-type]
    assert target.asked == []


def test_gdb_address_reads_the_bound_tcp_port_or_the_socket(tmp_path: Path) -> None:
    tcp = _target(tmp_path, gdb=True)
    tcp.chardevs = [{"label": "serial0", "filename": "unix:/x"},
                    {"label": GDB_CHARDEV, "filename": "disconnected:tcp:127.0.0.1:40937,server=on"}]
    assert asyncio.run(_access.gdb_address(tcp)) == "127.0.0.1:40937"
    unix = _target(tmp_path, gdb=True)
    unix.chardevs = [{"label": GDB_CHARDEV, "filename": "disconnected:unix:/run/gdb.sock,server=on"}]
    assert unix.runtime is not None
    assert asyncio.run(_access.gdb_address(unix)) == str(unix.runtime.gdb_socket)
    with pytest.raises(StateError, match="has no gdb stub"):
        asyncio.run(_access.gdb_address(_target(tmp_path)))
