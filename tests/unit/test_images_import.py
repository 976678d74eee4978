"""Imported images (qemu-img info parsing, partition and OS facts, the registry) and debian cache keys.

The disks here are small sparse files written with sfdisk and mkfs.ext4 -d, as
the bootable image is; no QEMU runs (qemu-img info reads the files).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from qemukit import images
from qemukit.errors import SpecError
from qemukit.images import bootable, debian, imported

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "sfdisk", "mkfs.ext4", "debugfs")),
    reason="needs qemu-img, sfdisk, mkfs.ext4 and debugfs (scripts/setup installs them)")



# --------------------------------------------------------------------------- qemu-img info


def test_img_info_refuses_a_backing_file_even_one_that_exists(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(b"")
    text = json.dumps({"format": "qcow2", "virtual-size": 4 << 30, "backing-filename": "base.raw"})
    with pytest.raises(SpecError) as caught:
        imported.parse_img_info(text, str(tmp_path / "top.qcow2"))
    assert caught.value.field == "backing-filename" and "qemu-img convert" in str(caught.value)


def test_img_info_refuses_an_external_data_file() -> None:
    text = json.dumps({"format": "qcow2", "virtual-size": 1 << 20, "format-specific": {
        "type": "qcow2", "data": {"data-file": "/etc/shadow"}}})
    with pytest.raises(SpecError) as caught:
        imported.parse_img_info(text, "/x/top.qcow2")
    assert (caught.value.field, caught.value.value) == ("data-file", "/etc/shadow")


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")
def test_import_refuses_a_qcow2_whose_backing_file_is_a_host_file(cache: Path, tmp_path: Path) -> None:
    """The attack: an image that names ~/.ssh/id_ed25519 (here: a marker file) as its backing."""
    secret = tmp_path / "id_ed25519"
    secret.write_text("MARKER-host-secret\n")
    evil = tmp_path / "cloud.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(secret), "-F", "raw",
                    str(evil), "1M"], check=True)
    with pytest.raises(SpecError) as caught:
        images.import_image("evil", evil)
    assert caught.value.field == "backing-filename" and caught.value.value == str(secret)
    assert "flatten" in str(caught.value)
    assert images.list_imported() == []


@pytest.mark.parametrize("fmt", ["vmdk", "vdi", None])
def test_img_info_refuses_other_formats_naming_the_field(fmt: str | None) -> None:
    with pytest.raises(SpecError) as caught:
        imported.parse_img_info(json.dumps({"format": fmt, "virtual-size": 1}), "/x/disk")
    assert caught.value.field == "format" and "/x/disk" in str(caught.value)


def test_import_of_a_missing_file_names_the_file(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as caught:
        images.import_image("mine", tmp_path / "nope.qcow2")
    assert caught.value.field == "file" and "no such file" in str(caught.value)
    assert not imported.registry_path(cache).exists()


@pytest.mark.parametrize("name", ["tiny", "debian", "Bad Name", "-x", ""])
def test_import_refuses_bad_or_reserved_names(cache: Path, tmp_path: Path, name: str) -> None:
    with pytest.raises(SpecError) as caught:
        images.import_image(name, tmp_path / "disk.raw")
    assert caught.value.field == "name"


def test_a_locked_image_is_refused_with_a_clear_error(cache: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    disk = tmp_path / "disk.qcow2"
    disk.write_bytes(b"x")
    message = ('qemu-img: Could not open \'disk.qcow2\': Failed to get shared "write" lock\n'
               "Is another process using the image [disk.qcow2]?")
    real_run = subprocess.run

    def fake_run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if argv[1:3] == ["info", "--output=json"]:
            return subprocess.CompletedProcess(argv, 1, "", message)
        return real_run(argv, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr("qemukit.images.imported.subprocess.run", fake_run)
    with pytest.raises(SpecError) as caught:
        images.import_image("mine", disk)
    assert caught.value.field == "file" and "in use" in str(caught.value)


# --------------------------------------------------------------------------- disks read without booting


def _disk(tmp_path: Path, *, esp: bool, qga: bool, os_id: str = "debian") -> Path:
    """A 600 MiB sparse raw disk: GPT (ESP + Linux) with an ext4 root holding os-release."""
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "usr/sbin").mkdir(parents=True)
    (tree / "etc/os-release").write_text(f'PRETTY_NAME="Test {os_id}"\nID={os_id}\nVERSION_ID="9"\n')
    if qga:
        (tree / "usr/sbin/qemu-ga").write_text("#!/bin/sh\n")
    disk = tmp_path / "disk.raw"
    layout = bootable.disk_layout(600 << 20, esp_mib=8)
    with open(disk, "wb") as fh:
        fh.truncate(600 << 20)
    esp_line = (f"start={layout['esp_start']}, size={layout['esp_sectors']}, "
                f"type={bootable.ESP_TYPE if esp else bootable.LINUX_TYPE.replace('0FC6', '0FC7')}\n")
    table = (f"label: gpt\nunit: sectors\n{esp_line}"
             f"start={layout['root_start']}, size={layout['root_sectors']}, type={bootable.LINUX_TYPE}\n")
    subprocess.run(["sfdisk", "--quiet", str(disk)], input=table, text=True, check=True,
                   capture_output=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-E", f"offset={layout['root_start'] * 512}",
                    "-d", str(tree), str(disk), f"{layout['root_sectors'] // 2}k"],
                   check=True, capture_output=True)
    return disk


@needs_tools
def test_partitions_of_a_gpt_disk(tmp_path: Path) -> None:
    disk = _disk(tmp_path, esp=True, qga=False)
    parts = imported.read_partitions(disk.read_bytes()[:34 * 512], disk.stat().st_size)
    layout = bootable.disk_layout(600 << 20, esp_mib=8)
    assert [p.type for p in parts] == [bootable.ESP_TYPE, bootable.LINUX_TYPE]
    assert parts[1].start == layout["root_start"] * 512
    assert parts[1].size == layout["root_sectors"] * 512


def test_a_disk_without_a_table_is_one_partition() -> None:
    assert imported.read_partitions(bytes(34 * 512), 1 << 20) == [imported.Partition(0, 1 << 20, "")]


@needs_tools
def test_import_reads_os_agent_user_firmware_and_registry_round_trips(cache: Path, tmp_path: Path) -> None:
    disk = _disk(tmp_path, esp=True, qga=True)
    before = debian.file_sha256(disk), disk.stat().st_mtime_ns
    image = images.import_image("mine", disk)
    assert (image.format, image.firmware, image.agent, image.user) == ("raw", "uefi", "qga", "debian")
    assert image.os == {"ID": "debian", "VERSION_ID": "9", "PRETTY_NAME": "Test debian"}
    assert (image.sha256, image.mtime_ns) == before  # read, never written
    registry = imported.registry_path(cache)
    assert registry.stat().st_mode & 0o777 == 0o600
    assert [i.name for i in images.list_imported()] == ["mine"]
    assert imported.find_imported(cache, "mine") == image

    spec = images.spec("mine")
    assert spec.kernel is None and spec.firmware == "ovmf" and spec.agent == "qga"
    assert spec.drives[0].file == str(disk) and spec.drives[0].overlay
    assert spec.cloud_init is not None and spec.cloud_init.ssh_user == "debian"
    # A developer image: its ports forward themselves (when run detached) unless asked not to.
    assert spec.forward_auto is True
    assert images.spec("mine", forward_auto=False).forward_auto is False
    assert images.spec("mine", nics=()).forward_auto is None  # no user network: off, no error

    with pytest.raises(SpecError) as caught:
        images.import_image("mine", disk)
    assert caught.value.field == "name" and "already imported" in str(caught.value)

    os.utime(disk, ns=(before[1] + 10**9, before[1] + 10**9))
    with pytest.raises(SpecError) as changed:
        images.spec("mine")
    assert changed.value.field == "image" and "changed since it was imported" in str(changed.value)

    assert images.remove_imported("mine").name == "mine"
    assert images.list_imported() == []
    assert disk.exists()
    with pytest.raises(SpecError):
        images.remove_imported("mine")


@needs_tools
def test_without_an_esp_or_agent_the_image_boots_bios_ssh_only(cache: Path, tmp_path: Path) -> None:
    image = images.import_image("plain", _disk(tmp_path, esp=False, qga=False, os_id="ubuntu"))
    assert (image.firmware, image.agent, image.user) == ("bios", "none", "ubuntu")
    spec = images.spec("plain")
    assert spec.firmware == "seabios" and spec.agent == "none"
    assert spec.forward_auto is None  # no agent to see the listeners
    with pytest.raises(SpecError) as forced:
        images.spec("plain", forward_auto=True)
    assert forced.value.field == "forward_auto"


@needs_tools
def test_an_unreadable_os_needs_user(cache: Path, tmp_path: Path) -> None:
    disk = tmp_path / "blank.raw"
    with open(disk, "wb") as fh:
        fh.truncate(1 << 20)
    with pytest.raises(SpecError) as caught:
        images.import_image("blank", disk)
    assert caught.value.field == "user"
    assert images.import_image("blank", disk, user="alice").user == "alice"


# --------------------------------------------------------------------------- debian cache keys


def test_cache_key_depends_on_suite_packages_bootable_and_recipe_version(
        monkeypatch: pytest.MonkeyPatch) -> None:
    base = debian.cache_key("bookworm")
    assert debian.cache_key("trixie") != base
    assert debian.cache_key("sid") != base
    assert debian.cache_key("bookworm", ["vim"]) != base
    assert debian.cache_key("bookworm", bootable=True) != base
    assert debian.cache_key("bookworm", ["vim", "git", "vim"]) == debian.cache_key("bookworm",
                                                                                  ["git", "vim"])
    assert debian.cache_key("bookworm", recipe_files={"packages": b"x"}) != base
    monkeypatch.setattr(debian, "RECIPE_VERSION", debian.RECIPE_VERSION + 1)
    assert debian.cache_key("bookworm") != base


def test_bad_suite_and_package_names_name_the_field() -> None:
    with pytest.raises(SpecError) as suite:
        images.build("debian", suite="buster")
    assert suite.value.field == "suite"
    with pytest.raises(SpecError) as package:
        images.build("debian", packages=["vim", "rm -rf"])
    assert package.value.field == "packages" and "rm -rf" in str(package.value)
    with pytest.raises(SpecError) as tiny:
        images.build("tiny", suite="trixie")
    assert tiny.value.field == "image"


def test_a_normal_user_gets_one_line_saying_what_is_missing(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemukit.images.debian.os.geteuid", lambda: 1000)
    with pytest.raises(Exception) as caught:
        images.build("debian", suite="trixie", packages=["vim"])
    message = str(caught.value)
    assert "\n" not in message and "root" in message and "unshare" in message


def test_find_debian_looks_up_by_inputs(cache: Path) -> None:
    out = debian._image_dir(cache, "trixie", ["vim"], False, images.recipe_dir("debian"))
    assert out.name.startswith("trixie-")
    assert debian.find_debian(cache, "trixie", ["vim"]) is None


def test_build_output_is_checked_before_anything_is_built(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from qemukit.cli import main

    existing = tmp_path / "disk.qcow2"
    existing.write_bytes(b"mine")
    runner = CliRunner()
    taken = runner.invoke(main, ["images", "build", "debian", "--bootable", "-o", str(existing)])
    assert taken.exit_code != 0 and "output" in taken.output and "already exists" in taken.output
    assert existing.read_bytes() == b"mine"
    plain = runner.invoke(main, ["images", "build", "debian", "-o", str(tmp_path / "new.qcow2")])
    assert plain.exit_code != 0 and "--bootable" in plain.output
    assert not (tmp_path / "new.qcow2").exists()


# --------------------------------------------------------------------------- BIOS boot layout

_GRUB_PC = Path("/usr/lib/grub/i386-pc")
needs_grub_pc = pytest.mark.skipif(
    not (shutil.which("sfdisk") and shutil.which("grub-mkimage") and (_GRUB_PC / "boot.img").is_file()),
    reason="needs sfdisk, grub-mkimage and grub-pc-bin (scripts/setup installs them)")


def test_disk_layout_puts_bios_boot_esp_and_root_in_order_without_overlap() -> None:
    layout = bootable.disk_layout(4 << 30)
    assert layout["bios_start"] == 2048 and layout["bios_sectors"] == 2048
    assert layout["esp_start"] == layout["bios_start"] + layout["bios_sectors"]
    assert layout["root_start"] == layout["esp_start"] + layout["esp_sectors"]
    assert layout["root_start"] + layout["root_sectors"] <= layout["sectors"] - 33
    assert layout["root_sectors"] % 8 == 0


def _fake_core(sectors: int) -> bytes:
    """A core.img shaped like grub-mkimage's: diskboot's block list at the first sector's end."""
    core = bytearray(os.urandom(512 * sectors))
    core[500:512] = (2).to_bytes(8, "little") + (sectors - 1).to_bytes(2, "little") + b"\x20\x08"
    return bytes(core)


