"""The warm-state cache without QEMU: what starts cold, the key, half entries, pruning."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from qemukit import Drive, Share, VMSpec
from qemukit._launch.plan import HostFacts
from qemukit.spec import CloudInit, Nic
from qemukit.warm import (
    WarmCache,
    WarmKey,
    file_digest,
    note_kernel_run,
    warm_key,
    warm_refusal,
    warm_spec,
)
from tests.unit.warm_inputs import FACTS, qemu


def spec(files: dict[str, Path], **changes: object) -> VMSpec:
    return VMSpec(kernel=files["vmlinuz"], initrd=files["initrd"], append="quiet",
                  drives=(Drive(files["disk.raw"], format="raw", overlay=True),)).replace(**changes)


def key(files: dict[str, Path], root: Path, **changes: object) -> str:
    return warm_key(spec(files, **changes), qemu(files["qemu"]), FACTS, root).digest


@pytest.mark.parametrize(("changes", "words"), [
    ({"shares": (Share("/tmp"),)}, "shares"),
    ({"cloud_init": CloudInit(), "agent": "qemukit"}, "qemu-guest-agent"),
    ({"firmware": "ovmf"}, "UEFI"),
    ({"agent": "none"}, "agent"),
    ({"drives": (Drive("/img/data.qcow2"),)}, "written in place"),
    ({"gdb_port": 0}, "gdb stub"),
    ({"arch": "aarch64", "machine": "virt"}, "aarch64 clones would resume with the saved RNG state"),
])
def test_what_cannot_start_warm_says_why(files: dict[str, Path], changes: dict[str, object],
                                         words: str) -> None:
    reason = warm_refusal(spec(files, **changes))
    assert reason is not None and words in reason


def test_overlay_and_read_only_disks_can_start_warm(files: dict[str, Path]) -> None:
    assert warm_refusal(spec(files)) is None
    assert warm_refusal(spec(files, drives=(Drive(files["disk.raw"], read_only=True),))) is None


def test_the_key_follows_what_is_booted(files: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "warm"
    first = key(files, root)
    assert key(files, root) == first
    assert key(files, root, name="other", warm=True) == first  # neither changes the guest
    assert key(files, root, tb_size=64) == first  # a pool's clones share the single VM's state
    with_nic = key(files, root, nics=(Nic(),))
    assert key(files, root, nics=(Nic(),), forward_auto=True) == with_nic  # acts from outside
    assert key(files, root, memory=1024) != first
    assert key(files, root, append="loglevel=8") != first
    assert warm_key(spec(files), qemu(files["qemu"], (8, 0, 0)), FACTS, root).digest != first
    assert warm_key(spec(files), qemu(files["qemu"]),
                    HostFacts(qemu=FACTS.qemu, accel="kvm"), root).digest != first
    for name in ("vmlinuz", "initrd", "disk.raw", "qemu"):
        before = key(files, root)
        with open(files[name], "ab") as fh:
            fh.write(b"changed")
        assert key(files, root) != before, name


def test_a_cloud_init_guest_with_the_agent_starts_warm(files: dict[str, Path]) -> None:
    assert warm_refusal(spec(files, cloud_init=CloudInit(), agent="qga")) is None


def test_a_seeds_identity_is_per_clone_but_its_user_data_is_in_the_key(
        files: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "warm"
    user_data = tmp_path / "user-data"
    user_data.write_text("#cloud-config\n{}\n")
    pub = tmp_path / "key.pub"
    pub.write_text("ssh-ed25519 AAAA x\n")
    seeded = CloudInit(user_data=user_data)
    first = key(files, root, agent="qga", cloud_init=seeded)
    # Host name and key are given to each clone after its restore: not in the key.
    assert key(files, root, agent="qga", cloud_init=CloudInit(
        user_data=user_data, hostname="other", ssh_key=pub)) == first
    assert key(files, root, agent="qga", cloud_init=CloudInit(user_data=user_data,
                                                              ssh_user="alice")) != first
    user_data.write_text("#cloud-config\npackages: [vim]\n")
    assert key(files, root, agent="qga", cloud_init=seeded) != first
    assert key(files, root, agent="qga", cloud_init=CloudInit()) != first
    # The builder boots with what every clone shares, and no name of its own.
    built = warm_spec(spec(files, agent="qga", cloud_init=CloudInit(
        user_data=user_data, hostname="other", ssh_key=pub, ssh_user="alice")))
    assert built.cloud_init == CloudInit(user_data=user_data, ssh_user="alice")
    assert built.name is None and "vmgenid,guid=auto" in built.extra_args


def test_a_disks_backing_file_is_part_of_the_key(files: dict[str, Path], tmp_path: Path) -> None:
    from .test_disk_images import qcow2_header

    base = tmp_path / "base.raw"
    base.write_bytes(b"base" * 100)
    top = tmp_path / "top.qcow2"
    # relative: resolved next to the top image, as QEMU does
    top.write_bytes(qcow2_header("base.raw", backing_format="raw"))
    drives = (Drive(top, format="qcow2", overlay=True, backing=(f"raw:{base}",)),)
    before = key(files, tmp_path, drives=drives)
    with open(base, "ab") as fh:
        fh.write(b"changed")
    assert key(files, tmp_path, drives=drives) != before


def test_digests_are_remembered_and_renewed_on_change(tmp_path: Path) -> None:
    data = tmp_path / "image"
    data.write_bytes(b"x" * 1000)
    first = file_digest(data, tmp_path)
    known = json.loads((tmp_path / "digests.json").read_text())
    assert known[str(data)]["sha256"] == first
    known[str(data)]["sha256"] = "remembered"
    (tmp_path / "digests.json").write_text(json.dumps(known))
    assert file_digest(data, tmp_path) == "remembered"  # the file was not read again
    data.write_bytes(b"y" * 1000)  # same size; new mtime/ctime
    assert file_digest(data, tmp_path) not in ("remembered", first)


def make_entry(cache: WarmCache, key: str, size: int, used: float) -> None:
    path = cache.root / key
    path.mkdir(parents=True)
    (path / "meta.json").write_text(json.dumps({"key": key, "created": used}))
    with open(path / "state.bin", "wb") as fh:
        fh.write(os.urandom(size))
    (path / "last-used").touch()
    os.utime(path / "last-used", (used, used))


def test_half_entries_are_never_listed_and_are_removed(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path)
    make_entry(cache, "aaaa", 4096, 100.0)
    (tmp_path / ".tmp-bbbb-123").mkdir()
    (tmp_path / "cccc").mkdir()  # no meta.json: a copy that never finished
    assert [e.key for e in cache.entries()] == ["aaaa"]
    assert cache.get("bbbb") is None and cache.get("cccc") is None
    # A half entry whose key is being built (its lock held) is left alone.
    (tmp_path / ".tmp-dddd-456").mkdir()
    fd = os.open(cache.lock_path("dddd"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert cache.remove_partial() == 1
    finally:
        os.close(fd)
    assert not (tmp_path / ".tmp-bbbb-123").exists()
    assert (tmp_path / ".tmp-dddd-456").exists()


def test_prune_removes_least_recently_used_first(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path)
    for key, used in (("old", 100.0), ("mid", 200.0), ("new", 300.0)):
        make_entry(cache, key, 64 << 10, used)
    sizes = {e.key: e.size for e in cache.entries()}
    removed = cache.prune(sizes["new"] + sizes["mid"])
    assert [e.key for e in removed] == ["old"]
    assert [e.key for e in cache.entries()] == ["mid", "new"]
    cache.get("mid").touch()  # type: ignore[union-attr]  # used now: "new" is the oldest
    assert [e.key for e in cache.prune(sizes["mid"])] == ["new"]
    assert [e.key for e in cache.clear()] == ["mid"] and cache.entries() == []


def test_a_kernel_run_is_known_again_by_contents(files: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "warm"
    run = spec(files)
    assert note_kernel_run(run, root) is False  # first run of this kernel
    assert note_kernel_run(run, root) is True
    assert note_kernel_run(run.replace(append="quiet other=1"), root) is False
    with open(files["vmlinuz"], "ab") as fh:  # rebuilt: a new kernel
        fh.write(b"changed")
    assert note_kernel_run(run, root) is False
    assert note_kernel_run(run, root) is True
    assert note_kernel_run(VMSpec(), root) is False


# -- an entry in use is never deleted; a half-deleted one never wedges its key -------------

KEY = "0123456789abcdef0123"  # what a key directory's name looks like


def test_an_entry_held_by_a_clone_survives_clear_and_goes_after(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path)
    make_entry(cache, KEY, 4096, 100.0)
    make_entry(cache, "fedcba9876543210fedc", 4096, 200.0)
    hold = cache.hold(KEY)
    assert hold is not None and hold.entry.key == KEY
    assert cache.in_use(hold.entry)
    assert [e.key for e in cache.clear()] == ["fedcba9876543210fedc"]
    assert [e.key for e in cache.entries()] == [KEY]  # kept whole: the clone still reads it
    assert (tmp_path / KEY / "state.bin").stat().st_size == 4096
    assert cache.prune(0) == []
    hold.close()
    assert [e.key for e in cache.clear()] == [KEY]
    assert cache.entries() == [] and not (tmp_path / KEY).exists()


def test_a_process_that_inherited_the_hold_keeps_the_entry(tmp_path: Path) -> None:
    """As a clone's QEMU does: the lock lives as long as any process holds the descriptor."""
    import subprocess
    import sys

    cache = WarmCache(tmp_path)
    make_entry(cache, KEY, 4096, 100.0)
    hold = cache.hold(KEY)
    assert hold is not None
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, pass_fds=[hold.fd])
    try:
        hold.close()  # the starting process is gone (a detached clone)
        assert cache.clear() == [] and cache.get(KEY) is not None
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(60)
    assert [e.key for e in cache.clear()] == [KEY]


