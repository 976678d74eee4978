"""Fork a running VM into N clones: ``vm.fork(n)``, ``qemukit fork NAME N``, MCP's ``fork_vm``.

One save, N restores, each clone a warm clone of the fork point:

1. :func:`plan_fork` checks everything that can be checked before any process
   starts (``n`` within :data:`FORK_LIMIT`, the parent running with an agent,
   the clones' names free) and raises :class:`~qemukit.errors.SpecError` naming
   the field.
2. The parent's state is saved once into an entry of the fork cache
   (``cache_dir()/forks``, a :class:`~qemukit.warm.WarmCache` of its own): the
   guest is paused, its state migrated into the entry and each writable
   disk's top layer copied beside it while it is paused (so the copy is
   consistent with the RAM), then the parent runs on. The parent's disks,
   and the base images under them, are never written by a clone: a clone
   writes only its own qcow2 overlay over the entry's read-only copy, so
   what the parent writes after the fork point never reaches a clone, nor
   the other way round. The hot-plugged devices (the hotplug ledger) go into
   the entry with the state and are recreated in each clone before it loads.
3. The clones start side by side, each exactly as a warm clone restores
   (:func:`qemukit.vm._warm.finish_warm`: the state loaded, the clock set,
   the RNG reseeded, a cloud-init guest given its own host name, machine id,
   MACs and ssh keys by :func:`qemukit.identity.reidentify`; a guest without
   cloud-init gets its own host name and machine id from the same function).
   Each holds the entry in use (:meth:`~qemukit.warm.WarmCache.hold`, the lock
   inherited by its QEMU) for as long as it runs, so ``cache clear`` and the
   prune of the next fork leave it alone; an entry whose clones have all
   ended is removed by the next fork (or ``qemukit cache clear``).

A clone is a normal VM: its own runtime directory and registry entry (``ls``
lists it, ``stop``/``gc`` end it), its own port forwards (every forward of the
parent gets a free host port), its name the parent's with ``-1``, ``-2``...
If a clone fails to start, the clones already started are stopped, the
entry is removed, and the parent, resumed right after the save, runs on.

Memory: a parent's RAM is anonymous (or a private copy of a warm state's
RAM file), so there is no file its clones could map; each clone reads the
saved RAM from the entry (``-v`` says so). See docs/fork.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._aio import file_lock
from ..errors import QemukitError, SnapshotError, SpecError, StateError
from ..identity import reidentify
from ..paths import cache_dir
from ..snapshot import Bundle
from ..snapshot._bundle import RAM_ID, STATE_FILE, without_ram_args
from ..spec import NAME_RE, VMSpec
from ..timeouts import SAVE_TIMEOUT
from ..warm import BUNDLE, TMP_PREFIX, WarmCache, WarmKey, WarmStart
from ._warm import WarmPlan

if TYPE_CHECKING:
    from ._core import AsyncVM

log = logging.getLogger("qemukit.fork")

#: The most clones one fork may start (a fork of more is refused before anything starts).
FORK_LIMIT = 16
#: The fork cache's directory under ``cache_dir()``.
FORKS_DIR = "forks"
_HOSTNAME_BAD = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class ForkPlan:
    """What a fork will do, checked before anything starts."""

    parent: str
    count: int
    #: The clones' names, in order.
    names: tuple[str, ...]


def fork_cache() -> WarmCache:
    """The fork cache: one entry per fork, held by its running clones."""
    return WarmCache(cache_dir() / FORKS_DIR)


def check_count(n: object, limit: int = FORK_LIMIT) -> int:
    """``n`` as a clone count, or a SpecError naming it (hostile input: an int 1..limit only)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise SpecError("n", n, f"must be a whole number of clones from 1 to {limit}")
    if not 1 <= n <= limit:
        raise SpecError("n", n, f"must be from 1 to {limit} (one fork starts at most "
                        f"{limit} clones)")
    return n


def clone_names(parent: str, count: int, taken: Callable[[str], bool]) -> tuple[str, ...]:
    """``count`` free names derived from ``parent``'s: ``PARENT-1``, ``PARENT-2``... skipping
    names ``taken`` says are in use; the parent's part is cut to keep a valid name."""
    names: list[str] = []
    index = 0
    while len(names) < count:
        index += 1
        if index > 10_000:
            raise SpecError("name", parent, "no free names for its clones")
        suffix = f"-{index}"
        stem = parent[: 40 - len(suffix)].rstrip("-.") or "vm"
        name = stem + suffix
        if NAME_RE.fullmatch(name) and name not in names and not taken(name):
            names.append(name)
    return tuple(names)


