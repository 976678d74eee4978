"""A guest that turns a share against the host: set-ID files, device nodes, read-only undone.

The guest's root is the attacker. Through a writable share it tries to leave a
setuid-root program or a device node (a door to the host's disks or memory) on the
host; through a read-only share (and the host root of ``--rootfs host``) it mounts the
export read-write again and writes. Each is tried over virtiofs (the tiny image's
kernel) and over 9p (the suite's kernel, which has 9p), and the host checks what is
really on its disk. See docs/threat/gdb-shares.md.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from qemukit import images
from qemukit.host._fsguard import guard_prefix, supported
from tests.helpers import QEMUKIT
from tests.integration.test_nonroot import NormalUser, normal_user  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hostile-share")]
TCG = ("--accel", "tcg")

# Run by the guest's root in the shared directory $1: each step prints its name and
# its exit status, so the host can tell a refusal from a step that never ran.
HOSTILE = (
    'cd "$1" || exit 99; '
    "echo payload > suid; chmod 755 suid; echo chmod755=$?; "
    "chmod u+s suid; echo chmod_u+s=$?; chmod g+s suid; echo chmod_g+s=$?; "
    "chmod 6755 suid; echo chmod6755=$?; "
    "mkdir dir; chmod g+s dir; echo chmod_dir_g+s=$?; "
    "mknod mem c 1 1; echo mknod_c=$?; mknod disk b 7 0; echo mknod_b=$?; "
    "mknod fifo p; echo mknod_p=$?; "
    "if [ -e old ]; then echo more >> old; echo append_old=$?; fi; "
    "ls -ln"
)
# Run by the guest's root against a read-only share mounted at $1 (tag $2, transport $3;
# the test's files in $1$4): remount it read-write and write; mount the export again,
# read-write, elsewhere and write there.
REMOUNT = (
    'm="$1"; sub="$4"; '
    'mount -o remount,rw "$m"; echo remount=$?; '
    'echo guest > "$m$sub/keep.txt"; echo write=$?; echo new > "$m$sub/made.txt"; echo create=$?; '
    'mkdir -p /run/again; '
    'if [ "$3" = 9p ]; then mount -t 9p -o trans=virtio,version=9p2000.L "$2" /run/again; '
    'else mount -t virtiofs "$2" /run/again; fi; again=$?; echo mount_again=$again; '
    'if [ $again = 0 ]; then mount -o remount,rw /run/again; '
    'echo guest > "/run/again$sub/keep.txt"; echo write_again=$?; '
    'echo new > "/run/again$sub/made.txt"; echo create_again=$?; fi'
)


def assert_writes_refused(result: dict[str, int], transport: str, stdout: str) -> None:
    """Every write the REMOUNT script tried failed (a 9p tag cannot be mounted twice)."""
    again = ("write_again", "create_again")
    assert result["mount_again"] == 0 or transport == "9p", stdout
    for step in ("write", "create", *(again if result["mount_again"] == 0 else ())):
        assert result[step] != 0, f"{step} succeeded:\n{stdout}"


def steps(stdout: str) -> dict[str, int]:
    """The ``name=status`` lines the guest printed."""
    out = {}
    for line in stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep and value.strip().lstrip("-").isdigit() and " " not in name:
            out[name] = int(value)
    return out


def assert_nothing_dangerous(directory: Path) -> None:
    """No set-user-ID or set-group-ID file and no device node anywhere under ``directory``."""
    found = []
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if st.st_mode & (stat.S_ISUID | stat.S_ISGID) or stat.S_ISCHR(st.st_mode) or \
                    stat.S_ISBLK(st.st_mode):
                found.append(f"{name}: {stat.filemode(st.st_mode)} uid {st.st_uid}")
    assert not found, f"the guest left dangerous files on the host: {found}"
    assert (directory / "suid").read_text() == "payload\n"  # the guest did write there


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    assert QEMUKIT
    return subprocess.run([QEMUKIT, "run", *TCG, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=400, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="module")
def tree() -> Path:
    """The suite's kernel (it has 9p; the tiny image's cloud kernel does not)."""
    from tests.kernel_build import build_test_kernel

    return build_test_kernel(progress=print)


def boot_args(transport: str, tree: Path | None) -> list[str]:
    return ["--kernel", str(tree)] if transport == "9p" else ["--image", "tiny"]


@pytest.fixture(params=["virtiofs", "9p"])
def transport(request: pytest.FixtureRequest, tiny_image: images.TinyImage) -> str:
    return str(request.param)


@pytest.fixture
def kernel_for(transport: str, request: pytest.FixtureRequest) -> Path | None:
    return request.getfixturevalue("tree") if transport == "9p" else None


def test_the_guard_refuses_set_id_bits_and_device_nodes_on_the_host(tmp_path: Path) -> None:
    """The guard itself, around a program that tries everything a file server might do."""
    if not supported():
        pytest.skip("the share guard knows x86_64 and aarch64 hosts only")
    probe = (
        "import os, sys\n"
        "d = sys.argv[1]\n"
        "def t(name, f):\n"
        "    try:\n"
        "        f(); print(name, 'ok')\n"
        "    except OSError as e:\n"
        "        print(name, e.errno)\n"
        "open(d + '/f', 'w').write('x')\n"
        "t('chmod', lambda: os.chmod(d + '/f', 0o4755))\n"
        "t('open', lambda: os.close(os.open(d + '/g', os.O_CREAT | os.O_WRONLY, 0o2755)))\n"
        "t('mknod', lambda: os.mknod(d + '/c', 0o600 | stat_chr, os.makedev(1, 3)))\n"
        "t('fifo', lambda: os.mkfifo(d + '/p'))\n"
        "t('write_ro', lambda: open(d + '/ro/keep', 'w'))\n"
        # A file capability (cap_setuid+ep, as `setcap` writes it): as strong as setuid-root.
        "t('setcap', lambda: os.setxattr(d + '/f', 'security.capability',\n"
        "  bytes.fromhex('010000028000000000000000000000000000000000')[:20]))\n"
    ).replace("stat_chr", str(stat.S_IFCHR))
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "keep").write_text("host")
    ro = [str(tmp_path / "ro")] if os.geteuid() == 0 else []
    out = subprocess.run([*guard_prefix(ro, drop_caps=os.geteuid() == 0), sys.executable, "-c",
                          probe, str(tmp_path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    result = dict(line.split() for line in out.stdout.splitlines())
    assert result["chmod"] == result["open"] == result["mknod"] == "1"  # EPERM
    assert result["fifo"] == "ok"  # ordinary work goes on
    if ro:
        assert result["write_ro"] == "30"  # EROFS
        assert result["setcap"] == "1"  # EPERM: root's server has no CAP_SETFCAP
    assert (tmp_path / "ro" / "keep").read_text() == "host"
    assert not (tmp_path / "g").exists() and not (tmp_path / "c").exists()
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) & 0o6000 == 0


def test_a_writable_share_takes_no_set_id_file_or_device_node(
        transport: str, kernel_for: Path | None, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    # A set-ID program the host already had in the directory: a write through the share
    # must not leave the guest's bytes behind a setuid bit.
    (share / "old").write_text("#!/bin/sh\n")
    os.chmod(share / "old", 0o6755)
    opts = ",9p" if transport == "9p" else ""
    out = _run(*boot_args(transport, kernel_for), "--share", f"{share}:/mnt/s{opts}", "--",
               "sh", "-c", HOSTILE, "sh", "/mnt/s")
    assert out.returncode == 0, out.stderr
    result = steps(out.stdout)
    # The share works (a FIFO is refused by the 9p client of the suite's kernel anyway).
    assert result["chmod755"] == 0 and result["append_old"] == 0, out.stdout
    assert result["mknod_p"] == 0 or transport == "9p", out.stdout
    for step in ("chmod_u+s", "chmod_g+s", "chmod6755", "chmod_dir_g+s", "mknod_c", "mknod_b"):
        assert result[step] != 0, f"{step} succeeded in the guest:\n{out.stdout}"
    assert_nothing_dangerous(share)
    assert stat.S_IMODE((share / "suid").stat().st_mode) == 0o755


def test_a_read_only_share_stays_read_only_when_the_guest_remounts_it(
        transport: str, kernel_for: Path | None, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "keep.txt").write_text("host\n")
    opts = ",9p" if transport == "9p" else ""
    out = _run(*boot_args(transport, kernel_for), "--share", f"{share}:/mnt/ro,ro,tag=ro{opts}",
               "--", "sh", "-c", REMOUNT, "sh", "/mnt/ro", "ro", transport, "")
    assert out.returncode == 0, out.stderr
    result = steps(out.stdout)
    assert result["remount"] == 0, out.stdout  # the guest's kernel let its root do it...
    assert_writes_refused(result, transport, out.stdout)  # ...the host did not
    assert (share / "keep.txt").read_text() == "host\n"
    assert sorted(p.name for p in share.iterdir()) == ["keep.txt"]


def test_the_host_root_stays_read_only_when_the_guest_mounts_it_again(
        transport: str, kernel_for: Path | None, tmp_path: Path) -> None:
    """--rootfs host: the guest's root leaves the command's chroot (/proc/1/root) for the raw
    mount of the host's /, remounts it read-write and writes, mounts it again and writes;
    and through the --rw directory it tries the set-ID and device-node attack."""
    (tmp_path / "keep.txt").write_text("host\n")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    raw = "/proc/1/root/run/qemukit-hostroot"
    script = f"{REMOUNT}; set -- {shlex.quote(str(out_dir))}; {HOSTILE}"
    out = _run(*boot_args(transport, kernel_for), "--rootfs", "host", "--rw", str(out_dir), "--",
               "sh", "-c", script, "sh", raw, "hostroot", transport, str(tmp_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    result = steps(out.stdout)
    assert result["remount"] == 0, out.stdout  # the guest's root may remount its own mount
    assert_writes_refused(result, transport, out.stdout)
    assert (tmp_path / "keep.txt").read_text() == "host\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "out"]
    assert_nothing_dangerous(out_dir)


def test_a_normal_users_share_takes_no_set_id_file_either(normal_user: NormalUser) -> None:  # noqa: F811
    """As a normal user virtiofsd runs in a user namespace, where the guest's root is the
    user: a setuid file would run as that user for anyone on the host. The guard refuses it,
    and a read-only share is a read-only bind mount in the daemon's namespace there too."""
    missing = [t for t in ("newuidmap", "newgidmap", "unshare")
               if shutil.which(t, path="/usr/bin:/bin") is None]
    if missing or len(normal_user.subid_ranges()) < 2:
        pytest.skip("a virtiofs share as a normal user needs uidmap and subordinate ids "
                    "(test_nonroot.py covers the error)")
    share, ro = normal_user.base / "share", normal_user.base / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("host\n")
    shutil.chown(ro, normal_user.name)
    shutil.chown(ro / "keep.txt", normal_user.name)
    script = f"{HOSTILE}; set -- /mnt/ro ro virtiofs ''; {REMOUNT}"
    out = normal_user.run("run", "--image", "tiny", *TCG, "--share", f"{share}:/mnt/s",
                          "--share", f"{ro}:/mnt/ro,ro,tag=ro", "--",
                          "sh", "-c", script, "sh", "/mnt/s")
    assert out.returncode == 0, out.stderr
    result = steps(out.stdout)
    assert result["chmod755"] == 0 and result["chmod_u+s"] != 0 and result["mknod_c"] != 0, \
        out.stdout
    assert_nothing_dangerous(share)
    assert (share / "suid").stat().st_uid == normal_user.uid
    # The read-only share, remounted read-write by the guest: still read-only on the host.
    assert result["remount"] == 0, out.stdout
    assert_writes_refused(result, "virtiofs", out.stdout)
    assert (ro / "keep.txt").read_text() == "host\n"
    assert sorted(p.name for p in ro.iterdir()) == ["keep.txt"]


