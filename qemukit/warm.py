"""Warm starts: a VM description booted once, its ready state saved, later VMs restored from it.

The cache lives in ``cache_dir()/warm``. An entry is a directory named by its
key, holding a state bundle (see :class:`qemukit.snapshot.Bundle`) and
``meta.json`` (the key's parts, size, creation time). The key is a digest of
everything that decides what the booted guest is (see :func:`warm_key`):
the contents of the kernel, the initrd and every disk (and its backing
chain), the spec in canonical form without its name, the QEMU binary (path,
version, size and modification time), the host facts that shape the command
line (accelerator, CPU model, sandbox), qemukit's version. Any change gives a
new key, so an entry is never used for a guest it does not describe.

An entry is written into a hidden temporary directory and renamed into
place, so a process killed while writing leaves only a ``.tmp-*`` directory,
which lookups ignore and the next build (or ``qemukit cache prune``)
removes. Builds of one key are serialized by an ``flock`` on
``<key>.lock``: a second process asking for the same new key waits for the
first one's entry instead of booting too.

A second lock, on ``<key>.use``, keeps an entry in use from being deleted
under its users. A clone takes it shared (:meth:`WarmCache.hold`) before it
restores and keeps it as long as it runs: its QEMU inherits the locked
descriptor, so a detached clone holds it after the process that started it
has gone, and a clone's overlays (backed by the entry's disk copies) never
lose their backing file. (A separate file, so that running clones never keep
a builder from looking up the key.) Deleting takes both locks exclusively
without waiting, so ``qemukit cache clear`` and the automatic prune skip an
entry in use (it is removed by a later clear or prune once its clones have
ended). A delete
first renames the key directory to a hidden ``.tmp-*`` name, so a process
killed while deleting leaves nothing a lookup could take for an entry; a
key directory left incomplete anyway (by an older qemukit, or by hand) is
moved aside by the next build of its key and by a prune, never a reason to
give up on the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import host
from ._fs import write_atomic
from ._launch.plan import HostFacts
from .errors import QemukitError, SnapshotError
from .paths import cache_dir
from .snapshot import Bundle
from .spec import CloudInit, Drive, VMSpec

__all__ = [
    "DEFAULT_CACHE_LIMIT",
    "WarmCache",
    "WarmEntry",
    "WarmHold",
    "WarmKey",
    "WarmStart",
    "file_digest",
    "note_kernel_run",
    "warm_key",
    "warm_refusal",
    "warm_spec",
]

log = logging.getLogger("qemukit.warm")

#: Bumped when the layout of an entry or the meaning of a key changes.
WARM_FORMAT = 3
#: After a build, the cache is pruned to this many bytes (least recently used first).
DEFAULT_CACHE_LIMIT = 4 << 30
META = "meta.json"
BUNDLE = "bundle"
#: The console log of the boot the state was saved after.
BOOT_LOG = "boot.log"
USED = "last-used"
TMP_PREFIX = ".tmp-"
#: The tail of a hidden ``.tmp-KEY-gonePID`` directory: an entry being deleted.
GONE = "gone"
#: What a key directory's name looks like (a digest's first 20 hex digits): nothing
#: else in the cache's root is ever taken for a broken entry and deleted.
_KEY_RE = re.compile(r"[0-9a-f]{20}")
#: How long a clone waits for an entry's lock while another process deletes it (seconds).
HOLD_TIMEOUT = 30.0
#: The arguments every warm VM gets: the guest kernel reseeds its RNG when a clone resumes.
VMGENID_ARGS = ("-device", "vmgenid,guid=auto")


@dataclass(frozen=True)
class WarmStart:
    """How a VM with ``spec.warm`` was started: warm (restored) or cold (booted), and why."""

    warm: bool
    reason: str
    key: str | None = None
    seconds: float = 0.0
    #: How the clone got the guest's RAM: ``memory mapped`` (copy on write from the
    #: state's RAM file) or ``memory copied: WHY`` (read into the clone); empty when cold.
    memory: str = ""
    #: Seconds this start spent building the warm state (booting and saving it) first, if it did.
    build_seconds: float = 0.0
    #: True if the start took a standby clone (restored ahead, paused) instead of restoring.
    standby: bool = False

    def describe(self) -> str:
        """One line: ``warm: restored KEY in 0.12 s (memory mapped)`` or ``cold: REASON``."""
        if self.warm:
            how = "; ".join(p for p in (self.memory, "standby clone taken" if self.standby
                                        else "") if p)
            memory = f" ({how})" if how else ""
            return f"warm: restored {self.key} in {self.seconds:.2f} s{memory}"
        return f"cold: {self.reason}"


@dataclass(frozen=True)
class WarmKey:
    """A cache key: the digest and the parts it was made from."""

    digest: str
    parts: Mapping[str, Any]


@dataclass(frozen=True)
class WarmEntry:
    """One complete entry in the cache."""

    key: str
    path: Path
    meta: Mapping[str, Any]

    @property
    def bundle_path(self) -> Path:
        """The state bundle's directory."""
        return self.path / BUNDLE

    @property
    def size(self) -> int:
        """Bytes the entry really uses on disk (its files are sparse)."""
        return _disk_usage(self.path)

    @property
    def last_used(self) -> float:
        """When a clone was last restored from it (creation time if never)."""
        try:
            return (self.path / USED).stat().st_mtime
        except OSError:
            return float(self.meta.get("created", 0.0))

    def bundle(self) -> Bundle:
        """Open (and check) the bundle."""
        return Bundle.open(self.bundle_path)

    def touch(self) -> None:
        """Record a use, for least-recently-used pruning."""
        stamp = self.path / USED
        with contextlib.suppress(OSError):  # a read-only cache still restores
            stamp.touch(mode=0o600)
            os.utime(stamp)


