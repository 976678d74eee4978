"""The kernel-test loop: ``qemukit run --image tiny -- true`` against the fastest raw QEMU.

The raw side is the floor for "boot and run one thing": the same kernel and
initramfs on microvm with a tuned command line, booted by the QEMU binary
qemukit uses (``$QEMUKIT_QEMU`` or qemu-system-x86_64 on PATH), timed until
the guest's init says it is ready. ``qemukit run`` inherits the environment,
so it picks the same binary; ``qemukit cmdline`` is asked which, to record it.
"""

from __future__ import annotations

from qemukit import host, images

from .common import (
    Result,
    interleave,
    qemu_binary,
    qemukit_run_binary,
    qemukit_run_true,
    ratio,
    raw_to_init,
    summary,
)


def raw_microvm_argv() -> list[str]:
    """The fastest QEMU command line for the tiny image that reaches its init."""
    image = images.build("tiny")
    khz = host.tsc_khz()  # what qemukit's microvm argv adds, for the same reason
    append = "console=ttyS0 panic=-1 quiet rdinit=/init qemukit.exit_after_ready"
    if khz:
        append += f" tsc_early_khz={khz}"
    return [
        qemu_binary(), "-M", "microvm,accel=tcg,pit=on,rtc=on", "-m", "512M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", append, "-serial", "stdio",
    ]


def bench_loop(runs: int) -> Result:
    """Median wall time of `qemukit run -- true` (q35 and microvm) and of raw microvm to init."""
    raw_argv = raw_microvm_argv()

    res = interleave(runs, raw_microvm_to_init=lambda: raw_to_init(raw_argv),
                     qemukit_run_true=qemukit_run_true("q35"),
                     qemukit_run_true_microvm=qemukit_run_true("microvm"))
    raw, qk = summary(res["raw_microvm_to_init"]), summary(res["qemukit_run_true"])
    micro = summary(res["qemukit_run_true_microvm"])
    return {"raw_microvm_to_init": raw, "qemukit_run_true": qk,
            "qemukit_run_true_microvm": micro,
            "ratio": ratio(qk, raw), "ratio_microvm": ratio(micro, raw), "goal": "<= 1.15",
            "virtme_ng": "see the virtme part (--with-virtme)",
            "qemu_binary": {"found": qemu_binary(), "raw": raw_argv[0],
                            "qemukit_run": qemukit_run_binary("q35"),
                            "qemukit_run_microvm": qemukit_run_binary("microvm")}}
