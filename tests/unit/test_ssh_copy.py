"""The ssh copy's scripts and streams, with the local shell standing in for ``ssh host``.

``ssh_copy_in``/``ssh_copy_out`` hand ssh an argv (``sh -c SCRIPT``), which
ssh quotes for the login shell; here that argv runs on this machine, so the
guest-side scripts, tar and the pumping of both pipes are the real ones. The
real guest is in tests/integration/test_images_import.py.
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from qemukit.errors import GuestError, StateError
from qemukit.guest import _copy_out_target, _unpack, _unpack_file, ssh_copy_in, ssh_copy_out


async def local_ssh(command: Sequence[str]) -> list[str]:
    return list(command)


async def failing_ssh(command: Sequence[str]) -> list[str]:
    return ["sh", "-c", "echo 'ssh: connect to host 127.0.0.1 port 1: Connection refused' >&2; exit 255"]


def test_a_binary_file_goes_in_and_out_byte_identical_with_its_mode(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "blob.bin"
    src.write_bytes(data)
    src.chmod(0o640)
    guest = tmp_path / "guest"
    guest.mkdir()
    seen: list[tuple[int, int]] = []
    dest = asyncio.run(ssh_copy_in(local_ssh, src, str(guest),
                                   progress=lambda done, total: seen.append((done, total))))
    assert dest == str(guest / "blob.bin")
    assert (guest / "blob.bin").read_bytes() == data
    assert (guest / "blob.bin").stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in guest.iterdir()) == ["blob.bin"]  # no staging left
    assert seen and seen[-1][0] == seen[-1][1] > len(data)  # the tar's size
    back = asyncio.run(ssh_copy_out(local_ssh, str(guest / "blob.bin"), tmp_path / "back.bin"))
    assert back.read_bytes() == data and back.stat().st_mode & 0o777 == 0o640
    renamed = asyncio.run(ssh_copy_in(local_ssh, src, str(guest / "other.bin")))
    assert Path(renamed).read_bytes() == data


def test_a_tree_with_r_keeps_its_modes_and_merges_into_an_existing_one(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "a" / "b" / "run.sh").chmod(0o750)
    (tree / "a" / "zero").write_bytes(bytes(range(256)))
    (tree / "a").chmod(0o711)
    guest = tmp_path / "guest"
    guest.mkdir()
    with pytest.raises(StateError, match="is a directory"):
        asyncio.run(ssh_copy_in(local_ssh, tree, str(guest)))
    assert asyncio.run(ssh_copy_in(local_ssh, tree, str(guest), recursive=True)) == str(guest / "tree")
    assert (guest / "tree" / "a" / "b" / "run.sh").stat().st_mode & 0o777 == 0o750
    assert (guest / "tree" / "a").stat().st_mode & 0o777 == 0o711
    (tree / "new").write_text("x")
    asyncio.run(ssh_copy_in(local_ssh, tree, str(guest), recursive=True))
    assert (guest / "tree" / "new").read_text() == "x" and (guest / "tree" / "a" / "zero").exists()
    back = asyncio.run(ssh_copy_out(local_ssh, str(guest / "tree"), tmp_path / "out", recursive=True))
    assert (back / "a" / "zero").read_bytes() == bytes(range(256))
    assert (back / "a" / "b" / "run.sh").stat().st_mode & 0o777 == 0o750


def test_missing_paths_are_clear_errors_and_change_nothing(tmp_path: Path) -> None:
    guest = tmp_path / "guest"
    guest.mkdir()
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        asyncio.run(ssh_copy_in(local_ssh, tmp_path / "nope", str(guest)))
    with pytest.raises(GuestError, match="no such directory in the guest: .*/no/such"):
        asyncio.run(ssh_copy_in(local_ssh, tmp_path / "f", str(guest / "no/such/f")))
    with pytest.raises(GuestError, match="no such file or directory in the guest"):
        asyncio.run(ssh_copy_out(local_ssh, str(guest / "nope"), tmp_path / "x"))
    with pytest.raises(StateError, match="ssh failed: ssh: connect to host"):
        asyncio.run(ssh_copy_out(failing_ssh, str(guest), tmp_path / "x"))
    assert list(guest.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "guest"]


# -- the unpacking of what a hostile guest sends: crafted tar streams ----------------------


def _tar(*members: tuple[str, str, object]) -> io.BytesIO:
    """A tar of ``(kind, name, arg)``: file (bytes, or (bytes, mode)), dir (mode), sym/hard
    (link name), fifo, chr."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for kind, name, arg in members:
            info = tarfile.TarInfo(name)
            data = None
            if kind == "file":
                body, mode = arg if isinstance(arg, tuple) else (arg, 0o644)
                assert isinstance(body, bytes) and isinstance(mode, int)
                info.size, info.mode, data = len(body), mode, io.BytesIO(body)
            elif kind == "dir":
                assert isinstance(arg, int)
                info.type, info.mode = tarfile.DIRTYPE, arg
            elif kind in ("sym", "hard"):
                info.type = tarfile.SYMTYPE if kind == "sym" else tarfile.LNKTYPE
                info.linkname = str(arg)
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info, data)
    buf.seek(0)
    return buf


