"""The command line's own cost: ``import qemukit``, ``qemukit --help``, ``qemukit ls`` with VMs up.

Python's bare start (``python -c pass``, the same interpreter) is measured beside them,
interleaved in one run, so what qemukit adds can be read off: each figure comes with its
ratio to Python's start and the milliseconds over it. ``ls`` lists real tiny VMs
(started by this process, idle, each with its registry entry), not fake entries.
"""

from __future__ import annotations

import json
import subprocess
import sys

from qemukit import VM

from .common import QEMUKIT_CMD, Result, interleave, ratio, summary, timed_command, tiny_spec


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
        listed = subprocess.run([QEMUKIT_CMD, "ls", "--json"], capture_output=True, text=True,
                                timeout=120, check=True)
        names = {entry["name"] for entry in json.loads(listed.stdout)}
        missing = {vm.name for vm in started} - names
        if missing:
            raise RuntimeError(f"qemukit ls did not list {sorted(missing)}")
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
    base = out["python_startup"]
    return {**out, "vms_listed": vms,
            "ratio_to_python": {k: ratio(v, base) for k, v in out.items() if k != "python_startup"},
            "ms_over_python": {k: round((v["median"] - base["median"]) * 1000, 1)
                               for k, v in out.items() if k != "python_startup"},
            "goals": {"import_qemukit": "<= 0.050", "help": "<= 0.100", "ls": "<= 0.200"}}
