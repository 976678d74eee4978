"""A user's own disk image end to end, under TCG: import, boot through UEFI firmware, ssh, agent, stop.

The "downloaded" image is the bootable debian disk (GPT, ESP with GRUB, ext4
root; built once and cached, about 80 s), copied to a temporary directory as a
user's download would be and imported under another name. It boots with
OVMF and its own GRUB, not ``-kernel``; its file must be byte-identical after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemukit import images
from qemukit.images.debian import file_sha256
from qemukit.paths import cache_dir
from tests.helpers import run_qemukit

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.xdist_group("imported-vm")]

IMAGE = "qk-imported-deb"
NAME = "qk-imported"


def qk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_qemukit(*args, timeout=timeout)


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bootable debian disk, built once, copied out as a user's download."""
    built = images.debian.find_debian(cache_dir(), bootable=True)
    if built is None and os.geteuid() != 0:
        pytest.skip("building the bootable debian image runs mmdebstrap as root")
    start = time.monotonic()
    out = tmp_path_factory.mktemp("download") / "debian-12-genericcloud.qcow2"
    result = qk("images", "build", "debian", "--bootable", "-o", str(out), timeout=1200)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == out
    print(f"\nimages build debian --bootable -o: {time.monotonic() - start:.1f}s", file=sys.stderr)
    return out


@pytest.fixture(scope="module")
def booted(downloaded: Path, state_root: Path) -> Iterator[str]:
    before = file_sha256(downloaded)
    qk("images", "remove", IMAGE)  # a leftover of an interrupted run
    result = qk("images", "import", IMAGE, str(downloaded))
    assert result.returncode == 0, result.stderr
    assert "Debian GNU/Linux 12" in result.stdout and "firmware uefi" in result.stdout
    assert "agent qga" in result.stdout and "user debian" in result.stdout
    listed = qk("images", "list")
    assert f"{IMAGE}" in listed.stdout and str(downloaded) in listed.stdout
    start = time.monotonic()
    result = qk("run", "--image", IMAGE, "--accel", "tcg", "--name", NAME, "--detach",
                "--wait", "ssh", "--timeout", "480", timeout=540)
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == NAME
        print(f"\nrun --image {IMAGE} --detach --wait ssh: {time.monotonic() - start:.1f}s",
              file=sys.stderr)
        yield NAME
    finally:
        qk("stop", NAME, timeout=180)
        qk("images", "remove", IMAGE)
        assert file_sha256(downloaded) == before, "the imported file was written"


def test_booted_by_its_own_bootloader_not_kernel(booted: str) -> None:
    out = qk("ssh", booted, "--", "cat", "/proc/cmdline", "/etc/os-release")
    assert out.returncode == 0, out.stderr
    assert "BOOT_IMAGE=/vmlinuz root=UUID=" in out.stdout  # GRUB's line, not -append's
    assert 'ID=debian' in out.stdout and 'VERSION_ID="12"' in out.stdout


def test_uefi_and_the_esp_are_mounted(booted: str) -> None:
    out = qk("ssh", booted, "--", "sh", "-c", "'test -d /sys/firmware/efi && findmnt -no FSTYPE /boot/efi'")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vfat"


def test_the_guest_agent_answers(booted: str) -> None:
    out = qk("exec", booted, "--", "true")
    assert out.returncode == 0, out.stderr


def test_stop_leaves_the_file_unchanged(booted: str, downloaded: Path) -> None:
    result = qk("stop", booted, timeout=180)
    assert result.returncode == 0, result.stderr
    assert shutil.which("qemu-img")
    info = subprocess.run(["qemu-img", "check", str(downloaded)], capture_output=True, text=True)
    assert info.returncode == 0, info.stdout + info.stderr