@pytest.fixture
def host(tmp_path: Path) -> tuple[Path, Path]:
    """``(out, canary)``: the directory copies go into, and a file outside it nothing may touch."""
    out = tmp_path / "out"
    out.mkdir()
    canary = tmp_path / "canary"
    canary.write_text("untouched")
    canary.chmod(0o644)
    return out, canary


def _outside_unchanged(tmp_path: Path, canary: Path) -> None:
    assert canary.read_text() == "untouched" and canary.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["canary", "out"]


@pytest.mark.parametrize("evil", ["d/../../canary", "/tmp/evil", "../canary", "other/x", "d/a/../../x",
                                  "./../canary"])
def test_a_name_outside_the_copied_tree_refuses_the_whole_copy(
        tmp_path: Path, host: tuple[Path, Path], evil: str) -> None:
    out, canary = host
    archive = _tar(("dir", "d", 0o755), ("file", "d/ok", b"fine"), ("file", evil, b"pwned"))
    with pytest.raises(GuestError, match="not inside 'd'"):
        _unpack(archive, "d", out / "d")
    assert list(out.iterdir()) == []  # refused before anything was written
    _outside_unchanged(tmp_path, canary)


def test_a_hard_link_then_a_file_of_its_name_writes_nothing_outside(
        tmp_path: Path, host: tuple[Path, Path]) -> None:
    out, canary = host
    for link in (str(canary), "../canary", "d/../../canary"):
        archive = _tar(("dir", "d", 0o755), ("hard", "d/x", link), ("file", "d/x", b"pwned"))
        skipped = _unpack(archive, "d", out / "d")
        assert any("hard link" in s for s in skipped)
        assert (out / "d" / "x").read_bytes() == b"pwned"  # the later file, a file of its own
        assert (out / "d" / "x").stat().st_nlink == 1
        _outside_unchanged(tmp_path, canary)


def test_symlinks_that_may_leave_the_tree_are_skipped_and_never_written_through(
        tmp_path: Path, host: tuple[Path, Path]) -> None:
    out, canary = host
    archive = _tar(("dir", "d", 0o755),
                   ("sym", "d/abs", str(canary)),          # absolute
                   ("sym", "d/root", "/"),                 # the host's root
                   ("sym", "d/up", "../canary"),           # one level above the top
                   ("sym", "d/s/L", ".."),                 # fine alone: the top itself
                   ("sym", "d/chain", "s/L/../canary"),    # .. after a link: out of the tree
                   ("sym", "d/empty", ""),
                   ("sym", "d/in", "s/file"),              # fine: stays inside
                   ("sym", "d/s/back", "../in"),           # fine: up one, then down
                   ("file", "d/s/file", b"inside"),
                   ("file", "d/abs", b"replaces the link"),  # the later entry wins
                   ("file", "d/root/etc/x", b"through the link?"))
    skipped = _unpack(archive, "d", out / "d")
    d = out / "d"
    assert not (d / "up").exists() and not (d / "up").is_symlink()
    assert not (d / "chain").is_symlink() and not (d / "empty").is_symlink()
    assert (d / "abs").read_bytes() == b"replaces the link" and not (d / "abs").is_symlink()
    assert (d / "root").is_dir() and not (d / "root").is_symlink()  # a real dir, made by us
    assert (d / "root" / "etc" / "x").read_bytes() == b"through the link?"
    assert os.readlink(d / "s" / "L") == ".." and os.readlink(d / "in") == "s/file"
    assert (d / "s" / "back").read_bytes() == b"inside"
    assert sum("may lead out" in s for s in skipped) == 5  # abs, root, up, chain, empty
    _outside_unchanged(tmp_path, canary)


def test_devices_and_fifos_are_skipped(tmp_path: Path, host: tuple[Path, Path]) -> None:
    out, canary = host
    archive = _tar(("dir", "d", 0o755), ("fifo", "d/pipe", None), ("chr", "d/null", None),
                   ("file", "d/f", b"x"))
    skipped = _unpack(archive, "d", out / "d")
    assert sorted(p.name for p in (out / "d").iterdir()) == ["f"]
    assert any("FIFO" in s for s in skipped) and any("device" in s for s in skipped)
    _outside_unchanged(tmp_path, canary)


