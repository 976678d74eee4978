"""A hostile guest against ``qemukit cp``: what it sends must not reach outside the target.

One tiny VM for the module, detached as a user runs it. The guest builds the
attack tree with its own tools (a symlink to a host file by absolute path, a
link to ``/`` and one to a host directory, an honest hard link, a setuid
file, a world-writable file, a sticky world-writable directory, a FIFO), and
for what an honest ``tar`` never makes (a hard link to a host file followed
by a regular file of the same name, a ``../`` name) the guest's ``tar`` is
replaced by a script that sends a tar made on the host, as a compromised
guest would. The host copies out with ``qemukit cp -r`` (twice, into the same
directory) and ``vm.copy_out``; canaries outside the target must be
unchanged, modes cleaned, the umask applied, nothing written through a link.
Copy in of a dot-directory, and a second copy in into it, work as cp -r.
"""

from __future__ import annotations

import io
import os
import secrets
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import attached, run_qemukit

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("hostile-copy")]


@pytest.fixture(scope="module")
def guest_vm(tiny_image: Any) -> Iterator[str]:
    name = f"hostile-{secrets.token_hex(3)}"
    r = run_qemukit("run", "--image", "tiny", "--accel", "tcg", "--name", name, "--nic", "user",
                    "--detach", "--wait", "agent", "--timeout", "240")
    assert r.returncode == 0, r.stderr
    yield name
    r = run_qemukit("kill", name)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``(out, canary, outside)``: the copy's target directory, a host file and a host directory
    outside it, which nothing may create, change or read through."""
    out = tmp_path / "out"
    out.mkdir()
    canary = tmp_path / "canary"
    canary.write_text("untouched\n")
    canary.chmod(0o644)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("host secret\n")
    return out, canary, outside


def guest(name: str, script: str) -> str:
    r = run_qemukit("exec", name, "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    return r.stdout


def cp(*args: str, umask: int = 0o027) -> Any:
    old = os.umask(umask)
    try:
        return run_qemukit("cp", *args, timeout=300)
    finally:
        os.umask(old)


def snapshot(tmp_path: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Everything under ``tmp_path`` except ``out``: name -> (mode, size, content or link)."""
    seen: dict[str, tuple[int, int, bytes | str]] = {}
    for root, dirs, files in os.walk(tmp_path):
        if Path(root) == tmp_path:
            dirs[:] = [d for d in dirs if d != "out"]
        for entry in dirs + files:
            path = Path(root) / entry
            st = path.lstat()
            body: bytes | str = (os.readlink(path) if path.is_symlink() else
                                 path.read_bytes() if stat.S_ISREG(st.st_mode) else b"")
            seen[str(path.relative_to(tmp_path))] = (st.st_mode, st.st_size, body)
    return seen


