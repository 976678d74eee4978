"""The aarch64 debian image end to end, under TCG: build (qemu-user), boot, agent, ssh, stop.

The image is built once (cached by its inputs; mmdebstrap runs the arm64
tree's maintainer scripts under qemu-user through binfmt_misc) and one VM
serves the module: it is started as a user would, ``qemukit run --image
debian --arch aarch64 --detach --wait ssh``, and each test takes it over
with ``VM.attach`` or uses the CLI. Under TCG on 2 shared cores the guest
needs minutes to reach ssh, so every wait has a generous deadline. The tests
run in file order; the last ones stop the VM and check the base image was
never written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qemukit import host, images
from qemukit.images.debian import file_sha256 as sha256
from tests.helpers import attached, run_qemukit

# The slow tier: building the arm64 image under qemu-user takes 10 to 40 minutes on 2 cores.
pytestmark = [pytest.mark.slow, pytest.mark.integration,
              pytest.mark.xdist_group("debian-arm64-vm")]

NAME = "qk-debian-arm64"
ARCH = "aarch64"
#: Boot to ssh measured 4.5 and 10.5 min here under TCG (load 7 to 8 on 2 cores).
BOOT_TIMEOUT = 1500


def qk(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return run_qemukit(*args, timeout=timeout)


@dataclass
class Booted:
    name: str
    seconds_to_ssh: float


@pytest.fixture(scope="module")
def arm_image() -> images.DebianImage:
    """The aarch64 debian image, built once (mmdebstrap under qemu-user) if the cache lacks it."""
    built = images.find_image("debian", ARCH)
    if built is not None:
        return built
    if os.geteuid() != 0:
        pytest.skip("building the debian image runs mmdebstrap as root (run 'qemukit images "
                    "build debian --arch aarch64' as root first)")
    problem = host.foreign_exec_problem(ARCH)
    if problem is not None:
        pytest.skip(f"this host cannot build the aarch64 debian image: {problem}")
    start = time.monotonic()
    image = images.build("debian", arch=ARCH,
                         progress=lambda msg: print(f"  {msg}", file=sys.stderr))
    print(f"\naarch64 debian image built in {time.monotonic() - start:.0f}s", file=sys.stderr)
    return image


@pytest.fixture(scope="module")
def base_sha256(arm_image: images.DebianImage) -> str:
    return sha256(arm_image.disk)


@pytest.fixture(scope="module")
def booted(arm_image: images.DebianImage, base_sha256: str, state_root: Path) -> Iterator[Booted]:
    start = time.monotonic()
    result = qk("run", "--image", "debian", "--arch", ARCH, "--accel", "tcg", "--name", NAME,
                "--detach", "--wait", "ssh", "--timeout", str(BOOT_TIMEOUT),
                timeout=BOOT_TIMEOUT + 90)
    seconds = time.monotonic() - start
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == NAME
        print(f"\nqemukit run --image debian --arch aarch64 --detach --wait ssh returned after "
              f"{seconds:.1f}s", file=sys.stderr)
        yield Booted(NAME, seconds)
    finally:
        if (state_root / NAME).exists():
            qk("kill", NAME)



def test_image_is_arm64_cached_and_read_only(arm_image: images.DebianImage) -> None:
    manifest = arm_image.manifest
    assert manifest["arch"] == "arm64"
    assert arm_image.kernel_release.endswith("-arm64")
    assert manifest["packages"] > 150
    assert arm_image.disk.stat().st_mode & 0o222 == 0  # nobody writes the base
    assert arm_image.directory.name.startswith("bookworm-aarch64-")
    assert images.find_image("debian", ARCH) == arm_image
    assert images.find_image("debian") != arm_image  # the x86_64 image is another one
    print(f"\naarch64 debian image: {arm_image.disk_bytes / 2**20:.0f} MiB qcow2, "
          f"{manifest['packages']} packages, built in {manifest['build_seconds']}s, initrd "
          f"{arm_image.initrd.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    assert images.build("debian", arch=ARCH) == arm_image  # a second build is the cache


def test_agent_says_aarch64_on_virt_with_its_console(booted: Booted) -> None:
    with attached(NAME) as vm:
        assert vm.spec.arch == ARCH and vm.spec.machine == "virt" and vm.spec.agent == "qga"
        assert vm.accel is not None and vm.accel.accel == "tcg"
        vm.wait_ready(120)
        out = vm.exec("uname -m; head -n1 /proc/consoles; hostname").stdout_text.split("\n")
        assert out[0] == "aarch64"
        assert out[1].split()[0] == "ttyAMA0"
        assert out[2] == NAME  # the cloud-init seed CD was read
        times = vm.exec(["systemctl", "show", "-P", "ActiveEnterTimestampMonotonic",
                         "qemu-guest-agent.service", "ssh.service"]).stdout_text.split()
        agent_s, ssh_s = (int(v) / 1e6 for v in times)
        print(f"\nguest: agent up {agent_s:.1f}s, sshd up {ssh_s:.1f}s after kernel start; "
              f"'run --wait ssh' returned after {booted.seconds_to_ssh:.1f}s", file=sys.stderr)
        assert 0 < agent_s < booted.seconds_to_ssh


def test_ssh_logs_in_and_returns_exit_codes(booted: Booted) -> None:
    result = qk("ssh", NAME, "--", "uname", "-m")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "aarch64"
    result = qk("ssh", NAME, "--", "id")
    assert result.stdout.startswith("uid=1000(debian)") and "(sudo)" in result.stdout
    assert qk("ssh", NAME, "--", "sh", "-c", "exit 5").returncode == 5
    state = qk("ssh", NAME, "--", "systemctl", "is-system-running", "--wait", timeout=600)
    assert state.stdout.strip() == "running", (state.stdout, state.stderr, qk(
        "ssh", NAME, "--", "systemctl", "--failed", "--no-legend").stdout)


def test_exec_through_the_agent_returns_exit_code_and_output(booted: Booted) -> None:
    with attached(NAME) as vm:
        result = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
        assert (result.exit_status, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
    cli = qk("exec", NAME, "--", "sh", "-c", "uname -m; exit 3")
    assert (cli.returncode, cli.stdout.strip()) == (3, "aarch64")


def test_stop_ends_on_the_graceful_rung(booted: Booted, state_root: Path) -> None:
    # virt's power button is a GPIO line in the device tree: gpio_keys turns it into
    # KEY_POWER, and systemd-logind powers the guest off (PSCI SYSTEM_OFF ends QEMU).
    result = qk("stop", NAME, "--json", "--timeout", "240", timeout=330)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rung"] == "acpi", report
    print(f"\nstop: {report['rung']} rung after {report['elapsed']:.1f}s", file=sys.stderr)
    assert not (state_root / NAME).exists()  # runtime dir, overlay and seed are gone


def test_base_image_never_written(arm_image: images.DebianImage, base_sha256: str) -> None:
    assert sha256(arm_image.disk) == base_sha256 == arm_image.manifest["disk_sha256"]
    assert not any(p.name.startswith("overlay") for p in arm_image.directory.iterdir())
