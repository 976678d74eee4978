"""A whole bootable disk from a root tree, the way distributions make their cloud images.

No loop device, no mount, no root-only trick: every step writes into plain
files.

1. the root's UUID, the ESP's volume id and the ext4 hash seed are derived from
   the build's cache key, so the same inputs give the same identifiers;
2. ``/etc/fstab`` in the tree names the root (and the ESP, ``nofail``) by UUID;
3. ``grub-mkstandalone -O x86_64-efi`` makes one EFI binary with its modules and
   a ``grub.cfg`` embedded: it finds the root by file system UUID and boots
   ``/vmlinuz`` + ``/initrd.img`` with ``root=UUID=... console=ttyS0``;
4. ``mkfs.vfat -C`` makes the ESP image and mtools (``mmd``, ``mcopy``) put
   that binary at ``EFI/BOOT/BOOTX64.EFI``, the removable-media path UEFI
   firmware boots without any boot variable;
5. ``grub-mkimage -O i386-pc`` makes GRUB's BIOS ``core.img`` with the same
   configuration embedded (run by GRUB's rescue parser: one plain command a
   line, as that configuration is);
6. ``sfdisk`` writes a GPT on the raw file (a 1 MiB BIOS boot partition, the
   ESP, then the root partition up to the end), ``mkfs.ext4 -d TREE -E
   offset=BYTES`` writes the root file system straight into its partition,
   and the ESP image is copied into its own;
7. :func:`install_bios_boot` does what ``grub-bios-setup`` does to a disk (that
   tool wants a block device and GRUB's device map): ``core.img`` goes into the
   BIOS boot partition, its first sector (``diskboot.img``) told where the rest
   lies, and GRUB's ``boot.img`` goes into the MBR, told where ``core.img``
   starts, keeping the protective MBR's partition table. So SeaBIOS boots the
   disk as well as OVMF does.
"""

from __future__ import annotations

import re
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BIOS_BOOT_TYPE", "ESP_TYPE", "LAYOUT_VERSION", "LINUX_TYPE", "check_tools", "disk_layout",
           "grub_config", "install_bios_boot", "write_disk"]

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
#: GPT's "BIOS boot partition": where GRUB's core.img lives on a GPT disk.
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
SECTOR = 512
#: Partitions start on 1 MiB boundaries, as parted and sfdisk place them.
ALIGN = 2048
ESP_MIB = 64
#: The BIOS boot partition: 1 MiB holds a core.img of a few hundred KiB with room to spare.
BIOS_BOOT_SECTORS = 2048
#: Bumped whenever write_disk changes what a bootable disk holds (part of its cache key).
LAYOUT_VERSION = 2
#: The backup GPT at the end of the disk: header plus 128 entries of 128 bytes.
_GPT_TAIL_SECTORS = 33
_TOOLS = {
    "sfdisk": "fdisk", "mkfs.vfat": "dosfstools", "mmd": "mtools", "mcopy": "mtools",
    "grub-mkstandalone": "grub-efi-amd64-bin", "grub-mkimage": "grub-common",
    "mkfs.ext4": "e2fsprogs",
}
_GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")
_GRUB_PC_DIR = Path("/usr/lib/grub/i386-pc")
#: GRUB's modules in the BIOS core.img: disk access, the partition table, the root's file
#: system, finding it by UUID, and the Linux loader.
_BIOS_MODULES = ("biosdisk", "part_gpt", "ext2", "search", "search_fs_uuid", "linux")

# Offsets in GRUB 2's boot.img (grub-core/boot/i386/pc/boot.S, include/grub/i386/pc/boot.h).
#: The BIOS parameter block some BIOSes write over: grub-bios-setup keeps the disk's bytes.
_BPB = slice(0x03, 0x5A)
#: The LBA (little-endian u64) of core.img's first sector.
_KERNEL_SECTOR = 0x5C
#: A 2-byte jump that trusts the BIOS's boot drive only for floppies; two NOPs on a hard disk.
_DRIVE_CHECK = 0x66
#: The disk signature and the four MBR partition entries: kept from the protective MBR.
_PART_TABLE = slice(0x1B8, 0x1FE)
#: diskboot.img's block list entry, the last 12 bytes of core.img's first sector: start LBA
#: (u64), sectors (u16), load segment (u16).
_BLOCKLIST = 512 - 12
_CORE_SEGMENT = 0x820
_NAMESPACE = uuid.UUID("6b0e8a4e-3f5c-4b1f-9d2e-71c0de5a1a70")

Run = Callable[..., str]


def check_tools() -> None:
    """Raise ``RuntimeError`` naming the first missing tool and its Debian package."""
    for tool, package in _TOOLS.items():
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found; a bootable image needs it "
                               f"(apt-get install {package}; scripts/setup does)")
    if not (_GRUB_EFI_DIR / "linux.mod").is_file():
        raise RuntimeError(f"GRUB's EFI modules are missing from {_GRUB_EFI_DIR} "
                           "(apt-get install grub-efi-amd64-bin)")
    if not ((_GRUB_PC_DIR / "boot.img").is_file() and (_GRUB_PC_DIR / "linux.mod").is_file()):
        raise RuntimeError(f"GRUB's BIOS boot files are missing from {_GRUB_PC_DIR} "
                           "(apt-get install grub-pc-bin; scripts/setup does)")