def test_hold_of_a_missing_or_vanished_entry_is_none(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path)
    assert cache.hold(KEY) is None
    make_entry(cache, KEY, 4096, 100.0)
    fd = os.open(cache.use_lock_path(KEY), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # being deleted, for longer than we wait
        assert cache.hold(KEY, timeout=0.2) is None
    finally:
        os.close(fd)
    entry = cache.get(KEY)
    assert entry is not None and cache.remove(entry)
    assert cache.hold(KEY) is None


def test_running_clones_never_block_the_build_lock(tmp_path: Path) -> None:
    """Many VMs of one spec: the later ones look the key up under its build lock while the
    first ones already run; clones hold the use lock, never the build lock."""
    cache = WarmCache(tmp_path)
    make_entry(cache, KEY, 4096, 100.0)
    hold = cache.hold(KEY)
    assert hold is not None
    fd = os.open(cache.lock_path(KEY), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise BlockingIOError
        entry = cache.get(KEY)
        assert entry is not None and not cache.remove(entry)  # a build (or its look-up) runs
    finally:
        os.close(fd)
        hold.close()


def test_a_delete_renames_first_so_a_kill_leaves_no_half_entry(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    cache = WarmCache(tmp_path)
    make_entry(cache, KEY, 4096, 100.0)
    entry = cache.get(KEY)
    assert entry is not None

    def killed(path: str | os.PathLike[str], ignore_errors: bool = False) -> None:
        (Path(path) / "meta.json").unlink()  # rmtree got this far when the kill came
        raise SystemExit("killed")

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(SystemExit):
        cache.remove(entry)
    monkeypatch.undo()
    assert not (tmp_path / KEY).exists() and cache.entries() == []
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".tmp-{KEY}-gone")
    locks = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".lock")
    assert cache.remove_partial() == 1 and not any(p.is_dir() for p in tmp_path.iterdir())
    # Removed by its name, not under a lock of a made-up key "KEY-gonePID".
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".lock") == locks


