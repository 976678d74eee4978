"""The debian image end to end under TCG, per architecture: build, boot, ssh, guest agent, stop.

One VM per architecture serves the module (pytest groups the tests by the ``guest``
fixture's parameter, ``[x86_64]`` or ``[aarch64]``, and runs each group in file order;
the last tests stop the VM and check the base image was never written). It is started
the way a user would, ``qemukit run --image debian [--arch A] --detach --wait ssh`` with
a ``--user-data`` file, and each test takes it over with ``VM.attach`` and lets go
again, so the CLI commands (``ssh``, ``exec``, ``stop``) can reach it in between.

- ``[x86_64]`` is in the default tier. Its start is warm, as ``run``'s default is: the
  VM is a restored clone, given its own identity (host name, keys), of a state saved
  after one cold boot with cloud-init (shared with test_debian_warm.py). The image's cold
  boot through the bootloader is test_images_import.py's. The guest files, fsfreeze,
  hotplug and internal snapshot checks run on it only.
- ``[aarch64]`` is in the slow tier: the image is built once under qemu-user
  (mmdebstrap runs the arm64 tree's maintainer scripts through binfmt_misc; 10 to 40
  minutes on 2 cores) and the VM boots cold (an aarch64 guest has no vmgenid, so qemukit
  does not clone it); under TCG it needs minutes to reach ssh, so every wait is generous.
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

from qemukit import host, images
from qemukit.arch import ARCHES, DEFAULT_ARCH
from qemukit.images.debian import file_sha256 as sha256
from tests.helpers import attached, run_qemukit

pytestmark = [pytest.mark.integration]

USER_DATA = """\
#cloud-config
write_files:
  - path: /etc/qemukit-user-data
    content: "passed through\\n"
"""


@dataclass(frozen=True)
class Case:
    """One architecture's VM and the deadlines its guest needs under TCG."""

    arch: str
    name: str
    #: ``run --wait ssh``'s --timeout (s); the boot to ssh measured 4.5 and 10.5 min for
    #: aarch64 here (load 7 to 8 on 2 cores), a cold x86_64 boot and save a few minutes.
    boot_timeout: int
    #: Deadline of any other qemukit command (s).
    command_timeout: float
    #: ``systemctl is-system-running --wait``'s deadline (s).
    running_timeout: float
    #: ``qemukit stop``'s --timeout (s).
    stop_timeout: int
    #: Whether ``run`` starts it warm (a restored clone) by default.
    warm: bool


X86_64 = Case(DEFAULT_ARCH, "qk-debian", boot_timeout=900, command_timeout=120,
              running_timeout=180, stop_timeout=90, warm=True)
AARCH64 = Case("aarch64", "qk-debian-arm64", boot_timeout=1500, command_timeout=180,
               running_timeout=600, stop_timeout=240, warm=False)

# Each VM is shared by its tests: keep them on one xdist worker (--dist loadgroup).
ON_X86_64 = pytest.param(X86_64, id="x86_64", marks=pytest.mark.xdist_group("debian-vm"))
ON_AARCH64 = pytest.param(AARCH64, id="aarch64", marks=[
    pytest.mark.slow, pytest.mark.xdist_group("debian-arm64-vm")])
#: For the checks made on the x86_64 guest only (same VM: the same parameter object).
X86_64_ONLY = pytest.mark.parametrize("case", [ON_X86_64], indirect=True)


@dataclass
class Booted:
    case: Case
    seconds_to_ssh: float


def qk(case: Case, *args: str, timeout: float | None = None
       ) -> subprocess.CompletedProcess[str]:
    return run_qemukit(*args, timeout=timeout or case.command_timeout)


@pytest.fixture(scope="module", params=[ON_X86_64, ON_AARCH64])
def case(request: pytest.FixtureRequest) -> Case:
    arch_case: Case = request.param
    return arch_case