def test_copying_a_hostile_tree_out_twice_touches_nothing_outside_the_target(
        guest_vm: str, tmp_path: Path, host: tuple[Path, Path, Path]) -> None:
    out, canary, outside = host
    guest(guest_vm, f"""
        set -e
        rm -rf /tmp/evil; mkdir -p /tmp/evil/sub /tmp/evil/sticky; cd /tmp/evil
        ln -s {canary} abs                 # a host file, by absolute path
        ln -s / root                       # the host's root
        ln -s {outside} hostdir            # a host directory
        ln -s ../../../../../../.. up      # up and out
        echo data > sub/orig; ln sub/orig sub/hard   # an honest hard link
        echo suid > suid; chmod 4755 suid
        echo sgid > sgid; chmod 2775 sgid
        echo ww > ww; chmod 666 ww
        chmod 1777 sticky
        mkfifo pipe
        echo plain > plain; chmod 640 plain
        ln -s plain inside                 # a link that stays inside: kept
        echo guest-file > planted          # the host has a symlink of this name, below
    """)
    before = snapshot(tmp_path)

    r = cp("-r", f"{guest_vm}:/tmp/evil", str(out))
    assert r.returncode == 0, r.stderr
    evil = out / "evil"
    for name in ("abs", "root", "hostdir", "up", "pipe"):
        assert not os.path.lexists(evil / name), name
    for name in ("abs", "root", "hostdir", "up", "pipe"):
        assert f"evil/{name}" in r.stderr, r.stderr  # each skip is said
    assert "hard link" in r.stderr
    # modes: no set-id, sticky or group/other write; the umask (027) applies
    assert stat.S_IMODE((evil / "suid").lstat().st_mode) == 0o750
    assert stat.S_IMODE((evil / "sgid").lstat().st_mode) == 0o750
    assert stat.S_IMODE((evil / "ww").lstat().st_mode) == 0o640
    assert stat.S_IMODE((evil / "plain").lstat().st_mode) == 0o640
    assert stat.S_IMODE((evil / "sticky").lstat().st_mode) == 0o750
    assert os.readlink(evil / "inside") == "plain"
    # tar sends the first name of a hard-linked file as a file and the others as links:
    # one name arrives, the link is skipped
    names = sorted(p.name for p in (evil / "sub").iterdir())
    assert len(names) == 1 and (evil / "sub" / names[0]).read_text() == "data\n"
    assert snapshot(tmp_path) == before

    # The guest turns its links into files; the host already holds a symlink out of the tree
    # where one lands (as older qemukit, or anyone, may have left it). A second copy into the
    # same directory must replace such links, never write through them.
    guest(guest_vm, "cd /tmp/evil && rm -f abs hostdir inside && echo pwned > abs && "
                    "mkdir hostdir && echo pwned > hostdir/secret && echo pwned > inside")
    (evil / "planted").unlink()
    (evil / "planted").symlink_to(canary)
    (evil / "sub2").symlink_to(outside)
    guest(guest_vm, "mkdir -p /tmp/evil/sub2 && echo pwned > /tmp/evil/sub2/secret")
    r = cp("-r", f"{guest_vm}:/tmp/evil", str(out))
    assert r.returncode == 0, r.stderr
    assert (evil / "abs").read_text() == "pwned\n" and not (evil / "abs").is_symlink()
    assert (evil / "planted").read_text() == "guest-file\n"
    assert not (evil / "planted").is_symlink()
    assert (evil / "sub2").is_symlink()  # not followed, not replaced: its entries skipped
    assert "evil/sub2" in r.stderr
    assert (evil / "hostdir" / "secret").read_text() == "pwned\n"
    assert (evil / "inside").read_text() == "pwned\n" and not (evil / "inside").is_symlink()
    assert canary.read_text() == "untouched\n"
    assert (outside / "secret").read_text() == "host secret\n"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    after = snapshot(tmp_path)
    assert after == before
    assert not [p for p in out.rglob("*") if "qemukit-tmp" in p.name]


