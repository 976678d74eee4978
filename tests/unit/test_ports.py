"""The port watcher's pure parts: /proc/net parsing, one sync pass against a fake QEMU, the cap on
forwards, and the watcher's command line (no import from the current directory)."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qemukit import SpecError
from qemukit._launch.runtime import RuntimeDir
from qemukit.ports import (
    MAX_AUTO_FORWARDS,
    Listener,
    list_forwards,
    parse_proc_net,
    parse_proc_net_tables,
    sync_forwards,
    watcher_argv,
)

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1FB3 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:0277 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0F02000A:0016 0202000A:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1
   3: 0F02000A:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4 1
"""
TCP6 = """\
  sl  local_address                         remote_address                        st
   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A 0 0
   1: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 0 0
   2: 0000000000000000FFFF00000100007F:1F41 00000000000000000000000000000000:0000 0A 0 0
"""
UDP = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref
  10: 00000000:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 5 2
  11: 0F02000A:D431 0302000A:0035 01 00000000:00000000 00:00000000 00000000     0        0 6 2
  12: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 7 2
"""


def test_tcp_listeners_on_the_guest_address_or_any_but_not_loopback_or_connected() -> None:
    assert parse_proc_net(TCP, "tcp") == {Listener("tcp", 8115), Listener("tcp", 8080)}


def test_tcp6_any_listens_and_v6_or_mapped_loopback_is_left_out() -> None:
    assert parse_proc_net(TCP6, "tcp") == {Listener("tcp", 80)}


def test_udp_bound_with_no_remote_end_only() -> None:
    assert parse_proc_net(UDP, "udp") == {Listener("udp", 53)}


def test_garbage_lines_are_skipped() -> None:
    assert parse_proc_net("nonsense\n  0: zz:zz 00:00 0A\n\n", "tcp") == set()


def test_the_agent_script_output_splits_by_table() -> None:
    text = f"== tcp\n{TCP}== tcp6\n{TCP6}== udp\n{UDP}== udp6\n"
    assert parse_proc_net_tables(text) == {Listener("tcp", 8115), Listener("tcp", 8080),
                                           Listener("tcp", 80), Listener("udp", 53)}


class FakeUsernet:
    """Just enough of a VMTarget: HMP info usernet, hostfwd_add and hostfwd_remove."""

    def __init__(self, path: Path, busy: set[int]) -> None:
        self.runtime = RuntimeDir(path)
        self.name = "fake"
        self.busy = busy
        self.forwards: list[tuple[str, int, int]] = [("tcp", 40022, 22)]  # a static ssh forward
        self.next_free = 45000

    async def qmp(self, command: str, arguments: Any = None, **kwargs: Any) -> str:
        line = kwargs["command_line"]
        if line == "info usernet":
            rows = "".join(f"  {p.upper()}[HOST_FORWARD]  13  127.0.0.1 {h}  10.0.2.15 {g}  0 0\n"
                           for p, h, g in self.forwards)
            return "Hub -1 (net0-backend):\n  Protocol[State] FD ...\n" + rows
        m = re.fullmatch(r"hostfwd_add net0-backend (\w+):127\.0\.0\.1:(\d+)-:(\d+)", line)
        if m:
            proto, host, guest = m.group(1), int(m.group(2)), int(m.group(3))
            if host in self.busy:
                return "Could not set up host forwarding rule"
            if host == 0:
                host, self.next_free = self.next_free, self.next_free + 1
            self.forwards.append((proto, host, guest))
            return ""
        m = re.fullmatch(r"hostfwd_remove net0-backend (\w+):127\.0\.0\.1:(\d+)", line)
        assert m, line
        self.forwards = [f for f in self.forwards if (f[0], f[1]) != (m.group(1), int(m.group(2)))]
        return "removed"


def test_a_sync_pass_adds_at_kernel_picked_ports_and_removes(tmp_path: Path) -> None:
    vm: Any = FakeUsernet(tmp_path, busy={8080})
    got = asyncio.run(sync_forwards(vm, {Listener("tcp", 8123), Listener("tcp", 8080),
                                          Listener("tcp", 22)}))
    # Never the guest's number (it would squat the host's own 127.0.0.1:8123), nor 22.
    assert {(f.guest_port, f.host_port, f.host_addr) for f in got} == {
        (8080, 45000, "127.0.0.1"), (8123, 45001, "127.0.0.1")}
    kinds = {f.guest_port: f.kind for f in asyncio.run(list_forwards(vm))}
    assert kinds == {22: "static", 8080: "auto", 8123: "auto"}
    assert asyncio.run(sync_forwards(vm, {Listener("tcp", 8080)}))[0].guest_port == 8080
    assert [f[2] for f in vm.forwards] == [22, 8080]
    asyncio.run(sync_forwards(vm, set()))
    assert vm.forwards == [("tcp", 40022, 22)]  # the static forward is never touched


def test_a_guest_on_a_privileged_port_gets_no_privileged_host_port(tmp_path: Path) -> None:
    vm: Any = FakeUsernet(tmp_path, busy=set())
    got = asyncio.run(sync_forwards(vm, {Listener("tcp", 80), Listener("udp", 53)}))
    assert sorted(f.host_port for f in got) == [45000, 45001]
    assert all(h >= 1024 for _, h, g in vm.forwards if g != 22)


def test_the_cap_forwards_at_most_limit_listeners_and_logs_the_rest_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    vm: Any = FakeUsernet(tmp_path, busy=set())
    flood = {Listener("tcp", port) for port in range(20000, 20500)}  # a guest opening 500
    with caplog.at_level(logging.INFO, logger="qemukit.ports"):
        got = asyncio.run(sync_forwards(vm, flood, limit=3))
        assert sorted(f.guest_port for f in got) == [20000, 20001, 20002]
        assert len(vm.forwards) == 1 + 3
        skipped = [r for r in caplog.records if "not forwarded" in r.getMessage()]
        assert len(skipped) == 497
        caplog.clear()
        again = asyncio.run(sync_forwards(vm, flood, limit=3))  # the next look logs nothing new
    assert [f.guest_port for f in again] == [20000, 20001, 20002]
    assert not [r for r in caplog.records if "not forwarded" in r.getMessage()]
    # One listener goes away: a slot frees up for the lowest waiting one.
    asyncio.run(sync_forwards(vm, flood - {Listener("tcp", 20001)}, limit=3))
    assert sorted(g for _, _, g in vm.forwards if g != 22) == [20000, 20002, 20003]


def test_the_default_cap() -> None:
    assert MAX_AUTO_FORWARDS == 16
    with pytest.raises(SpecError, match="max_forwards"):
        asyncio.run(sync_forwards(Any, set(), limit=-1))  # type: ignore[arg-type]


# -- the watcher process does not import from the directory it was started in -----------------

PLANTED = """import pathlib
pathlib.Path({marker!r}).write_text(__name__)
raise SystemExit("planted module imported")
"""


@pytest.mark.parametrize("module", ["qemukit", "click"])
def test_the_watcher_does_not_import_modules_planted_in_the_cwd(tmp_path: Path, module: str,
                                                               state_root: Path) -> None:
    cwd = tmp_path / "project"
    cwd.mkdir()
    marker = tmp_path / "imported"
    (cwd / f"{module}.py").write_text(PLANTED.format(marker=str(marker)))
    argv = watcher_argv("no-such-vm")
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "QEMUKIT_STATE": str(state_root)})
    assert not marker.exists(), result.stderr
    assert result.returncode == 125 and "no VM named 'no-such-vm'" in result.stderr
    # The attack the old command line (no -P) let through:
    old = [a for a in argv if a != "-P"]
    subprocess.run(old, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert marker.read_text() == module
