"""The cold kernel loop: ``qemukit run --kernel K -- true`` against raw QEMU booting K to init.

K is a kernel built here: the suite's own (Debian's linux-source-6.1, tinyconfig plus
``qemukit kconfig``; ``tests/kernel_build.py`` builds and caches it, about 9 minutes the
first time). Every round copies its bzImage and ``.config`` to a new directory, so each
run boots a kernel file qemukit has never seen (no warm state, no cached digest helps),
as in a developer's loop of change, build, boot.

qemukit picks the machine itself (``run -v`` says which: microvm for this kernel, see
``qemukit.kernel.kernel_run_machine``); the raw side boots the same kernel and the tiny
initramfs on that machine, with the command line qemukit gives it, and is timed until the
tiny init's ready line. Both run the QEMU binary qemukit uses.

The split of a qemukit run comes from what it leaves in its own state directory (the
bench points ``QEMUKIT_STATE`` at a fresh one), watched every 5 ms from a thread:

- ``python_start``: from the spawn of ``qemukit`` to QEMU running (``vm.json`` is written
  right after QEMU's spawn, with the time);
- ``boot``: QEMU running to the tiny init's ready line on the console log;
- ``agent``: the ready line to the guest agent's first answer (``guest-ready``, with the time);
- ``command_and_power_off``: the agent's answer to the runtime directory's removal (the
  command runs, QEMU is stopped: a kill, since nothing the guest wrote can outlive it);
- ``exit``: the directory gone to the ``qemukit`` process' exit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from qemukit import host, images

from .common import (
    INIT_LINE,
    QEMUKIT_CMD,
    Result,
    interleave_groups,
    qemu_binary,
    ratio,
    raw_to_init,
    summary,
)

PHASES = ("python_start", "boot", "agent", "command_and_power_off", "exit")


def _kernel_tree() -> Path:
    from tests.kernel_build import build_test_kernel

    return build_test_kernel(progress=lambda line: print(f"bench kloop: {line}", flush=True))


def _fresh_kernel(tree: Path, root: Path, round_no: int, side: str) -> Path:
    """The tree's bzImage and .config, copied to a directory of their own."""
    target = root / f"{side}-{round_no}"
    target.mkdir()
    shutil.copyfile(tree / "arch" / "x86" / "boot" / "bzImage", target / "bzImage")
    shutil.copyfile(tree / ".config", target / ".config")
    return target / "bzImage"


class _Watch:
    """Times the phases of one qemukit run from its state directory (see the module text)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.marks: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        entry: Path | None = None
        while not self.stop.wait(0.005):
            if entry is None:
                found = [p for p in self.state.glob("*/vm.json")]
                if not found:
                    continue
                entry = found[0].parent
            if "spawned" not in self.marks:
                try:
                    self.marks["spawned"] = float(json.loads((entry / "vm.json").read_text())
                                                  ["created"])
                except (OSError, ValueError, KeyError):
                    continue
            if "init" not in self.marks:
                try:
                    if INIT_LINE in (entry / "console.log").read_bytes():
                        self.marks["init"] = time.time()
                except OSError:
                    pass
            if "ready" not in self.marks:
                try:
                    self.marks["ready"] = float((entry / "guest-ready").read_text())
                except (OSError, ValueError):
                    pass
            if not entry.exists():
                self.marks["gone"] = time.time()
                return

    def __enter__(self) -> _Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def _qemukit_run(kernel: Path, state: Path) -> tuple[float, dict[str, float], str]:
    """One ``qemukit run -v --kernel K -- true``: its wall time, its phases, its -v lines."""
    state.mkdir()
    env = dict(os.environ, QEMUKIT_STATE=str(state))
    argv = [QEMUKIT_CMD, "run", "-v", "--accel", "tcg", "--kernel", str(kernel), "--", "true"]
    with _Watch(state) as watch:
        began = time.time()
        t0 = time.perf_counter()
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env,
                             stdin=subprocess.DEVNULL, check=False)
        elapsed = time.perf_counter() - t0
        ended = began + elapsed
        watch.stop.wait(0.05)  # its last look at the directory
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr[-2000:]}")
    m = watch.marks
    missing = [k for k in ("spawned", "init", "ready") if k not in m]
    if missing:
        raise RuntimeError(f"the run left no trace of {missing} in {state}: {out.stderr[-1000:]}")
    gone = m.get("gone", ended)
    phases = {"python_start": m["spawned"] - began, "boot": m["init"] - m["spawned"],
              "agent": max(0.0, m["ready"] - m["init"]),
              "command_and_power_off": max(0.0, gone - m["ready"]),
              "exit": max(0.0, ended - gone)}
    return elapsed, phases, out.stderr


def _raw_argv(kernel: Path, machine: str) -> list[str]:
    """Raw QEMU booting ``kernel`` with the tiny initramfs, as qemukit's argv does it, minus
    qemukit's own devices (monitor, agent channel, sockets)."""
    tiny = images.build("tiny")
    append = images.tiny_append("x86_64")
    khz = host.tsc_khz()
    if machine == "microvm" and khz:
        append += f" tsc_early_khz={khz}"  # what qemukit adds on microvm, for the same reason
    return [qemu_binary(), "-machine", f"{machine},accel=tcg", "-m", "512M", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(kernel),
            "-initrd", str(tiny.initrd), "-append", append, "-serial", "stdio"]


def bench_kloop(runs: int) -> Result:
    """Both sides, interleaved, each on a fresh copy of the kernel; ratio and qemukit's split."""
    tree = _kernel_tree()
    with tempfile.TemporaryDirectory(prefix="qk-bench-kloop-") as tmp:
        root = Path(tmp)
        # Which machine qemukit picks for this kernel (said by run -v), before the rounds.
        _, _, said = _qemukit_run(_fresh_kernel(tree, root, -1, "probe"), root / "state-probe")
        found = re.search(r"machine (\S+): (.*)", said)
        machine, why = (found.group(1), found.group(2)) if found else ("q35", "(not said)")
        phases: dict[str, list[float]] = {p: [] for p in PHASES}
        counter = {"qemukit": 0, "raw": 0}

        def qemukit() -> dict[str, float]:
            n = counter["qemukit"] = counter["qemukit"] + 1
            elapsed, split, _ = _qemukit_run(_fresh_kernel(tree, root, n, "qk"),
                                             root / f"state-{n}")
            for name, seconds in split.items():
                phases[name].append(seconds)
            return {"qemukit_run_true": elapsed}

        def raw() -> dict[str, float]:
            n = counter["raw"] = counter["raw"] + 1
            return {"raw_to_init": raw_to_init(_raw_argv(_fresh_kernel(tree, root, n, "raw"),
                                                          machine))}

        res = interleave_groups(runs, qemukit, raw)
    qk, rw = summary(res["qemukit_run_true"]), summary(res["raw_to_init"])
    return {"machine": machine, "why": why, "kernel": str(tree),
            "qemukit_run_true": qk, "raw_to_init": rw, "ratio": ratio(qk, rw),
            "split_medians": {p: round(sorted(v)[len(v) // 2], 3) for p, v in phases.items()},
            "goal": "<= 1.10",
            "qemu_binary": {"raw": qemu_binary(), "qemukit_run": qemu_binary()}}