def _boot_img() -> bytes:
    return bytes(510) + b"\x55\xaa"


def test_install_bios_boot_refuses_what_does_not_fit_or_is_not_grub(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(510) + b"\x55\xaa" + bytes(4096 * 512))
    with pytest.raises(RuntimeError, match="does not fit"):
        bootable.install_bios_boot(disk, _fake_core(40), _boot_img(), 2048, 32)
    with pytest.raises(RuntimeError, match="not a 512-byte boot sector"):
        bootable.install_bios_boot(disk, _fake_core(4), bytes(512), 2048, 32)
    odd = bytearray(_fake_core(4))
    odd[508:510] = b"\x00\x10"
    with pytest.raises(RuntimeError, match="not GRUB 2's layout"):
        bootable.install_bios_boot(disk, bytes(odd), _boot_img(), 2048, 32)
    blank = tmp_path / "blank.raw"
    blank.write_bytes(bytes(4096 * 512))
    with pytest.raises(RuntimeError, match="has no MBR"):
        bootable.install_bios_boot(blank, _fake_core(4), _boot_img(), 2048, 32)


@needs_grub_pc
def test_bios_boot_writes_grubs_mbr_and_core_as_grub_bios_setup_would(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    layout = bootable.disk_layout(600 << 20, esp_mib=8)
    with open(disk, "wb") as fh:
        fh.truncate(layout["sectors"] * 512)
    table = ("label: gpt\nunit: sectors\n"
             f"start={layout['bios_start']}, size={layout['bios_sectors']}, type={bootable.BIOS_BOOT_TYPE}\n"
             f"start={layout['root_start']}, size={layout['root_sectors']}, type={bootable.LINUX_TYPE}\n")
    subprocess.run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)], input=table,
                   text=True, check=True, capture_output=True)
    cfg = tmp_path / "early.cfg"
    cfg.write_text(bootable.grub_config("11111111-2222-3333-4444-555555555555"))
    core_file = tmp_path / "core.img"
    subprocess.run(["grub-mkimage", "-O", "i386-pc", "-o", str(core_file), "-c", str(cfg), "-p",
                    "/boot/grub", "biosdisk", "part_gpt", "ext2", "search", "linux"],
                   check=True, capture_output=True)
    core = core_file.read_bytes()
    boot = (_GRUB_PC / "boot.img").read_bytes()
    before = disk.read_bytes()[:34 * 512]

    bootable.install_bios_boot(disk, core, boot, layout["bios_start"], layout["bios_sectors"])
    data = disk.read_bytes()
    mbr = data[:512]
    # boot.img's code, with the kernel sector and the hard-disk NOPs patched in ...
    assert int.from_bytes(mbr[0x5C:0x64], "little") == layout["bios_start"]
    assert mbr[0x66:0x68] == b"\x90\x90"
    assert mbr[0x5A:0x5C] == boot[0x5A:0x5C] and mbr[0x68:0x1B8] == boot[0x68:0x1B8]
    assert mbr[:3] == boot[:3]
    # ... and the protective MBR's partition table, signature and the GPT itself kept.
    assert mbr[0x1B8:0x200] == before[0x1B8:0x200] and mbr[0x1C2] == 0xEE
    assert data[512:34 * 512] == before[512:34 * 512]
    parts = imported.read_partitions(data[:34 * 512], len(data))
    assert [p.type for p in parts] == [bootable.BIOS_BOOT_TYPE, bootable.LINUX_TYPE]
    # core.img in the BIOS boot partition, its block list naming the sectors after the first.
    at = layout["bios_start"] * 512
    written = data[at:at + len(core)]
    rest = -(-(len(core) - 512) // 512)
    assert written[500:512] == ((layout["bios_start"] + 1).to_bytes(8, "little")
                                + rest.to_bytes(2, "little") + (0x820).to_bytes(2, "little"))
    assert written[:500] == core[:500] and written[512:] == core[512:]
    assert data[at + len(core):at + layout["bios_sectors"] * 512] == bytes(
        layout["bios_sectors"] * 512 - len(core))


def test_bootable_cache_key_has_the_disk_layout_version_and_the_plain_one_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plain, boot = debian.cache_key("bookworm"), debian.cache_key("bookworm", bootable=True)
    monkeypatch.setattr(debian, "LAYOUT_VERSION", bootable.LAYOUT_VERSION + 1)
    assert debian.cache_key("bookworm", bootable=True) != boot
    assert debian.cache_key("bookworm") == plain
