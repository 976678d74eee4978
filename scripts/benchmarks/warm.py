"""Warm starts: a restore of the saved ready state against a boot, side by side.

- run: ``qemukit run --image tiny -- true`` warm (the default) against
  warm with a standby clone ready (left by an untimed ``run --standby -- true``
  just before; the sample fails unless ``-v`` says the standby was taken) against
  ``--cold`` against raw QEMU booting the same kernel and initramfs (q35, the
  tiny image's command line) to the tiny init's ready line. A warm run's own
  split (restore to ready, from ``-v``) is recorded beside it.
- many: 16 warm VMs started at once from one process: all ready, failures, total.
- plugin: the pytest plugin's per-test cost: ``qemu_vm`` warm against
  ``qemu_vm`` cold (``--qemukit-cold``) against ``qemu_clean_vm`` (one session
  VM rolled back to a snapshot per test), from the time pytest reports for a
  file of identical tests, divided by their number.
- debian (an optional part, ``--only debian``: each cold sample is a whole
  Debian boot): ``qemukit run --image debian --detach --wait ssh`` warm, and
  warm with a standby clone ready, against ``--cold``, each sample from the
  command's start to its return with ssh logging in, the VM killed after.

The warm state is built before the rounds (not counted).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from qemukit import images
from qemukit.images import TINY_APPEND

from .common import (
    QEMUKIT_CMD,
    Result,
    interleave,
    qemu_binary,
    ratio,
    raw_to_init,
    summary,
    timed_command,
)

RUN = [QEMUKIT_CMD, "run", "-v", "--image", "tiny", "--accel", "tcg"]
#: Tests per plugin sample: enough that the session's own start is a small share.
PLUGIN_TESTS = 8


def _run_true(*extra: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run([*RUN, *extra, "--", "true"], capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL, check=False)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"qemukit run {' '.join(extra)} -- true failed ({out.returncode}): "
                           f"{out.stderr[-2000:]}")
    return elapsed, out.stderr


def _raw_q35() -> float:
    tiny = images.build("tiny")
    argv = [qemu_binary(), "-M", "q35", "-accel", "tcg", "-m", "512", "-display", "none",
            "-nodefaults", "-no-user-config", "-serial", "stdio", "-kernel", str(tiny.kernel),
            "-initrd", str(tiny.initrd), "-append", TINY_APPEND]
    return raw_to_init(argv)


def bench_run(runs: int) -> Result:
    """Warm, cold and raw medians, interleaved, with the ratios the issue sets goals for."""
    _run_true()  # builds the warm state when there is none
    restores: list[float] = []

    def warm() -> float:
        elapsed, err = _run_true()
        found = re.search(r"warm: restored \S+ in ([0-9.]+) s", err)
        if not found:
            raise RuntimeError(f"a warm run did not restore: {err[-2000:]}")
        restores.append(float(found.group(1)))
        return elapsed

    standby_restores: list[float] = []

    def warm_standby() -> float:
        _run_true("--standby")  # (untimed) leaves a standby clone ready, then exits
        elapsed, err = _run_true()
        found = re.search(r"warm: restored \S+ in ([0-9.]+) s \(.*standby clone taken", err)
        if not found:
            raise RuntimeError(f"a run with a standby ready did not take it: {err[-2000:]}")
        standby_restores.append(float(found.group(1)))
        return elapsed

    res = interleave(runs, warm=warm, warm_standby=warm_standby,
                     cold=lambda: _run_true("--cold")[0], raw_to_init=_raw_q35,
                     cli_start=timed_command([QEMUKIT_CMD, "--version"]))
    w, c, r = summary(res["warm"]), summary(res["cold"]), summary(res["raw_to_init"])
    ws = summary(res["warm_standby"])
    start, restore = summary(res["cli_start"]), summary(restores)
    return {"warm": w, "warm_standby": ws, "cold": c, "raw_to_init": r,
            "warm_restore_to_ready": restore,
            "warm_standby_restore_to_ready": summary(standby_restores),
            "cold_over_warm": ratio(c, w), "raw_over_warm": ratio(r, w),
            "cold_over_warm_standby": ratio(c, ws), "raw_over_warm_standby": ratio(r, ws),
            "warm_over_warm_standby": ratio(w, ws),
            # A warm run's split, from medians: the interpreter and the CLI's own import
            # (`qemukit --version`), the restore to a ready agent (clock set included, from -v),
            # and the rest: importing the VM layer, spawning QEMU, the command, the stop.
            "warm_split": {"python_and_cli_import": start["median"],
                           "restore_to_ready": restore["median"],
                           "spawn_command_and_stop": round(
                               w["median"] - start["median"] - restore["median"], 3)},
            "goal": "warm median <= 0.35 s, cold/warm >= 6; raw/warm >= 20, with a standby "
                    ">= 40"}


async def _many(count: int) -> Result:
    from qemukit import AsyncVM

    spec = images.spec("tiny", accel="tcg", warm=True)
    vms = [AsyncVM(spec) for _ in range(count)]
    t0 = time.perf_counter()
    try:
        started = await asyncio.gather(*(vm.start() for vm in vms), return_exceptions=True)
        ready = await asyncio.gather(
            *(vm.exec(["true"]) for vm, s in zip(vms, started, strict=True)
              if not isinstance(s, BaseException)), return_exceptions=True)
        elapsed = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(vm.kill() for vm in vms if vm.state.value == "running"),
                             return_exceptions=True)
    failures = [repr(r) for r in (*started, *ready) if isinstance(r, BaseException)]
    warm = sum(1 for vm in vms if vm.warm_start is not None and vm.warm_start.warm)
    return {"count": count, "all_ready_seconds": round(elapsed, 3), "warm": warm,
            "failures": failures}


def bench_many(count: int) -> Result:
    """``count`` warm VMs at once from one process (the warm state exists: built by run)."""
    _run_true()
    return asyncio.run(_many(count))


_PLUGIN_TESTS = textwrap.dedent('''
    import pytest

    @pytest.mark.parametrize("i", range({n}))
    def test_fresh(qemu_vm, i):
        assert qemu_vm.exec(["true"]).exit_status == 0

    @pytest.mark.parametrize("i", range({n}))
    def test_rolled_back(qemu_clean_vm, i):
        assert qemu_clean_vm.exec(["true"]).exit_status == 0
''')


def bench_plugin(runs: int) -> Result:
    """Per-test seconds of ``qemu_vm`` warm and cold and of ``qemu_clean_vm``, interleaved."""
    with tempfile.TemporaryDirectory(prefix="qk-bench-plugin-") as tmp:
        test_file = Path(tmp) / "test_bench_plugin.py"
        test_file.write_text(_PLUGIN_TESTS.format(n=PLUGIN_TESTS))

        def per_test(selector: str, *extra: str) -> float:
            argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-p", "no:randomly", "-o", "addopts=", str(test_file), "-k", selector,
                    "--qemukit-accel", "tcg", *extra]
            t0 = time.perf_counter()
            out = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=tmp,
                                 check=False)
            elapsed = time.perf_counter() - t0
            if out.returncode != 0:
                raise RuntimeError(f"pytest {selector} {extra} failed: {out.stdout[-2000:]}")
            return elapsed / PLUGIN_TESTS

        per_test("test_fresh")  # the fixture's warm state, built once before the rounds

        res = interleave(runs, qemu_vm_warm=lambda: per_test("test_fresh"),
                         qemu_vm_cold=lambda: per_test("test_fresh", "--qemukit-cold"),
                         qemu_clean_vm=lambda: per_test("test_rolled_back"))
    warm, cold, clean = (summary(res[k]) for k in ("qemu_vm_warm", "qemu_vm_cold", "qemu_clean_vm"))
    return {"tests_per_sample": PLUGIN_TESTS,
            "per_test_seconds": {"qemu_vm_warm": warm, "qemu_vm_cold": cold,
                                 "qemu_clean_vm": clean},
            "cold_over_warm": ratio(cold, warm), "warm_over_clean": ratio(warm, clean),
            "goal": "qemu_vm warm within 1.5x of qemu_clean_vm",
            "note": "each sample is a whole pytest run divided by its tests: the session's "
                    "start (and for qemu_clean_vm its boot and snapshot) is spread over them"}


def _debian_to_ssh(*extra: str) -> float:
    name = f"qk-bench-debian-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    out = subprocess.run([QEMUKIT_CMD, "run", "--image", "debian", "--accel", "tcg", "--detach",
                          "--wait", "ssh", "--name", name, "--timeout", "900", *extra],
                         capture_output=True, text=True, timeout=960, stdin=subprocess.DEVNULL,
                         check=False)
    elapsed = time.perf_counter() - t0
    subprocess.run([QEMUKIT_CMD, "kill", name], capture_output=True, timeout=60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"qemukit run --image debian {' '.join(extra)} failed "
                           f"({out.returncode}): {out.stderr[-2000:]}")
    return elapsed


def _debian_standby_to_ssh() -> float:
    _debian_to_ssh("--standby")  # (untimed) leaves a standby clone ready
    return _debian_to_ssh()


def bench_debian(runs: int) -> Result:
    """Seconds to a working ssh login on the Debian image: warm (and with a standby ready)
    against cold, interleaved."""
    _debian_to_ssh()  # builds the warm state when there is none
    res = interleave(runs, warm=_debian_to_ssh, warm_standby=_debian_standby_to_ssh,
                     cold=lambda: _debian_to_ssh("--cold"))
    w, ws, c = summary(res["warm"]), summary(res["warm_standby"]), summary(res["cold"])
    return {"warm_to_ssh": w, "warm_standby_to_ssh": ws, "cold_to_ssh": c,
            "cold_over_warm": ratio(c, w), "cold_over_warm_standby": ratio(c, ws),
            "goal": "cold/warm (with a standby) >= 30"}


def bench_warm(runs: int, many: int) -> Result:
    """The three comparisons of warm starts, in one part."""
    return {"run": bench_run(runs), "many": bench_many(many), "plugin": bench_plugin(max(3, runs // 2))}
