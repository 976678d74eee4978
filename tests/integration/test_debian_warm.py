"""Warm starts of the Debian image: clones restored from one saved state are separate machines.

``qemukit run --image debian --detach --wait ssh`` starts warm by default: the
first start of this description boots it, waits for cloud-init, saves the
state; every start restores a clone and gives it its own identity. The
user-data is test_debian.py's, so the two modules share one warm state:
whichever starts first boots the image and saves it, under the key's lock.
Checked from inside each guest: host name, machine-id, MAC (also as QEMU sees
it), ssh host keys (also as sshd presents them), random bytes, and that a
file written in one clone is in no other.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import attached, run_qemukit
from tests.integration.test_debian import USER_DATA

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("debian-warm")]

NAMES = ("qk-warm-a", "qk-warm-b", "qk-warm-c")
#: A Debian boot and save under TCG on a loaded host can take minutes; restores take seconds.
START_TIMEOUT = 900


@pytest.fixture(scope="module")
def user_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("seed") / "user-data"
    path.write_text(USER_DATA)
    return path


def start(name: str, user_data: Path) -> str:
    """Start clone ``name`` detached, wait for ssh; returns qemukit's ``-v`` line about warmth."""
    result = run_qemukit("run", "--image", "debian", "--accel", "tcg", "--name", name,
                         "--detach", "--wait", "ssh", "--user-data", str(user_data), "-v",
                         "--timeout", str(START_TIMEOUT), timeout=START_TIMEOUT + 60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == name
    lines = [line for line in result.stderr.splitlines() if ": warm:" in line or ": cold:" in line]
    assert lines, result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def clones(debian_image: object, user_data: Path, state_root: Path) -> Iterator[dict[str, str]]:
    """Clones a and b, running at once; name -> the -v line of its start."""
    started: dict[str, str] = {}
    try:
        for name in NAMES[:2]:
            started[name] = start(name, user_data)
        yield started
    finally:
        for name in NAMES:
            if (state_root / name).exists():
                run_qemukit("kill", name)



def facts(name: str) -> dict[str, str]:
    """What makes a machine itself, read inside the guest (and the NIC's MAC as QEMU has it)."""
    script = ("hostname; cat /etc/machine-id; cat /sys/class/net/eth0/address; "
              "cut -d' ' -f2 /etc/ssh/ssh_host_ed25519_key.pub; "
              "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo")
    with attached(name) as vm:
        out = vm.exec(["sh", "-c", script], check=True).stdout_text.split("\n")
        qemu_mac = vm.qmp("query-rx-filter")[0]["main-mac"]
        host, port = vm.ssh_address()
    keys = ("hostname", "machine_id", "mac", "host_key", "random")
    got = dict(zip(keys, out[:5], strict=True))
    got.update(qemu_mac=qemu_mac, port=str(port), host=host)
    return got


def test_the_second_clone_is_restored_not_booted(clones: dict[str, str]) -> None:
    # The first start may have built the state (or test_debian.py did); the second restores it.
    assert ": warm: restored " in clones[NAMES[1]], clones


def test_each_clone_is_its_own_machine(clones: dict[str, str]) -> None:
    a, b = facts(NAMES[0]), facts(NAMES[1])
    assert (a["hostname"], b["hostname"]) == NAMES[:2]
    for key in ("machine_id", "mac", "host_key", "random", "port"):
        assert a[key] != b[key], key
    for clone in (a, b):
        assert clone["mac"] == clone["qemu_mac"]  # the guest's new MAC reached QEMU's NIC
        assert clone["mac"] != "52:54:00:12:34:56"  # not QEMU's default, which every VM has


def test_sshd_presents_the_clones_own_host_key_and_logs_in_with_its_own_key(
        clones: dict[str, str]) -> None:
    for name in NAMES[:2]:
        mine = facts(name)
        scan = subprocess.run(["ssh-keyscan", "-T", "60", "-p", mine["port"], "-t", "ed25519",
                               mine["host"]], capture_output=True, text=True, timeout=90)
        assert mine["host_key"] in scan.stdout, (scan.stdout, scan.stderr)
        login = run_qemukit("ssh", name, "--", "hostname", timeout=120)
        assert (login.returncode, login.stdout.strip()) == (0, name), login.stderr


def test_ssh_keeps_each_word_and_checks_the_clones_pinned_host_key(
        clones: dict[str, str], state_root: Path, tmp_path: Path) -> None:
    name = NAMES[0]
    # Each word arrives as one argument (ssh alone would run 'sh -c echo a | cat').
    r = run_qemukit("ssh", name, "--", "sh", "-c", "echo a | cat", timeout=120)
    assert (r.returncode, r.stdout) == (0, "a\n"), r.stderr
    r = run_qemukit("ssh", name, "--", "printf", "[%s]", "a b", "$HOME", "", timeout=120)
    assert (r.returncode, r.stdout) == (0, "[a b][$HOME][]"), r.stderr
    printed = run_qemukit("ssh", name, "--print", "--", "true").stdout
    for option in ("-F /dev/null", "StrictHostKeyChecking=yes", f"HostKeyAlias=qemukit-{name}",
                   "IdentitiesOnly=yes", "ForwardAgent=no", "ProxyCommand=none"):
        assert option in printed, printed
    # The pin is the key sshd presents (the clone's own, given by qemukit).
    known = state_root / name / "known_hosts"
    assert known.stat().st_mode & 0o077 == 0
    assert facts(name)["host_key"] in known.read_text()
    saved = known.read_text()
    wrong = tmp_path / "wrong"
    made = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key_type, key = (wrong.with_suffix(".pub")).read_text().split()[:2]
    try:
        known.write_text(f"qemukit-{name} {key_type} {key}\n")
        r = run_qemukit("ssh", name, "--", "true", timeout=120)
        assert r.returncode == 255, (r.stdout, r.stderr)
        assert "Host key verification failed" in r.stderr, r.stderr
    finally:
        known.write_text(saved)
    assert run_qemukit("ssh", name, "--", "true", timeout=120).returncode == 0


def test_a_file_written_in_one_clone_is_in_no_other(clones: dict[str, str],
                                                    user_data: Path) -> None:
    with attached(NAMES[0]) as vm:
        vm.exec(["sh", "-c", "echo mine > /root/marker && sync"], check=True)
    with attached(NAMES[1]) as vm:
        assert vm.exec(["test", "-e", "/root/marker"]).exit_status == 1
    line = start(NAMES[2], user_data)
    assert ": warm: restored " in line
    with attached(NAMES[2]) as vm:
        assert vm.exec(["test", "-e", "/root/marker"]).exit_status == 1
        assert vm.exec("hostname").stdout_text.strip() == NAMES[2]
        # The user-data of the first boot was applied, and the state carries it.
        assert vm.guest.read_file("/etc/qemukit-user-data") == b"passed through\n"
