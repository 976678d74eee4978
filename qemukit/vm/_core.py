"""The async core: :class:`AsyncVM`'s lifecycle and the supervision around it.

Start, attach, guarded waits, QMP, the guest agent, shutdown; and the
registry of live VMs that an exit hook (and a fork) keeps from outliving, or
being cleaned up by, the wrong process. What is not supervision lives
beside it: the launch plan is carried out by :mod:`qemukit._launch.start`,
ssh, copies and the gdb stub are functions of the target in
:mod:`qemukit._access`; the operations (hotplug, snapshots, saved state, dumps,
ssh, copies) come as methods from :class:`qemukit.vm._operations.Operations`,
the test writer's verbs from :class:`qemukit.vm._verbs.Verbs`. The guarded
wait's mechanism is :mod:`._guard`, a clone of a bundle :mod:`._restore`, the
agent's waits :mod:`._guestagent`, the monitor's verbs :mod:`._monitor`, the
shutdown ladder (and the kill rung) :mod:`._ladder`, the states :mod:`._state`."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from .. import _sync, host
from .._aio import cancel_and_wait
from .._launch.netaddr import NetworkMember, Networks
from .._launch.plan import plan_launch
from .._launch.process import QemuProcess
from .._launch.runtime import RuntimeDir
from .._launch.start import (
    AdoptedQemu,
    Prepared,
    adopt,
    carry_out,
    output_for_error,
    prepare,
    record,
    spawn_qemu,
    stop_helpers,
    warn_exposed,
)
from .._wire.agent import Agent, ExecResult
from .._wire.console import (
    ConsoleEvent,
    ConsoleWatcher,
    log_tail,
)
from .._wire.io_errors import IOErrorWatch
from .._wire.qmp import QMP
from ..errors import (
    LaunchError,
    QemukitError,
    QMPConnectionError,
    SnapshotError,
    SpecError,
    StateError,
    WaitTimeout,
)
from ..guest import AsyncGuest
from ..hotplug import AsyncHotplug
from ..identity import CloneIdentity
from ..kconfig import ResolvedKernel, resolve_kernel
from ..spec import VMSpec
from ..timeouts import BOOT_TIMEOUT, QMP_TIMEOUT, SAVE_TIMEOUT
from ..warm import WarmHold, WarmStart

if TYPE_CHECKING:
    from .._launch.seed import Seed
from . import _fork, _monitor, _net, _standby, _verbs, _warm
from ._facts import default_probe_image, host_facts
from ._guard import guarded_wait
from ._guestagent import checked, make_agent, wait_agent
from ._ladder import (
    ShutdownResult,
    close_connections,
    graceful_rung,
    kill_at_once,
    run_ladder,
)
from ._operations import Operations
from ._restore import start_clone
from ._state import VMState

log = logging.getLogger(__name__)


T = TypeVar("T")


_live: weakref.WeakSet[AsyncVM] = weakref.WeakSet()
#: At interpreter exit, how long the VMs left running get to close and stop in order.
EXIT_CLEANUP_TIMEOUT = 5.0


#: The process that owns the VMs in ``_live`` (a forked child owns none of them).
_live_pid = os.getpid()


@atexit.register
def _kill_leftovers() -> None:
    """Last resort at interpreter exit: no VM owned by this process outlives it."""
    if os.getpid() != _live_pid:
        return
    vms = list(_live)
    # VMs of the sync API: their connections closed and QEMU stopped on the loop
    # thread, so no task of theirs is destroyed half-way when the interpreter goes.
    _sync.finish_at_exit([vm._cleanup(force=True) for vm in vms
                          if vm._loop is not None and _sync.is_own_loop(vm._loop)],
                         EXIT_CLEANUP_TIMEOUT)
    for vm in vms:  # whatever that did not end (or an AsyncVM of a loop now gone)
        vm._emergency_stop()


def _forget_parents_vms() -> None:
    """In a child of ``os.fork()``: the parent's VMs are not ours to kill or clean up."""
    global _live, _live_pid
    _live = weakref.WeakSet()
    _live_pid = os.getpid()


os.register_at_fork(after_in_child=_forget_parents_vms)


