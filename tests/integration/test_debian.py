"""The debian image end to end, under TCG: build, boot, ssh, guest agent, hotplug, snapshots, stop.

One VM serves the whole module (a boot costs about a minute under TCG). It
is started the way a user would, ``qemukit run --image debian --detach
--wait ssh``, with a ``--user-data`` file, and each test takes it over with
``VM.attach`` and lets go again, so the CLI commands (``ssh``, ``exec``,
``stop``) can reach it in between. The tests run in file order; the last
ones stop the VM and check the base image was never written.

That start is warm, as ``run``'s default is: the VM is a restored clone, given
its own identity (host name, keys), of a state saved after one cold boot with
cloud-init (shared with test_debian_warm.py). The image's cold boot through
the bootloader is test_images_import.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qemukit import images
from qemukit.images.debian import file_sha256 as sha256
from tests.helpers import attached, run_qemukit

# The module shares one VM: keep its tests on one xdist worker (--dist loadgroup).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("debian-vm")]

NAME = "qk-debian"
USER_DATA = """\
#cloud-config
write_files:
  - path: /etc/qemukit-user-data
    content: "passed through\\n"
"""


def qk(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_qemukit(*args, timeout=timeout)



@dataclass
class Booted:
    name: str
    seconds_to_ssh: float


@pytest.fixture(scope="module")
def base_sha256(debian_image: images.DebianImage) -> str:
    return sha256(debian_image.disk)


@pytest.fixture(scope="module")
def booted(debian_image: images.DebianImage, base_sha256: str, state_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    user_data = tmp_path_factory.mktemp("seed") / "user-data"
    user_data.write_text(USER_DATA)
    start = time.monotonic()
    # Started as a user would: warm by default. The first start of this description (this
    # module's or test_debian_warm.py's, which uses the same user-data) boots the image with
    # cloud-init on a fresh seed and saves it; this VM is then a restored clone of it.
    result = qk("run", "--image", "debian", "--accel", "tcg", "--name", NAME, "--detach",
                "--wait", "ssh", "--user-data", str(user_data), "--timeout", "900",
                timeout=960)
    seconds = time.monotonic() - start
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == NAME
        print(f"\nqemukit run --image debian --detach --wait ssh returned after {seconds:.1f}s",
              file=sys.stderr)
        yield Booted(NAME, seconds)
    finally:
        if (state_root / NAME).exists():
            qk("kill", NAME)



def test_image_is_built_cached_and_read_only(debian_image: images.DebianImage) -> None:
    manifest = debian_image.manifest
    assert manifest["packages"] > 150
    assert debian_image.disk.stat().st_mode & 0o222 == 0  # nobody writes the base
    assert debian_image.kernel_release.endswith("-cloud-amd64")
    assert images.find_image("debian") == debian_image
    print(f"\ndebian image: {debian_image.disk_bytes / 2**20:.0f} MiB qcow2, "
          f"{manifest['packages']} packages, built in {manifest['build_seconds']}s", file=sys.stderr)
    # a second build is the cache: no step of a build runs, the manifest is not rewritten
    steps: list[str] = []
    written = (debian_image.directory / "manifest.json").stat().st_mtime_ns
    assert images.build("debian", progress=steps.append) == debian_image
    assert steps == [f"using cached debian image {debian_image.directory}"], steps
    assert (debian_image.directory / "manifest.json").stat().st_mtime_ns == written


def test_boot_is_usable_over_ssh_and_agent(booted: Booted) -> None:
    with attached(NAME) as vm:
        assert vm.spec.agent == "qga"
        assert vm.accel is not None and vm.accel.accel == "tcg"
        vm.wait_ready(60)
        # When did the guest (its own monotonic clock, from kernel start) bring them up? In
        # the boot the state was saved after: both services started there, and run ever since.
        out = vm.exec(["systemctl", "show", "-P", "ActiveEnterTimestampMonotonic",
                       "qemu-guest-agent.service", "ssh.service"]).stdout_text.split()
        agent_s, ssh_s = (int(v) / 1e6 for v in out)
        print(f"\nguest: agent up {agent_s:.1f}s, sshd up {ssh_s:.1f}s after kernel start; "
              f"'run --wait ssh' returned after {booted.seconds_to_ssh:.1f}s", file=sys.stderr)
        assert 0 < agent_s and 0 < ssh_s
        host, port = vm.ssh_address()
        assert host == "127.0.0.1" and port > 0


def test_ssh_runs_id_and_the_system_is_running(booted: Booted) -> None:
    result = qk("ssh", NAME, "--", "id")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("uid=1000(debian)")
    assert "(sudo)" in result.stdout
    result = qk("ssh", NAME, "--", "systemctl", "is-system-running", "--wait", timeout=180)
    assert result.stdout.strip() == "running", (result.stdout, result.stderr)
    assert qk("ssh", NAME, "--", "sh", "-c", "exit 5").returncode == 5  # each word intact
    printed = qk("ssh", NAME, "--print", "--", "true").stdout
    assert "StrictHostKeyChecking=yes" in printed and "UserKnownHostsFile=" in printed
    assert "127.0.0.1" in printed


def test_guest_exec_returns_exit_code_and_output(booted: Booted) -> None:
    with attached(NAME) as vm:
        result = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
        assert (result.exit_status, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
        assert vm.exec("hostname").stdout_text.strip() == NAME
        assert vm.guest.exec(["true"]).exit_status == 0
    cli = qk("exec", NAME, "--", "sh", "-c", "cat /etc/hostname; exit 3")
    assert (cli.returncode, cli.stdout.strip()) == (3, NAME)


def test_user_data_file_was_passed_through(booted: Booted) -> None:
    with attached(NAME) as vm:
        assert vm.guest.read_file("/etc/qemukit-user-data") == b"passed through\n"


def test_guest_files_and_fsfreeze(booted: Booted) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, binary
    with attached(NAME) as vm:
        vm.guest.write_file("/root/blob", payload)
        assert vm.exec(["sha256sum", "/root/blob"]).stdout_text.split()[0] == hashlib.sha256(
            payload).hexdigest()
        assert vm.guest.read_file("/root/blob") == payload
        assert vm.guest.fsfreeze_status() == "thawed"
        with vm.guest.frozen() as count:
            assert count >= 1
            assert vm.guest.fsfreeze_status() == "frozen"
        assert vm.guest.fsfreeze_status() == "thawed"
        vm.exec(["rm", "/root/blob"], check=True)


def test_hotplugged_disk_shows_in_lsblk(booted: Booted, tmp_path: Path) -> None:
    disk = tmp_path / "scratch.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "96M"], check=True)
    with attached(NAME) as vm:
        before = vm.exec(["lsblk", "-dnbo", "NAME,SIZE"]).stdout_text
        device = vm.hotplug.disk(disk)
        try:
            after = vm.exec(["sh", "-c", "udevadm settle; lsblk -dnbo NAME,SIZE"]).stdout_text
            new = set(after.splitlines()) - set(before.splitlines())
            assert [line.split()[1] for line in new] == [str(96 * 2**20)], (before, after)
        finally:
            vm.unplug(device)
        gone = vm.exec(["sh", "-c", "udevadm settle; lsblk -dnbo NAME,SIZE"]).stdout_text
        assert set(gone.splitlines()) == set(before.splitlines())


def test_internal_snapshot_saves_and_loads(booted: Booted) -> None:
    with attached(NAME) as vm:
        vm.guest.write_file("/root/disk-marker", b"before\n")
        vm.guest.write_file("/run/ram-marker", b"before\n")  # tmpfs: lives in RAM only
        vm.exec(["sync"], check=True)
        start = time.monotonic()
        info = vm.snapshots.save("qk-t1")
        saved = time.monotonic() - start
        assert info.vm_state_size > 0
        vm.guest.write_file("/root/disk-marker", b"after\n")
        vm.guest.write_file("/run/ram-marker", b"after\n")
        vm.exec(["sync"], check=True)
        start = time.monotonic()
        vm.snapshots.load("qk-t1")
        loaded = time.monotonic() - start
        print(f"\nsnapshot-save {saved:.1f}s ({info.vm_state_size / 2**20:.0f} MiB RAM state), "
              f"snapshot-load {loaded:.1f}s", file=sys.stderr)
        # the agent's channel survives the rollback: the next call syncs afresh
        assert vm.guest.read_file("/root/disk-marker") == b"before\n"
        assert vm.guest.read_file("/run/ram-marker") == b"before\n"
        vm.snapshots.delete("qk-t1")


def test_stop_ends_on_the_acpi_rung(booted: Booted, state_root: Path) -> None:
    result = qk("stop", NAME, "--json", "--timeout", "90", timeout=150)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rung"] == "acpi", report
    assert not (state_root / NAME).exists()  # runtime dir, overlay and seed are gone


def test_base_image_never_written(debian_image: images.DebianImage, base_sha256: str) -> None:
    assert sha256(debian_image.disk) == base_sha256 == debian_image.manifest["disk_sha256"]
    assert not any(p.name.startswith("overlay") for p in debian_image.directory.iterdir())
    assert os.access(debian_image.disk, os.R_OK)
