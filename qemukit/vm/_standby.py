"""Standby clones: the next warm clone of a state, restored ahead and left paused.

After a warm start of a spec with ``standby`` (:attr:`VMSpec.standby
<qemukit.spec.VMSpec>`; on by default for the pytest plugin's VMs, the
MCP server's, a VM pool's and a matrix worker's), the VM's process restores another clone of
the same warm state in the background: a VM of its own, ``standby-XXXXXX``,
launched with ``-S -incoming defer``, its state loaded, the after-restore
command run once (so TCG has translated it: :func:`_warm_up`) and the guest
paused again. It waits in the registry (``qemukit ls`` shows it as ``standby``), marked
by ``standby.json`` (:mod:`qemukit._launch.standby`).

The next start whose warm state has the same key (same spec, same files,
same QEMU: a standby of an outdated state is never taken) takes it instead
of restoring: it claims the standby (removing the marker, which one process
only can do), renames its runtime directory to its own name, resumes the
guest and finishes it as every warm clone is finished
(:func:`qemukit.vm._warm.finish_warm`: clock, RNG reseed, a cloud-init
clone's host name, machine-id, MACs and keys). Before the claim nothing that
is a clone's own happened: the overlays were made for it and hold at most what
the guest wrote during the warm-up (as any clone's would), the seed is
written again for the taker's name, and the identity (clock, fresh RNG
seed, host name...) comes after the resume. Then the taker leaves a new standby for
the start after it.

Lifetime. No daemon: a standby is a QEMU of the process that made it, which
dies with it (QEMU's parent-death signal; ``qemukit gc`` removes the entry of
a standby whose owner was killed). ``qemukit run --standby`` leaves its
standby running after it exits, on purpose (:func:`detach_standbys`): the
next ``run`` of the same description, in any process, takes it. ``qemukit gc``
ends a standby whose warm state is gone, ``qemukit cache clear`` ends the
standbys of the states it clears, and a start that finds a standby of its own
description with an older key (a file, the QEMU binary or qemukit changed)
ends it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .._launch.runtime import RuntimeDir
from .._launch.standby import (
    MARKER,
    claim,
    end_standby,
    list_standbys,
    make_info,
    move_runtime,
    read_marker,
    write_marker,
)
from .._launch.start import adopt, record
from .._wire.console import ConsoleWatcher
from ..errors import QemukitError
from ..paths import state_dir
from ..snapshot import restore_vm
from ..spec import VMSpec
from ..timeouts import QMP_TIMEOUT, SAVE_TIMEOUT
from ..warm import WarmCache, WarmHold
from ._state import VMState

if TYPE_CHECKING:
    from .._launch.process import QemuProcess
    from .._launch.seed import Seed
    from .._launch.start import Prepared
    from .._wire.agent import Agent
    from .._wire.io_errors import IOErrorWatch
    from .._wire.qmp import QMP
    from ..host import AccelChoice, QemuBinary
    from ..hotplug import AsyncHotplug
    from ._core import AsyncVM
    from ._warm import WarmPlan

log = logging.getLogger("qemukit.warm")

__all__ = ["ENV", "StandbyClones", "detach_standbys", "end_all", "family", "kept_memory",
           "kept_keys", "ready_keys", "refill", "settle", "wanted"]

#: ``QEMUKIT_STANDBY=0`` turns standby clones off (none made, none taken); ``1`` turns them
#: on for every warm start whose spec does not say.
ENV = "QEMUKIT_STANDBY"
#: The argument that keeps a standby's guest from running after its state is loaded.
PAUSED_ARGS = ("-S",)

#: Per event loop: the standbys this process made and keeps (root, key) -> (VM, its spec).
_ready: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                  dict[tuple[Path, str], tuple[AsyncVM, VMSpec]]] = (
    weakref.WeakKeyDictionary())
#: Per event loop: standbys being made, by (root, key).
_making: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                   dict[tuple[Path, str], asyncio.Task[None]]] = (
    weakref.WeakKeyDictionary())
#: Per event loop: the memory (MiB) of each standby being made, by (root, key).
_making_memory: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop,
                                          dict[tuple[Path, str], int]] = (
    weakref.WeakKeyDictionary())
#: True once this process's standbys are to outlive it (``qemukit run --standby``).
_detached = False
#: How long the exit handler gives this process's standbys to be ended in order.
EXIT_TIMEOUT = 10.0
#: True once the exit handler is registered (at the first standby: after the VMs' own, so
#: it runs before theirs and no standby is left half made).
_exit_hooked = False


def detach_standbys(on: bool = True) -> None:
    """Make this process's standbys outlive it (the CLI: the next ``run`` takes them)."""
    global _detached
    _detached = on