def test_modes_lose_set_id_sticky_and_group_other_write_and_the_umask_applies(
        host: tuple[Path, Path]) -> None:
    out, _ = host
    archive = _tar(("dir", "d", 0o1777), ("file", "d/suid", (b"x", 0o6755)),
                   ("file", "d/ww", (b"x", 0o666)), ("file", "d/noexec", (b"x", 0o055)),
                   ("dir", "d/sub", 0o3777))
    old = os.umask(0o027)
    try:
        _unpack(archive, "d", out / "d")
    finally:
        os.umask(old)
    d = out / "d"
    assert (d / "suid").stat().st_mode & 0o7777 == 0o750
    assert (d / "ww").stat().st_mode & 0o7777 == 0o640
    assert (d / "noexec").stat().st_mode & 0o7777 == 0o640  # exec only if the owner's
    assert d.stat().st_mode & 0o7777 == 0o750
    assert (d / "sub").stat().st_mode & 0o7777 == 0o750


def test_a_second_copy_never_follows_a_symlink_already_in_the_target(
        tmp_path: Path, host: tuple[Path, Path]) -> None:
    out, canary = host
    outside = tmp_path / "outside"
    outside.mkdir()
    d = out / "d"
    d.mkdir()
    d.chmod(0o700)                        # an existing directory keeps its mode, as with cp -r
    (d / "link").symlink_to(canary)       # as an old copy (or anyone) may have left them
    (d / "dirlink").symlink_to(outside)
    archive = _tar(("dir", "d", 0o755), ("file", "d/link", b"pwned"),
                   ("file", "d/dirlink/x", b"pwned"), ("dir", "d/dirlink/sub", 0o755))
    skipped = _unpack(archive, "d", d)
    assert (d / "link").read_bytes() == b"pwned" and not (d / "link").is_symlink()
    assert (d / "dirlink").is_symlink() and list(outside.iterdir()) == []
    assert d.stat().st_mode & 0o777 == 0o700
    assert any("dirlink" in s and "symlink" in s for s in skipped)
    outside.rmdir()
    _outside_unchanged(tmp_path, canary)


def test_a_symlink_as_the_target_itself_is_not_followed(tmp_path: Path,
                                                         host: tuple[Path, Path]) -> None:
    out, canary = host
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "d").symlink_to(outside)
    with pytest.raises(StateError, match="not a directory"):
        _unpack(_tar(("dir", "d", 0o755), ("file", "d/x", b"pwned")), "d", out / "d")
    assert list(outside.iterdir()) == []


def test_a_damaged_or_truncated_stream_leaves_nothing(tmp_path: Path,
                                                      host: tuple[Path, Path]) -> None:
    out, canary = host
    whole = _tar(("dir", "d", 0o755), ("file", "d/a", b"a" * 5000), ("file", "d/b", b"b" * 70000))
    with pytest.raises(GuestError):
        _unpack(io.BytesIO(whole.getvalue()[:4000]), "d", out / "d")
    with pytest.raises(GuestError, match="no valid tar"):
        _unpack(io.BytesIO(b"not a tar at all" * 100), "d", out / "d")
    assert list(out.iterdir()) == []  # no target, no staging directory, no temporary file
    _outside_unchanged(tmp_path, canary)


def test_the_single_file_path_takes_one_regular_file_and_replaces_a_symlink(
        tmp_path: Path, host: tuple[Path, Path]) -> None:
    out, canary = host
    with pytest.raises(GuestError, match="copy refused"):
        _unpack_file(_tar(("file", "f", b"x"), ("file", "../canary", b"pwned")), "f", out / "f")
    with pytest.raises(GuestError, match="copy refused"):
        _unpack_file(_tar(("sym", "f", str(canary))), "f", out / "f")
    (out / "f").symlink_to(canary)
    _unpack_file(_tar(("file", "f", (b"new", 0o4777))), "f", out / "f")
    assert not (out / "f").is_symlink() and (out / "f").read_bytes() == b"new"
    assert (out / "f").stat().st_mode & 0o7022 == 0
    _outside_unchanged(tmp_path, canary)


def test_a_hostile_stat_answer_is_an_error(host: tuple[Path, Path]) -> None:
    out, _ = host
    with pytest.raises(GuestError, match="the guest answered"):
        _copy_out_target(["f", "9z", "1"], "/x", out, False)
    with pytest.raises(GuestError, match="the guest answered"):
        _copy_out_target(["d", "755", "extra"], "/x", out, True)
