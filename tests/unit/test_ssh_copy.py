"""The ssh copy's scripts and streams, with the local shell standing in for ``ssh host``.

``ssh_copy_in``/``ssh_copy_out`` hand ssh an argv (``sh -c SCRIPT``), which
ssh quotes for the login shell; here that argv runs on this machine, so the
guest-side scripts, tar and the pumping of both pipes are the real ones. The
real guest is in tests/integration/test_images_import.py.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from qemukit.errors import GuestError, StateError
from qemukit.guest import ssh_copy_in, ssh_copy_out


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