def wanted(spec: VMSpec, environ: dict[str, str] | None = None) -> bool:
    """Whether a warm start of ``spec`` keeps a standby ready (and may take one)."""
    env = (os.environ if environ is None else environ).get(ENV, "")
    if env == "0":
        return False
    return bool(spec.standby) or (spec.standby is None and env == "1")


def family(spec: VMSpec) -> str:
    """What ``spec`` describes apart from its files' contents and the QEMU binary's.

    Two warm keys of one family are one VM description whose files (or QEMU,
    or qemukit) changed: the standby of the older one is outdated.
    """
    data = spec.to_dict()
    for ignored in ("name", "warm", "standby", "forward_auto", "networks", "tb_size"):
        data.pop(ignored, None)
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _same_clone(a: VMSpec, b: VMSpec) -> bool:
    """True if clone specs ``a`` and ``b`` launch the same QEMU (names and ``-S`` aside)."""
    def bare(spec: VMSpec) -> VMSpec:
        args = spec.extra_args
        if args[-len(PAUSED_ARGS):] == PAUSED_ARGS:
            args = args[:-len(PAUSED_ARGS)]
        return spec.replace(name=None, extra_args=args)
    return bare(a) == bare(b)


async def settle(timeout: float = SAVE_TIMEOUT) -> None:
    """Wait (up to ``timeout``) for the standbys this loop is making (before a process exits)."""
    tasks = list(_making.get(asyncio.get_running_loop(), {}).values())
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)


class _Parts(Protocol):
    """What of :class:`~qemukit.vm.AsyncVM` the standby side moves from one VM to another."""

    spec: VMSpec
    runtime: RuntimeDir | None
    state: VMState
    argv: list[str]
    accel: AccelChoice | None
    incoming: str | None
    die_with_parent: bool
    continue_on_oops: bool
    boot_timeout: float
    _proc: QemuProcess | None
    _qmp: QMP | None
    _console: ConsoleWatcher | None
    _agent: Agent | None
    _io_watch: IOErrorWatch | None
    _hotplug: AsyncHotplug | None
    _helpers: list[QemuProcess]
    _prepared: Prepared | None
    _seed: Seed | None
    _warm_hold: WarmHold | None
    _state_root: Path | None
    _loop: asyncio.AbstractEventLoop | None

    @property
    def name(self) -> str: ...
    @property
    def qemu(self) -> QemuBinary: ...
    def qemu_alive(self) -> bool: ...
    async def _start(self, spec: VMSpec, timeout: float) -> None: ...
    async def _cleanup(self, force: bool) -> None: ...
    async def _connect_shared_monitor(self, timeout: float) -> None: ...


# Type-checked against the parts it uses; at run time a plain base class (as _verbs.Verbs).
if TYPE_CHECKING:
    _Base = _Parts
else:
    _Base = object


