"""A user's own disk image end to end, under TCG: import, boot through its firmware, ssh, agent,
cp both ways (agent and ssh), ports that forward themselves, stop; then the same disk under BIOS.

The "downloaded" image is the bootable debian disk (GPT, BIOS boot partition,
ESP with GRUB, ext4 root; built once and cached, about 80 s), copied to a
temporary directory as a user's download would be and imported under another
name. It boots with OVMF and its own GRUB, not ``-kernel``, detached as a
developer starts it (no --forward-auto: an imported image with an agent has
it on by default); its file must be byte-identical after. One UEFI boot for
the module, then one SeaBIOS boot of the same file imported with
``--firmware bios``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemukit import images
from qemukit.images.debian import file_sha256
from qemukit.paths import cache_dir
from tests.helpers import run_qemukit, wait_until

# The slow tier: a bootable Debian disk built with GRUB, then two cold boots through its
# bootloader (UEFI and BIOS) under TCG: about 18 minutes, which the default tier cannot fit.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.xdist_group("imported-vm")]

IMAGE = "qk-imported-deb"
NAME = "qk-imported"
BIOS_IMAGE = "qk-imported-bios"
BIOS_NAME = "qk-imported-bios"


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
    out = qk("ssh", booted, "--", "sh", "-c", "test -d /sys/firmware/efi && findmnt -no FSTYPE /boot/efi")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "vfat"


def test_the_guest_agent_answers(booted: str) -> None:
    out = qk("exec", booted, "--", "true")
    assert out.returncode == 0, out.stderr


def guest(name: str, script: str, timeout: float = 120) -> str:
    """Run shell code in the guest as root through qemu-guest-agent; its stdout."""
    r = qk("exec", name, "--", "sh", "-c", script, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout



@pytest.fixture(scope="module")
def blob(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("blob") / "blob.bin"
    path.write_bytes(os.urandom(20 * 1024 * 1024))
    path.chmod(0o640)
    return path


def _tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "a" / "b" / "run.sh").chmod(0o750)
    (tree / "a" / "zero").write_bytes(bytes(range(256)) * 64)
    (tree / "a" / "zero").chmod(0o600)
    (tree / "a").chmod(0o711)
    return tree


@pytest.mark.parametrize("via", ["agent", "ssh"])
def test_cp_of_a_20mb_binary_file_both_ways_is_byte_identical(booted: str, blob: Path,
                                                             tmp_path: Path, via: str) -> None:
    where = f"/tmp/{via}-blob.bin"
    start = time.monotonic()
    r = qk("cp", "--via", via, str(blob), f"{booted}:{where}", timeout=600)
    assert r.returncode == 0, r.stderr
    copied_in = time.monotonic() - start
    out = guest(booted, f"sha256sum {where}; stat -c '%a %U' {where}; ls -a /tmp").split()
    assert out[0] == hashlib.sha256(blob.read_bytes()).hexdigest()
    # Over ssh the file belongs to the login user (the seed's), over the agent to root.
    assert out[2:4] == ["640", "debian" if via == "ssh" else "root"]
    assert not any("qemukit" in name for name in out[4:]), out
    back = tmp_path / "back.bin"
    start = time.monotonic()
    r = qk("cp", "--via", via, f"{booted}:{where}", str(back), timeout=600)
    assert r.returncode == 0, r.stderr
    print(f"\ncp --via {via} 20 MiB: in {copied_in:.1f}s, out {time.monotonic() - start:.1f}s",
          file=sys.stderr)
    assert back.read_bytes() == blob.read_bytes()
    assert back.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.bin"]


@pytest.mark.parametrize("via", ["agent", "ssh"])
def test_cp_r_copies_a_tree_keeping_modes(booted: str, tmp_path: Path, via: str) -> None:
    tree = _tree(tmp_path)
    target = f"/tmp/{via}-trees"
    guest(booted, f"rm -rf {target}; mkdir -m 777 {target}")
    r = qk("cp", "-r", "--via", via, str(tree), f"{booted}:{target}/", timeout=300)
    assert r.returncode == 0, r.stderr
    out = guest(booted, f"cd {target}/tree && stat -c '%n %a' a a/b/run.sh a/zero && a/b/run.sh")
    assert out.split("\n")[:4] == ["a 711", "a/b/run.sh 750", "a/zero 600", "hi"]
    r = qk("cp", "-r", "--via", via, f"{booted}:{target}/tree", str(tmp_path / "back"), timeout=300)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back"
    assert (back / "a" / "zero").read_bytes() == bytes(range(256)) * 64
    assert (back / "a" / "b" / "run.sh").stat().st_mode & 0o777 == 0o750
    assert (back / "a").stat().st_mode & 0o777 == 0o711


@pytest.mark.parametrize("via", ["agent", "ssh"])
def test_cp_of_a_missing_path_is_a_clear_error_and_changes_nothing(booted: str, tmp_path: Path,
                                                                   via: str) -> None:
    before = guest(booted, "ls -la /tmp")
    r = qk("cp", "--via", via, str(tmp_path / "no-such-file"), f"{booted}:/tmp/")
    assert r.returncode == 125 and "no such file or directory on the host" in r.stderr, r.stderr
    r = qk("cp", "--via", via, f"{booted}:/tmp/no-such-file", str(tmp_path / "x"))
    assert r.returncode == 125, r.stderr
    assert "no such file or directory in the guest: /tmp/no-such-file" in r.stderr
    (tmp_path / "f").write_bytes(b"x")
    r = qk("cp", "--via", via, str(tmp_path / "f"), f"{booted}:/no/such/dir/f")
    assert r.returncode == 125 and "no such directory in the guest: /no/such/dir" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    assert guest(booted, "ls -la /tmp") == before


def _forwards(name: str) -> list[dict[str, Any]]:
    r = qk("ports", name, "--json")
    assert r.returncode == 0, r.stderr
    return list(json.loads(r.stdout))


def _forward(name: str, proto: str, port: int) -> dict[str, Any] | None:
    return next((f for f in _forwards(name) if f["proto"] == proto and f["guest_port"] == port),
                None)


def test_a_guest_http_server_is_forwarded_by_itself_and_the_forward_goes_with_it(
        booted: str) -> None:
    guest(booted, "mkdir -p /tmp/www && echo served-from-the-guest > /tmp/www/hello.txt && "
          "systemd-run --unit=qk-http8123 --working-directory=/tmp/www "
          "python3 -m http.server 8123")
    fw = wait_until(lambda: _forward(booted, "tcp", 8123), 120,
                    "a forward of guest TCP port 8123 in qemukit ports --json", interval=1)
    assert fw["kind"] == "auto" and fw["host_addr"] == "127.0.0.1"
    url = f"http://127.0.0.1:{fw['host_port']}/hello.txt"
    with urllib.request.urlopen(url, timeout=60) as reply:
        assert reply.read() == b"served-from-the-guest\n"
    guest(booted, "systemctl stop qk-http8123")
    wait_until(lambda: _forward(booted, "tcp", 8123) is None, 120,
               "the forward of TCP 8123 to be removed", interval=1)
    assert "8123" not in qk("ports", booted).stdout


_UDP_ECHO = ("import socket\n"
             "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
             "s.bind(('0.0.0.0', 8124))\n"
             "while True:\n"
             "    data, peer = s.recvfrom(2048)\n"
             "    s.sendto(b'echo:' + data, peer)\n")


def test_a_guest_udp_listener_gets_a_udp_forward_and_a_datagram_round_trips(booted: str) -> None:
    guest(booted, f"systemd-run --unit=qk-udp8124 python3 -c \"{_UDP_ECHO}\"")
    fw = wait_until(lambda: _forward(booted, "udp", 8124), 120,
                    "a forward of guest UDP port 8124 in qemukit ports --json", interval=1)
    assert fw["kind"] == "auto" and fw["host_addr"] == "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)

        def echoed() -> bytes | None:
            sock.sendto(b"datagram", ("127.0.0.1", fw["host_port"]))
            try:
                return sock.recvfrom(2048)[0]
            except TimeoutError:
                return None  # UDP: a datagram may be lost; send again

        assert wait_until(echoed, 60, "the guest's UDP echo", interval=1) == b"echo:datagram"
    guest(booted, "systemctl stop qk-udp8124")
    wait_until(lambda: _forward(booted, "udp", 8124) is None, 120,
               "the forward of UDP 8124 to be removed", interval=1)


def test_stop_leaves_the_file_unchanged(booted: str, downloaded: Path) -> None:
    result = qk("stop", booted, timeout=180)
    assert result.returncode == 0, result.stderr
    assert shutil.which("qemu-img")
    info = subprocess.run(["qemu-img", "check", str(downloaded)], capture_output=True, text=True)
    assert info.returncode == 0, info.stdout + info.stderr


def test_the_same_disk_boots_with_bios_firmware(downloaded: Path, state_root: Path) -> None:
    """SeaBIOS, the MBR's boot.img, core.img in the BIOS boot partition, the kernel: no EFI."""
    before = file_sha256(downloaded)
    qk("images", "remove", BIOS_IMAGE)  # a leftover of an interrupted run
    result = qk("images", "import", BIOS_IMAGE, str(downloaded), "--firmware", "bios")
    assert result.returncode == 0, result.stderr
    assert "firmware bios" in result.stdout
    start = time.monotonic()
    # --cold: this is about SeaBIOS and GRUB booting the disk, not about a restored clone.
    result = qk("run", "--image", BIOS_IMAGE, "--accel", "tcg", "--name", BIOS_NAME, "--detach",
                "--cold", "--wait", "agent", "--no-forward-auto", "--timeout", "480", timeout=540)
    try:
        assert result.returncode == 0, result.stderr
        print(f"\nrun --image {BIOS_IMAGE} (SeaBIOS) --wait agent: {time.monotonic() - start:.1f}s",
              file=sys.stderr)
        out = guest(BIOS_NAME, "if [ -d /sys/firmware/efi ]; then echo efi; else echo bios; fi; "
                    "cat /proc/cmdline; findmnt -no SOURCE,UUID /")
        firmware, cmdline, root = out.splitlines()[:3]
        assert firmware == "bios"
        device, uuid = root.split()
        # GRUB's i386-pc loader (BOOT_IMAGE=), with the embedded config's root: not -kernel.
        assert f"BOOT_IMAGE=/vmlinuz root=UUID={uuid} ro" in cmdline, cmdline
        assert device.startswith("/dev/vda")
        spec = (state_root / BIOS_NAME / "spec.toml").read_text()
        assert 'firmware = "seabios"' in spec
    finally:
        qk("stop", BIOS_NAME, timeout=180)
        qk("images", "remove", BIOS_IMAGE)
    assert file_sha256(downloaded) == before, "the imported file was written"
