"""The warm start: a VM of ``spec.warm`` restored from a saved state instead of booting.

A start with ``spec.warm`` goes through three steps, each a function here that
works on the small interface :class:`WarmTarget` (``AsyncVM`` implements it;
unit tests pass fakes):

1. :func:`choose_warm` decides: a spec that cannot start warm boots cold (and
   says why); else the state of its key is found in the cache, or built by a
   builder VM (:func:`build_warm`), and checked. The result is a
   :class:`WarmPlan`: the clone's spec (its disks overlays over the state's
   copies) to launch with ``-incoming defer``.
2. The VM launches that spec (``AsyncVM._start``).
3. :func:`finish_warm` feeds the state to the paused QEMU, sets the guest's
   clock, reseeds its RNG, gives a cloud-init clone its identity and puts the
   saved boot's console output at the top of its log. A state QEMU cannot
   load raises :class:`SnapshotError` (the entry is removed), and the VM
   boots cold instead.

Mapped restore (QEMU's VM templating, docs/system/vm-templating.rst): unless
:func:`mapping_refusal` says why not, the builder's RAM is a file in the
entry (``memory-backend-file,share=on``), the state is saved with the
``x-ignore-shared`` migration capability so the RAM is not copied into it,
and each clone maps that file privately (``share=off``: copy on write) and
loads only the device state. Clones of one state share the file's pages in
the host's page cache, and a clone's writes go to its own private pages,
never to the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .. import host
from .._aio import cancel_and_wait, file_lock
from .._launch.plan import HostFacts
from .._wire.agent import ExecResult
from ..arch import ARCHES
from ..errors import (
    AgentError,
    LaunchError,
    QMPCommandError,
    SnapshotError,
    StateError,
    WaitTimeout,
)
from ..identity import RESEED_STEPS, CloneIdentity, host_keys, reidentify, reseed_script
from ..snapshot import Bundle, restore_vm, shared_ram_args
from ..spec import VMSpec
from ..target import VMTarget
from ..timeouts import SAVE_TIMEOUT
from ..warm import (
    BOOT_LOG,
    BUNDLE,
    DEFAULT_CACHE_LIMIT,
    WarmCache,
    WarmEntry,
    WarmHold,
    WarmKey,
    WarmStart,
    warm_key,
    warm_refusal,
    warm_spec,
)

if TYPE_CHECKING:
    from .._launch.seed import Seed

log = logging.getLogger("qemukit.warm")

#: Where the builder's RAM file is made, in the entry being written (then moved into the bundle).
RAM_FILE = "ram"
#: Turns mapped restores off (``QEMUKIT_WARM_MAP=0``): every clone copies the RAM in.
MAP_ENV = "QEMUKIT_WARM_MAP"
#: Whether clones map the RAM when ``QEMUKIT_WARM_MAP`` is not set.
MAP_DEFAULT = "1"
#: How long the clock and RNG command after a restore may take.
CLOCK_TIMEOUT = 30.0


class GuestCalls(Protocol):
    """Raw guest agent calls (qemu-guest-agent's ``guest-set-time``)."""

    async def call(self, command: str, arguments: dict[str, Any] | None = None, *,
                   timeout: float = ...) -> Any:
        """Run one raw agent command."""


class WarmBuilder(Protocol):
    """The VM that boots a warm state's spec once and saves it."""

    @property
    def spec(self) -> VMSpec:
        """The builder's spec."""

    @property
    def console_log(self) -> Path | None:
        """Its console log, copied into the entry as the boot log."""

    async def start(self) -> object:
        """Launch it."""

    async def wait_ready(self, timeout: float | None = None) -> float:
        """Wait until its guest agent answers."""

    async def wait_ssh(self, timeout: float | None = None) -> float:
        """Wait until ssh logs in (a cloud-init guest is saved after its first boot)."""

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = ..., **kwargs: Any) -> Any:
        """Run one QMP command."""

    async def save_state(self, path: str | Path, *, stop: bool = False,
                         timeout: float = ...) -> Bundle:
        """Save its state as a bundle at ``path``."""

    async def kill(self) -> object:
        """Stop it at once and clean up (a StateError if it never ran)."""


