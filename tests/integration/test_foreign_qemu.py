"""A host with only a foreign QEMU (as on an arm64 host): nothing looks for the x86_64 one.

PATH holds only ``qemu-system-aarch64`` and ``qemu-img``. Before, creating any overlay
found "the" QEMU again with the x86_64 default and failed with "no QEMU for x86_64
guests found", so ``run --arch aarch64`` with an overlay disk and every external
snapshot of a foreign VM failed there. Each VM now finds its QEMU once, for its own
architecture, and carries it (with its qemu-img) to every later step.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemukit import VM, Drive, images
from tests.helpers import QEMUKIT

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("arch-foreign-qemu")]


@pytest.fixture
def only_aarch64(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """An environment whose PATH has only the aarch64 QEMU and qemu-img."""
    images.build("tiny", arch="aarch64")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("qemu-system-aarch64", "qemu-img"):
        found = shutil.which(name)
        if found is None:
            pytest.skip(f"{name} is not installed")
        (bin_dir / name).symlink_to(found)
    for var in [v for v in os.environ if v.startswith("QEMUKIT_QEMU")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert shutil.which("qemu-system-x86_64") is None
    yield {k: v for k, v in os.environ.items()}


def _disk(tmp_path: Path) -> Path:
    disk = tmp_path / "base.qcow2"
    qemu_img = shutil.which("qemu-img")
    assert qemu_img is not None
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    return disk


def test_run_with_an_overlay_disk_on_the_foreign_qemu_alone(
        only_aarch64: dict[str, str], tmp_path: Path) -> None:
    assert QEMUKIT
    result = subprocess.run(
        [QEMUKIT, "run", "--arch", "aarch64", "--image", "tiny", "--accel", "tcg",
         "--disk", f"{_disk(tmp_path)},overlay", "--timeout", "400", "--",
         "sh", "-c", "uname -m; test -b /dev/vda && echo disk"],
        env=only_aarch64, capture_output=True, text=True, timeout=500,
        stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["aarch64", "disk"]


def test_an_external_snapshot_of_a_foreign_vm_on_the_foreign_qemu_alone(
        only_aarch64: dict[str, str], tmp_path: Path) -> None:
    vm = VM(images.spec("tiny", arch="aarch64", accel="tcg",
                        drives=(Drive(_disk(tmp_path), overlay=True),)))
    vm.start()
    try:
        vm.wait_ready(400)
        assert vm.qemu.path.endswith("qemu-system-aarch64")
        vm.exec("printf %s DISK-A > /dev/vda && sync", check=True)
        vm.snapshots.external("before")  # an overlay made with the VM's own qemu-img
        vm.exec("printf %s DISK-B > /dev/vda && sync", check=True)
        vm.snapshots.revert("before")  # disk only: the guest boots again on the old disk
        vm.wait_ready(400)
        marker = vm.exec("head -c 6 /dev/vda", check=True).stdout_text
        assert marker == "DISK-A"
    finally:
        if vm.state.value == "running":
            vm.kill()
