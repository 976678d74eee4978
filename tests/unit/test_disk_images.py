"""A drive's format and backing chain without QEMU: qemukit.host._img.

The guest writes its disks, so a header in a disk is hostile input: these
check that the format is never probed again once recorded, that ``format=``
is used as given, that a backing file or data file named in a header is
never opened unless the user named it, and that nothing here reads a FIFO
or a device (each test would hang or read forever otherwise: an alarm
turns that into a failure).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemukit import Drive, SpecError, host
from qemukit.host import _img
from qemukit.warm import file_digest, warm_key

from .warm_inputs import FACTS

QEMU = host.QemuBinary("/usr/bin/qemu-system-x86_64", (7, 2, 0), "7.2", frozenset({"q35"}),
                       True, None)  # no qemu-img: a probe would fail loudly


def qcow2_header(backing: str | None = None, *, backing_format: str | None = None,
                 data_file: str | None = None, size: int = 1 << 20) -> bytes:
    """The first cluster (64 KiB) of a version 3 qcow2, as qemu-img writes it."""
    cluster = 1 << 16
    incompatible = 4 if data_file is not None else 0
    head = bytearray(b"QFI\xfb" + struct.pack(">IQIIQ", 3, 0, 0, 16, size))
    head = head.ljust(72, b"\0") + struct.pack(">QQQII", incompatible, 0, 0, 4, 104)
    ext = b""
    for kind, value in ((0xE2792ACA, backing_format), (0x44415441, data_file)):
        if value is not None:
            data = value.encode()
            ext += struct.pack(">II", kind, len(data)) + data.ljust((len(data) + 7) & ~7, b"\0")
    head += ext + struct.pack(">II", 0, 0)
    if backing is not None:
        name = backing.encode()
        struct.pack_into(">QI", head, 8, len(head), len(name))
        head += name
    return bytes(head.ljust(cluster, b"\0"))


@pytest.fixture(autouse=True)
def no_hang() -> Iterator[None]:
    """A hang (a FIFO opened for reading, /dev/zero digested) fails the test instead."""
    def fail(*_: object) -> None:
        raise AssertionError("hung: a FIFO or a device was read")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every format probe (qemu-img info) made; the fake probe reads the magic as qemu-img does."""
    made: list[str] = []

    def probe(path: str, qemu: host.QemuBinary) -> str:
        made.append(path)
        with open(path, "rb") as fh:
            return "qcow2" if fh.read(4) == b"QFI\xfb" else "raw"
    monkeypatch.setattr(_img, "image_format", probe)
    return made


def test_header_read_from_a_qemu_img_like_header(tmp_path: Path) -> None:
    img = tmp_path / "top.qcow2"
    img.write_bytes(qcow2_header("base.raw", backing_format="raw", size=5 << 20))
    header = host.read_qcow2_header(img)
    assert header is not None
    assert (header.backing, header.backing_format, header.virtual_size) == ("base.raw", "raw", 5 << 20)
    assert header.backing_path(str(img)) == str(tmp_path / "base.raw")  # next to the image
    assert header.data_file is None
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 4096)
    assert host.read_qcow2_header(raw) is None


def test_format_given_is_used_as_given_never_probed(cache: Path, tmp_path: Path,
                                                    probes: list[str]) -> None:
    """--disk scratch.img,format=raw on a file that looks like a qcow2 naming a host file: raw."""
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(qcow2_header("/etc/passwd", backing_format="raw"))
    image = host.resolve_disk(Drive(scratch, format="raw"), QEMU)
    assert (image.format, image.backing) == ("raw", ())
    assert probes == []


def test_first_sight_is_recorded_and_a_guest_written_header_changes_nothing(
        cache: Path, tmp_path: Path, probes: list[str]) -> None:
    scratch = tmp_path / "scratch.img"
    scratch.write_bytes(b"\0" * (1 << 20))
    assert host.resolve_disk(Drive(scratch), QEMU).format == "raw"
    assert probes == [str(scratch)]
    assert _img.recorded_format(str(scratch)) == "raw"
    assert oct(os.stat(_img.format_records_path()).st_mode & 0o777) == "0o600"
    # The guest writes a qcow2 header naming a host file into its raw disk (in place).
    with open(scratch, "r+b") as fh:
        fh.write(qcow2_header(str(tmp_path / "secret"), backing_format="raw"))
    image = host.resolve_disk(Drive(scratch), QEMU)
    assert (image.format, image.backing) == ("raw", ())
    assert probes == [str(scratch)]  # not probed again


