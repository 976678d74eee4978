"""Cache and state directories hold code (a warm state's spec.toml is a clone's QEMU command
line), so qemukit refuses one that another user owns or can write, and under sudo keeps
images in the invoking user's cache, given to that user.

The attack: another local user who can write a shared ``$QEMUKIT_CACHE`` (mode 0777, or
their own directory) plants files qemukit then runs as the victim. The old code used any
directory it was given.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qemukit import HostError, StateError, paths
from qemukit._launch.runtime import RuntimeDir
from qemukit.cli import EXIT_ERROR, main

OTHER_UID = 54321


def test_a_fresh_cache_and_its_parents_are_made_private(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEMUKIT_CACHE", str(tmp_path / "a" / "b" / "cache"))
    root = paths.cache_dir()
    for made in (root, root.parent, root.parent.parent):
        assert made.is_dir() and made.stat().st_mode & 0o077 == 0, oct(made.stat().st_mode)


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_cache_writable_by_others_is_refused(tmp_path: Path, mode: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    monkeypatch.setenv("QEMUKIT_CACHE", str(shared))
    with pytest.raises(HostError) as info:
        paths.cache_dir()
    message = str(info.value)
    assert "\n" not in message and str(shared) in message and f"{mode:04o}" in message
    assert "QEMUKIT_CACHE" in message


def test_a_state_dir_of_another_user_is_refused(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    monkeypatch.setenv("QEMUKIT_STATE", str(theirs))
    with pytest.raises(StateError, match=f"owned by uid {OTHER_UID}, not by you"):
        RuntimeDir.create("vm1")
    assert list(theirs.iterdir()) == []


def test_a_parent_that_others_can_write_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    open_parent = tmp_path / "open"
    (open_parent / "cache").mkdir(parents=True, mode=0o700)
    open_parent.chmod(0o777)  # no sticky bit: anyone can rename cache away and put theirs
    monkeypatch.setenv("QEMUKIT_CACHE", str(open_parent / "cache"))
    with pytest.raises(HostError, match="parent .*open is writable by group and others"):
        paths.cache_dir()
    open_parent.chmod(0o1777)  # /tmp's mode: the sticky bit stops the rename
    assert paths.cache_dir() == open_parent / "cache"


def test_a_parent_of_another_user_is_refused(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = tmp_path / "theirs"
    (theirs / "state").mkdir(parents=True, mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    monkeypatch.setenv("QEMUKIT_STATE", str(theirs / "state"))
    with pytest.raises(StateError, match=f"parent .*theirs is owned by uid {OTHER_UID}"):
        paths.state_dir()


def test_a_symlink_to_an_open_directory_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "link").symlink_to(shared)
    monkeypatch.setenv("QEMUKIT_CACHE", str(tmp_path / "link"))
    with pytest.raises(HostError, match="writable by group and others"):
        paths.cache_dir()


def test_the_command_refuses_with_one_line_and_exit_125(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    spec = shared / "warm"  # what the attacker would plant
    result = CliRunner().invoke(main, ["images", "list"], env={"QEMUKIT_CACHE": str(shared)})
    assert result.exit_code == EXIT_ERROR, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qemukit: refusing qemukit's cache"), lines
    assert not spec.exists()
    result = CliRunner().invoke(main, ["ls"], env={"QEMUKIT_STATE": str(shared)})
    assert result.exit_code == EXIT_ERROR and "refusing qemukit's state" in result.stderr


# -- root under sudo ------------------------------------------------------------------------


@pytest.fixture
def sudo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Root run by ``sudo`` from user OTHER_UID, whose home is returned (QEMUKIT_CACHE unset)."""
    if os.geteuid() != 0:
        pytest.skip("the sudo case is root's")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.chown(home, OTHER_UID, OTHER_UID)
    real = pwd.getpwuid

    def getpwuid(uid: int) -> Any:
        if uid == OTHER_UID:
            return pwd.struct_passwd(("user", "x", OTHER_UID, OTHER_UID, "", str(home),
                                      "/bin/sh"))
        return real(uid)

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    monkeypatch.setenv("SUDO_UID", str(OTHER_UID))
    monkeypatch.setenv("SUDO_GID", str(OTHER_UID))
    monkeypatch.delenv("QEMUKIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "root-cache"))  # root's, kept by sudo
    return home


def test_under_sudo_images_go_to_the_invoking_users_cache(sudo: Path) -> None:
    root = paths.cache_dir()
    assert root == sudo / ".cache" / "qemukit"
    for made in (root, root.parent):
        assert made.stat().st_uid == OTHER_UID and made.stat().st_mode & 0o077 == 0


def test_under_sudo_the_users_own_cache_is_accepted(sudo: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = sudo / "qk"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    monkeypatch.setenv("QEMUKIT_CACHE", str(theirs))  # kept by sudo
    assert paths.cache_dir() == theirs
    monkeypatch.delenv("SUDO_UID")  # plain root: the same directory is another user's
    with pytest.raises(HostError, match=f"owned by uid {OTHER_UID}"):
        paths.cache_dir()


def test_under_sudo_what_root_made_is_handed_over_and_links_are_not_followed(
        sudo: Path, tmp_path: Path) -> None:
    root = paths.cache_dir()
    (root / "tiny" / "6.1").mkdir(parents=True)
    (root / "tiny" / "6.1" / "vmlinuz").write_text("kernel")
    system_file = tmp_path / "system-file"
    system_file.write_text("root's")
    (root / "tiny" / "planted").symlink_to(system_file)
    assert paths.hand_over_cache() >= 3
    for made in (root / "tiny", root / "tiny" / "6.1", root / "tiny" / "6.1" / "vmlinuz"):
        assert made.stat().st_uid == OTHER_UID, made
    assert (root / "tiny" / "planted").lstat().st_uid == OTHER_UID
    assert system_file.stat().st_uid == 0


def test_hand_over_does_nothing_without_sudo(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUDO_UID", raising=False)
    (cache / "x").write_text("")
    assert paths.hand_over_cache() == 0
    assert (cache / "x").stat().st_uid == os.geteuid()


def test_images_build_under_sudo_hands_the_image_over(sudo: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from qemukit import images

    def built(cache: Path, recipe: Path, **kwargs: Any) -> str:
        (cache / "tiny" / "6.1").mkdir(parents=True)
        (cache / "tiny" / "6.1" / "initrd.img").write_text("")
        return "image"

    monkeypatch.setattr(images, "find_image", lambda name, arch="x86_64": None)
    monkeypatch.setattr(images, "build_tiny", built)
    built_image: object = images.build("tiny")  # what the patched build_tiny returned
    assert built_image == "image"
    assert (sudo / ".cache" / "qemukit" / "tiny" / "6.1" / "initrd.img").stat().st_uid == OTHER_UID


# -- big files on disk, sockets in the runtime directory --------------------------------------


def test_data_dir_follows_the_state_dir_unless_that_is_the_runtime_tmpfs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QEMUKIT_DATA", raising=False)
    monkeypatch.setenv("QEMUKIT_STATE", str(tmp_path / "state"))
    assert paths.data_dir() == paths.state_dir()  # tests: one directory per VM, as before
    monkeypatch.delenv("QEMUKIT_STATE")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    assert paths.state_dir() == tmp_path / "run" / "qemukit"
    assert paths.data_dir() == tmp_path / "state-home" / "qemukit-data"
    monkeypatch.setenv("QEMUKIT_DATA", str(tmp_path / "data"))
    assert paths.data_dir() == tmp_path / "data"
    (tmp_path / "data").chmod(0o777)
    with pytest.raises(StateError, match="refusing qemukit's data directory.*QEMUKIT_DATA"):
        paths.data_dir()


def test_a_vm_keeps_its_big_files_in_the_data_dir_and_removes_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QEMUKIT_STATE", raising=False)
    monkeypatch.delenv("QEMUKIT_DATA", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    data = tmp_path / "state-home" / "qemukit-data" / "vm1"
    data.mkdir(parents=True)
    (data / "overlay-disk0.qcow2").write_text("a leftover of an earlier vm1")
    rd = RuntimeDir.create("vm1")
    assert rd.path == tmp_path / "run" / "qemukit" / "vm1"
    assert rd.console_log.resolve() == data / "console.log"
    assert rd.overlay("disk0").resolve() == data / "overlay-disk0.qcow2"
    assert rd.qmp_socket.parent == rd.path
    assert list(data.iterdir()) == []  # the leftover is gone: the name is this VM's now
    rd.console_log.write_text("boot")
    RuntimeDir(rd.path).remove()
    assert not rd.path.exists() and not data.exists()


def test_any_command_under_sudo_hands_the_cache_over_at_its_end(sudo: Path) -> None:
    cache = sudo / ".cache" / "qemukit"
    (cache / "warm" / "entry").mkdir(parents=True)  # what an earlier root command left
    (cache / "qemu-facts.json").write_text("{}")
    result = CliRunner().invoke(main, ["images", "list"])
    assert result.exit_code == 0, result.output
    for made in (cache / "warm", cache / "warm" / "entry", cache / "qemu-facts.json"):
        assert made.stat().st_uid == OTHER_UID, made
