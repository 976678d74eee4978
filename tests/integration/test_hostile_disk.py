"""A guest that turns its raw disk into a qcow2 naming a host file must not read that file.

The attack (issue #23, part 3): the guest writes, with dd, a qcow2 header
whose backing file is a host file into its raw scratch disk. QEMU, if it
probed the disk's format at the next start, would open it as a qcow2 and
read the host file through it as the guest's disk. Here the host file holds
a marker; the guest of the next start reads its whole disk and greps for it.
The header is made on the host by ``qemu-img create -f qcow2 -b HOSTFILE -F
raw`` and handed to the guest as a second, read-only raw drive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, Drive, SpecError, VMSpec

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hostile-disk"),
              pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")]

MARKER = "HOST-SECRET-7f3a9c"
SCRATCH_SIZE = 1 << 20
#: The guest's disk, flushed and read back from the device: the marker must not be in it.
READ_DISK = ("sync; blockdev --flushbufs /dev/vda; echo 3 > /proc/sys/vm/drop_caches; "
             f"if grep -q {MARKER} /dev/vda; then echo LEAKED; else echo CLEAN; fi; "
             "head -c 4 /dev/vda | od -An -c")


@pytest.fixture
def hostile(tmp_path: Path) -> dict[str, Path]:
    """The host secret, the raw scratch disk, and the qcow2 header naming the secret."""
    secret = tmp_path / "id_ed25519"
    secret.write_text((MARKER + "\n") * 4096)  # more than a sector: grep sees it wherever read
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(b"\0" * SCRATCH_SIZE)
    header = tmp_path / "hdr.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(header), str(SCRATCH_SIZE)], check=True, timeout=60)
    # qemu-img leaves the file a few bytes past its last cluster; a drive wants whole sectors.
    clusters = -(-header.stat().st_size // 65536)
    os.truncate(header, clusters * 65536)
    return {"secret": secret, "scratch": scratch, "header": header}


def _boot(spec: VMSpec, drives: tuple[Drive, ...]) -> VM:
    vm = VM(spec.replace(drives=drives))
    vm.start()
    try:
        vm.wait_ready(180)
    except BaseException:
        vm.kill()
        raise
    return vm


def _opened_as(vm: VM) -> dict[str, Any]:
    """What QEMU opened for disk0 (query-block): driver, file, backing."""
    (entry,) = [b for b in vm.qmp("query-block") if "disk0" in str(b.get("qdev", ""))]
    inserted = entry["inserted"]
    return {"drv": inserted["drv"], "file": inserted["file"],
            "backing_file": inserted.get("backing_file"),
            "backing_image": inserted.get("image", {}).get("backing-image"),
            "depth": inserted.get("backing_file_depth", 0)}


def _scratch_nodes(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1])
            if a == "-blockdev" and "disk0" in argv[i + 1]]


def test_a_guest_written_qcow2_header_does_not_open_the_host_file(
        tiny_spec: VMSpec, hostile: dict[str, Path]) -> None:
    scratch, header, secret = hostile["scratch"], hostile["header"], hostile["secret"]
    # 1. The guest writes the header into its raw scratch disk (first sight: probed raw, recorded).
    vm = _boot(tiny_spec, (Drive(scratch), Drive(header, format="raw", read_only=True)))
    try:
        assert _opened_as(vm)["drv"] == "raw"
        size = header.stat().st_size
        out = vm.exec(f"dd if=/dev/vdb of=/dev/vda bs=512 count={size // 512} conv=notrunc "
                      "2>/dev/null && sync && head -c 4 /dev/vda", timeout=120)
        assert out.ok, out.stderr_text
        assert out.stdout == b"QFI\xfb"
    finally:
        vm.shutdown(timeout=30)
    assert scratch.read_bytes()[:4] == b"QFI\xfb"
    # What an old start would have done: qemu-img now sees a qcow2 over the host file.
    probed = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(scratch)],
                                       capture_output=True, text=True, check=True).stdout)
    assert probed["format"] == "qcow2" and probed["backing-filename"] == str(secret)

    # 2. Next starts, with format=raw and without format: raw, no backing, no marker.
    for drive in (Drive(scratch, format="raw"), Drive(scratch)):
        vm = _boot(tiny_spec, (drive,))
        try:
            opened = _opened_as(vm)
            assert opened == {"drv": "raw", "file": str(scratch), "backing_file": None,
                              "backing_image": None, "depth": 0}, opened
            nodes = _scratch_nodes(vm.argv)
            assert nodes == [f"driver=file,node-name=disk0-file,filename={scratch}",
                             "driver=raw,node-name=disk0-fmt,file=disk0-file"]
            assert str(secret) not in " ".join(vm.argv)
            out = vm.exec(READ_DISK, timeout=120)
            assert out.ok, out.stderr_text
            assert out.stdout_text.split()[0] == "CLEAN", out.stdout_text
            assert out.stdout_text.split()[1:5] == ["Q", "F", "I", "373"]  # its own bytes, raw
        finally:
            vm.shutdown(timeout=30)


def test_first_sight_of_a_disk_already_carrying_the_header_is_refused(
        tiny_spec: VMSpec, hostile: dict[str, Path], tmp_path: Path) -> None:
    """A disk qemukit never saw (no record) that probes as a qcow2 over a host file: no start."""
    copy = tmp_path / "never-seen.img"
    shutil.copyfile(hostile["header"], copy)
    for drive in (Drive(copy), Drive(copy, format="qcow2"), Drive(copy, overlay=True)):
        vm = VM(tiny_spec.replace(drives=(drive,)))
        with pytest.raises(SpecError) as caught:
            vm.start()
        assert str(hostile["secret"]) in str(caught.value)
        assert "format=raw" in str(caught.value)
        assert vm.state.value != "running"


def test_cli_disk_format_raw_boots_a_qcow2_looking_file_as_raw(
        qk: Callable[..., subprocess.CompletedProcess[str]], hostile: dict[str, Path]) -> None:
    """--disk scratch.img,format=raw used to be refused ("scratch.img is qcow2")."""
    scratch = hostile["scratch"]
    shutil.copyfile(hostile["header"], scratch)  # a raw disk whose first bytes look like qcow2
    out = qk("run", "--image", "tiny", "--accel", "tcg", "--disk", f"{scratch},format=raw", "--",
             "sh", "-c", READ_DISK)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "CLEAN", out.stdout
    assert out.stdout.split()[1:5] == ["Q", "F", "I", "373"]