class WarmTarget(VMTarget, Protocol):
    """What a warm start needs of the VM being started."""

    @property
    def boot_timeout(self) -> float:
        """How long a boot (of the builder, or to a ready agent) may take."""

    @property
    def guest(self) -> GuestCalls:
        """The guest agent's raw calls."""

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = ...,
                   check: bool = ..., stdin: bytes | None = ...) -> ExecResult:
        """Run a command in the guest."""

    def warm_builder(self, spec: VMSpec) -> WarmBuilder:
        """A new VM with this one's options (state root, boot timeout), not started."""


@dataclass(frozen=True)
class WarmPlan:
    """A chosen warm state: what the VM launches, and what :func:`finish_warm` feeds it."""

    entry: WarmEntry
    bundle: Bundle
    #: The clone's spec: the saved one, disks as overlays over the state's copies.
    spec: VMSpec
    #: Why the VM starts warm or not (the first start of a spec builds, then restores).
    start: WarmStart
    #: When the warm start began (time.monotonic()).
    began: float
    #: True if the clone maps the entry's RAM file.
    mapped: bool
    #: The clone's shared lock on the entry (pass its fd to the clone's QEMU: while either
    #: holds it, ``cache clear`` and the prune leave the entry alone).
    hold: WarmHold | None = None
    #: True for a standby clone taken (qemukit.vm._standby): the state is loaded already,
    #: the guest paused; finishing resumes it instead of restoring.
    loaded: bool = False


# -- which RAM: mapped or copied -------------------------------------------------


def mapping_refusal(spec: VMSpec, environ: Mapping[str, str] | None = None) -> str | None:
    """Why clones of ``spec`` cannot map the warm state's RAM (then they copy it), or None.

    QEMU 7.2 gives guest pages back (``ram_block_discard_range``) by punching
    holes into a file-backed RAM even when it is mapped privately (later
    versions warn about it or drop only the private copy), so anything that
    discards guest RAM could zero the shared template, on any version:
    virtio-balloon (inflation and free-page reporting), virtio-mem, postcopy
    (which qemukit never uses). vhost-user devices need the RAM shared with
    another process, which a private mapping is not.
    """
    environ = os.environ if environ is None else environ
    if environ.get(MAP_ENV, MAP_DEFAULT) == "0":
        return f"{MAP_ENV}=0 turns mapped restores off"
    args = " ".join(spec.extra_args)
    if "virtio-balloon" in args:
        return ("a virtio-balloon device gives guest pages back, and QEMU discards them by "
                "punching holes in a file-backed RAM: the shared template would be zeroed")
    if "virtio-mem" in args:
        return ("virtio-mem unplugs memory by discarding it, which would punch holes in the "
                "shared template")
    if "vhost-user" in args or any(sh.transport == "virtiofs" for sh in spec.all_shares):
        return ("a vhost-user device maps the guest's RAM into another process, so the RAM must "
                "be shared, and a clone's is private")
    if any(word in args for word in ("memory-backend", "mem-path", "-numa", "mem-prealloc")):
        return "extra_args choose the guest's RAM backend themselves"
    if spec.max_memory is not None:
        return ("hot-pluggable memory (max_memory): the template covers the boot RAM only, "
                "and this combination is not tried yet")
    return None


async def set_ignore_shared(vm: VMTarget | WarmBuilder) -> None:
    """Tell QEMU to leave shared RAM out of the migration stream (both ends must)."""
    await vm.qmp("migrate-set-capabilities",
                 capabilities=[{"capability": "x-ignore-shared", "state": True}])


# -- 1. choose (and build) --------------------------------------------------------

#: Per event loop, one asyncio lock per warm key: the VMs of this process building or awaiting it.
_build_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary())


def _build_lock(key: str) -> asyncio.Lock:
    locks = _build_locks.setdefault(asyncio.get_running_loop(), {})
    return locks.setdefault(key, asyncio.Lock())