def _size_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if not match:
        raise RuntimeError(f"bad disk size {text!r} (e.g. 4G)")
    power: int = " KMGT".index(match.group(2) or " ")
    return int(match.group(1)) * (1 << (10 * power))


def disk_layout(disk_bytes: int, esp_mib: int = ESP_MIB) -> dict[str, int]:
    """Where the partitions go on a disk of ``disk_bytes``, in 512-byte sectors.

    The BIOS boot partition starts at 1 MiB, the ESP right after it, the
    root after that, ending before the backup GPT on a whole 4 KiB block.
    """
    total = disk_bytes // SECTOR
    bios_start, bios_sectors = ALIGN, BIOS_BOOT_SECTORS
    esp_start, esp_sectors = bios_start + bios_sectors, esp_mib * 2048
    root_start = esp_start + esp_sectors
    root_sectors = (total - _GPT_TAIL_SECTORS - root_start) // 8 * 8
    if root_sectors < 512 * 2048:
        raise RuntimeError(f"disk of {disk_bytes} bytes is too small for a root file system")
    return {"sectors": total, "bios_start": bios_start, "bios_sectors": bios_sectors,
            "esp_start": esp_start, "esp_sectors": esp_sectors,
            "root_start": root_start, "root_sectors": root_sectors}


def grub_config(root_uuid: str, kernel: str = "/vmlinuz", initrd: str = "/initrd.img",
                append: str = "console=ttyS0 net.ifnames=0") -> str:
    """The grub.cfg embedded in the EFI binary: the root by UUID, no menu, no wait."""
    return (
        "set timeout=0\n"
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        f"linux {kernel} root=UUID={root_uuid} ro {append}\n"
        f"initrd {initrd}\n"
        "boot\n"
    )


def _boot_paths(root: Path, release: str) -> tuple[str, str]:
    """/vmlinuz and /initrd.img if the kernel package made those links, else /boot's files."""
    if (root / "vmlinuz").is_symlink() and (root / "initrd.img").is_symlink():
        return "/vmlinuz", "/initrd.img"
    return f"/boot/vmlinuz-{release}", f"/boot/initrd.img-{release}"


