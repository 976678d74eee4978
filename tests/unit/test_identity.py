"""A restored clone's new identity, without QEMU: the MACs chosen, the keys made, the command."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from qemukit import Nic, VMSpec
from qemukit._wire.agent import ExecResult
from qemukit.errors import StateError
from qemukit.identity import host_keys, random_mac, reidentify
from qemukit.spec import CloudInit


class FakeClone:
    """Answers query-rx-filter like QEMU and records the agent command."""

    def __init__(self, spec: VMSpec, exit_status: int = 0) -> None:
        self.spec = spec
        self.exit_status = exit_status
        self.argv: list[str] = []

    async def qmp(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = 10.0) -> Any:
        assert command == "query-rx-filter"
        return [{"name": "net0", "main-mac": "52:54:00:12:34:56"},
                {"name": "net1", "main-mac": "52:54:00:aa:bb:cc"}]

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = 60.0,
                   check: bool = False, stdin: bytes | None = None) -> ExecResult:
        assert isinstance(command, list)
        self.argv = command
        stderr = b"sed: boom\n" if self.exit_status else b""
        return ExecResult(tuple(command), self.exit_status, b"", stderr, 0.1)


SPEC = VMSpec(agent="qga", cloud_init=CloudInit(ssh_user="alice"),
              nics=(Nic(), Nic(mac="52:54:00:aa:bb:cc")))


def test_random_macs_are_locally_administered_and_differ() -> None:
    macs = {random_mac() for _ in range(50)}
    assert len(macs) == 50
    assert all(re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", m) for m in macs)


def test_host_keys_are_new_each_time() -> None:
    first, second = host_keys("root@a"), host_keys("root@b")
    assert sorted(first) == ["ssh_host_ecdsa_key", "ssh_host_ecdsa_key.pub",
                             "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
    assert first["ssh_host_ed25519_key.pub"].startswith(b"ssh-ed25519 ")
    assert first["ssh_host_ecdsa_key.pub"].startswith(b"ecdsa-sha2-")
    assert all(first[name] != second[name] for name in first)


def test_only_nics_without_a_mac_of_their_own_get_a_new_one() -> None:
    clone = FakeClone(SPEC)
    keys = host_keys("root@web-1")
    ident = asyncio.run(reidentify(clone, "web-1", ["ssh-ed25519 AAAA me"], keys=keys))
    assert list(ident.macs) == ["net0"]
    script_args = clone.argv[4:]
    host, machine_id, user, authorized, pairs = script_args[:5]
    assert (host, user) == ("web-1", "alice")
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id) and machine_id == ident.machine_id
    assert base64.b64decode(authorized) == b"ssh-ed25519 AAAA me\n"
    assert pairs == f"52:54:00:12:34:56={ident.macs['net0']}"
    files = dict(zip(script_args[6::2], script_args[7::2], strict=True))
    assert {n: base64.b64decode(v) for n, v in files.items()} == keys
    assert ident.host_keys["ed25519"] == keys["ssh_host_ed25519_key.pub"].decode().strip()


def test_a_failing_guest_command_is_an_error_with_its_stderr() -> None:
    with pytest.raises(StateError, match="own identity failed.*sed: boom"):
        asyncio.run(reidentify(FakeClone(SPEC, exit_status=1), "web-1", [], keys={}))
