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
5. ``sfdisk`` writes a GPT on the raw file (ESP, then the root partition up to
   the end), ``mkfs.ext4 -d TREE -E offset=BYTES`` writes the root file system
   straight into its partition, and the ESP image is copied into its own.

BIOS boot is not provided: it needs GRUB's i386-pc ``core.img`` in a BIOS boot
partition and a patched ``boot.img`` in the MBR (grub-pc-bin is not installed).
"""

from __future__ import annotations

import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["ESP_TYPE", "LINUX_TYPE", "check_tools", "disk_layout", "grub_config", "write_disk"]

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_TYPE = "0FC63DAF-8483-4772-8E79-3D69D8477DE4"
SECTOR = 512
#: Partitions start on 1 MiB boundaries, as parted and sfdisk place them.
ALIGN = 2048
ESP_MIB = 64
#: The backup GPT at the end of the disk: header plus 128 entries of 128 bytes.
_GPT_TAIL_SECTORS = 33
_TOOLS = {
    "sfdisk": "fdisk", "mkfs.vfat": "dosfstools", "mmd": "mtools", "mcopy": "mtools",
    "grub-mkstandalone": "grub-efi-amd64-bin", "mkfs.ext4": "e2fsprogs",
}
_GRUB_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")
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


def _size_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]?)", text.strip().upper())
    if not match:
        raise RuntimeError(f"bad disk size {text!r} (e.g. 4G)")
    power: int = " KMGT".index(match.group(2) or " ")
    return int(match.group(1)) * (1 << (10 * power))


def disk_layout(disk_bytes: int, esp_mib: int = ESP_MIB) -> dict[str, int]:
    """Where the partitions go on a disk of ``disk_bytes``, in 512-byte sectors.

    The ESP starts at 1 MiB, the root right after it and ends before the
    backup GPT, on a whole 4 KiB block.
    """
    total = disk_bytes // SECTOR
    esp_start, esp_sectors = ALIGN, esp_mib * 2048
    root_start = esp_start + esp_sectors
    root_sectors = (total - _GPT_TAIL_SECTORS - root_start) // 8 * 8
    if root_sectors < 512 * 2048:
        raise RuntimeError(f"disk of {disk_bytes} bytes is too small for a root file system")
    return {"sectors": total, "esp_start": esp_start, "esp_sectors": esp_sectors,
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
    if (raw.stat().st_size != layout["sectors"] * SECTOR):
        raise RuntimeError(f"{raw} changed size while the file systems were written")
    return {**layout, "root_uuid": root_uuid, "esp_uuid": esp_uuid, "kernel": kernel,
            "initrd": initrd, "firmware": "uefi"}