async def choose_warm(vm: WarmTarget, spec: VMSpec, qemu: host.QemuBinary, facts: HostFacts, *,
                      needs_files: bool = False, cache: WarmCache | None = None
                      ) -> tuple[WarmStart, WarmPlan | None]:
    """Find (or build) the warm state of ``spec``; the plan is None when it boots cold.

    The WarmStart says which and why. ``needs_files``: the kernel's modules
    are appended to the initramfs per VM, which no saved state can hold.
    """
    began = time.monotonic()
    refusal = warm_refusal(spec)
    if refusal is None and needs_files:
        refusal = ("the kernel's modules are appended to the initramfs per VM (a kernel "
                   "tree with modules, or modules=), so it boots")
    if refusal is not None:
        return WarmStart(False, refusal), None
    no_map = mapping_refusal(spec)
    if no_map is not None:
        log.info("%s: warm state: the RAM is copied, not mapped: %s", vm.name, no_map)
    cache = cache if cache is not None else WarmCache()
    key = await asyncio.to_thread(warm_key, spec, qemu, facts, cache.root,
                                  ram="copied" if no_map else "mapped")
    entry = cache.get(key.digest)
    reason = None
    built = 0.0
    if entry is None:
        built = time.monotonic()
        entry, reason = await build_warm(vm, spec, cache, key, mapped=no_map is None)
        built = time.monotonic() - built
    if entry is None:
        return WarmStart(False, reason or "no warm state", key.digest), None
    mapped = no_map is None
    try:
        bundle = entry.bundle()  # a mapped bundle without its RAM file is refused here
        bundle.check_qemu(qemu)
        if mapped and bundle.ram_file is None:
            raise SnapshotError("its RAM is not mapped")
    except SnapshotError as exc:
        what = ("is removed" if cache.remove(entry) else
                "is kept while it is in use (by a running clone or a build)")
        return WarmStart(False, f"the warm state {key.digest} was unusable and {what} "
                         f"({exc})", key.digest), None
    # In use from here on: `cache clear` and the prune leave it alone while this clone runs.
    hold = await asyncio.to_thread(cache.hold, key.digest)
    if hold is None:
        return WarmStart(False, f"the warm state {key.digest} was removed while this VM "
                         "started", key.digest), None
    try:
        entry.touch()
        # The clone's own seed (its instance id, host name and keys), given to it after the restore.
        clone = bundle.clone_spec(spec.name, qemu_version=qemu.version).replace(
            cloud_init=spec.cloud_init, tb_size=spec.tb_size)
    except BaseException:
        hold.close()  # else the entry counts as in use for the rest of this process
        raise
    memory = "memory mapped" if mapped else f"memory copied: {no_map}"
    start = WarmStart(reason is None, reason or "", key.digest, memory=memory,
                      build_seconds=built)
    log.debug("%s: warm state %s chosen (%s)", vm.name, key.digest, memory)
    return start, WarmPlan(entry, bundle, clone, start, began, mapped, hold)


async def build_warm(vm: WarmTarget, spec: VMSpec, cache: WarmCache, key: WarmKey, *,
                     mapped: bool = False) -> tuple[WarmEntry | None, str | None]:
    """Boot a builder VM of ``spec``, wait until it is ready, save its state as ``key``.

    Under the key's lock: a second process asking for the same key waits
    here and then finds the entry. Returns (entry, why it was cold), or
    (None, why) when QEMU cannot save this VM (it then boots cold).
    VMs of one process wait on an asyncio lock first, so at most one of
    them waits for the file lock (in a worker thread): many waiters there
    would take every worker the builder itself needs.
    """
    wait = vm.boot_timeout + SAVE_TIMEOUT
    local = _build_lock(key.digest)
    try:
        await asyncio.wait_for(local.acquire(), wait)
    except TimeoutError:
        raise WaitTimeout(f"the warm state {key.digest}, being built by another VM of "
                          "this process", wait) from None
    try:
        return await _build_warm_locked(vm, spec, cache, key, wait, mapped)
    finally:
        local.release()


async def _build_warm_locked(vm: WarmTarget, spec: VMSpec, cache: WarmCache, key: WarmKey,
                             wait: float, mapped: bool) -> tuple[WarmEntry | None, str | None]:
    cache.ensure()
    lock = cache.lock_path(key.digest)
    async with file_lock(lock, wait, f"the warm state {key.digest}, being built by "
                         f"another process (lock {lock})"):
        entry = cache.get(key.digest)
        if entry is not None:
            return entry, None
        build_dir = await asyncio.to_thread(cache.new_build_dir, key.digest)
        saved = warm_spec(spec)
        if mapped:
            saved = saved.replace(extra_args=saved.extra_args
                                  + shared_ram_args(saved.memory, build_dir / RAM_FILE))
        builder = vm.warm_builder(saved)
        booted = time.monotonic()
        try:
            await builder.start()
            await builder.wait_ready()
            if builder.spec.cloud_init is not None:
                # Saved once cloud-init is done (wait_ssh waits for it, then logs in):
                # a clone must not resume in the middle of its first-boot set-up.
                await builder.wait_ssh()
            booted = time.monotonic() - booted
            log.debug("%s: warm state %s: builder booted in %.2f s", vm.name, key.digest, booted)
            console = builder.console_log
            if console is not None and console.exists():
                await asyncio.to_thread(shutil.copyfile, console, build_dir / BOOT_LOG)
            if mapped:
                await set_ignore_shared(builder)
            bundle = await builder.save_state(build_dir / BUNDLE, stop=True)
            if mapped:
                bundle = await asyncio.to_thread(bundle.adopt_ram, build_dir / RAM_FILE)
            entry = await asyncio.to_thread(cache.commit, key, build_dir, bundle)
        except SnapshotError as exc:
            shutil.rmtree(build_dir, ignore_errors=True)
            return None, f"QEMU cannot save this VM's state, so it boots every time ({exc})"
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(StateError):  # it never ran, or stopped already
                await builder.kill()
    try:
        await asyncio.to_thread(cache.prune, DEFAULT_CACHE_LIMIT)
    except OSError as exc:  # a full cache costs disk space, not this start
        log.debug("warm cache: prune failed: %r", exc)
    return entry, (f"first start of this spec, state saved for next time (booted in "
                   f"{booted:.2f} s)")