def hostname_of(name: str) -> str:
    """A host name for a clone named ``name`` (lower case, letters, digits and '-')."""
    host = _HOSTNAME_BAD.sub("-", name.lower()).strip("-")[:63].strip("-")
    return host or "clone"


def plan_fork(parent: AsyncVM, n: object, taken: Callable[[str], bool]) -> ForkPlan:
    """Check a fork of ``parent`` into ``n`` clones before anything starts (SpecError or
    StateError naming what is wrong)."""
    count = check_count(n)
    if parent.state.value != "running":
        raise StateError(f"VM {parent.name!r} is {parent.state.value}; only a running VM forks")
    spec = parent.spec
    if spec.agent == "none":
        raise SpecError("agent", spec.agent, "a fork's clones are given their identity (clock, "
                        "RNG, host name) through the guest agent; this VM has none")
    joined = sorted(set(spec.networks) | set(parent.networks))
    if joined:
        raise SpecError("networks", joined,
                        "forking a VM on a private network is not supported yet (its clones "
                        "would share its address)")
    if spec.gdb or spec.gdb_port is not None or spec.qmp_tcp_port is not None:
        raise SpecError("gdb" if spec.gdb or spec.gdb_port is not None else "qmp_tcp_port",
                        spec.gdb_port or spec.qmp_tcp_port or spec.gdb,
                        "a fixed TCP port would be the same in every clone")
    return ForkPlan(parent.name, count, clone_names(parent.name, count, taken))


def clone_spec(bundle: Bundle, name: str, qemu_version: tuple[int, int, int]) -> VMSpec:
    """The spec a fork clone runs: the bundle's clone spec, each port forward on a free
    host port, and RAM of its own.

    A warm clone's RAM is a private mapping of its warm state's RAM file
    (``memory-backend-file`` with the id ``qemukit-ram``); the fork's state
    holds the whole RAM, and a clone must not depend on that file (the warm
    entry may be pruned while the clone runs), so its RAM is anonymous, under
    the same id (QEMU matches RAM blocks by it when it loads the state).
    """
    spec = bundle.clone_spec(name, qemu_version=qemu_version)
    args = without_ram_args(spec.extra_args)
    if args != spec.extra_args:
        args += ("-object", f"memory-backend-ram,id={RAM_ID},size={spec.memory}M",
                 "-machine", f"memory-backend={RAM_ID}")
    nics = tuple(dataclasses.replace(nic, forwards=tuple(
        dataclasses.replace(fw, host_port=0) for fw in nic.forwards)) for nic in spec.nics)
    seed = spec.cloud_init
    if seed is not None and seed.hostname is not None:
        seed = dataclasses.replace(seed, hostname=None)  # each clone is named after itself
    return spec.replace(extra_args=args, nics=nics, warm=False, cloud_init=seed)


#: Starts one clone of a fork from its plan (:meth:`AsyncVM._fork_clone`).
CloneStarter = Callable[[WarmPlan], Awaitable["AsyncVM"]]


