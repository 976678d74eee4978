"""qemukit as a normal user: a virtiofs share works (virtiofsd in a user namespace), or the
run fails before boot with one line saying what the host lacks.

As root, each test creates a throwaway user with its own home, state and cache
(the tiny image copied there: root's cache is not readable by others) and runs
the installed code as that user through ``runuser``. As a normal user, the
tests run as that user itself.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

import qemukit
from qemukit import images

pytestmark = pytest.mark.integration

REPO = Path(qemukit.__file__).resolve().parents[1]
PYTHONS = (sys.executable, "/usr/bin/python3")


@dataclass
class NormalUser:
    """A user that is not root, and everything needed to run qemukit as it."""

    name: str
    uid: int
    base: Path  # the user's own scratch directory (home, state, cache, share)
    python: str
    prefix: list[str]  # runuser -u NAME -- (empty when the tests already run as NAME)
    created: bool

    def env(self) -> dict[str, str]:
        site = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        return {
            "HOME": str(self.base / "home"), "PATH": "/usr/bin:/bin",
            "QEMUKIT_STATE": str(self.base / "state"), "QEMUKIT_CACHE": str(self.base / "cache"),
            "PYTHONPATH": os.pathsep.join([str(REPO), *sorted(site)]), "LANG": "C.UTF-8",
        }

    def run(self, *args: str, timeout: float = 240,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``qemukit ARGS`` as this user, with a clean environment (in ``cwd``: its home)."""
        env_args = [f"{k}={v}" for k, v in self.env().items()]
        code = "import sys; from qemukit.cli import main; sys.exit(main())"
        return subprocess.run([*self.prefix, "env", "-i", *env_args, self.python, "-c", code, *args],
                              capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False, cwd=cwd or self.base / "home")

    def subid_ranges(self) -> dict[str, tuple[int, int]]:
        """The user's first range in /etc/subuid and /etc/subgid, where it has one."""
        found: dict[str, tuple[int, int]] = {}
        for file in ("/etc/subuid", "/etc/subgid"):
            for line in Path(file).read_text().splitlines() if Path(file).exists() else []:
                fields = line.split(":")
                if len(fields) == 3 and fields[0] in (self.name, str(self.uid)):
                    found.setdefault(file, (int(fields[1]), int(fields[2])))
        return found

    def processes(self) -> list[str]:
        """This user's live processes other than the test's own (a zombie counts as gone)."""
        if not self.created:
            me = psutil.Process()
            ours = {me.pid, *(p.pid for p in me.parents())}
        else:
            ours = set()
        left = []
        for proc in psutil.process_iter(["uids", "status", "cmdline"]):
            try:
                if (proc.info["uids"].real == self.uid and proc.pid not in ours
                        and proc.info["status"] != psutil.STATUS_ZOMBIE
                        and (self.created or str(self.base) in " ".join(proc.info["cmdline"] or []))):
                    left.append(" ".join(proc.info["cmdline"] or []))
            except psutil.Error:
                continue
        return left


def _free_subid_start() -> int:
    end = 100000
    for file in ("/etc/subuid", "/etc/subgid"):
        for line in Path(file).read_text().splitlines() if Path(file).exists() else []:
            fields = line.split(":")
            if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
                end = max(end, int(fields[1]) + int(fields[2]))
    return end


def _usable_python(prefix: list[str]) -> str | None:
    """An interpreter this user can run that imports qemukit and its dependencies."""
    probe = NormalUser("", 0, Path("/"), "", prefix, False)
    for python in PYTHONS:
        out = subprocess.run([*prefix, "env", "-i", f"PYTHONPATH={probe.env()['PYTHONPATH']}",
                              python, "-c", "import qemukit.cli, qemu.qmp, psutil, click"],
                             capture_output=True, text=True, timeout=60, check=False)
        if out.returncode == 0:
            return python
    return None