# -- 3. finish: restore, clock and RNG, identity -----------------------------------


async def finish_warm(vm: WarmTarget, plan: WarmPlan, seed: Seed | None = None
                      ) -> tuple[WarmStart, CloneIdentity | None]:
    """Feed the warm state to ``vm`` (just launched with ``-incoming defer``) and make it a clone.

    Sets the guest's clock and reseeds its RNG; a cloud-init clone (``seed``)
    is then given its own identity (:mod:`qemukit.identity`), its ssh host
    keys made while QEMU loads the state. Returns the final WarmStart (with
    the seconds it took) and the identity. A state QEMU cannot load raises
    :class:`SnapshotError`; once the clone's QEMU is gone (it holds the entry
    in use), :func:`discard` removes the entry.
    """
    keys_task = (asyncio.ensure_future(asyncio.to_thread(host_keys, f"root@{seed.hostname}"))
                 if seed is not None and seed.host_keys is None else None)
    identity = None
    try:
        steps = _Steps(vm.name)
        try:
            if plan.loaded:  # a standby clone: loaded ahead, paused until now
                await vm.resume()
            else:
                await restore_vm(vm, plan.bundle, SAVE_TIMEOUT)  # maps a mapped bundle's RAM
        except (SnapshotError, LaunchError, QMPCommandError) as exc:
            # QEMU refused the state, a capability, or exited while loading.
            raise SnapshotError(
                f"QEMU could not load the warm state {plan.entry.key} ({exc})") from exc
        steps.mark("standby resumed" if plan.loaded else "state loaded")
        await set_guest_clock(vm)
        steps.mark("clock set, RNG reseeded")
        if seed is not None:
            keys = seed.host_keys if keys_task is None else await keys_task
            identity = await reidentify(vm, seed.hostname, seed.public_keys, keys=keys)
            if keys_task is not None and vm.runtime is not None:
                from .._launch.seed import KNOWN_HOSTS_FILE, host_key_alias, write_known_hosts

                write_known_hosts(vm.runtime.path / KNOWN_HOSTS_FILE,
                                  host_key_alias(vm.runtime.name),
                                  list(identity.host_keys.values()))
            steps.mark("identity given")
    finally:
        if keys_task is not None:
            await cancel_and_wait(keys_task)
    if vm.runtime is not None:
        await asyncio.to_thread(append_boot_log, vm.runtime.console_log,
                                plan.entry.path / BOOT_LOG)
    return replace(plan.start, seconds=time.monotonic() - plan.began), identity


def discard(plan: WarmPlan) -> str:
    """Remove a state QEMU could not load (call it once the clone's QEMU has exited); says how.

    Only this process's lock is closed here: a QEMU that inherited it and still
    runs, or another clone of the entry, keeps the entry in use.
    """
    if plan.hold is not None:
        plan.hold.close()
    if WarmCache(plan.entry.path.parent).remove(plan.entry):
        return f"the warm state {plan.entry.key} is removed, so the next start boots and saves a new one"
    return (f"the warm state {plan.entry.key} is in use by another process; "
            "'qemukit cache clear' removes it")