class StandbyClones(_Base):
    """The standby side of :class:`~qemukit.vm.AsyncVM`'s warm start (see the module)."""

    # (Declared as AsyncVM declares them: mypy would take the first assignment here instead.)
    runtime: RuntimeDir | None
    incoming: str | None
    _loop: asyncio.AbstractEventLoop | None
    _warm_hold: WarmHold | None
    #: The warm state this VM was restored from and its spec: what :func:`refill` clones.
    _standby_source: tuple[WarmPlan, VMSpec] | None = None

    def _registry_root(self) -> Path:
        """The registry this VM lives in (its state root, else the user's state directory)."""
        return self._state_root if self._state_root is not None else state_dir()

    # -- taking ------------------------------------------------------------------------

    async def _take_standby(self, plan: WarmPlan, spec: VMSpec,
                            timeout: float) -> WarmPlan | None:
        """For the warm start of ``spec`` (``plan``): take a ready standby of the same state.

        Returns the plan to finish (its state loaded: ``loaded``), or None to
        restore as usual. Standbys of the same description with another key
        are ended on the way.
        """
        if os.environ.get(ENV) == "0":
            return None
        root = self._registry_root()
        key = plan.entry.key
        fam = family(spec)
        taken = await self._take_own(plan, root, key, fam)
        if taken is None:
            taken = await self._take_detached(plan, root, key, fam, timeout)
        if taken is None:
            return None
        if plan.hold is not None:
            plan.hold.close()  # the standby's QEMU holds the entry in use
        self._warm_hold = None
        self.spec = taken
        assert self.runtime is not None
        self.runtime.write_private(self.runtime.spec_file, self.spec.dumps())
        if self.spec.cloud_init is not None:
            self._seed = await asyncio.to_thread(_reseed, self.spec, self.runtime)
        log.info("%s: warm start: took the standby clone of %s", self.name, key)
        start = replace(plan.start, standby=True)
        return replace(plan, spec=self.spec, start=start, loaded=True, hold=None)

    async def _take_own(self, plan: WarmPlan, root: Path, key: str,
                        fam: str) -> VMSpec | None:
        """Take a standby this process made, on this loop; the taker's spec, or None."""
        ready = _ready.get(asyncio.get_running_loop(), {})
        for (where, other), (standby, _) in list(ready.items()):
            if where == root and other != key and standby.runtime is not None and (
                    (marker := read_marker(standby.runtime)) is not None and marker.family == fam):
                del ready[(where, other)]
                log.info("%s: the standby clone %s is outdated (its state %s, this start's %s): "
                         "ended", self.name, standby.name, other, key)
                await _end_own(standby)
        found = ready.pop((root, key), None)
        if found is None:
            return None
        standby, made_for = found
        if not self.die_with_parent or not _same_clone(made_for, plan.spec):
            # A VM meant to outlive this process cannot be one that dies with it.
            ready[(root, key)] = found
            return None
        if (standby.runtime is None or not standby.qemu_alive()
                or not claim(standby.runtime)):
            await _end_own(standby)  # ended by gc or cache clear meanwhile
            return None
        try:
            rd = await asyncio.to_thread(_move, standby.runtime, self.spec.name)
        except OSError as exc:
            log.info("%s: the standby clone %s cannot take this name (%s): ended",
                     self.name, standby.name, exc)
            await _end_own(standby)
            return None
        self._adopt_parts(standby, rd)
        return plan.spec.replace(name=rd.name)

    def _adopt_parts(self, standby: AsyncVM, rd: RuntimeDir) -> None:
        """Make this VM the standby's QEMU (moved to ``rd``); ``standby`` is left empty."""
        self.runtime = rd
        self._proc = standby._proc
        self._qmp = standby._qmp
        self._console = standby._console
        self._agent = standby._agent
        self._io_watch = standby._io_watch
        self._hotplug = standby._hotplug
        self._helpers = standby._helpers
        self._prepared = standby._prepared
        self.argv = standby.argv
        self.accel = standby.accel
        standby.runtime = standby._proc = standby._qmp = standby._console = None
        standby._agent = standby._io_watch = standby._hotplug = None
        standby._helpers = []
        if self._console is not None:
            self._console.log_path = rd.console_log
            self._console.continue_on_oops = self.continue_on_oops
        if self._agent is not None:  # never connected: the standby's guest never ran
            self._agent.socket_path = rd.agent_socket
        standby.state = VMState.STOPPED
        info = rd.read_info()
        if info is not None:
            rd.write_info(dataclasses.replace(info, name=rd.name))

    async def _take_detached(self, plan: WarmPlan, root: Path, key: str, fam: str,
                             timeout: float) -> VMSpec | None:
        """Take a standby left by another process (``run --standby``); the spec, or None."""
        for rd, info, marker in await asyncio.to_thread(list_standbys, root):
            if not marker.detached:
                continue
            if marker.key != key:
                if marker.family == fam:
                    log.info("%s: the standby clone %s is outdated (its state %s, this "
                             "start's %s): ended", self.name, rd.name, marker.key, key)
                    await asyncio.to_thread(end_standby, rd, info)
                continue
            try:
                made_for = VMSpec.load(rd.spec_file)
            except (OSError, QemukitError, ValueError):
                continue
            if not _same_clone(made_for, plan.spec) or not claim(rd):
                continue
            try:
                moved = await asyncio.to_thread(_move, rd, self.spec.name)
            except OSError as exc:
                log.info("%s: the standby clone %s cannot take this name (%s): ended",
                         self.name, rd.name, exc)
                await asyncio.to_thread(end_standby, rd, info, claimed=True)
                continue
            try:
                await self._attach_standby(moved, timeout)
            except BaseException:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(end_standby, moved, info, claimed=True)
                raise
            return plan.spec.replace(name=moved.name)
        return None

    async def _attach_standby(self, rd: RuntimeDir, timeout: float) -> None:
        """Control the QEMU of a claimed standby another process made (as ``attach`` does)."""
        _, adopted, _ = await asyncio.to_thread(adopt, rd.name, rd.path.parent)
        self.runtime = adopted.runtime
        self._proc = adopted.process
        self.argv = list(adopted.process.argv)
        self._helpers = list(adopted.helpers)
        self.accel = adopted.accel
        # Its owner now: gc ends it if this process dies (it is no child of ours, so
        # QEMU's parent-death signal cannot).
        record(rd, adopted.process, self.argv, adopted.accel, self._helpers,
               die_with_parent=self.die_with_parent)
        await self._connect_shared_monitor(timeout)
        if self.spec.serial:
            self._console = ConsoleWatcher(rd.console_log,
                                           continue_on_oops=self.continue_on_oops)
            await self._console.start(rd.console_socket)

    # -- making one ------------------------------------------------------------------

    async def _launch_paused(self, spec: VMSpec, hold: WarmHold, owner: StandbyClones
                             ) -> None:
        """Launch this (new) VM for ``spec`` with ``-incoming defer``, its QEMU holding ``hold``."""
        self.incoming = "defer"
        self.accel = owner.accel
        self._warm_hold = hold  # inherited by QEMU, which keeps the entry in use
        self._loop = asyncio.get_running_loop()
        self.state = VMState.STARTING
        try:
            await self._start(spec, QMP_TIMEOUT)
        finally:
            self._warm_hold = None  # (the caller closes its own copy)
        self.state = VMState.RUNNING

    async def _discard_standby(self) -> None:
        """Stop a standby's QEMU at once and remove its files."""
        if self.state in (VMState.STARTING, VMState.RUNNING):
            await self._cleanup(force=True)
            self.state = VMState.STOPPED

    # -- leaving one for the next start ---------------------------------------------

    def _leave_standby(self, plan: WarmPlan, spec: VMSpec) -> None:
        """After a warm start of ``spec``: make the next clone of its state, in the background."""
        self._standby_source = (plan, spec)
        if not wanted(spec):
            return
        global _exit_hooked
        if not _exit_hooked:
            atexit.register(_end_at_exit)
            _exit_hooked = True
        loop = asyncio.get_running_loop()
        slot = (self._registry_root(), plan.entry.key)
        making = _making.setdefault(loop, {})
        ready = _ready.setdefault(loop, {})
        if slot in making:
            return
        found = ready.get(slot)
        if found is not None:
            standby = found[0]
            if (standby.qemu_alive() and standby.runtime is not None
                    and (standby.runtime.path / MARKER).exists()):
                return
            del ready[slot]
            loop.create_task(_end_own(standby))
        task = loop.create_task(_make(self, plan, spec, slot, _detached))
        making[slot] = task
        memory = _making_memory.setdefault(loop, {})
        memory[slot] = plan.spec.memory

        def done(_: asyncio.Task[None]) -> None:
            if making.get(slot) is task:
                del making[slot]
                memory.pop(slot, None)

        task.add_done_callback(done)