async def fork_vm(parent: AsyncVM, n: object, start_clone: CloneStarter, *,
                  taken: Callable[[str], bool], timeout: float = SAVE_TIMEOUT,
                  cache: WarmCache | None = None) -> list[AsyncVM]:
    """Fork the running ``parent`` into ``n`` clones (see the module's docstring); returns
    them running, in order of their names.

    ``start_clone`` starts one clone from its :class:`WarmPlan`; ``taken`` says
    whether a VM name is in use. Raises before anything starts for a bad
    ``n`` or a parent that cannot fork; if the save or a clone fails, the
    clones already started are stopped, and the parent runs on.
    """
    began = time.monotonic()
    plan = plan_fork(parent, n, taken)
    cache = cache if cache is not None else await asyncio.to_thread(fork_cache)
    await asyncio.to_thread(_prune, cache)
    key = WarmKey(f"{secrets.token_hex(8)}", {"fork_of": parent.name, "count": plan.count})
    plans: list[WarmPlan] = []
    started: list[AsyncVM] = []
    entry = None
    try:
        # Under the entry's build lock until every clone holds it: a prune (of another
        # fork, or `cache clear`) skips a key being built and an entry in use.
        lock = cache.lock_path(key.digest)
        async with file_lock(lock, timeout, f"the fork state {key.digest} (lock {lock})"):
            build_dir = await asyncio.to_thread(cache.new_build_dir, key.digest)
            try:
                await _copy_all_ram(parent)
                bundle = await parent.save_state(build_dir / BUNDLE, timeout=timeout)
                entry = await asyncio.to_thread(cache.commit, key, build_dir, bundle)
                bundle = await asyncio.to_thread(entry.bundle)  # where the commit moved it
            except BaseException:
                await asyncio.to_thread(_rmtree, build_dir)
                raise
            saved = time.monotonic()
            log.debug("%s: fork state saved in %.3f s (%s bytes)", parent.name, saved - began,
                      bundle.manifest.get("state_size"))
            log.info("%s: fork: the clones' memory is copied from the saved state (the "
                     "parent's RAM is not a file they could map)", parent.name)
            for name in plan.names:
                hold = await asyncio.to_thread(cache.hold, key.digest)
                if hold is None:
                    raise SnapshotError(f"the fork state {entry.path} was removed while the "
                                        "clones started")
                spec = clone_spec(bundle, name, parent.qemu.version)
                start = WarmStart(True, f"fork of {parent.name}", key.digest,
                                  memory="memory copied: forked from a running VM")
                plans.append(WarmPlan(entry, bundle, spec, start, saved, False, hold))

        async def one(p: WarmPlan) -> AsyncVM:
            clone = await start_clone(p)
            started.append(clone)  # (so that a cancel after it started still stops it)
            return clone

        results = await asyncio.gather(*(one(p) for p in plans), return_exceptions=True)
        clones = [r for r in results if not isinstance(r, BaseException)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
    except BaseException:
        await _stop_all(started)
        for p in plans:
            if p.hold is not None:
                p.hold.close()
        if entry is not None:
            await asyncio.to_thread(cache.remove, entry)
        raise
    for p in plans:  # each clone's QEMU inherited its own copy of the lock
        if p.hold is not None:
            p.hold.close()
    # Every clone has loaded the state: only the disk copies are needed from here on.
    with contextlib.suppress(OSError):
        await asyncio.to_thread((bundle.path / STATE_FILE).unlink)
    log.debug("%s: forked into %d clones in %.3f s", parent.name, len(clones),
              time.monotonic() - began)
    return clones


async def _copy_all_ram(parent: AsyncVM) -> None:
    """Turn ``x-ignore-shared`` off on a parent that was restored with it (a mapped warm clone).

    Its RAM is a private mapping, which that capability never leaves out, but the
    stream records the capability and a clone would have to set it too; the clone
    restores as any bundle's, with it off.
    """
    caps = await parent.qmp("query-migrate-capabilities")
    if any(c.get("capability") == "x-ignore-shared" and c.get("state") for c in caps):
        await parent.qmp("migrate-set-capabilities",
                         capabilities=[{"capability": "x-ignore-shared", "state": False}])


async def give_identity(clone: AsyncVM) -> None:
    """A clone without cloud-init: its own host name and machine id (as a cloud-init clone
    gets from its seed), through :func:`qemukit.identity.reidentify`."""
    clone.identity = await reidentify(clone, hostname_of(clone.name), (), keys={})


async def _stop_all(clones: Sequence[AsyncVM]) -> None:
    results = await asyncio.gather(*(c.kill() for c in clones), return_exceptions=True)
    for clone, result in zip(clones, results, strict=True):
        if isinstance(result, QemukitError):
            log.warning("%s: stopping the clone after a failed fork failed: %s", clone.name, result)
        elif isinstance(result, BaseException):
            raise result


def _prune(cache: WarmCache) -> None:
    """Remove the entries of earlier forks whose clones have all ended, and their lock files."""
    cache.ensure()
    try:
        cache.clear()
        _drop_stale_locks(cache.root)
    except OSError as exc:  # disk space, not this fork
        log.debug("fork cache: prune failed: %r", exc)


def _drop_stale_locks(root: Path) -> None:
    """Unlink the lock files of fork keys that have no entry any more.

    A warm key comes back, so the warm cache keeps its lock files; a fork's key
    is random and never used again once its entry is gone, so its two files
    would only pile up. Each is unlinked while locked exclusively, so never
    under a fork that is building or holding that key.
    """
    names = [p.name for p in root.iterdir()]
    dirs = {n for n in names if (root / n).is_dir()}
    for name in names:
        key, dot, kind = name.rpartition(".")
        if not dot or kind not in ("lock", "use") or key in dirs:
            continue
        if any(d.startswith(f"{TMP_PREFIX}{key}-") for d in dirs):
            continue  # being written or deleted
        path = root / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