def _crafted(members: list[tuple[str, str, object]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, arg in members:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "hard":
                info.type, info.linkname = tarfile.LNKTYPE, str(arg)
                tar.addfile(info)
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
                tar.addfile(info)
            else:
                assert isinstance(arg, bytes)
                info.size, info.mode = len(arg), 0o644
                tar.addfile(info, io.BytesIO(arg))
    return buf.getvalue()


@pytest.fixture
def lying_tar(guest_vm: str, tmp_path: Path) -> Iterator[Any]:
    """``install(tar_bytes)``: the guest's ``tar`` now sends those bytes whatever it is asked.

    busybox's shell runs its own ``tar`` whatever PATH says, so the compromised
    guest hides it behind a shell function: ``/bin/sh`` (which the agent runs
    each command with) becomes a script defining ``tar`` before it runs the command.
    """
    real = guest(guest_vm, "readlink /bin/sh").strip()
    assert real, "the tiny guest's /bin/sh is expected to be a link to busybox"

    def install(data: bytes) -> None:
        blob = tmp_path / "crafted.tar"
        blob.write_bytes(data)
        r = cp(str(blob), f"{guest_vm}:/root/crafted.tar")
        assert r.returncode == 0, r.stderr
        guest(guest_vm, LYING_SH)

    yield install
    guest(guest_vm, f"rm -f /bin/sh && ln -s {real} /bin/sh")


LYING_SH = """cat > /root/sh <<'END'
#!/bin/busybox ash
case $1 in
/run/qemukit-agent/*)
    tar() {
        while [ $# -gt 0 ]; do case $1 in -f) f=$2; shift ;; esac; shift; done
        cat /root/crafted.tar > "$f"
    }
    . "$1" ;;
*) exec /bin/busybox ash "$@" ;;
esac
END
chmod 755 /root/sh && mv -f /root/sh /bin/sh"""


def test_a_hard_link_out_then_a_file_of_its_name_does_not_write_the_host_file(
        guest_vm: str, tmp_path: Path, host: tuple[Path, Path, Path], lying_tar: Any) -> None:
    out, canary, _ = host
    guest(guest_vm, "rm -rf /tmp/hl && mkdir /tmp/hl")
    lying_tar(_crafted([("dir", "hl", None),
                        ("hard", "hl/x", "../../canary"),
                        ("file", "hl/x", b"pwned\n"),
                        ("hard", "hl/y", str(canary)),
                        ("file", "hl/y", b"pwned\n"),
                        ("chr", "hl/null", None)]))
    before = snapshot(tmp_path)
    with attached(guest_vm) as vm:
        back = vm.copy_out("/tmp/hl", out, recursive=True)
    assert back == out / "hl"
    for name in ("x", "y"):
        assert (back / name).read_text() == "pwned\n"
        assert (back / name).stat().st_nlink == 1
    assert not os.path.lexists(back / "null")
    assert canary.read_text() == "untouched\n"
    assert snapshot(tmp_path) == before


def test_a_name_outside_the_target_refuses_the_copy_and_writes_nothing(
        guest_vm: str, tmp_path: Path, host: tuple[Path, Path, Path], lying_tar: Any) -> None:
    out, canary, _ = host
    guest(guest_vm, "rm -rf /tmp/esc && mkdir /tmp/esc")
    lying_tar(_crafted([("dir", "esc", None), ("file", "esc/ok", b"fine\n"),
                        ("file", "esc/../../canary", b"pwned\n"),
                        ("file", "/tmp/qemukit-hostile-abs", b"pwned\n")]))
    before = snapshot(tmp_path)
    r = cp("-r", f"{guest_vm}:/tmp/esc", str(out))
    assert r.returncode != 0
    assert "not inside 'esc'" in r.stderr and "copy refused" in r.stderr
    assert list(out.iterdir()) == []
    assert snapshot(tmp_path) == before
    assert not os.path.lexists("/tmp/qemukit-hostile-abs")


def test_copy_in_of_a_dot_directory_and_a_second_copy_in_merge_as_cp_r(
        guest_vm: str, tmp_path: Path) -> None:
    tree = tmp_path / ".config"
    (tree / ".hidden").mkdir(parents=True)
    (tree / "a").write_text("one\n")
    (tree / ".hidden" / "b").write_text("two\n")
    guest(guest_vm, "rm -rf /root/dots && mkdir /root/dots")
    r = run_qemukit("cp", "-r", str(tree), f"{guest_vm}:/root/dots/")
    assert r.returncode == 0, r.stderr
    (tree / "c").write_text("three\n")
    (tree / "a").write_text("one, changed\n")
    r = run_qemukit("cp", "-r", str(tree), f"{guest_vm}:/root/dots/")
    assert r.returncode == 0, r.stderr
    out = guest(guest_vm, "cd /root/dots && ls -A && cd .config && ls -A && cat a .hidden/b c")
    assert out.split("\n") == [".config", ".hidden", "a", "c", "one, changed", "two", "three", ""]
    # and back out, twice, into one host directory
    back = tmp_path / "back"
    back.mkdir()
    for _ in range(2):
        r = run_qemukit("cp", "-r", f"{guest_vm}:/root/dots/.config", str(back))
        assert r.returncode == 0, r.stderr
    assert (back / ".config" / ".hidden" / "b").read_text() == "two\n"
    assert sorted(p.name for p in back.iterdir()) == [".config"]