def test_the_deleted_entries_of_one_key_go_with_its_partial_builds(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path)
    gone = tmp_path / f".tmp-{KEY}-gone{os.getpid()}-123"
    other = tmp_path / f".tmp-{'b' * len(KEY)}-gone{os.getpid()}-456"
    for path in (gone, other):
        path.mkdir()
    assert cache.remove_partial(KEY) == 1
    assert not gone.exists() and other.exists()
    assert not list(tmp_path.glob("*.lock"))


def _fake_bundle() -> object:
    class Fake:
        manifest: dict[str, object] = {"state_size": 1}

    return Fake()


def test_a_half_deleted_key_directory_is_replaced_by_the_next_build(tmp_path: Path) -> None:
    """The wedge of old: a key directory without meta.json made every commit fail, forever."""
    cache = WarmCache(tmp_path)
    make_entry(cache, KEY, 4096, 100.0)
    (tmp_path / KEY / "meta.json").unlink()  # an older rmtree killed half way
    assert cache.get(KEY) is None
    build = cache.new_build_dir(KEY)  # under the key's lock, as a builder calls it
    assert not (tmp_path / KEY).exists()  # moved aside and deleted at once
    (build / "state.bin").write_bytes(b"new")
    # And if it comes back between (say a copy of an old cache), the commit still lands.
    (tmp_path / KEY).mkdir()
    (tmp_path / KEY / "bundle").mkdir()
    entry = cache.commit(WarmKey(KEY, {}), build, _fake_bundle())  # type: ignore[arg-type]
    assert entry.path == tmp_path / KEY and (entry.path / "state.bin").read_bytes() == b"new"
    assert cache.get(KEY) is not None


def test_prune_removes_broken_key_directories_but_nothing_else(tmp_path: Path) -> None:
    cache = WarmCache(tmp_path)
    (tmp_path / KEY).mkdir()  # a key directory without an entry
    (tmp_path / "standby").mkdir()  # not a key's name: never taken for one
    assert cache.prune(1 << 30) == []
    assert not (tmp_path / KEY).exists() and (tmp_path / "standby").is_dir()
