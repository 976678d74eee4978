"""The command line's own cost: ``import qemukit``, ``qemukit --help``, ``qemukit ls`` with VMs up.

Python's bare start is measured beside them, so what qemukit adds can be read off.
"""

from __future__ import annotations

import sys

from qemukit import VM

from .common import QEMUKIT_CMD, Result, interleave, summary, timed_command, tiny_spec


def bench_cli(runs: int, vms: int) -> Result:
    """Median wall times of the CLI's cheap commands while ``vms`` idle tiny VMs run."""
    spec = tiny_spec()
    started: list[VM] = []
    try:
        for i in range(vms):
            vm = VM(spec.replace(name=f"bench-ls-{i}"))
            vm.start()  # a start that fails cleans up after itself
            started.append(vm)
        for vm in started:  # idle guests: do not time the CLI against ten booting ones
            vm.wait_ready()
        res = interleave(
            runs,
            python_startup=timed_command([sys.executable, "-c", "pass"]),
            import_qemukit=timed_command([sys.executable, "-c", "import qemukit"]),
            help=timed_command([QEMUKIT_CMD, "--help"]),
            ls=timed_command([QEMUKIT_CMD, "ls"]),
        )
    finally:
        for vm in started:
            vm.kill()
    out = {k: summary(v) for k, v in res.items()}
    return {**out, "vms_listed": vms,
            "goals": {"import_qemukit": "<= 0.100", "help": "<= 0.150", "ls": "<= 0.300"}}
