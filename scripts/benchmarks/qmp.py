"""``query-status`` round trips through the clients of one QEMU: what qemukit's sync API costs.

One QEMU (so one binary, the one qemukit found) serves every contender. The
goal (issue 13) is qemukit's sync API within 1.25x of qemu.qmp's async client
in every run. The clients and the monitor socket each talks to:

* ``qemukit_sync``: ``VM.qmp()`` on the VM that started QEMU. It talks over the
  owner monitor: our end of an AF_UNIX stream socketpair whose other end QEMU
  got at spawn (chardev ``qmp-owner``, ``socket,fd=N``).
* ``qemu_qmp_async``: qemu.qmp's ``QMPClient`` connected to ``qmp.sock`` (chardev
  ``qmp-shared``, a listening AF_UNIX stream socket), in an asyncio loop of its
  own in this thread, its calls timed inside the loop: its best case, with no
  thread hand-off.
* ``qemukit_sync_attached``: the same sync API on ``VM.attach(name)``, over
  ``qmp.sock`` like qemu.qmp: the control for "is it the socket or the client?",
  timed against ``qemukit_sync_beside_attached`` (the owner's ``VM.qmp()`` again).
* ``plain_socket``: JSON lines written to ``qmp.sock`` by hand: the floor.

Both sockets are AF_UNIX stream sockets into a QEMU socket chardev in control
mode, so once connected the kernel and QEMU do the same work for either; the
result's ``sockets`` and ``chardevs`` say which each contender used.

A run is ``calls`` calls per contender. The two clients of a comparison are
connected at once and alternate in blocks of :data:`BLOCK` calls, the order
flipping every block, so a load spike on this shared machine hits both, not
one: ``ratios_per_run`` (round by round) measure the clients, not the moment.
The groups (the goal's pair, the socket control, the floor) rotate their order
from run to run. ``ratio_max`` is the worst run.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from collections.abc import Callable
from typing import Any

from qemukit import VM

from .common import (
    Result,
    interleave_groups,
    per_run_ratios,
    qemu_binary,
    ratio,
    summary,
    tiny_spec,
)

GOAL = 1.25
#: Calls per block when two clients alternate within a run.
BLOCK = 50

#: A client under test: ``n`` -> seconds for ``n`` query-status round trips.
Client = Callable[[int], float]


def alternate(calls: int, block: int, **clients: Client) -> dict[str, float]:
    """Mean seconds per call of each client, the clients taking turns ``block`` calls at a time.

    The order of the turns reverses every block (a b, b a, a b, ...).
    """
    names = list(clients)
    totals = dict.fromkeys(names, 0.0)
    blocks = max(1, calls // block)
    for n in range(blocks):
        for name in names if n % 2 == 0 else names[::-1]:
            totals[name] += clients[name](block)
    return {name: total / (blocks * block) for name, total in totals.items()}


def sync_client(vm: VM) -> Client:
    """``vm.qmp("query-status")``, ``n`` times."""

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            vm.qmp("query-status")
        return time.perf_counter() - t0

    return run


async def _timed_calls(client: Any, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await client.execute("query-status")
    return time.perf_counter() - t0


def _goal_pair(vm: VM, path: str, calls: int) -> dict[str, float]:
    """qemukit's sync API (owner monitor) against qemu.qmp's async client (qmp.sock)."""
    from qemu.qmp import QMPClient

    loop = asyncio.new_event_loop()
    client: Any = QMPClient("bench")
    try:
        loop.run_until_complete(client.connect(path))

        def qemu_qmp(n: int) -> float:
            return float(loop.run_until_complete(_timed_calls(client, n)))

        result = alternate(calls, BLOCK, qemukit_sync=sync_client(vm), qemu_qmp_async=qemu_qmp)
        loop.run_until_complete(client.disconnect())
        return result
    finally:
        loop.close()


def _socket_control(vm: VM, calls: int) -> dict[str, float]:
    """The same sync API over qmp.sock (attached) and over the owner's socketpair."""
    attached = VM.attach(vm.name)
    try:
        return alternate(calls, BLOCK, qemukit_sync_attached=sync_client(attached),
                         qemukit_sync_beside_attached=sync_client(vm))
    finally:
        attached.detach()


def _plain_socket(path: str, calls: int) -> dict[str, float]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        stream = sock.makefile("rwb")
        stream.readline()
        stream.write(b'{"execute": "qmp_capabilities"}\n')
        stream.flush()
        stream.readline()
        t0 = time.perf_counter()
        for _ in range(calls):
            stream.write(b'{"execute": "query-status"}\n')
            stream.flush()
            while b'"return"' not in stream.readline():
                pass
        return {"plain_socket": (time.perf_counter() - t0) / calls}


def bench_qmp(runs: int, calls: int) -> Result:
    """Per-call ``query-status`` time of each client of one QEMU, and the per-run ratios."""
    with VM(tiny_spec()) as vm:
        vm.wait_ready()  # an idle guest: a booting one under TCG would eat a core
        assert vm.runtime is not None
        path = str(vm.runtime.qmp_socket)
        chardevs = {c["label"]: c["filename"] for c in vm.qmp("query-chardev")
                    if c["label"] in ("qmp-owner", "qmp-shared")}
        groups: list[Callable[[], dict[str, float]]] = [
            lambda: _goal_pair(vm, path, calls),
            lambda: _socket_control(vm, calls),
            lambda: _plain_socket(path, calls),
        ]
        for group in groups:  # warm up: imports, first connections
            group()
        res = interleave_groups(runs, *groups)
        binary, pid = vm.argv[0], vm.pid
    out = {k: summary(v) for k, v in res.items()}
    per_run = per_run_ratios(res["qemukit_sync"], res["qemu_qmp_async"])
    per_run_socket = per_run_ratios(res["qemukit_sync_attached"],
                                    res["qemukit_sync_beside_attached"])
    return {
        **out,
        "calls_per_run": calls,
        "calls_per_block": BLOCK,
        "ratio_qemukit_vs_qemu_qmp": ratio(out["qemukit_sync"], out["qemu_qmp_async"]),
        "ratios_per_run": per_run,
        "ratio_median": round(statistics.median(per_run), 3),
        "ratio_max": max(per_run),
        "goal": f"<= {GOAL} in every run",
        "goal_met": max(per_run) <= GOAL,
        # qmp.sock against the socketpair, same client: ~1.0 means the socket does not matter.
        "ratios_per_run_socket_control": per_run_socket,
        "sockets": {
            "qemukit_sync": "owner monitor: AF_UNIX stream socketpair, QEMU's end passed at "
                            "spawn (chardev qmp-owner)",
            "qemu_qmp_async": "qmp.sock (chardev qmp-shared), connected by path",
            "qemukit_sync_attached": "qmp.sock (chardev qmp-shared), via VM.attach()",
            "qemukit_sync_beside_attached": "owner monitor, as qemukit_sync",
            "plain_socket": "qmp.sock (chardev qmp-shared), connected by path",
        },
        "chardevs": chardevs,
        # One QEMU process serves every contender: the one qemukit started.
        "qemu_binary": {"found": qemu_binary(), "served_all": binary},
        "qemu_pid": pid,
    }