def warm_refusal(spec: VMSpec) -> str | None:
    """Why ``spec`` cannot start warm (it then boots cold), or None if it can."""
    if spec.all_shares:
        return ("shares cannot be saved in a VM's state (a mounted virtiofs or 9p export "
                "blocks migration)")
    if spec.cloud_init is not None and spec.agent != "qga":
        return ("a cloud-init guest is given its own host name, keys and MACs after a restore "
                "through qemu-guest-agent, and this VM has none")
    if spec.firmware == "ovmf":
        return "the UEFI variable store is per VM and not part of the saved state"
    if spec.machine == "microvm":
        return "microvm has no vmgenid device, so clones could not reseed their RNG"
    if spec.agent == "none":
        return "without a guest agent nothing tells when the guest is ready to save"
    if spec.gdb:
        return "a gdb stub is for watching the kernel boot (and -S halts it before it can)"
    if not spec.arch_info.vmgenid:
        # Restoring clones works on every architecture (tests/integration/test_arch_snapshot.py),
        # but only x86 has vmgenid, which makes the kernel reseed its RNG at a restore:
        # two riscv64 or ppc64le clones of one state read the same /dev/urandom bytes here.
        return (f"{spec.arch} clones would resume with the saved RNG state (QEMU has no vmgenid "
                f"device for {spec.machine}, so the guest kernel would not reseed), so it boots")
    for drive in spec.drives:
        if not drive.read_only and not drive.overlay:
            return (f"disk {drive.file} is written in place; a clone would write a copy "
                    "(add ,overlay or ,readonly to start it warm)")
    return None


# -- the key ---------------------------------------------------------------------


def _digest_cache_path(root: Path) -> Path:
    return root / "digests.json"


def file_digest(path: str | os.PathLike[str], root: Path | None = None) -> str:
    """SHA-256 of a file's contents, remembered by (path, size, mtime, inode) under ``root``.

    Only a regular file is read, and only its size's worth: a FIFO, a device
    (``/dev/zero``) or a directory is a SpecError naming it, at once.
    """
    real = os.path.realpath(path)
    # O_NOFOLLOW: the name was resolved above; a link swapped in since is refused.
    fd = host.open_regular(real, "file", follow=False)
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]
        cache_file = _digest_cache_path(root) if root is not None else None
        known: dict[str, Any] = {}
        if cache_file is not None:
            with contextlib.suppress(OSError, ValueError):
                known = json.loads(cache_file.read_text())
            entry = known.get(real)
            if isinstance(entry, dict) and entry.get("stamp") == stamp:
                return str(entry["sha256"])
        h = hashlib.sha256()
        left = st.st_size
        while left > 0 and (chunk := fh.read(min(1 << 20, left))):
            h.update(chunk)
            left -= len(chunk)
    digest = h.hexdigest()
    if cache_file is not None:
        # Forget files that are gone (throwaway disks), so the table stays small.
        known = {p: v for p, v in known.items() if os.path.exists(p)}
        known[real] = {"stamp": stamp, "sha256": digest}
        with contextlib.suppress(OSError):  # only a cost next time
            cache_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomic(cache_file, json.dumps(known, sort_keys=True))
    return digest


