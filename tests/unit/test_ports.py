"""The port watcher's pure parts: /proc/net parsing, and one sync pass against a fake QEMU."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from qemukit._launch.runtime import RuntimeDir
from qemukit.ports import Listener, list_forwards, parse_proc_net, parse_proc_net_tables, sync_forwards

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


def test_a_sync_pass_adds_falls_back_to_a_free_port_and_removes(tmp_path: Path) -> None:
    vm: Any = FakeUsernet(tmp_path, busy={8080})
    got = asyncio.run(sync_forwards(vm, {Listener("tcp", 8123), Listener("tcp", 8080),
                                          Listener("tcp", 22)}))
    assert {(f.guest_port, f.host_port, f.host_addr) for f in got} == {
        (8123, 8123, "127.0.0.1"), (8080, 45000, "127.0.0.1")}
    kinds = {f.guest_port: f.kind for f in asyncio.run(list_forwards(vm))}
    assert kinds == {22: "static", 8080: "auto", 8123: "auto"}
    assert asyncio.run(sync_forwards(vm, {Listener("tcp", 8080)}))[0].guest_port == 8080
    assert [f[2] for f in vm.forwards] == [22, 8080]
    asyncio.run(sync_forwards(vm, set()))
    assert vm.forwards == [("tcp", 40022, 22)]  # the static forward is never touched