class _Steps:
    """Debug lines with the time each step of a restore took."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last = time.monotonic()

    def mark(self, step: str) -> None:
        now = time.monotonic()
        log.debug("%s: warm restore: %s in %.3f s", self.name, step, now - self.last)
        self.last = now


def append_boot_log(console_log: Path, boot_log: Path) -> None:
    """Add the saved boot's console output to a warm clone's log, once it is ready.

    Not before: a tool waiting for a line of the boot in the log (the tiny
    init's ``ready``) must not see it before the clone can run commands.
    QEMU appends to the log (``O_APPEND``), as this does.
    """
    try:
        boot = boot_log.read_bytes()
    except OSError:  # an entry of an older qemukit, or pruned meanwhile: no boot log
        return
    text = (b"qemukit: --- the boot this warm state was saved after ---\n" + boot
            + b"\nqemukit: --- restored from the warm state here ---\n")
    fd = os.open(console_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


async def set_guest_clock(vm: WarmTarget) -> None:
    """After a restore: set the guest's clock to the host's, and reseed its RNG.

    The saved clock stopped at the save, and the kernel's RNG resumes as
    saved: two clones would read the same bytes from ``/dev/urandom`` and
    ``getrandom`` until their kernels next reseed. Writing host bytes to
    ``/dev/urandom`` does not reseed (Linux 5.18+), and the vmgenid device
    only helps a kernel with its driver (the tiny image's cloud kernel has
    none), so this runs :func:`~qemukit.identity.reseed_script` (host bytes
    plus RNDRESEEDCRNG) before anything else runs in the clone; it
    failing fails the start. With qemu-guest-agent (a guest that may not be
    Linux) a failed reseed is logged and vmgenid is left to do it.
    """
    if vm.spec.agent == "qga":
        await vm.wait_ready()
        await vm.guest.call("guest-set-time", {"time": time.time_ns()})
        try:
            result = await vm.exec(["sh", "-c", reseed_script()], timeout=30)
            failure = reseed_failure(result) if result.exit_status != 0 else None
        except AgentError as exc:  # qemu-guest-agent refused it: no sh, not a Linux guest
            failure = str(exc)
        if failure is not None:
            log.warning("%s: reseeding the clone's RNG failed (%s); only vmgenid "
                        "reseeds it", vm.name, failure)
        return
    # One process in the guest sets the clock and reseeds (see qemukit.identity). The
    # script is the agent's command itself (no `sh -c` inside it) and runs without the
    # agent's `timeout` wrapper (the host gives up instead, and the start fails): under
    # TCG every program a restored guest runs first is translated anew.
    try:
        result = await asyncio.wait_for(vm.exec(reseed_script(set_clock=True), timeout=None),
                                        CLOCK_TIMEOUT)
    except TimeoutError:
        raise WaitTimeout("the clock and RNG command after the restore", CLOCK_TIMEOUT) from None
    if result.exit_status != 0:
        raise StateError(f"VM {vm.name!r}: setting the guest clock and reseeding its RNG "
                         f"after the restore failed: {reseed_failure(result)}")


def reseed_failure(result: ExecResult) -> str:
    """Which step of the clock and reseed command failed, with the guest's stderr."""
    step = RESEED_STEPS.get(result.exit_status)
    what = f"{step} failed" if step else f"exit {result.exit_status}"
    stderr = result.stderr_text.strip()[-300:]
    return f"{what}: {stderr}" if stderr else what


# -- a clone of a user's bundle (AsyncVM.restore) ------------------------------------


async def restore_clone(vm: WarmTarget, bundle: Bundle, timeout: float = SAVE_TIMEOUT) -> None:
    """Feed ``bundle`` to ``vm`` (launched with ``-incoming defer``), then reseed it.

    The caller stops the clone if this fails.
    """
    await restore_vm(vm, bundle, timeout)
    await reseed_restored(vm, bundle)


async def reseed_restored(vm: WarmTarget, bundle: Bundle) -> None:
    """After a bundle's restore: the clock and RNG reseed a warm start does
    (:func:`set_guest_clock`), where it can run; else a warning."""
    why = None
    if bundle.manifest.get("guest") != "running":
        why = "it was saved paused"
    elif vm.spec.agent == "none":
        why = "it has no agent"
    elif vm.spec.agent == "qemukit" and not ARCHES[vm.spec.arch].reseed_program:
        why = f"the reseed program does not run on {vm.spec.arch} guests"
    if why is None:
        await set_guest_clock(vm)
        return
    log.warning("%s: the clone's clock is not set and its RNG not reseeded (%s): clones "
                "of %s may hand out the same random bytes until their kernels reseed",
                vm.name, why, bundle.path)