#: The kernels ``note_kernel_run`` remembers (the least recently run are forgotten).
KERNEL_RUNS_KEPT = 256


def note_kernel_run(spec: VMSpec, root: Path | None = None, *, record: bool = True) -> bool:
    """Remember a run of ``spec``'s kernel; True if it ran before with the same initrd and append.

    ``record=False`` only asks (``qemukit cmdline`` shows what a run would do).

    "The same" is by contents (the kernel image's and the initrd's digests),
    so a rebuilt kernel is a new one. ``run --kernel K -- CMD`` boots a kernel
    it has not seen on microvm, the quickest cold boot; from the second run of
    one kernel on it takes q35 and a warm state, so the runs after that are
    restores. A tree whose modules are installed at each start boots cold
    anyway: for it this notes nothing and returns False.
    """
    from .kconfig import find_tree, is_tree

    if spec.kernel is None:
        return False
    image = Path(spec.kernel)
    if is_tree(image):
        tree = find_tree(image, spec.arch)
        if tree.modules:
            return False
        image = tree.image
    root = root if root is not None else cache_dir() / "warm"
    parts = [spec.arch, file_digest(image, root),
             file_digest(spec.initrd, root) if spec.initrd is not None else "",
             spec.append or ""]
    run_id = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]
    path = root / "kernel-runs.json"
    runs: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(path.read_text())
        if isinstance(loaded, dict):
            runs = {str(k): float(v) for k, v in loaded.items()}
    seen = run_id in runs
    if not record:
        return seen
    runs[run_id] = time.time()
    kept = dict(sorted(runs.items(), key=lambda kv: kv[1])[-KERNEL_RUNS_KEPT:])
    with contextlib.suppress(OSError):  # forgetting costs one more microvm boot, nothing else
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_atomic(path, json.dumps(kept, sort_keys=True))
    return seen


def _chain_digests(drive: Drive, qemu: host.QemuBinary, root: Path | None) -> dict[str, Any]:
    """The drive's format, its backing chain and the digest of every file in it, top first.

    The chain is the one a start opens (:func:`qemukit.host.resolve_disk`): named, never
    read out of a header; each file is read only if it is a regular file.
    """
    image = host.resolve_disk(drive, qemu)
    files = [os.path.abspath(drive.file), *(path for path, _ in image.backing)]
    return {"format": image.format, "backing": [list(layer) for layer in image.backing],
            "sha256": [file_digest(path, root) for path in files]}