async def _make(owner: StandbyClones, plan: WarmPlan, spec: VMSpec, slot: tuple[Path, str],
                detached: bool) -> None:
    """Restore a standby clone of ``plan``'s state, paused, and keep it (or leave it detached)."""
    from ._core import AsyncVM

    cache = WarmCache(plan.entry.path.parent)
    hold = await asyncio.to_thread(cache.hold, plan.entry.key)
    if hold is None:  # the state was removed meanwhile
        return
    standby = AsyncVM(plan.spec, die_with_parent=not detached, state_root=owner._state_root,
                      boot_timeout=owner.boot_timeout, continue_on_oops=owner.continue_on_oops,
                      qemu=owner.qemu)
    made_for = plan.spec.replace(name=f"standby-{secrets.token_hex(3)}",
                                 extra_args=plan.spec.extra_args + PAUSED_ARGS)
    try:
        await standby._launch_paused(made_for, hold, owner)
        assert standby.runtime is not None
        await restore_vm(standby, plan.bundle, SAVE_TIMEOUT, resume=False)
        await _warm_up(standby)
        write_marker(standby.runtime, make_info(plan.entry.key, plan.entry.path, family(spec),
                                                detached=detached))
    except asyncio.CancelledError:
        await standby._discard_standby()
        raise
    except Exception as exc:  # noqa: BLE001 - a standby that failed costs its speed-up only
        log.info("%s: the standby clone of %s could not be made: %s", owner.name,
                 plan.entry.key, exc)
        await standby._discard_standby()
        return
    finally:
        hold.close()  # (its QEMU holds the entry in use)
    log.debug("%s: standby clone %s of %s ready", owner.name, standby.name, plan.entry.key)
    if detached:
        await standby.detach()
        return
    if standby.state is VMState.RUNNING:
        _ready.setdefault(asyncio.get_running_loop(), {})[slot] = (standby, made_for)


