"""Guests of other architectures (aarch64, riscv64, s390x, ppc64le) in real QEMU under TCG.

One VM per architecture serves every test of this module (pytest groups the
tests by the ``guest`` fixture's parameter), checked from inside the guest:
``uname -m``, a command's exit code, a hotplugged disk where the machine
supports it (a clear refusal where it does not), and last the shutdown
ladder's rung. The tiny images are built (once, cached) by the tests
themselves. A panic is in ``test_arch_panic.py`` (a panic ends its VM), the
internal snapshots in ``test_arch_snapshot.py`` (on s390x and pseries a
snapshot load can leave the guest's block I/O hanging, which would hold up the
guest's own power-off here).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from qemukit import VM, HotplugError, Share
from qemukit.arch import ARCHES
from qemukit.vm import ShutdownRung
from tests.helpers import FOREIGN_ARCHES, foreign_tiny_vm

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("arch-guests")]

#: The graceful rung that ends a tiny guest: its power button, or (riscv64 virt has none
#: the guest hears on QEMU 7.2) a power-off the guest makes when its agent asks.
GRACEFUL = {"aarch64": ShutdownRung.ACPI, "riscv64": ShutdownRung.AGENT,
            "s390x": ShutdownRung.ACPI, "ppc64le": ShutdownRung.ACPI}
#: Disk hotplug: s390x on CCW, aarch64 on pcie-root-ports; refused elsewhere.
DISK_HOTPLUG = {"aarch64": True, "riscv64": False, "s390x": True, "ppc64le": False}


@pytest.fixture(scope="module", params=FOREIGN_ARCHES)
def guest(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[str, VM, Path]]:
    arch: str = request.param
    work = tmp_path_factory.mktemp(f"arch-{arch}")
    (work / "share").mkdir()
    (work / "share" / "hello.txt").write_text(f"hello from the host to {arch}\n")
    # virtiofs where it works; 9p on s390x and pseries (the arm64 cloud kernel has no 9p).
    transport: Literal["virtiofs", "9p"] = "9p" if ARCHES[arch].virtiofs else "virtiofs"
    share = Share(work / "share", "/mnt/host", transport=transport)
    # The runtime directory is kept so a failed stop can show the console; removed after.
    with foreign_tiny_vm(arch, work, shares=(share,), keep_runtime=True) as vm:
        yield arch, vm, work


def test_uname_and_exit_code(guest: tuple[str, VM, Path]) -> None:
    arch, vm, _ = guest
    assert vm.accel is not None and vm.accel.accel == "tcg"
    assert "emulated" in vm.accel.summary and arch in vm.accel.summary
    out = vm.exec("uname -m; cat /proc/consoles; exit 7")
    assert out.exit_status == 7
    lines = out.stdout_text.split("\n")
    assert lines[0] == arch
    assert lines[1].split()[0] == ARCHES[arch].console


def test_host_share_is_readable(guest: tuple[str, VM, Path]) -> None:
    arch, vm, _ = guest
    out = vm.exec("cat /mnt/host/hello.txt; grep /mnt/host /proc/mounts", check=True).stdout_text
    lines = out.split("\n")
    assert lines[0] == f"hello from the host to {arch}"
    assert lines[1].split()[2] == ("9p" if ARCHES[arch].virtiofs else "virtiofs")


def test_disk_hotplug(guest: tuple[str, VM, Path]) -> None:
    arch, vm, work = guest
    raw = work / "hp.raw"
    marker = f"HP-{arch}-MARK".encode()
    raw.write_bytes(marker.ljust(1 << 20, b"\0"))
    if not DISK_HOTPLUG[arch]:
        with pytest.raises(HotplugError, match=vm.spec.machine):
            vm.hotplug.disk(raw, format="raw")
        return
    disk = vm.hotplug.disk(raw, format="raw", id="hpd")
    script = ("for i in $(seq 1000); do [ -e /sys/block/vdb ] && break; sleep 0.02; done; "
              f"dd if=/dev/vdb bs=512 count=1 2>/dev/null | head -c {len(marker)}")
    assert vm.exec(script, check=True).stdout == marker
    start = time.monotonic()
    vm.unplug(disk)
    assert time.monotonic() - start < 60
    gone = "for i in $(seq 500); do [ -e /sys/block/vdb ] || break; sleep 0.02; done; ls /sys/block"
    assert "vdb" not in vm.exec(gone, check=True).stdout_text.split()


def test_stop_ends_on_the_graceful_rung_where_there_is_one(guest: tuple[str, VM, Path]) -> None:
    arch, vm, _ = guest
    result = vm.shutdown(timeout=60)
    assert result.rung == GRACEFUL[arch], (result, vm.console_tail(40))
    # Nothing else was tried: QEMU exited because the guest powered off (no quit, no signal).
    assert result.tried == (GRACEFUL[arch],), result
    assert result.exit_status == 0, result
