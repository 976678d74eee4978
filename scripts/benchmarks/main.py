"""The command line of ``scripts/bench``: pick the parts, run them, print and save JSON.

    scripts/bench [--runs N] [--quick] [--json FILE] [--only launch,qmp,...]

Parts: launch (spawn to QMP ready, qemukit vs raw QEMU with the identical argv),
qmp (query-status round trips: qemukit's sync API, qemu.qmp's async client, a
plain socket), loop (qemukit run -- true vs the fastest raw QEMU command line for
the same kernel and initramfs), cli (import, --help, ls with 10 VMs), rollback
(snapshot load vs a boot per test), restore (state bundle restore vs cold boot),
scale (16 VMs launched at once), warm (warm against cold against raw for run --
true, 16 warm VMs at once, the pytest plugin's per-test cost), mapped (warm with the RAM
mapped against copied against cold against raw for run -- true, restore to the first command's
output by step, the PSS of 8 clones mapped against copied), fork (a running tiny guest forked
into 4 clones: seconds until all 4 answer, the save and each restore, their PSS; checkpoint and
rollback of it). Optional: arch (each foreign
architecture's run -- true against raw QEMU), debian (seconds to an ssh login on the Debian
image, warm against cold), kloop (the cold kernel loop: qemukit run --kernel K
-- true on a fresh copy of a kernel built here, against raw QEMU booting it to init on the machine
qemukit picks, with qemukit's split; builds the suite's kernel if it is not cached), tbsize
(4 TCG VMs at once with QEMU's 1 GiB code buffer against tb_size 64 and 16 MiB: boot time,
RSS, PSS, translated code, flushes; --tb-image debian for a bigger guest), libvirt
(--with-libvirt: `virsh create` to guest init vs qemukit, libvirtd's RSS, virsh's per-call cost) and
virtme (--with-virtme: `vng --run KERNEL --exec true` vs `qemukit run -- true`,
or why vng does not run here).

Every raw-QEMU side runs the binary qemukit uses: ``$QEMUKIT_QEMU`` if set, else
qemu-system-x86_64 on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path

from qemukit import host
from qemukit.arch import DEFAULT_ARCH

from .common import Result

DEFAULT_PARTS = ("launch", "qmp", "loop", "cli", "rollback", "restore", "scale", "warm", "mapped",
                 "fork")
OPTIONAL_PARTS = ("arch", "debian", "kloop", "libvirt", "tbsize", "virtme")


def _parts(args: argparse.Namespace, runs: int) -> dict[str, Callable[[], Result]]:
    """Each part's name and how to run it (modules are imported only when run)."""

    def launch() -> Result:
        from .launch import bench_launch
        return bench_launch(runs)

    def qmp() -> Result:
        from .qmp import bench_qmp
        return bench_qmp(runs, 100 if args.quick else 1000)

    def loop() -> Result:
        from .loop import bench_loop
        return bench_loop(runs)

    def cli() -> Result:
        from .cli import bench_cli
        return bench_cli(runs, 2 if args.quick else 10)

    def rollback() -> Result:
        from .rollback import bench_rollback
        return bench_rollback(runs)

    def restore() -> Result:
        from .restore import bench_restore
        return bench_restore(runs)

    def scale() -> Result:
        from .scale import bench_scale
        return bench_scale(3 if args.quick else 16)

    def warm() -> Result:
        from .warm import bench_warm
        return bench_warm(runs, 3 if args.quick else 16)

    def mapped() -> Result:
        from .mapped import bench_mapped
        return bench_mapped(runs, 3 if args.quick else 8)

    def fork() -> Result:
        from .fork import bench_fork
        return bench_fork(runs, 2 if args.quick else 4)

    def tbsize() -> Result:
        from .tbsize import bench_tbsize
        return bench_tbsize(2 if args.quick else runs, image=args.tb_image)

    def debian() -> Result:
        from .warm import bench_debian
        return bench_debian(2 if args.quick else min(runs, 3))

    def arch() -> Result:
        from .arch import bench_arch
        return bench_arch(runs)

    def kloop() -> Result:
        from .kloop import bench_kloop
        return bench_kloop(runs)

    def libvirt() -> Result:
        from .libvirt import bench_libvirt
        return bench_libvirt(runs)

    def virtme() -> Result:
        from .virtme import bench_virtme
        return bench_virtme(runs, args.with_virtme, args.vng_kernel)

    return {"launch": launch, "qmp": qmp, "loop": loop, "cli": cli, "rollback": rollback,
            "restore": restore, "scale": scale, "warm": warm, "mapped": mapped, "fork": fork,
            "debian": debian,
            "arch": arch, "kloop": kloop, "libvirt": libvirt, "tbsize": tbsize, "virtme": virtme}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options; an unknown part or a bad count is an error before anything runs."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="qemukit benchmarks: medians of interleaved runs, each comparison a ratio.",
        epilog="\n\n".join((__doc__ or "").split("\n\n")[2:]))
    parser.add_argument("--runs", type=int, default=7, help="runs per figure (>= 5)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: 2 runs, small counts (not for reporting)")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--only", default=",".join(DEFAULT_PARTS),
                        help="comma-separated parts (also: arch, kloop, libvirt, tbsize, virtme)")
    parser.add_argument("--tb-image", default="tiny", choices=("tiny", "debian"),
                        help="the guest of the tbsize part (4 at once; debian needs its image)")
    parser.add_argument("--with-libvirt", action="store_true",
                        help="add the libvirt part (needs virsh and libvirtd installed)")
    parser.add_argument("--with-virtme", action="store_true",
                        help="add the virtme part (pip-installs virtme-ng if missing)")
    parser.add_argument("--vng-kernel", type=Path,
                        help="kernel for vng (default: the tiny image's); vng finds modules "
                             "in a lib/modules/VERSION above it, e.g. an unpacked linux-image")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in DEFAULT_PARTS + OPTIONAL_PARTS]
    if unknown or not parts:
        parser.error(f"--only {args.only!r}: unknown part(s) {', '.join(unknown) or '(none given)'}"
                     f"; choose from {', '.join(DEFAULT_PARTS + OPTIONAL_PARTS)}")
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: must be at least 1 (fewer than 5 are raised to 5)")
    for flag, part in ((args.with_libvirt, "libvirt"), (args.with_virtme, "virtme")):
        if flag and part not in parts:
            parts.append(part)
    args.parts = parts
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen parts in order; print each part's JSON as it finishes."""
    args = parse_args(argv)
    runs = 2 if args.quick else max(5, args.runs)
    qemu = host.find_qemu(DEFAULT_ARCH)
    results: Result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "kernel": platform.release(), "qemu": qemu.version_text,
                    "qemu_binary": qemu.path, "QEMUKIT_QEMU": os.environ.get("QEMUKIT_QEMU")},
        "runs": runs,
        # The machine is shared and small: the load around each part says how far to
        # trust its numbers.
        "loadavg": {},
    }
    table = _parts(args, runs)
    for part in args.parts:
        print(f"bench: {part} ...", file=sys.stderr, flush=True)
        before = os.getloadavg()
        results[part] = table[part]()
        results["loadavg"][part] = {"before": [round(x, 2) for x in before],
                                    "after": [round(x, 2) for x in os.getloadavg()]}
        print(json.dumps({part: results[part]}, indent=1), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