async def _warm_up(standby: AsyncVM) -> None:
    """Run the after-restore command once in the standby, then pause it again.

    Under TCG the first code a restored guest runs is translated anew, and the
    clock and RNG command after a restore is most of a warm start's time
    (docs/mapped-restores.md). Run here, it leaves the agent's path and the
    reseed program translated in this QEMU; after the take the same command
    runs again with the taker's clock and fresh host bytes, so nothing of the
    clone's identity comes from here (a reseed only adds entropy).
    """
    from ._warm import set_guest_clock

    await standby.resume()
    await set_guest_clock(standby)
    await standby.pause()


async def _end_own(standby: AsyncVM) -> None:
    """End a standby this process made (claimed, or found dead)."""
    if standby.runtime is not None:
        claim(standby.runtime)
    await standby._discard_standby()


def _move(rd: RuntimeDir, name: str | None) -> RuntimeDir:
    """Move a claimed standby to the taker's name (a generated one if it has none)."""
    for _ in range(10):
        try:
            return move_runtime(rd, name or f"vm-{secrets.token_hex(3)}")
        except FileExistsError:
            if name is not None:
                raise
    raise FileExistsError(f"no free name for the standby clone {rd.name}")


def _reseed(spec: VMSpec, rd: RuntimeDir) -> Seed:
    """The taker's cloud-init seed, written over the standby's (the same file QEMU has open)."""
    from .._launch.argv import SEED_FILE
    from .._launch.seed import KEY_FILE, build_seed

    assert spec.cloud_init is not None
    if spec.cloud_init.ssh_key is None:  # ssh-keygen does not overwrite: a new key pair
        for name in (KEY_FILE, KEY_FILE + ".pub"):
            (rd.path / name).unlink(missing_ok=True)
    iso = rd.path / SEED_FILE
    fd = os.open(iso, os.O_RDWR | os.O_CLOEXEC)
    try:
        seed = build_seed(spec.cloud_init, rd.path, rd.name)
        data = iso.read_bytes()
        # The CD QEMU has open (its old inode) gets the new contents too: a reboot finds
        # the taker's instance id and host name there, as on a clone's own seed.
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    finally:
        os.close(fd)
    return seed


