"""``query-status`` round trips through the clients of one QEMU: what qemukit's sync API costs.

One QEMU (so one binary, the one qemukit found) serves every contender; each
round times ``calls`` calls per contender, interleaved, and reports the mean
per call. The contenders and the monitor socket each talks to:

* ``qemukit_sync``: ``VM.qmp()`` on the VM that started QEMU. It talks over the
  owner monitor: our end of an AF_UNIX stream socketpair whose other end QEMU
  got at spawn (chardev ``qmp-owner``, ``socket,fd=N``).
* ``qemukit_sync_attached``: the same sync API on ``VM.attach(name)``, which
  talks over the shared monitor ``qmp.sock`` (chardev ``qmp-shared``), the
  socket the two below use: the control for "is it the socket or the client?".
* ``qemu_qmp_async``: qemu.qmp's ``QMPClient`` connected to ``qmp.sock``, run
  in a fresh asyncio loop in this thread (its best case: no thread hand-off).
* ``plain_socket``: JSON lines written to ``qmp.sock`` by hand: the floor.

Both sockets are AF_UNIX stream sockets into a QEMU socket chardev in control
mode, so once connected the kernel and QEMU do the same work for either; the
result's ``sockets`` and ``chardevs`` say which each contender used.

The goal (issue 13): the sync API within 1.25x of qemu.qmp's async client in
every run. ``ratios_per_run`` are round by round (same round, same load),
``ratio_max`` is the worst of them.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from typing import Any

from qemukit import VM

from .common import Result, interleave, per_run_ratios, qemu_binary, ratio, summary, tiny_spec

GOAL = 1.25


async def _qemu_qmp_round(path: str, calls: int) -> float:
    from qemu.qmp import QMPClient

    client: Any = QMPClient("bench")
    await client.connect(path)
    try:
        t0 = time.perf_counter()
        for _ in range(calls):
            await client.execute("query-status")
        return (time.perf_counter() - t0) / calls
    finally:
        await client.disconnect()


def _plain_round(path: str, calls: int) -> float:
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
        return (time.perf_counter() - t0) / calls


def bench_qmp(runs: int, calls: int) -> Result:
    """Per-call ``query-status`` time of four clients of one QEMU, and the sync/async ratios."""
    with VM(tiny_spec()) as vm:
        vm.wait_ready()  # an idle guest: a booting one under TCG would eat a core
        assert vm.runtime is not None
        path = str(vm.runtime.qmp_socket)
        chardevs = {c["label"]: c["filename"] for c in vm.qmp("query-chardev")
                    if c["label"] in ("qmp-owner", "qmp-shared")}

        def qemukit_sync() -> float:
            t0 = time.perf_counter()
            for _ in range(calls):
                vm.qmp("query-status")
            return (time.perf_counter() - t0) / calls

        def qemukit_sync_attached() -> float:
            attached = VM.attach(vm.name)
            try:
                t0 = time.perf_counter()
                for _ in range(calls):
                    attached.qmp("query-status")
                return (time.perf_counter() - t0) / calls
            finally:
                attached.detach()

        def qemu_qmp_async() -> float:
            return asyncio.run(_qemu_qmp_round(path, calls))

        def plain_socket() -> float:
            return _plain_round(path, calls)

        contenders = {"plain_socket": plain_socket, "qemu_qmp_async": qemu_qmp_async,
                      "qemukit_sync": qemukit_sync,
                      "qemukit_sync_attached": qemukit_sync_attached}
        for fn in contenders.values():  # warm up: imports, first connections
            fn()
        res = interleave(runs, **contenders)
        binary, pid = vm.argv[0], vm.pid
    out = {k: summary(v) for k, v in res.items()}
    per_run = per_run_ratios(res["qemukit_sync"], res["qemu_qmp_async"])
    per_run_attached = per_run_ratios(res["qemukit_sync_attached"], res["qemu_qmp_async"])
    return {
        **out,
        "calls_per_run": calls,
        "ratio_qemukit_vs_qemu_qmp": ratio(out["qemukit_sync"], out["qemu_qmp_async"]),
        "ratios_per_run": per_run,
        "ratio_median": round(statistics.median(per_run), 3),
        "ratio_max": max(per_run),
        "ratios_per_run_attached": per_run_attached,
        "ratio_max_attached": max(per_run_attached),
        "goal": f"<= {GOAL} in every run",
        "goal_met": max(per_run) <= GOAL,
        "sockets": {
            "qemukit_sync": "owner monitor: AF_UNIX stream socketpair, QEMU's end passed at "
                            "spawn (chardev qmp-owner)",
            "qemukit_sync_attached": "qmp.sock (chardev qmp-shared), via VM.attach()",
            "qemu_qmp_async": "qmp.sock (chardev qmp-shared), connected by path",
            "plain_socket": "qmp.sock (chardev qmp-shared), connected by path",
        },
        "chardevs": chardevs,
        # One QEMU process serves every contender: the one qemukit started.
        "qemu_binary": {"found": qemu_binary(), "served_all": binary},
        "qemu_pid": pid,
    }