@pytest.fixture
def normal_user(tiny_image: images.TinyImage) -> Iterator[NormalUser]:
    """A normal user with a private home, state, cache (holding the tiny image) and share."""
    created = os.geteuid() == 0
    if created:
        if shutil.which("useradd") is None or shutil.which("runuser") is None:
            pytest.skip("running as root without useradd/runuser: cannot make a normal user")
        name = f"qk{uuid.uuid4().hex[:8]}"
        base = Path(tempfile.mkdtemp(prefix=f"qemukit-{name}-", dir="/tmp"))
        subprocess.run(["useradd", "-M", "-d", str(base / "home"), "-s", "/usr/sbin/nologin",
                        name], check=True, capture_output=True, text=True)
        prefix = ["runuser", "-u", name, "--"]
    else:
        name = pwd.getpwuid(os.geteuid()).pw_name
        base = Path(tempfile.mkdtemp(prefix="qemukit-nonroot-"))
        prefix = []
    try:
        for sub in ("home", "state", "cache/tiny", "share"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        shutil.copytree(tiny_image.directory, base / "cache" / "tiny" / tiny_image.directory.name)
        (base / "share" / "file").write_text("shared by the host\n")
        uid = pwd.getpwnam(name).pw_uid
        if created:
            os.chmod(base, 0o700)
            subprocess.run(["chown", "-R", f"{name}:", str(base)], check=True)
        python = _usable_python(prefix)
        if python is None:
            pytest.skip(f"no Python that {name} may run imports qemukit (tried {PYTHONS})")
        user = NormalUser(name, uid, base, python, prefix, created)
        if created and len(user.subid_ranges()) < 2:
            # useradd gives subordinate ids only where /etc/subuid already exists.
            start = _free_subid_start()
            span = f"{start}-{start + 65535}"
            subprocess.run(["usermod", "--add-subuids", span, "--add-subgids", span, name],
                           check=True, capture_output=True, text=True)
        yield user
        assert not user.processes(), f"processes left running as {name}: {user.processes()}"
        assert not list((base / "state").iterdir()), "runtime entries left behind"
    finally:
        if created:
            subprocess.run(["userdel", name], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def test_share_works_as_a_normal_user(normal_user: NormalUser) -> None:
    missing = [t for t in ("newuidmap", "newgidmap", "unshare")
               if shutil.which(t, path="/usr/bin:/bin") is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (uidmap, util-linux; scripts/setup installs "
                    "them): the failure path is tested below")
    if len(normal_user.subid_ranges()) < 2:
        pytest.skip(f"{normal_user.name} has no /etc/subuid and /etc/subgid range (only root can "
                    "add one)")
    share = normal_user.base / "share"
    out = normal_user.run("run", "--image", "tiny", "--share", f"{share}:/mnt/s", "--",
                          "sh", "-c", "cat /mnt/s/file && echo from-guest > /mnt/s/back")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "shared by the host\n"
    # What the guest's root wrote belongs to the user on the host.
    assert (share / "back").read_text() == "from-guest\n"
    assert (share / "back").stat().st_uid == normal_user.uid


def test_share_fails_before_boot_saying_what_is_missing(normal_user: NormalUser) -> None:
    ranges = normal_user.subid_ranges()
    if not normal_user.created and ranges:
        pytest.skip("the user has subordinate ids and only root can take them away for this test")
    if ranges:
        spans = {f: f"{s}-{s + n - 1}" for f, (s, n) in ranges.items()}
        subprocess.run(["usermod", "--del-subuids", spans["/etc/subuid"],
                        "--del-subgids", spans["/etc/subgid"], normal_user.name],
                       check=True, capture_output=True, text=True)
    share = normal_user.base / "share"
    out = normal_user.run("run", "--image", "tiny", "--json", "-", "--share", f"{share}:/mnt/s",
                          "--", "cat", "/mnt/s/file")
    assert out.returncode == 125, out.stderr
    result = json.loads(out.stdout)
    assert result["outcome"] == "error" and result["boot_time"] is None
    assert result["console_tail"] == ""  # QEMU never started: not a boot that failed later
    error = result["error"]
    assert "\n" not in error and "setgroups" not in error
    assert f"normal user ({normal_user.name})" in error
    if shutil.which("newuidmap", path="/usr/bin:/bin") is None:
        assert "apt-get install uidmap" in error
    else:
        assert re.search(rf"usermod --add-subuids (\d+-\d+) --add-subgids \1 {normal_user.name}",
                         error), error
    assert "run as root" in error and "9p" in error


def test_rootfs_host_works_as_a_normal_user(normal_user: NormalUser) -> None:
    """The host's root as the guest's, for a user who is not root, with the suite's own kernel
    (it has 9p; QEMU serves the root read-only): the host's programs in the guest, the command
    in the user's directory, a write outside --rw stays in the guest, one inside reaches the
    host and belongs to the user."""
    from tests.kernel_build import build_test_kernel

    tree = build_test_kernel(progress=print)
    kernel = normal_user.base / "kernel"
    kernel.mkdir()
    shutil.copyfile(tree / "arch/x86/boot/bzImage", kernel / "bzImage")
    shutil.copyfile(tree / ".config", kernel / ".config")  # what says it has 9p
    work, out = normal_user.base / "share", normal_user.base / "out"
    out.mkdir()
    if normal_user.created:
        subprocess.run(["chown", "-R", f"{normal_user.name}:", str(kernel), str(out)], check=True)
    script = (f"cat file; pwd; ls /usr/bin | grep -cx python3; grep ' / ' /proc/mounts | "
              f"cut -d' ' -f3; echo guest > outside.txt; echo guest > {out}/inside.txt; "
              f"cat outside.txt")
    run = normal_user.run("run", "--accel", "tcg", "--kernel", str(kernel / "bzImage"),
                          "--rootfs", "host", "--rw", str(out), "--", "sh", "-c", script,
                          cwd=work, timeout=480)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["shared by the host", str(work), "1", "overlay", "guest"]
    assert not (work / "outside.txt").exists()
    assert (out / "inside.txt").read_text() == "guest\n"
    assert (out / "inside.txt").stat().st_uid == normal_user.uid


def test_rootfs_host_over_the_c_virtiofsd_is_refused_for_a_normal_user_before_boot(
        normal_user: NormalUser) -> None:
    """The tiny image's kernel has no 9p, and the C virtiofsd in a user namespace cannot
    serve the host's programs to the guest's overlay: one line says so, nothing boots."""
    from qemukit import host

    daemon = host.find_virtiofsd()
    if daemon is None or daemon[1] != "c":
        pytest.skip(f"the refusal is for the C virtiofsd; this host has {daemon}")
    run = normal_user.run("run", "--image", "tiny", "--accel", "tcg", "--rootfs", "host",
                          "--", "true")
    assert run.returncode == 125, run.stderr
    assert "O_NOATIME" in run.stderr and "CONFIG_9P_FS" in run.stderr
    assert "TCG" not in run.stderr  # refused before QEMU started (no accelerator line)