def test_a_new_file_under_the_same_name_is_seen_afresh(cache: Path, tmp_path: Path,
                                                       probes: list[str]) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    host.resolve_disk(Drive(disk), QEMU)
    replaced = tmp_path / "new.img"
    replaced.write_bytes(qcow2_header())
    os.replace(replaced, disk)  # another inode: the user put a qcow2 there
    assert host.resolve_disk(Drive(disk), QEMU).format == "qcow2"
    assert probes == [str(disk), str(disk)]


def test_a_preview_does_not_record(cache: Path, tmp_path: Path, probes: list[str]) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    host.resolve_disk(Drive(disk), QEMU, record=False)
    assert _img.recorded_format(str(disk)) is None


def test_a_backing_file_named_only_by_the_header_is_refused(cache: Path, tmp_path: Path,
                                                            probes: list[str]) -> None:
    """First sight after the guest wrote the header: the probe says qcow2, the chain is refused."""
    secret = tmp_path / "id_ed25519"
    secret.write_text("MARKER\n")
    disk = tmp_path / "scratch.img"
    disk.write_bytes(qcow2_header(str(secret), backing_format="raw"))
    for drive in (Drive(disk), Drive(disk, format="qcow2"), Drive(disk, overlay=True)):
        with pytest.raises(SpecError) as caught:
            host.resolve_disk(drive, QEMU)
        assert caught.value.field == "drive.file" and caught.value.value == str(disk)
        assert str(secret) in str(caught.value) and "format=raw" in str(caught.value)


def test_a_named_backing_chain_is_followed_exactly(cache: Path, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 4096)
    mid = tmp_path / "mid.qcow2"
    mid.write_bytes(qcow2_header("base.raw", backing_format="raw"))
    top = tmp_path / "top.qcow2"
    top.write_bytes(qcow2_header(str(mid), backing_format="qcow2", size=7 << 20))
    drive = Drive(top, format="qcow2", backing=(f"qcow2:{mid}", f"raw:{base}"))
    image = host.resolve_disk(drive, QEMU)
    assert image.format == "qcow2" and image.virtual_size == 7 << 20
    assert image.backing == ((str(mid), "qcow2"), (str(base), "raw"))
    # Named, but not what the header says; or named beyond the end of the chain.
    other = tmp_path / "other.raw"
    other.write_bytes(b"")
    for backing, value in (((f"raw:{other}",), str(other)),
                           ((f"qcow2:{mid}", f"raw:{base}", f"raw:{other}"), str(other))):
        with pytest.raises(SpecError) as caught:
            host.resolve_disk(Drive(top, format="qcow2", backing=backing), QEMU)
        assert (caught.value.field, caught.value.value) == ("drive.backing", value)


def test_an_external_data_file_is_refused(cache: Path, tmp_path: Path) -> None:
    disk = tmp_path / "d.qcow2"
    disk.write_bytes(qcow2_header(data_file="/etc/shadow"))
    with pytest.raises(SpecError) as caught:
        host.resolve_disk(Drive(disk, format="qcow2"), QEMU)
    assert "/etc/shadow" in str(caught.value) and "data file" in str(caught.value)


def test_format_qcow2_on_a_raw_file_is_a_clear_error(cache: Path, tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(b"\0" * 4096)
    with pytest.raises(SpecError) as caught:
        host.resolve_disk(Drive(disk, format="qcow2"), QEMU)
    assert caught.value.field == "drive.format" and "format=raw" in str(caught.value)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_is_refused_at_once(cache: Path, tmp_path: Path, kind: str) -> None:
    target = tmp_path / "fifo" if kind == "fifo" else Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(target)
    for drive in (Drive(target, format="raw"), Drive(target)):
        with pytest.raises(SpecError) as caught:
            host.resolve_disk(drive, QEMU)
        assert caught.value.value == str(target)
        assert ("a FIFO" if kind == "fifo" else "a character device") in str(caught.value)
    # Named as a backing file: refused the same way.
    top = tmp_path / "top.qcow2"
    top.write_bytes(qcow2_header(str(target)))
    with pytest.raises(SpecError) as caught:
        host.resolve_disk(Drive(top, format="qcow2", backing=(f"raw:{target}",)), QEMU)
    assert (caught.value.field, caught.value.value) == ("drive.backing", str(target))


# -- the warm key ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_warm_key_with_a_backing_name_at_a_fifo_or_dev_zero_fails_fast(
        cache: Path, tmp_path: Path, kind: str) -> None:
    """It used to open whatever the header named: a FIFO hung the start, /dev/zero never ended."""
    from qemukit import VMSpec

    target = tmp_path / "fifo" if kind == "fifo" else Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(target)
    binary = tmp_path / "qemu"
    binary.write_bytes(b"qemu")
    qemu = host.QemuBinary(str(binary), (7, 2, 0), "7.2", frozenset({"q35"}), True, None)
    top = tmp_path / "top.qcow2"
    top.write_bytes(qcow2_header(str(target)))
    what = "a FIFO" if kind == "fifo" else "a character device"
    # The header's name alone is never followed; named by the user, it is refused as what it is.
    for drive, message in ((Drive(top, format="qcow2", overlay=True), "did not name"),
                           (Drive(top, format="qcow2", overlay=True, backing=(f"raw:{target}",)),
                            what)):
        with pytest.raises(SpecError) as caught:
            warm_key(VMSpec(drives=(drive,)), qemu, FACTS, tmp_path / "warm")
        assert message in str(caught.value) and str(target) in str(caught.value)
    with pytest.raises(SpecError) as caught:
        file_digest(target, tmp_path / "warm")
    assert what in str(caught.value) and str(target) in str(caught.value)