async def end_all() -> None:
    """End the standbys this event loop made and keeps (an owner's tidy end; its exit would too)."""
    loop = asyncio.get_running_loop()
    for task in list(_making.get(loop, {}).values()):
        task.cancel()
    await settle()
    for standby, _ in list(_ready.pop(loop, {}).values()):
        await _end_own(standby)


def _end_at_exit() -> None:
    """At interpreter exit: end the standbys of the sync API's loop (one being made included,
    whose runtime directory the VMs' own exit handler would not know of yet)."""
    from .. import _sync

    if any(_sync.is_own_loop(loop) for loop in (*_making.keys(), *_ready.keys())):
        _sync.finish_at_exit([end_all()], EXIT_TIMEOUT)


def refill(vm: AsyncVM) -> bool:
    """Make the next standby clone of the warm state ``vm`` was restored from, in the
    background, as its start would have with ``standby`` on (running or stopped since).

    For an owner that counts its QEMUs (:class:`~qemukit.vm.AsyncVMPool`): its VMs start
    without a standby while there is no room for one, and it asks for one here when
    room is freed. False if ``vm`` was not restored from a warm state, or standby clones
    are off (``QEMUKIT_STANDBY=0``); nothing is made if one is ready or being made.
    """
    source = vm._standby_source
    if source is None or os.environ.get(ENV) == "0":
        return False
    plan, spec = source
    vm._leave_standby(plan, spec.replace(standby=True))
    return True


def kept_memory() -> list[int]:
    """The memory (MiB) of each standby this event loop keeps ready or is making: what a
    server with limits (``qemukit mcp``) counts beside its running VMs."""
    loop = asyncio.get_running_loop()
    ready = [spec.memory for _, spec in _ready.get(loop, {}).values()]
    making = [mib for slot, mib in _making_memory.get(loop, {}).items()
              if slot in _making.get(loop, {})]
    return ready + making


def kept_keys() -> list[str]:
    """The warm keys of the standbys this event loop keeps ready or is making (one per
    standby): what an owner of one warm state (a pool) counts as its own."""
    loop = asyncio.get_running_loop()
    return [key for (_, key) in (*_ready.get(loop, {}), *_making.get(loop, {}))]


async def end_kept(key: str) -> None:
    """End this event loop's standbys of the warm state ``key``, ready or being made (the
    tidy end of an owner of that state; other owners' standbys stay)."""
    loop = asyncio.get_running_loop()
    tasks = [task for (_, k), task in _making.get(loop, {}).items() if k == key]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=SAVE_TIMEOUT)
    ready = _ready.get(loop, {})
    for slot in [slot for slot in ready if slot[1] == key]:
        standby, _ = ready.pop(slot)
        await _end_own(standby)


def ready_keys() -> list[str]:
    """The warm keys of the standbys this event loop keeps ready (for tests and ``-v``)."""
    return [key for (_, key) in _ready.get(asyncio.get_running_loop(), {})]