class AsyncVM(_verbs.Verbs, Operations, _standby.StandbyClones):
    """A QEMU virtual machine controlled from asyncio.

    ``die_with_parent`` (default) kills QEMU when this Python process dies;
    ``keep_runtime`` leaves the runtime directory (logs, overlays) after
    shutdown; ``state_root`` overrides where runtime directories live.
    A kernel oops or BUG ends every guarded wait with :class:`GuestOops`
    unless ``continue_on_oops`` (then it is only recorded, see :meth:`console_events`).
    ``incoming`` is QEMU's ``-incoming`` for a VM that will be fed saved state
    (``defer``: :meth:`restore` sends it over QMP). ``adopt`` makes the
    object for a QEMU that already runs (:meth:`attach` uses it).

    ``spec.kernel`` may be a built kernel tree (see :func:`qemukit.kconfig.find_tree`),
    and ``modules`` a directory of modules (``make modules_install
    INSTALL_MOD_PATH=DIR``) to append to the spec's initrd. The start resolves
    both (:func:`qemukit.kconfig.resolve_kernel`): the tree's image boots, its
    config is checked against the spec (a missing option is a
    :class:`SpecError` before anything starts), and the tree's modules (or
    ``modules``) go into a copy of the initramfs written in the VM's runtime
    directory, which goes with the VM (also a detached one). :attr:`spec` is then
    the spec that booted.
    """

    def __init__(
        self,
        spec: VMSpec,
        *,
        die_with_parent: bool = True,
        keep_runtime: bool = False,
        state_root: Path | None = None,
        boot_timeout: float = BOOT_TIMEOUT,
        continue_on_oops: bool = False,
        incoming: str | None = None,
        adopt: AdoptedQemu | None = None,
        modules: str | os.PathLike[str] | None = None,
        qemu: host.QemuBinary | None = None,
    ) -> None:
        if not isinstance(spec, VMSpec):
            raise SpecError("spec", spec, "must be a VMSpec")
        self.spec = spec
        #: The QEMU binary (and its qemu-img) for the spec's architecture, found once.
        self._qemu = qemu
        #: Modules to append to the initrd at start (see the class docstring).
        self.modules = Path(modules) if modules is not None else None
        #: The kernel as the start resolved it (None before the start, and for attach).
        self.kernel: ResolvedKernel | None = None
        self.die_with_parent = die_with_parent
        self.keep_runtime = keep_runtime
        self.boot_timeout = boot_timeout
        #: Handed to the console watcher at start (ConsoleWatcher.continue_on_oops).
        self.continue_on_oops = continue_on_oops
        self._state_root = state_root
        self.state = VMState.NEW
        self.accel: host.AccelChoice | None = None
        self.argv: list[str] = []
        self.runtime: RuntimeDir | None = None
        self._proc: QemuProcess | None = None
        self._qmp: QMP | None = None
        self._console: ConsoleWatcher | None = None
        self._agent: Agent | None = None
        self._io_watch: IOErrorWatch | None = None
        #: What the start's checks found (the QEMU binary, drive formats, daemons' launch).
        self._prepared: Prepared | None = None
        #: Helper daemons this VM needs (virtiofsd), stopped after QEMU.
        self._helpers: list[QemuProcess] = []
        self._hotplug: AsyncHotplug | None = None
        #: A warm clone's shared lock on its cache entry; its QEMU inherits it (see qemukit.warm).
        self._warm_hold: WarmHold | None = None
        self.last_shutdown: ShutdownResult | None = None
        #: True for a VM taken over with :meth:`attach` rather than started here.
        self.attached = False
        self.incoming = incoming
        #: For ``spec.warm``: whether the start restored a saved state, and why (set by start).
        self.warm_start: WarmStart | None = None
        #: The event loop the VM was started on (its tasks and connections live there).
        self._loop: asyncio.AbstractEventLoop | None = None
        #: The cloud-init seed written for this VM (None without one, or when attached).
        self._seed: Seed | None = None
        #: What a warm clone of a cloud-init guest was given after its restore.
        self.identity: CloneIdentity | None = None
        #: The private networks joined (``spec.networks``): name -> index, MAC, address.
        self.networks: dict[str, NetworkMember] = Networks(spec.name or "")
        if adopt is not None:
            self.runtime, self._proc, self.argv = adopt.runtime, adopt.process, list(adopt.process.argv)
            self._helpers = list(adopt.helpers)
            self.accel = adopt.accel
            self.state = VMState.RUNNING
            self.attached = True

    # -- properties --------------------------------------------------------

    def __repr__(self) -> str:
        parts = [f"{self.name!r}", self.state.value]
        if self._proc is not None:
            parts.append(f"pid={self._proc.pid}")
        if self.accel is not None:
            parts.append(self.accel.accel)
        if self.attached:
            parts.append("attached")
        return f"<{type(self).__name__} {' '.join(parts)}>"

    @property
    def name(self) -> str:
        """The VM's name (generated at start when the spec has none)."""
        if self.runtime is not None:
            return self.runtime.name
        return self.spec.name or "(unnamed)"

    @property
    def pid(self) -> int | None:
        """QEMU's pid once started."""
        return self._proc.pid if self._proc else None

    @property
    def qemu(self) -> host.QemuBinary:
        """The QEMU binary this VM runs on (and its qemu-img): found once, for its architecture."""
        if self._qemu is None:
            self._qemu = host.find_qemu(self.spec.arch)
        return self._qemu

    @property
    def console_log(self) -> Path | None:
        """Path of the console log (inside the runtime directory)."""
        return self.runtime.console_log if self.runtime else None

    def console_tail(self, max_lines: int = 30) -> str:
        """The last lines the guest printed on its serial console."""
        return log_tail(self.runtime.console_log, max_lines) if self.runtime else ""

    def qemu_output(self, max_lines: int = 30) -> str:
        """The last lines QEMU itself printed."""
        return self._proc.output_tail(max_lines) if self._proc else ""

    def stats(self) -> dict[str, Any]:
        """QEMU's resource use from psutil: CPU seconds, RSS, threads, open files and fds."""
        if self._proc is None or not self._proc.alive():
            raise StateError(f"VM {self.name!r} has no running QEMU")
        return self._proc.stats()

    # -- start ---------------------------------------------------------------

    async def start(self, timeout: float = QMP_TIMEOUT) -> AsyncVM:
        """Launch QEMU and connect to its monitor; returns once QMP answers.

        With ``spec.warm`` a saved state of the spec is restored instead of a
        boot (see :mod:`qemukit.vm._warm`); :attr:`warm_start` says which and why.
        """
        self._require(VMState.NEW)
        self.state = VMState.STARTING
        self._loop = asyncio.get_running_loop()
        networks = self.spec.networks
        try:
            spec = await self._resolve_kernel()
            warm = await self._choose_warm(spec)
            taken = await self._take_standby(warm, spec, timeout) if warm is not None else None
            if taken is None:
                await self._start(warm.spec if warm is not None else spec, timeout)
            else:  # a standby clone (qemukit.vm._standby): launched and loaded already
                warm = taken
                _live.add(self)
            self.state = VMState.RUNNING
            if warm is not None:
                restored = await self._finish_warm(warm, spec, timeout)
                if restored:
                    self._leave_standby(warm, spec)
                if restored and networks and self.runtime is not None:
                    # The saved state has no NICs on private networks: plugged in now.
                    await _net.plug_after_restore(self, self.runtime.path.parent, networks)
                    await _net.configure_guest(self)
        except BaseException:
            self.state = VMState.FAILED
            await self._cleanup(force=True)
            raise
        return self

    async def _resolve_kernel(self) -> VMSpec:
        """The spec to boot, its kernel resolved (a tree's image, modules in the initrd).

        A clone being restored (``incoming``) keeps the saved spec as it is.
        """
        if self.incoming is not None and self.modules is None:
            return self.spec
        self.kernel = await asyncio.to_thread(resolve_kernel, self.spec, self.modules)
        return self.kernel.spec

    async def _choose_warm(self, spec: VMSpec) -> _warm.WarmPlan | None:
        """For ``spec.warm``: the warm state to restore (found or built), None to boot cold."""
        if not spec.warm or self.incoming is not None:
            return None
        await asyncio.to_thread(self._prepare, spec)
        assert self.accel is not None
        qemu = self.qemu  # found once for the VM's architecture, carried
        self.warm_start, plan = await _warm.choose_warm(
            self, spec, qemu, host_facts(qemu, self.accel),
            needs_files=self.kernel is not None and self.kernel.needs_files)
        if plan is not None:
            self.incoming = "defer"
            self._warm_hold = plan.hold
        return plan

    async def _finish_warm(self, plan: _warm.WarmPlan, cold: VMSpec, timeout: float) -> bool:
        """Restore the warm state into the QEMU just launched (True); if QEMU cannot load it,
        boot ``cold`` instead (False; :attr:`warm_start` says why)."""
        try:
            self.warm_start, self.identity = await _warm.finish_warm(self, plan, self._seed)
            return True
        except SnapshotError as exc:  # only the loading of the state raises it
            await self._cleanup(force=True)  # its QEMU held the entry in use
            removal = await asyncio.to_thread(_warm.discard, plan)
            log.warning("%s: %s; %s; booting instead", self.name, exc, removal)
            self._forget_launch()
            self.state = VMState.STARTING
            self.warm_start = WarmStart(False, f"{exc}; {removal}; booted instead",
                                        plan.entry.key)
            await self._start(cold, timeout)
            self.state = VMState.RUNNING
            return False

    def _forget_launch(self) -> None:
        """After a launch was cleaned up: forget its process, connections and runtime."""
        self._proc = self._qmp = self._console = self._agent = None
        self._io_watch = None
        self._hotplug = self._seed = self.runtime = None
        self._helpers = []
        self.argv = []
        self.incoming = None

    def warm_builder(self, spec: VMSpec) -> AsyncVM:
        """A new VM of ``spec`` with this one's options: the builder of a warm state."""
        return AsyncVM(spec, state_root=self._state_root, boot_timeout=self.boot_timeout,
                       continue_on_oops=self.continue_on_oops)

    def _prepare(self, spec: VMSpec) -> None:
        """Check ``spec`` against the host before anything starts, and choose the accelerator.

        See :func:`qemukit._launch.start.prepare`; a warm start keeps the
        accelerator chosen for the user's spec.
        """
        self._prepared = prepare(spec, self.qemu)
        _net.check_subnets(spec.networks)
        if self.accel is None:
            probe = default_probe_image(spec.arch) if spec.accel != "tcg" else None
            self.accel = host.resolve_accel(spec.accel, self._prepared.qemu, probe, arch=spec.arch)

    async def _start(self, spec: VMSpec, timeout: float) -> None:
        """Launch QEMU for ``spec`` (which becomes :attr:`spec`) and connect to its monitor."""
        warn_exposed(spec, stacklevel=4)  # (warn_exposed, _start, start, its caller)
        await asyncio.to_thread(self._prepare, spec)
        assert self.accel is not None and self._prepared is not None
        self.runtime = rd = RuntimeDir.create(spec.name, self._state_root)
        if self.kernel is not None and self.kernel.needs_files:
            # In the runtime directory: the initramfs with the modules lives as long as the VM.
            spec = await asyncio.to_thread(self.kernel.materialize, rd.data_path / "kernel")
        self.spec = spec
        # The plan again, now in the directory really claimed (its name may be generated).
        plan = plan_launch(self.spec, host_facts(self._prepared.qemu, self.accel), rd,
                           self._prepared.formats, incoming=self.incoming,
                           console_reader=self.die_with_parent)
        rd.write_private(rd.spec_file, self.spec.dumps())
        self._seed = await asyncio.to_thread(carry_out, plan, self._prepared, self._helpers,
                                             die_with_parent=self.die_with_parent)
        links = await _net.join_networks(self, rd.path.parent, self.spec.networks)
        self._proc, self.argv, ours, console = spawn_qemu(
            plan, self._prepared, links, [self._warm_hold.fd] if self._warm_hold else [],
            die_with_parent=self.die_with_parent)
        _live.add(self)
        if console is not None:  # connected from QEMU's start: read (and log) it at once
            self._console = ConsoleWatcher(rd.console_log, continue_on_oops=self.continue_on_oops)
            await self._console.start(rd.console_socket, sock=console)
        self._qmp = QMP(f"qemukit-{rd.name}")
        # Start talking to QEMU at once; the bookkeeping below runs while it boots.
        connect = asyncio.ensure_future(self._qmp.connect(ours, timeout))
        try:
            record(rd, self._proc, self.argv, self.accel, self._helpers,
                   die_with_parent=self.die_with_parent)
        except BaseException:
            await cancel_and_wait(connect)
            raise
        try:
            await self.guarded(connect, timeout, "QMP", launching=True)
        except QMPConnectionError:
            # QEMU closed the monitor: it is exiting; report why it failed.
            await self._raise_launch_failure()
            raise
        self._io_watch = IOErrorWatch(self._qmp, self.name)
        if self.spec.serial and self._console is None:  # QEMU logs it: connect by its path
            self._console = ConsoleWatcher(rd.console_log, continue_on_oops=self.continue_on_oops)
            await self._console.start(rd.console_socket)
        if self.spec.agent != "none":
            self._agent = make_agent(self.spec, rd, monitor=self._qmp)

    @classmethod
    async def attach(
        cls, name: str, *, state_root: Path | None = None, timeout: float = QMP_TIMEOUT
    ) -> AsyncVM:
        """Take control of a running VM by name (e.g. one started with ``--detach``).

        Connects to its shared QMP socket; QEMU serves one client at a time,
        so this waits (up to ``timeout``) while another client is connected.
        Raises :class:`StateError` if no such VM runs.
        """
        spec, adopted, die_with_parent = adopt(name, state_root)
        vm = cls(spec, die_with_parent=die_with_parent, state_root=adopted.runtime.path.parent,
                 adopt=adopted)
        log.debug("%s: attaching to QEMU pid %d (%d helpers)", name, adopted.process.pid,
                  len(adopted.helpers))
        try:
            await vm._connect_shared_monitor(timeout)
        except BaseException:
            await vm.detach()
            raise
        log.debug("%s: attached", name)
        return vm

    async def _connect_shared_monitor(self, timeout: float) -> None:
        """An attached VM's QMP (the shared qmp.sock), I/O-error watch and agent client."""
        from .._wire.qmp import connect_unix

        assert self.runtime is not None
        sock = await connect_unix(str(self.runtime.qmp_socket), timeout)
        self._qmp = QMP(f"qemukit-{self.runtime.name}")
        await self.guarded(self._qmp.connect(sock, timeout), timeout, "QMP")
        self._io_watch = IOErrorWatch(self._qmp, self.name)
        if self.has_agent:
            self._agent = make_agent(self.spec, self.runtime, connect_timeout=timeout,
                                      monitor=self._qmp)

    async def detach(self) -> None:
        """Let go of the VM without stopping it: close connections, leave QEMU running.

        Only a VM started with ``die_with_parent=False`` outlives this process.
        """
        await self._stop_io_watch()
        await close_connections((self._agent, self._console, self._qmp), self.name, "detach",
                                logging.WARNING)  # the VM runs on: say so
        self._agent = self._console = self._qmp = None
        for proc in (self._proc, *self._helpers):
            if proc is not None:
                proc.close()
        self._release_warm_hold()  # QEMU's inherited copy keeps the entry in use
        _live.discard(self)
        self.state = VMState.DETACHED

    async def _stop_io_watch(self) -> None:
        if self._io_watch is not None:
            await self._io_watch.stop()
            self._io_watch = None

    def _exited(self, message: str, argv: Sequence[str] = (), console_lines: int = 20
                ) -> LaunchError:
        """The error for a QEMU that is gone: its (and a dead helper's) last output, the console's."""
        assert self._proc is not None
        return LaunchError(message, argv=argv, returncode=self._proc.returncode,
                           stderr=output_for_error(self._proc, self._helpers),
                           console=self.console_tail(console_lines))

    async def _raise_launch_failure(self) -> None:
        assert self._proc is not None
        with contextlib.suppress(WaitTimeout):
            await self._proc.wait(5)
        raise self._exited("QEMU exited during start-up" if not self._proc.alive()
                           else "QEMU closed its monitor", self.argv, 10)

    # -- guarded waits ---------------------------------------------------------

    async def guarded(
        self, aw: Awaitable[T], timeout: float | None, what: str, *, launching: bool = False,
        guest_io: bool = False, guest_faults: bool = True,
    ) -> T:
        """Await ``aw`` but stop early, with the right error, if QEMU exits or the guest panics.

        With ``guest_io`` (waits that need the guest to run), a disk I/O error
        that makes QEMU pause the guest ends the wait too, as :class:`GuestIOError`.
        ``guest_faults=False`` is for work on a guest that has already failed
        (dumping a panicked kernel): a panic or oops does not end that wait.
        """
        assert self._proc is not None
        return await guarded_wait(
            aw, timeout, what, proc=self._proc, console=self._console,
            io_watch=self._io_watch if guest_io else None, guest_faults=guest_faults,
            continue_on_oops=self.continue_on_oops, shares=self.spec.all_shares,
            console_tail=self.console_tail,
            exited=lambda message: self._exited(message, self.argv if launching else ()))

    def qemu_alive(self) -> bool:
        """True while this VM's QEMU process runs."""
        return self._proc is not None and self._proc.alive()

    @property
    def has_agent(self) -> bool:
        """True if the spec has an in-guest agent (qemukit's own or qemu-guest-agent)."""
        return self.spec.agent != "none"

    async def reset_agent(self) -> None:
        """Forget the agent connection and readiness: the guest is being rebooted.

        The next agent call waits for the new guest's agent.
        """
        if self._agent is not None:
            await self._agent.close()
            self._agent.ready = False
        if self.runtime is not None:
            self.runtime.ready_stamp.unlink(missing_ok=True)

    def forget_guest_faults(self) -> None:
        """Forget a panic, oops or share error seen so far: the guest's state is being replaced.

        Loading a snapshot (or reverting to one) puts back a guest from
        before the fault, so calls after it must not fail because of it.
        """
        if self._console is not None:
            self._console.reset()

    # -- QMP ---------------------------------------------------------------------

    @property
    def monitor(self) -> QMP:
        """The owner's QMP connection (for event listeners)."""
        self._require(VMState.RUNNING, VMState.STOPPING)
        assert self._qmp is not None
        return self._qmp

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = QMP_TIMEOUT, **kwargs: Any) -> Any:
        """Run a raw QMP command: ``await vm.qmp("query-status")``.

        Arguments come as a mapping or as keyword arguments (``-`` in QMP
        names becomes ``_``: ``node_name=`` is sent as ``node-name``).
        """
        args = _monitor.qmp_arguments(command, arguments, kwargs, self.spec.extra_args)
        # Not guarded(): a QEMU that dies closes the monitor, which fails the command
        # at once; skipping the guard's extra futures keeps a round trip cheap.
        try:
            return await self.monitor.execute(command, args or None, timeout=timeout)
        except QMPConnectionError:
            assert self._proc is not None
            with contextlib.suppress(WaitTimeout):
                await self._proc.wait(0.5)
            if not self._proc.alive():
                raise self._exited(f"QEMU exited while waiting for QEMU's reply to QMP {command}"
                                   ) from None
            raise

    async def status(self) -> str:
        """QEMU's run state (``running``, ``paused``, ``shutdown``...)."""
        return str((await self.qmp("query-status"))["status"])

    async def pause(self) -> None:
        """Stop the guest's vCPUs; returns once QEMU reports the STOP event."""
        await _monitor.pause(self)

    async def resume(self) -> None:
        """Let a paused guest run again; returns once QEMU reports the RESUME event."""
        await _monitor.resume(self)

    @classmethod
    async def restore(cls, bundle: str | Path, *, name: str | None = None,
                      timeout: float = SAVE_TIMEOUT, die_with_parent: bool = True,
                      keep_runtime: bool = False, state_root: Path | None = None,
                      boot_timeout: float = BOOT_TIMEOUT,
                      continue_on_oops: bool = False) -> AsyncVM:
        """Start a clone from a bundle written by :meth:`save_state`; returns it running.

        The clone resumes where the saved guest was, without booting, on its
        own qcow2 overlays over the bundle's disk copies (the bundle is never
        written), so several clones can run side by side. ``name`` names it
        (generated when None); the other options are those of :class:`AsyncVM`.

        As for a warm start, the clone's clock is set to the host's and its
        kernel RNG reseeded before this returns (so before any command of
        yours): clones of one bundle would otherwise hand out the same random
        bytes. That waits for the agent (``boot_timeout``). It is skipped, with
        a warning, for a guest saved paused, one without an agent, and one
        with the tiny agent that is not x86_64 (the reseed program's only
        architecture).
        """
        return await start_clone(bundle, name, lambda clone, qemu: cls(
            clone, die_with_parent=die_with_parent, keep_runtime=keep_runtime,
            state_root=state_root, boot_timeout=boot_timeout, continue_on_oops=continue_on_oops,
            incoming="defer", qemu=qemu), timeout)

    async def fork(self, n: int, *, timeout: float = SAVE_TIMEOUT,
                   die_with_parent: bool | None = None) -> list[AsyncVM]:
        """Fork this running VM into ``n`` clones; returns them running, each with its own
        identity, name (``NAME-1``...), ports and disk overlays (see :mod:`qemukit.vm._fork`).

        The guest is paused while its state is saved once, then runs on. Each
        clone has the memory, disks and hot-plugged devices of the fork point.
        ``n`` beyond :data:`~qemukit.vm._fork.FORK_LIMIT` is refused before
        anything starts; if a clone fails, those started are stopped.
        ``die_with_parent`` is the clones' (None: this VM's).
        """
        root = self.runtime.path.parent if self.runtime is not None else None
        dies = self.die_with_parent if die_with_parent is None else die_with_parent
        return await _fork.fork_vm(
            self, n, functools.partial(self._fork_clone, die_with_parent=dies), timeout=timeout,
            taken=lambda name: root is not None and (root / name).exists())

    async def _fork_clone(self, plan: _warm.WarmPlan, *, die_with_parent: bool) -> AsyncVM:
        """Start one clone of a fork: restored like a warm clone, given its identity."""
        vm = AsyncVM(plan.spec, die_with_parent=die_with_parent, state_root=self._state_root,
                     boot_timeout=self.boot_timeout, continue_on_oops=self.continue_on_oops,
                     incoming="defer", qemu=self._qemu)
        vm._warm_hold = plan.hold  # its QEMU inherits it: the fork's entry stays while it runs
        await vm.start()
        try:
            vm.warm_start, vm.identity = await _warm.finish_warm(vm, plan, vm._seed)
            if vm._seed is None:
                await _fork.give_identity(vm)
        except BaseException:
            with contextlib.suppress(QemukitError):  # the restore's own error is raised
                await vm.kill()
            raise
        return vm

    # -- guest agent and cloud-init (qemukit.qga, qemukit.seed) -------------------------

    @property
    def guest(self) -> AsyncGuest:
        """The guest agent, for more than :meth:`exec`; every call is guarded like exec.

        With ``agent="qga"`` it offers file read and write, fsfreeze/thaw and
        raw QGA calls (see :class:`qemukit.qga.AsyncGuest`). Call
        :meth:`wait_ready` first, or use the calls' own timeouts.
        """
        self._require(VMState.RUNNING)
        if self._agent is None:
            raise StateError(f"VM {self.name!r} has no agent (spec.agent is 'none')")
        return AsyncGuest(self, self._agent)

    # -- guest -------------------------------------------------------------------

    async def wait_ready(self, timeout: float | None = None) -> float:
        """Wait until the guest agent answers; returns seconds since QEMU started.

        Raises :class:`GuestPanic` if the kernel panics, :class:`LaunchError`
        if QEMU exits, :class:`WaitTimeout` (with the console tail) otherwise.
        """
        self._require(VMState.RUNNING)
        if self._agent is None:
            raise StateError(f"VM {self.name!r} has no agent (spec.agent is 'none')")
        timeout = self.boot_timeout if timeout is None else timeout
        await wait_agent(self, self._agent, timeout)
        assert self._proc is not None
        return self._proc.uptime()

    @property
    def guest_booted(self) -> bool:
        """True once the guest agent has answered, here or in any process controlling the VM."""
        if self._agent is not None and self._agent.ready:
            return True
        return self.runtime is not None and self.runtime.ready_stamp.exists()

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = 60.0,
                   check: bool = False, stdin: bytes | None = None) -> ExecResult:
        """Run a command in the guest: a list runs as argv, a string as shell code.

        Waits for the agent first if the guest is still booting. With
        ``check=True`` a non-zero exit raises :class:`~qemukit.errors.GuestError`.
        ``stdin`` is fed to the command (qemu-guest-agent only).
        """
        await self.wait_ready()
        return checked(command, await self.guest.exec(command, timeout, stdin=stdin), check)

    def follow_console(self, sink: Callable[[bytes], None] | None) -> None:
        """Pass everything the guest prints from now on to ``sink`` (None stops)."""
        if self._console is None:
            raise StateError(f"VM {self.name!r} has no serial console")
        self._console.sink = sink

    async def console_events(self) -> list[ConsoleEvent]:
        """The kernel events seen on the console so far, in order (see :mod:`qemukit.console`).

        Includes everything the guest printed before the call: panics, oopses,
        warnings (soft lockups, RCU stalls, ``WARNING:``) and share errors.
        Empty for a VM without a console watcher (attached, or no serial).
        """
        if self._console is None:
            return []
        await self._console.settle()
        return list(self._console.events)

    async def wait_exit(self, timeout: float | None = None) -> int | None:
        """Wait until QEMU exits by itself (the guest powered off); returns its status."""
        self._require(VMState.RUNNING)
        assert self._proc is not None
        return await self._proc.wait(timeout)

    # -- the test writer's verbs: inherited from _verbs.Verbs, but for this one, which
    # -- reads the console watcher (NixOS test driver's names) ----------------------

    async def wait_for_console_text(self, regex: str, *, timeout: float = _verbs.WAIT_TIMEOUT,
                                    since: Literal["now", "start"] = "now") -> str:
        """Wait for a serial console line matching ``regex`` (``re.search``); returns the line.

        ``since="now"`` looks at what the guest prints from the call on;
        ``since="start"`` also at everything it printed before. The line
        being written (a prompt without newline yet) counts too.
        """
        return await _verbs.wait_for_console_text(self, self._console, regex, timeout, since)

    # -- shutdown ----------------------------------------------------------------

    async def shutdown(
        self,
        timeout: float = 30.0,
        *,
        quit_timeout: float = 5.0,
        term_timeout: float = 5.0,
        kill_timeout: float = 5.0,
    ) -> ShutdownResult:
        """Stop the VM through the ladder: ACPI powerdown, quit, SIGTERM, SIGKILL.

        ``timeout`` bounds the ACPI rung (the guest's own clean shutdown; 0
        skips it). The runtime directory and throwaway overlays are removed
        afterwards, whatever happened. Calling it again returns the first result.
        """
        if self.state in (VMState.STOPPED, VMState.FAILED) and self.last_shutdown:
            return self.last_shutdown
        self._require(VMState.RUNNING)
        self.state = VMState.STOPPING
        try:
            assert self._proc is not None
            qmp = self._qmp if self._qmp is not None and self._qmp.connected else None
            timeout, agent_poweroff = graceful_rung(self.spec, self._agent, self.name, timeout)
            result = await run_ladder(self._proc, qmp, self.name, acpi_timeout=timeout,
                                      quit_timeout=quit_timeout, term_timeout=term_timeout,
                                      kill_timeout=kill_timeout, agent_poweroff=agent_poweroff)
        finally:
            await self._cleanup(force=True)
            self.state = VMState.STOPPED
        self.last_shutdown = result
        return result

    async def kill(self, *, kill_timeout: float = 5.0) -> ShutdownResult:
        """SIGKILL QEMU at once and clean up: no QMP, no graceful rung.

        The result's rung is ``SIGKILL`` (``ALREADY_EXITED`` if QEMU was gone).
        Calling it after a shutdown returns that shutdown's result.
        """
        if self.state in (VMState.STOPPED, VMState.FAILED) and self.last_shutdown:
            return self.last_shutdown
        self._require(VMState.RUNNING)
        self.state = VMState.STOPPING
        assert self._proc is not None
        try:
            result = await kill_at_once(self._proc, self.name, kill_timeout)
        finally:
            await self._cleanup(force=True)
            self.state = VMState.STOPPED
        self.last_shutdown = result
        return result

    async def _cleanup(self, force: bool) -> None:
        """Close connections, make sure QEMU is gone, remove runtime files."""
        await self._stop_io_watch()
        if self._console is not None and self._proc is not None and not self._proc.alive():
            await self._console.drain()  # QEMU's last output, into the log the watcher writes
        await close_connections((self._agent, self._console, self._qmp), self.name, "cleanup")
        if self._proc is not None:
            if force and self._proc.alive():
                self._proc.kill()
                try:
                    await self._proc.wait(10)
                except WaitTimeout:  # the files go anyway; say that QEMU did not
                    log.warning("%s: cleanup: QEMU pid %d survived SIGKILL for 10 s",
                                self.name, self._proc.pid)
            self._proc.close()
        await stop_helpers(self._helpers, self.name)
        self._release_warm_hold()
        _live.discard(self)
        if self.runtime is not None and not self.keep_runtime:
            self.runtime.remove()

    def _release_warm_hold(self) -> None:
        """Close this process's lock on the warm entry (QEMU, if alive, keeps its copy)."""
        if self._warm_hold is not None:
            self._warm_hold.close()
            self._warm_hold = None

    def _emergency_stop(self) -> None:
        """Synchronous kill used at interpreter exit."""
        for proc in (self._proc, *self._helpers):
            if proc is not None and proc.alive():
                proc.kill()
        if self.runtime is not None and not self.keep_runtime:
            self.runtime.remove()

    async def __aenter__(self) -> AsyncVM:
        if self.state == VMState.NEW:
            await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.state == VMState.RUNNING:
            await self.shutdown()

