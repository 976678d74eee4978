"""What users type first: hotplug right after ``run --detach``, and ``cmdline`` = ``run``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration
TCG = ("--image", "tiny", "--accel", "tcg")


def test_hotplug_cpu_and_unplug_disk_while_the_guest_boots(qk: Any, tmp_path: Path) -> None:
    """``run --detach`` returns once QMP answers, long before the guest is up."""
    disk = tmp_path / "d.qcow2"
    qk("run", "--detach", "--name", "race", *TCG, "--max-cpus", "2")
    try:
        import subprocess

        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "8M"], check=True)
        cpu = qk("hotplug", "race", "cpu", "--json")
        assert cpu.returncode == 0, cpu.stderr
        # Acknowledged: the guest kernel has the CPU; its init then onlines it (bounded).
        assert qk("exec", "race", "--", "test", "-d", "/sys/devices/system/cpu/cpu1").returncode == 0
        online = qk("exec", "race", "--", "sh", "-c",
                    "for i in $(seq 200); do [ $(cat /sys/devices/system/cpu/online) = 0-1 ] "
                    "&& exit 0; sleep 0.1; done; cat /sys/devices/system/cpu/online; exit 1")
        assert online.returncode == 0, online
        plugged = qk("hotplug", "race", "disk", str(disk), "--json")
        assert plugged.returncode == 0, plugged.stderr
        dev_id = json.loads(plugged.stdout)["id"]
        unplug = qk("unplug", "race", dev_id)
        assert unplug.returncode == 0, unplug.stderr
        assert dev_id not in qk("devices", "race").stdout
    finally:
        assert qk("stop", "race").returncode == 0


def _without_fd(argv: list[str]) -> list[str]:
    """The inherited monitor fd's number differs between a preview and a start."""
    return [re.sub(r"^socket,id=(qmp-owner|console0),fd=\d+", r"socket,id=\1,fd=N", a) for a in argv]


def test_cmdline_prints_what_run_runs_with_a_share(qk: Any, tmp_path: Path,
                                                   state_root: Path) -> None:
    share = tmp_path / "shared"
    share.mkdir()
    opts = ("--name", "same", *TCG, "--share", f"{share}:/mnt/s", "--memory", "768M")
    preview = qk("cmdline", "--json", "--detach", *opts)  # as the run below
    assert preview.returncode == 0, preview.stderr
    planned = json.loads(preview.stdout)["argv"]
    owned = json.loads(qk("cmdline", "--json", *opts).stdout)["argv"]
    # A VM qemukit owns hands QEMU its console connection; a detached one's QEMU logs it.
    assert any(a.startswith("socket,id=console0,fd=") for a in owned)
    assert any(a.startswith("socket,id=console0,path=") for a in planned)
    assert any(a.startswith("vhost-user-fs-pci") for a in planned)
    started = qk("run", "--detach", *opts)
    assert started.returncode == 0, started.stderr
    try:
        ran = json.loads((state_root / "same" / "vm.json").read_text())["argv"]
    finally:
        assert qk("stop", "same").returncode == 0
    assert _without_fd(ran) == _without_fd(planned)