@pytest.mark.skipif(not shutil.which("qemu-img"), reason="needs qemu-img")
def test_headers_qemu_img_writes_are_read_the_same(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"MARKER" * 100)
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(top), "3M"], check=True)
    header = host.read_qcow2_header(top)
    assert header is not None
    assert (header.backing, header.backing_format, header.virtual_size) == (str(secret), "raw", 3 << 20)
    data = tmp_path / "data.qcow2"
    outside = tmp_path / "outside.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={outside}",
                    str(data), "1M"], check=True)
    header = host.read_qcow2_header(data)
    assert header is not None and header.data_file == str(outside)


def test_the_plan_puts_the_base_and_its_chain_under_the_overlay(tmp_path: Path) -> None:
    from qemukit import VMSpec
    from qemukit._launch.plan import DiskImage, HostFacts, plan_launch
    from qemukit._launch.runtime import RuntimeDir

    spec = VMSpec(drives=(Drive("/img/top.qcow2", overlay=True, backing=("raw:/img/base.raw",)),
                          Drive("/img/data.raw", format="raw")))
    images = [DiskImage("qcow2", (("/img/base.raw", "raw"),), 5 << 20), DiskImage("raw", (), 4096)]
    plan = plan_launch(spec, HostFacts(qemu="qemu", accel="tcg"), RuntimeDir(tmp_path / "vm"), images)
    (step,) = plan.overlays
    assert (step.base, step.base_format, step.size) == ("/img/top.qcow2", "qcow2", 5 << 20)
    assert plan.plumbing.drive_formats == ("qcow2", "raw")
    assert plan.plumbing.drive_backing == (
        (("/img/top.qcow2", "qcow2"), ("/img/base.raw", "raw")), ())
    argv = plan.argv()
    assert '"backing":"disk0-b0-fmt"' in " ".join(argv)
    assert "driver=raw,node-name=disk1-fmt,file=disk1-file" in argv


def test_a_clone_names_the_chain_its_bundle_recorded(tmp_path: Path) -> None:
    from qemukit import VMSpec
    from qemukit.snapshot import Bundle

    ro = Drive("/img/ro.qcow2", format="qcow2", read_only=True, backing=("raw:/img/b.raw",))
    VMSpec(drives=(Drive("/img/base.raw", format="raw", overlay=True), ro)).dump(
        tmp_path / "spec.toml")
    manifest = {"disks": [{"id": "disk0", "file": "disk-disk0.qcow2", "format": "qcow2",
                           "backing": ["raw:/img/base.raw"]}]}
    drive, kept = Bundle(tmp_path, manifest).clone_spec().drives
    assert kept == Drive("/img/ro.qcow2", format="qcow2", read_only=True, id="disk1",
                         backing=("raw:/img/b.raw",))  # not copied: as the VM had it
    assert (drive.file, drive.format, drive.overlay) == (str(tmp_path / "disk-disk0.qcow2"),
                                                         "qcow2", True)
    assert drive.backing == ("raw:/img/base.raw",)


def test_a_data_file_is_refused_before_any_probe(cache: Path, tmp_path: Path,
                                                 probes: list[str]) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(qcow2_header(data_file="/etc/shadow"))
    with pytest.raises(SpecError) as caught:
        host.resolve_disk(Drive(disk), QEMU)
    assert "/etc/shadow" in str(caught.value)
    assert probes == []  # qemu-img would have opened the data file