def install_bios_boot(raw: Path, core_img: bytes, boot_img: bytes, bios_start: int,
                      bios_sectors: int) -> None:
    """Make the raw disk ``raw`` boot with a BIOS: what ``grub-bios-setup`` does, on a plain file.

    ``core_img`` (from ``grub-mkimage -O i386-pc``) goes into the BIOS boot
    partition at sector ``bios_start``; the block list at the end of its first
    sector (``diskboot.img``) is pointed at the sectors after it. ``boot_img``
    (GRUB's 512-byte MBR code) replaces the MBR's code, told to load sector
    ``bios_start``, while the disk's own BIOS parameter block, disk signature
    and partition table (the GPT's protective entry) are kept. No Reed-Solomon
    codes are added (as ``--no-rs-codes``): the partition is GRUB's alone.
    """
    if len(boot_img) != SECTOR or boot_img[510:512] != b"\x55\xaa":
        raise RuntimeError("GRUB's boot.img is not a 512-byte boot sector")
    rest = -(-(len(core_img) - SECTOR) // SECTOR)
    if len(core_img) <= SECTOR or 1 + rest > bios_sectors:
        raise RuntimeError(f"GRUB's core.img ({len(core_img)} bytes) does not fit the "
                           f"{bios_sectors * SECTOR}-byte BIOS boot partition")
    start, length, segment = struct.unpack_from("<QHH", core_img, _BLOCKLIST)
    # grub-mkimage fills the length and segment; a mismatch means another GRUB layout.
    if length != rest or segment != _CORE_SEGMENT:
        raise RuntimeError(f"core.img's block list holds {length} sectors at segment "
                           f"{segment:#x}, expected {rest} at {_CORE_SEGMENT:#x}: not GRUB 2's layout")
    core = bytearray(core_img)
    struct.pack_into("<QHH", core, _BLOCKLIST, bios_start + 1, rest, _CORE_SEGMENT)
    with open(raw, "r+b") as disk:
        mbr = disk.read(SECTOR)
        if len(mbr) != SECTOR or mbr[510:512] != b"\x55\xaa":
            raise RuntimeError(f"{raw} has no MBR (write the partition table first)")
        code = bytearray(boot_img)
        code[_BPB] = mbr[_BPB]
        struct.pack_into("<Q", code, _KERNEL_SECTOR, bios_start)
        code[_DRIVE_CHECK:_DRIVE_CHECK + 2] = b"\x90\x90"
        code[_PART_TABLE] = mbr[_PART_TABLE]
        disk.seek(bios_start * SECTOR)
        disk.write(bytes(core) + bytes(bios_sectors * SECTOR - len(core)))
        disk.seek(0)
        disk.write(bytes(code))


def write_disk(root: Path, raw: Path, work: Path, *, release: str, key: str, disk_size: str,
               run: Run) -> dict[str, Any]:
    """Write a bootable raw disk ``raw`` from the tree ``root``; returns its layout facts.

    ``key`` (the build's cache key) seeds the identifiers; ``run(argv, what)``
    runs a tool and raises ``RuntimeError`` on failure. Temporary files go in
    ``work``.
    """
    layout = disk_layout(_size_bytes(disk_size))
    root_uuid = str(uuid.uuid5(_NAMESPACE, f"root-{key}"))
    hash_seed = str(uuid.uuid5(_NAMESPACE, f"hash-{key}"))
    esp_id = uuid.uuid5(_NAMESPACE, f"esp-{key}").hex[:8].upper()
    esp_uuid = f"{esp_id[:4]}-{esp_id[4:]}"

    (root / "etc/fstab").write_text(
        "# qemukit debian image (bootable): file systems by UUID\n"
        f"UUID={root_uuid} / ext4 rw,errors=remount-ro 0 1\n"
        f"UUID={esp_uuid} /boot/efi vfat umask=0077,nofail 0 2\n",
        encoding="utf-8")
    (root / "boot/efi").mkdir(parents=True, exist_ok=True)

    kernel, initrd = _boot_paths(root, release)
    cfg = work / "grub.cfg"
    cfg.write_text(grub_config(root_uuid, kernel, initrd), encoding="utf-8")
    efi = work / "BOOTX64.EFI"
    run(["grub-mkstandalone", "-O", "x86_64-efi", "-o", str(efi), "--locales=", "--fonts=",
         "--themes=", "--modules=part_gpt ext2 search_fs_uuid linux normal",
         f"boot/grub/grub.cfg={cfg}"], "grub-mkstandalone")

    core = work / "core.img"
    run(["grub-mkimage", "-O", "i386-pc", "-d", str(_GRUB_PC_DIR), "-o", str(core), "-c", str(cfg),
         "-p", "/boot/grub", *_BIOS_MODULES], "grub-mkimage (BIOS core.img)")

    esp = work / "esp.img"
    run(["mkfs.vfat", "-C", "-F", "32", "-n", "EFI", "-i", esp_id, str(esp),
         str(layout["esp_sectors"] // 2)], "mkfs.vfat")
    run(["mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT"], "mmd (ESP directories)")
    run(["mcopy", "-i", str(esp), str(efi), "::/EFI/BOOT/BOOTX64.EFI"], "mcopy (GRUB into the ESP)")

    with open(raw, "wb") as fh:
        fh.truncate(layout["sectors"] * SECTOR)
    table = (
        "label: gpt\n"
        f"label-id: {uuid.uuid5(_NAMESPACE, f'disk-{key}')}\n"
        "unit: sectors\n"
        f"start={layout['bios_start']}, size={layout['bios_sectors']}, type={BIOS_BOOT_TYPE}, "
        f"uuid={uuid.uuid5(_NAMESPACE, f'bios-part-{key}')}, name=\"BIOS boot\"\n"
        f"start={layout['esp_start']}, size={layout['esp_sectors']}, type={ESP_TYPE}, "
        f"uuid={uuid.uuid5(_NAMESPACE, f'esp-part-{key}')}, name=\"EFI System\"\n"
        f"start={layout['root_start']}, size={layout['root_sectors']}, type={LINUX_TYPE}, "
        f"uuid={uuid.uuid5(_NAMESPACE, f'root-part-{key}')}, name=\"root\"\n"
    )
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(raw)], "sfdisk",
        input_text=table)

    run(["mkfs.ext4", "-q", "-F", "-L", "debian-root", "-U", root_uuid,
         "-E", f"offset={layout['root_start'] * SECTOR},hash_seed={hash_seed}",
         "-d", str(root), str(raw), f"{layout['root_sectors'] // 2}k"], "mkfs.ext4 -d at an offset")
    with open(esp, "rb") as src, open(raw, "r+b") as dst:
        dst.seek(layout["esp_start"] * SECTOR)
        shutil.copyfileobj(src, dst, 1 << 20)
    install_bios_boot(raw, core.read_bytes(), (_GRUB_PC_DIR / "boot.img").read_bytes(),
                      layout["bios_start"], layout["bios_sectors"])
    if (raw.stat().st_size != layout["sectors"] * SECTOR):
        raise RuntimeError(f"{raw} changed size while the file systems were written")
    return {**layout, "root_uuid": root_uuid, "esp_uuid": esp_uuid, "kernel": kernel,
            "initrd": initrd, "firmware": ["uefi", "bios"]}