def warm_key(spec: VMSpec, qemu: host.QemuBinary, facts: HostFacts,
             root: Path | None = None, *, ram: str = "copied") -> WarmKey:
    """The cache key of ``spec`` started with ``qemu`` under ``facts`` (digests cached in ``root``).

    ``ram`` is how the entry keeps the guest's RAM: ``copied`` into the state
    file, or ``mapped`` (a file clones map copy on write): two different entries.
    """
    from . import __version__

    data = spec.to_dict()
    # What the VM is, not how it is reached: forward_auto acts from outside, once it runs.
    # Networks too: a clone's NICs on them are hot-plugged after the restore (qemukit.vm._net).
    # tb_size: how big QEMU's code buffer is on this host, not what the guest is.
    # standby: whether a clone is kept ready, not what the clones are.
    for ignored in ("name", "warm", "forward_auto", "networks", "tb_size", "standby"):
        data.pop(ignored, None)
    files: dict[str, Any] = {}
    for field in ("kernel", "initrd"):
        value = getattr(spec, field)
        if value is not None:
            data[field] = os.path.abspath(value)
            files[field] = file_digest(value, root)
    if spec.cloud_init is not None:
        # The host name and the keys are each clone's own (see qemukit.identity);
        # the user-data shapes the first boot, so its contents are part of the key.
        seed = data["cloud_init"]
        for per_clone in ("hostname", "ssh_key", "user_data"):
            seed.pop(per_clone, None)
        if spec.cloud_init.user_data is not None:
            files["user_data"] = file_digest(spec.cloud_init.user_data, root)
    for index, drive in enumerate(spec.drives):
        data["drives"][index]["file"] = os.path.abspath(drive.file)
        files[f"drive{index}"] = _chain_digests(drive, qemu, root)
    binary = os.stat(qemu.path)
    parts = {
        "format": WARM_FORMAT,
        "qemukit": __version__,
        "qemu": {"path": qemu.path, "version": qemu.version_string,
                 "size": binary.st_size, "mtime_ns": binary.st_mtime_ns},
        "host": dataclasses.asdict(facts),
        "spec": data,
        "files": files,
        "ram": ram,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return WarmKey(hashlib.sha256(text.encode()).hexdigest()[:20], json.loads(text))


def warm_spec(spec: VMSpec) -> VMSpec:
    """The spec a warm state is booted with: ``spec`` plus the vmgenid device, no name.

    A cloud-init seed keeps only what is the same for every clone (the
    user-data, the login user): host name and keys come after the restore.
    """
    seed = spec.cloud_init
    if seed is not None:
        seed = CloudInit(user_data=seed.user_data, ssh_user=seed.ssh_user)
    return spec.replace(name=None, warm=False, standby=None, cloud_init=seed, networks=(),
                        extra_args=spec.extra_args + VMGENID_ARGS)


# -- the cache -------------------------------------------------------------------


def _disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


class WarmHold:
    """A shared lock on one entry: while it (or a copy of :attr:`fd`) is open, nobody deletes it.

    Pass :attr:`fd` to the clone's QEMU (``pass_fds``): the lock then lasts
    as long as the clone runs, wherever its owner is. :meth:`close` drops
    this process's copy.
    """

    def __init__(self, entry: WarmEntry, fd: int) -> None:
        self.entry = entry
        self.fd = fd

    def close(self) -> None:
        """Close this process's descriptor (a QEMU that inherited it keeps the lock)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> WarmHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class WarmCache:
    """The warm states in ``root`` (default ``cache_dir()/warm``)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "warm"

    def ensure(self) -> None:
        """Create the cache directory (0700)."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def lock_path(self, key: str) -> Path:
        """The file whose ``flock`` serializes builds (and removal) of ``key``."""
        return self.root / f"{key}.lock"

    def use_lock_path(self, key: str) -> Path:
        """The file clones of ``key`` lock shared while they run (see :meth:`hold`)."""
        return self.root / f"{key}.use"

    def get(self, key: str) -> WarmEntry | None:
        """The complete entry for ``key``, or None (a missing or unreadable one is no entry)."""
        path = self.root / key
        try:
            meta = json.loads((path / META).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        return WarmEntry(key, path, meta)

    def entries(self) -> list[WarmEntry]:
        """Every complete entry, least recently used first."""
        if not self.root.is_dir():
            return []
        found = [self.get(p.name) for p in self.root.iterdir()
                 if p.is_dir() and not p.name.startswith(".")]
        return sorted((e for e in found if e is not None), key=lambda e: e.last_used)

    def new_build_dir(self, key: str) -> Path:
        """A fresh hidden directory to write ``key``'s entry in (call under its lock)."""
        self.ensure()
        self.remove_partial(key)
        self._discard_broken(key)
        path = self.root / f"{TMP_PREFIX}{key}-{os.getpid()}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700)
        return path

    def remove_partial(self, key: str | None = None) -> int:
        """Remove half-written entries (of ``key``, or of every key not being built now)."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for path in self.root.iterdir():
            if not path.name.startswith(TMP_PREFIX):
                continue
            # A build directory is ``.tmp-KEY-PID``, a deleted entry ``.tmp-KEY-gonePID-NS``.
            name = path.name[len(TMP_PREFIX):]
            owner, gone, _ = name.partition(f"-{GONE}")
            if not gone:
                owner = name.rpartition("-")[0]
            if key is not None and owner != key:
                continue
            if gone:  # deleted already, by name: nobody uses it
                shutil.rmtree(path, ignore_errors=True)
            elif key is None:
                with self._try_lock(owner) as held:
                    if not held:
                        continue  # being built right now
                    shutil.rmtree(path, ignore_errors=True)
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed += 1
        if key is None:
            for path in self._broken_dirs():
                with self._try_lock(path.name) as held:  # (_discard_broken takes the use lock)
                    if held and self._discard_broken(path.name):
                        removed += 1
        return removed

    def _broken_dirs(self) -> list[Path]:
        """Key directories without a complete entry (half deleted, or damaged)."""
        return [p for p in self.root.iterdir()
                if p.is_dir() and _KEY_RE.fullmatch(p.name) and self.get(p.name) is None]

    def _discard_broken(self, key: str) -> bool:
        """Move ``key``'s directory aside and delete it if it is no complete entry (hold its lock)."""
        path = self.root / key
        if not path.is_dir() or self.get(key) is not None:
            return False
        with self._try_lock(key, use=True) as free:
            if not free:  # a clone still runs on what is left of it
                return False
            self._delete(path, key)
        return True

    def _delete(self, path: Path, key: str) -> None:
        """Rename ``path`` to a hidden name at once, then delete it: a kill leaves no half entry."""
        gone = self.root / f"{TMP_PREFIX}{key}-{GONE}{os.getpid()}-{time.monotonic_ns()}"
        try:
            os.rename(path, gone)
        except FileNotFoundError:
            return
        shutil.rmtree(gone, ignore_errors=True)

    def commit(self, key: WarmKey, build_dir: Path, bundle: Bundle) -> WarmEntry:
        """Write ``meta.json`` and rename ``build_dir`` into place: the entry now exists."""
        meta = {"key": key.digest, "format": WARM_FORMAT, "created": time.time(),
                "size": _disk_usage(build_dir), "state_size": bundle.manifest.get("state_size"),
                "parts": key.parts}
        write_atomic(build_dir / META, json.dumps(meta, indent=2, sort_keys=True))
        os.chmod(build_dir / META, 0o600)
        target = self.root / key.digest
        try:
            try:
                os.rename(build_dir, target)
            except OSError:
                # A key directory left incomplete (a kill while deleting it, before
                # deletes renamed first): not an entry, so it goes (callers hold the lock).
                if not self._discard_broken(key.digest):
                    raise
                os.rename(build_dir, target)
        except OSError as exc:
            shutil.rmtree(build_dir, ignore_errors=True)
            existing = self.get(key.digest)
            if existing is not None:  # an equal state was stored meanwhile: use that one
                return existing
            raise SnapshotError(f"cannot store the warm state {target}: {exc}") from exc
        return WarmEntry(key.digest, target, meta)

    @contextlib.contextmanager
    def _try_lock(self, key: str, use: bool = False) -> Iterator[bool]:
        """Hold ``key``'s build lock (``use``: its use lock) if free now (True), else yield False."""
        path = self.use_lock_path(key) if use else self.lock_path(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def hold(self, key: str, timeout: float = HOLD_TIMEOUT) -> WarmHold | None:
        """Lock ``key``'s entry shared, for a clone; None if there is no such entry (any more).

        Waits (up to ``timeout``) only while another process deletes the
        entry; it is looked up again once the lock is held.
        """
        self.ensure()
        fd = os.open(self.use_lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return None
                    time.sleep(0.02)
            entry = self.get(key)
        except BaseException:
            os.close(fd)
            raise
        if entry is None:
            os.close(fd)
            return None
        return WarmHold(entry, fd)

    def in_use(self, entry: WarmEntry) -> bool:
        """True if a clone of the entry runs (or restores) now."""
        with self._try_lock(entry.key, use=True) as free:
            return not free

    def remove(self, entry: WarmEntry) -> bool:
        """Delete one entry unless it is being built or used (by a restore or a running clone)."""
        with self._try_lock(entry.key) as held, self._try_lock(entry.key, use=True) as free:
            if not (held and free):
                return False
            gone = self.root / f"{TMP_PREFIX}{entry.key}-{GONE}{os.getpid()}-{time.monotonic_ns()}"
            try:
                os.rename(entry.path, gone)
            except FileNotFoundError:
                return False
        # The lock files stay: unlinking one could let two processes lock different files.
        shutil.rmtree(gone, ignore_errors=True)
        return True

    def prune(self, limit: int) -> list[WarmEntry]:
        """Remove least recently used entries until the cache uses at most ``limit`` bytes.

        Half-written entries are removed first. Returns the entries removed.
        """
        self.remove_partial()
        entries = self.entries()
        sizes = {e.key: e.size for e in entries}
        total = sum(sizes.values())
        removed = []
        for entry in entries:
            if total <= limit:
                break
            if self.remove(entry):
                total -= sizes[entry.key]
                removed.append(entry)
        return removed

    def clear(self, state_root: Path | None = None) -> list[WarmEntry]:
        """Remove every entry not in use (and half-written ones); see :meth:`in_use`.

        The standby clones of these states in the registry at ``state_root``
        (default: the user's) are ended first: a standby keeps its state in
        use, and is worth nothing without it.
        """
        from ._launch.standby import end_standbys

        try:
            end_standbys(state_root, cache=self.root)
        except (OSError, QemukitError) as exc:  # no registry: no standby either
            log.debug("warm cache: cannot look for standby clones: %s", exc)
        return self.prune(-1)
