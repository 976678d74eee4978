"""Per foreign architecture: ``qemukit run --arch A -- true`` against raw QEMU booting the
same kernel and initramfs to the tiny init's ready line (the floor under TCG)."""

from __future__ import annotations

import subprocess
import time

from qemukit import host, images

from .common import QEMUKIT_CMD, Result, interleave, summary


def bench_arch(runs: int) -> Result:
    """For each architecture but x86_64: both sides, interleaved; the same QEMU binary."""
    from qemukit.arch import ARCHES

    out: Result = {}
    for arch, info in ARCHES.items():
        if arch == "x86_64":
            continue
        image = images.build("tiny", arch=arch)
        binary = host.find_qemu(arch).path  # what qemukit runs, QEMUKIT_QEMU_<ARCH> included
        machine = f"{info.default_machine},accel=tcg" + (f",{info.machine_opts}"
                                                         if info.machine_opts else "")
        raw_argv = [binary, "-machine", machine, "-m", "512M", "-nodefaults",
                    "-no-user-config", "-display", "none", "-no-reboot",
                    "-kernel", str(image.kernel), "-initrd", str(image.initrd),
                    "-append", images.tiny_append(arch), "-serial", "stdio"]
        if info.tcg_cpu:
            raw_argv[3:3] = ["-cpu", info.tcg_cpu]

        def raw(argv: list[str] = raw_argv) -> float:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            assert proc.stdout is not None
            for line in proc.stdout:
                if b"qemukit-init: ready" in line:
                    break
            elapsed = time.perf_counter() - t0
            proc.kill()
            proc.wait()
            return elapsed

        def qemukit(a: str = arch) -> float:
            t0 = time.perf_counter()
            res = subprocess.run([QEMUKIT_CMD, "run", "--arch", a, "--", "true"],
                                 capture_output=True, timeout=180, check=False)
            assert res.returncode == 0, res.stderr
            return time.perf_counter() - t0

        res = interleave(runs, raw_to_init=raw, qemukit_run_true=qemukit)
        r, q = summary(res["raw_to_init"]), summary(res["qemukit_run_true"])
        out[arch] = {"machine": info.default_machine, "raw_to_init": r, "qemukit_run_true": q,
                     "ratio": round(q["median"] / r["median"], 3),
                     "qemu_binary": {"raw": binary, "qemukit": binary}}
    return out