@pytest.fixture(scope="module")
def image(case: Case, request: pytest.FixtureRequest) -> images.DebianImage:
    """The case's debian image, built once (x86_64: by the session's fixture) if the cache
    lacks it."""
    if case.arch == DEFAULT_ARCH:
        x86_64: images.DebianImage = request.getfixturevalue("debian_image")
        return x86_64
    built = images.find_image("debian", case.arch)
    if built is not None:
        return built
    if os.geteuid() != 0:
        pytest.skip(f"building the debian image runs mmdebstrap as root (run 'qemukit images "
                    f"build debian --arch {case.arch}' as root first)")
    problem = host.foreign_exec_problem(case.arch)
    if problem is not None:
        pytest.skip(f"this host cannot build the {case.arch} debian image: {problem}")
    start = time.monotonic()
    image = images.build("debian", arch=case.arch,
                         progress=lambda msg: print(f"  {msg}", file=sys.stderr))
    print(f"\n{case.arch} debian image built in {time.monotonic() - start:.0f}s", file=sys.stderr)
    return image


@pytest.fixture(scope="module")
def base_sha256(image: images.DebianImage) -> str:
    return sha256(image.disk)


@pytest.fixture(scope="module")
def booted(case: Case, image: images.DebianImage, base_sha256: str, state_root: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    user_data = tmp_path_factory.mktemp("seed") / "user-data"
    user_data.write_text(USER_DATA)
    start = time.monotonic()
    # Started as a user would: warm by default where the architecture allows it. The first
    # x86_64 start of this description (this module's or test_debian_warm.py's, which uses
    # the same user-data) boots the image with cloud-init on a fresh seed and saves it; this
    # VM is then a restored clone of it.
    arch = () if case.arch == DEFAULT_ARCH else ("--arch", case.arch)
    result = qk(case, "run", "--image", "debian", *arch, "--accel", "tcg", "--name", case.name,
                "--detach", "--wait", "ssh", "--user-data", str(user_data),
                "--timeout", str(case.boot_timeout), timeout=case.boot_timeout + 90)
    seconds = time.monotonic() - start
    try:
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == case.name
        print(f"\nqemukit run --image debian {' '.join((*arch, '--detach'))} --wait ssh "
              f"returned after {seconds:.1f}s", file=sys.stderr)
        yield Booted(case, seconds)
    finally:
        if (state_root / case.name).exists():
            qk(case, "kill", case.name)


def test_image_is_built_cached_and_read_only(case: Case, image: images.DebianImage) -> None:
    manifest = image.manifest
    assert manifest["arch"] == ARCHES[case.arch].debian_arch
    assert manifest["packages"] > 150
    assert image.disk.stat().st_mode & 0o222 == 0  # nobody writes the base
    assert image.kernel_release.endswith(  # -cloud-amd64, -arm64
        ARCHES[case.arch].kernel_package.removeprefix("linux-image"))
    assert image.directory.name.startswith(f"bookworm{ARCHES[case.arch].cache_suffix}-")
    assert images.find_image("debian", case.arch) == image
    if case.arch != DEFAULT_ARCH:
        assert images.find_image("debian") != image  # the x86_64 image is another one
    print(f"\n{case.arch} debian image: {image.disk_bytes / 2**20:.0f} MiB qcow2, "
          f"{manifest['packages']} packages, built in {manifest['build_seconds']}s, initrd "
          f"{image.initrd.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
    # a second build is the cache: no step of a build runs, the manifest is not rewritten
    steps: list[str] = []
    written = (image.directory / "manifest.json").stat().st_mtime_ns
    assert images.build("debian", arch=case.arch, progress=steps.append) == image
    assert steps == [f"using cached debian image {image.directory}"], steps
    assert (image.directory / "manifest.json").stat().st_mtime_ns == written


def test_boot_is_usable_over_ssh_and_agent(booted: Booted) -> None:
    case = booted.case
    with attached(case.name) as vm:
        assert vm.spec.arch == case.arch and vm.spec.agent == "qga"
        assert vm.spec.machine == ARCHES[case.arch].machines[0]
        assert vm.accel is not None and vm.accel.accel == "tcg"
        vm.wait_ready(120)
        out = vm.exec("uname -m; head -n1 /proc/consoles; hostname").stdout_text.split("\n")
        assert out[0] == case.arch
        assert out[1].split()[0] == ARCHES[case.arch].console
        assert out[2] == case.name  # the cloud-init seed CD was read (or the clone renamed)
        # When did the guest (its own monotonic clock, from kernel start) bring them up? A
        # warm clone: in the boot the state was saved after; both services started there,
        # and run ever since.
        times = vm.exec(["systemctl", "show", "-P", "ActiveEnterTimestampMonotonic",
                         "qemu-guest-agent.service", "ssh.service"]).stdout_text.split()
        agent_s, ssh_s = (int(v) / 1e6 for v in times)
        print(f"\nguest: agent up {agent_s:.1f}s, sshd up {ssh_s:.1f}s after kernel start; "
              f"'run --wait ssh' returned after {booted.seconds_to_ssh:.1f}s", file=sys.stderr)
        assert 0 < agent_s and 0 < ssh_s
        if not case.warm:  # this boot is the one that started them
            assert agent_s < booted.seconds_to_ssh
        host, port = vm.ssh_address()
        assert host == "127.0.0.1" and port > 0


def test_ssh_logs_in_and_returns_exit_codes(booted: Booted) -> None:
    case = booted.case
    result = qk(case, "ssh", case.name, "--", "uname", "-m")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == case.arch
    result = qk(case, "ssh", case.name, "--", "id")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("uid=1000(debian)")
    assert "(sudo)" in result.stdout
    assert qk(case, "ssh", case.name, "--", "sh", "-c", "exit 5").returncode == 5  # words intact
    state = qk(case, "ssh", case.name, "--", "systemctl", "is-system-running", "--wait",
               timeout=case.running_timeout)
    assert state.stdout.strip() == "running", (state.stdout, state.stderr, qk(
        case, "ssh", case.name, "--", "systemctl", "--failed", "--no-legend").stdout)
    printed = qk(case, "ssh", case.name, "--print", "--", "true").stdout
    assert "StrictHostKeyChecking=yes" in printed and "UserKnownHostsFile=" in printed
    assert "127.0.0.1" in printed


def test_exec_through_the_agent_returns_exit_code_and_output(booted: Booted) -> None:
    case = booted.case
    with attached(case.name) as vm:
        result = vm.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
        assert (result.exit_status, result.stdout, result.stderr) == (7, b"out\n", b"err\n")
        assert vm.exec("hostname").stdout_text.strip() == case.name
        assert vm.guest.exec(["true"]).exit_status == 0
    cli = qk(case, "exec", case.name, "--", "sh", "-c", "uname -m; cat /etc/hostname; exit 3")
    assert (cli.returncode, cli.stdout.split()) == (3, [case.arch, case.name])


@X86_64_ONLY
def test_user_data_file_was_passed_through(booted: Booted) -> None:
    with attached(booted.case.name) as vm:
        assert vm.guest.read_file("/etc/qemukit-user-data") == b"passed through\n"


@X86_64_ONLY
def test_guest_files_and_fsfreeze(booted: Booted) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, binary
    with attached(booted.case.name) as vm:
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


@X86_64_ONLY
def test_hotplugged_disk_shows_in_lsblk(booted: Booted, tmp_path: Path) -> None:
    disk = tmp_path / "scratch.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "96M"], check=True)
    with attached(booted.case.name) as vm:
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


@X86_64_ONLY
def test_internal_snapshot_saves_and_loads(booted: Booted) -> None:
    with attached(booted.case.name) as vm:
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


def test_stop_ends_on_the_graceful_rung(booted: Booted, state_root: Path) -> None:
    # x86_64: the ACPI power button. aarch64: virt's power button is a GPIO line in the
    # device tree: gpio_keys turns it into KEY_POWER, and systemd-logind powers the guest
    # off (PSCI SYSTEM_OFF ends QEMU). Both report the "acpi" rung.
    case = booted.case
    result = qk(case, "stop", case.name, "--json", "--timeout", str(case.stop_timeout),
                timeout=case.stop_timeout + 90)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rung"] == "acpi", report
    print(f"\nstop: {report['rung']} rung after {report['elapsed']:.1f}s", file=sys.stderr)
    assert not (state_root / case.name).exists()  # runtime dir, overlay and seed are gone


def test_base_image_never_written(image: images.DebianImage, base_sha256: str) -> None:
    assert sha256(image.disk) == base_sha256 == image.manifest["disk_sha256"]
    assert not any(p.name.startswith("overlay") for p in image.directory.iterdir())
    assert os.access(image.disk, os.R_OK)
