"""What every part shares: summaries, interleaving, ratios, timing helpers, the QEMU in use."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from qemukit import VMSpec, host, images
from qemukit.arch import DEFAULT_ARCH

#: A part's result: JSON-ready, printed and written by :mod:`.main`.
Result = dict[str, Any]

#: What the tiny image's init prints once it is up (on its serial console).
INIT_LINE = b"qemukit-init: ready"

#: The ``qemukit`` console script of the interpreter running the bench.
QEMUKIT_CMD = shutil.which("qemukit", path=str(Path(sys.executable).parent)) or "qemukit"


def tiny_spec(**overrides: Any) -> VMSpec:
    """The guest the parts measure: the tiny image under TCG (``overrides`` replace fields)."""
    return images.spec("tiny", accel="tcg", **overrides)


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, min and max of samples (seconds), rounded to microseconds, and their count."""
    return {
        "median": round(statistics.median(samples), 6),
        "min": round(min(samples), 6),
        "max": round(max(samples), 6),
        "n": len(samples),
    }


def interleave(runs: int, **contenders: Callable[[], float]) -> dict[str, list[float]]:
    """Run each contender once per round, ``runs`` rounds: drift and load hit all alike.

    The order within a round rotates (round 0 starts with the first contender,
    round 1 with the second, ...), so none always runs right after the same other
    one; results keep the contenders' order and, per contender, the rounds' order,
    so ``results[a][i]`` and ``results[b][i]`` were measured in the same round.
    """

    def single(name: str, fn: Callable[[], float]) -> Callable[[], dict[str, float]]:
        return lambda: {name: fn()}

    return interleave_groups(runs, *(single(name, fn) for name, fn in contenders.items()))


def interleave_groups(runs: int, *groups: Callable[[], dict[str, float]]) -> dict[str, list[float]]:
    """:func:`interleave` for contenders that each measure one or more named figures at once.

    A group returns ``{name: seconds}``, e.g. two clients timed in alternating blocks
    within the group; every name gets one sample per round, in the rounds' order.
    """
    results: dict[str, list[float]] = {}
    for round_no in range(runs):
        shift = round_no % len(groups)
        for group in groups[shift:] + groups[:shift]:
            for name, seconds in group().items():
                results.setdefault(name, []).append(seconds)  # round 0 is unrotated
    return results


def ratio(numerator: dict[str, float], denominator: dict[str, float]) -> float:
    """The ratio of two summaries' medians, rounded to 3 places."""
    return round(numerator["median"] / denominator["median"], 3)


def per_run_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Round by round ratios of two contenders measured by :func:`interleave`."""
    return [round(a / b, 3) for a, b in zip(numerator, denominator, strict=True)]


def timed_command(argv: Sequence[str], *, timeout: float = 300.0) -> Callable[[], float]:
    """A contender that runs ``argv`` (it must exit 0) and returns its wall time."""

    def run() -> float:
        t0 = time.perf_counter()
        out = subprocess.run(list(argv), capture_output=True, stdin=subprocess.DEVNULL,
                             timeout=timeout, check=False)
        elapsed = time.perf_counter() - t0
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: "
                               f"{out.stderr.decode(errors='replace')[-2000:]}")
        return elapsed

    return run


def qemu_binary() -> str:
    """The QEMU binary qemukit uses (``$QEMUKIT_QEMU`` or qemu-system-x86_64 on PATH).

    Every raw-QEMU contender runs this, so both sides of a comparison run the same QEMU.
    """
    return host.find_qemu(DEFAULT_ARCH).path


def qemu_img() -> str:
    """The qemu-img that goes with :func:`qemu_binary` (found next to it, else on PATH)."""
    path = host.find_qemu(DEFAULT_ARCH).qemu_img
    if path is None:
        raise RuntimeError(f"no qemu-img beside {qemu_binary()}")
    return path


def create_disk(path: Path, size: str) -> None:
    """A blank qcow2 disk image at ``path`` made by :func:`qemu_img`."""
    subprocess.run([qemu_img(), "create", "-q", "-f", "qcow2", str(path), size],
                   check=True, timeout=60)


def wait_console(path: Path, deadline: float, needle: bytes = INIT_LINE) -> None:
    """Poll a serial console log file every 5 ms until ``needle`` appears.

    The same code watches every contender's console, so the polling cost is alike.
    Raises TimeoutError at ``deadline`` (time.monotonic()), with the log's last bytes.
    """
    pos, tail = 0, b""
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            pos += len(chunk)
            window = tail + chunk
            if needle in window:
                return
            tail = window[-max(len(needle), 400):]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{needle.decode()!r} did not appear in {path}; it ends with: "
                               f"{tail.decode(errors='replace')!r}")
        time.sleep(0.005)


def qemukit_run_true(machine: str = "q35") -> Callable[[], float]:
    """A contender: ``qemukit run --image tiny --accel tcg --machine MACHINE -- true``."""
    return timed_command([QEMUKIT_CMD, "run", "--image", "tiny", "--accel", "tcg",
                          "--machine", machine, "--", "true"])


def qemukit_run_binary(machine: str = "q35") -> str:
    """The QEMU binary ``qemukit run --machine MACHINE`` runs, as ``qemukit cmdline`` says.

    Both get the bench's environment, so ``$QEMUKIT_QEMU`` counts for both.
    """
    out = subprocess.run([QEMUKIT_CMD, "cmdline", "--json", "--image", "tiny", "--accel", "tcg",
                          "--machine", machine], capture_output=True, text=True, timeout=60,
                         check=True)
    return str(json.loads(out.stdout)["argv"][0])


def raw_to_init(argv: Sequence[str]) -> float:
    """Seconds from spawning raw QEMU ``argv`` (serial on stdio) to the tiny init's ready line.

    QEMU is killed after; an exit before the line is a RuntimeError, not a time.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends at QEMU's exit at the latest
            if INIT_LINE in line:
                return time.perf_counter() - t0
        raise RuntimeError(f"raw QEMU exited ({proc.wait()}) before the tiny init was ready")
    finally:
        proc.kill()
        proc.wait(30)