def test_a_normal_users_9p_share_takes_no_set_id_file_either(
        normal_user: NormalUser, tree: Path) -> None:  # noqa: F811
    """Over 9p QEMU itself serves the share, as the user: unguarded, the guest's root would
    leave a program setuid to the user (QEMU's `security_model=none` chmods as asked)."""
    kernel = normal_user.base / "kernel"
    kernel.mkdir()
    shutil.copyfile(tree / "arch/x86/boot/bzImage", kernel / "bzImage")
    share = normal_user.base / "share"
    if normal_user.created:
        subprocess.run(["chown", "-R", f"{normal_user.name}:", str(kernel)], check=True)
    out = normal_user.run("run", *TCG, "--kernel", str(kernel / "bzImage"), "--share",
                          f"{share}:/mnt/s,9p", "--", "sh", "-c", HOSTILE, "sh", "/mnt/s",
                          timeout=480)
    assert out.returncode == 0, out.stderr
    result = steps(out.stdout)
    assert result["chmod755"] == 0, out.stdout
    for step in ("chmod_u+s", "chmod_g+s", "chmod6755", "mknod_c", "mknod_b"):
        assert result[step] != 0, f"{step} succeeded in the guest:\n{out.stdout}"
    assert_nothing_dangerous(share)
    assert (share / "suid").stat().st_uid == normal_user.uid
