r"""The kernel-testing loop: boot a kernel, run one command, return a verdict.

:func:`run_in_vm` boots any spec, waits for the guest agent, runs the
command and always stops the VM; :func:`run_kernel` does the same for a
freshly built kernel with the tiny initramfs (plus optional modules and host
shares). Both return a :class:`KernelTestResult`, which writes itself as
JSON or JUnit XML for CI (through :mod:`qemukit.results`' writers). A
panic ends the run within seconds with the panic line; an oops or BUG ends
it too (outcome ``oops``) unless ``continue_on_oops``; soft lockups, RCU
stalls and ``WARNING:`` lines are recorded as warnings and end nothing; a
boot that never reaches the agent ends at the timeout with the console
tail. Neither raises for guest trouble: it is in the result.

The files are valid whatever the guest printed (see :mod:`qemukit.results`);
invalid UTF-8 from the guest is already U+FFFD in the result's text (the
bytes themselves are in :class:`~qemukit.guest.ExecResult`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from . import crashdir, kconfig
from ._sync import run_sync
from ._wire.console import ConsoleEvent
from .arch import DEFAULT_ARCH
from .errors import GuestOops, GuestPanic, HostError, QemukitError, SpecError, WaitTimeout
from .resolve import MachineChoice, Request, kernel_run_machine, resolve
from .results import (
    JUNIT_TEXT_LIMIT,
    Outcome,
    ReportCase,
    json_clean,
    json_safe,
    write_json,
    write_junit,
    xml_safe,
)
from .spec import Share, VMSpec
from .vm import VM, VMState

__all__ = ["JUNIT_TEXT_LIMIT", "KernelTestResult", "MachineChoice", "bzimage_release",
           "json_safe", "kernel_run_machine", "run_in_vm", "run_kernel", "xml_safe"]

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class KernelTestResult:
    """The outcome of one boot-and-run.

    ``outcome`` (an :class:`~qemukit.results.Outcome`; a name given here is
    turned into one) is ``passed`` (exit status 0), ``failed`` (non-zero), ``panic``
    (the kernel stopped), ``oops`` (an oops or BUG; the kernel ran on but the
    run was ended), ``timeout`` or ``error`` (qemukit or QEMU failed, or a
    share did not mount, before the command ran). ``oops`` holds the first
    oops line, also when the run continued past it; ``warnings`` the kernel's
    warning lines (soft lockups, RCU stalls, ``WARNING:``, and oopses
    continued past), in order.
    """

    command: tuple[str, ...]
    outcome: Outcome
    exit_status: int | None
    stdout: str
    stderr: str
    boot_time: float | None
    duration: float
    panic: str | None
    error: str | None
    accel: str | None
    console_log: str | None
    console_tail: str
    oops: str | None = None
    warnings: tuple[str, ...] = ()
    #: The crash dump written on a panic (``dump_on_panic``), if any.
    dump: str | None = None
    #: The guest's architecture (``x86_64``, ``aarch64``, ...).
    arch: str = DEFAULT_ARCH
    #: The kernel's release (``uname -r``): from a build tree, or the image's header.
    kernel_release: str | None = None
    #: The SHA-256 of the kernel's config file, when one was found (a tree's .config).
    kernel_config_sha256: str | None = None
    #: Every kernel report the console showed, in order: ``kind`` (panic, oops, warning),
    #: ``report`` (the debugging tool: kasan, kcsan, ubsan, lockdep, hung_task, kmemleak;
    #: else None), ``line`` and ``lines`` (the report's first lines).
    reports: tuple[dict[str, Any], ...] = ()
    #: The crash bundle written for a panic or oops (``crash_dir``), if any.
    crash_bundle: str | None = None
    #: Seconds the run spent first building the spec's warm state (None: it did not), apart
    #: from ``boot_time``; the ``timeout`` for boot plus command counts from after it.
    warm_build_time: float | None = None
    #: Why the console log could not be copied to the ``console_log`` asked for (then
    #: ``console_log`` is None); the verdict stands regardless. None when it was written.
    console_log_error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", Outcome(self.outcome))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        data = asdict(self)
        data["command"] = list(self.command)
        data["warnings"] = list(self.warnings)
        data["reports"] = list(self.reports)
        return data

    def write_json(self, path: str | Path) -> None:
        """Write the result as JSON (strict: ASCII only, no lone surrogates)."""
        write_json(self.to_dict(), path)

    def report_case(self, name: str | None = None) -> ReportCase:
        """This result as a JUnit test case, named ``name`` (default: the command)."""
        message = {Outcome.FAILED: f"exit status {self.exit_status}",
                   Outcome.PANIC: f"kernel panic: {self.panic}",
                   Outcome.OOPS: f"kernel oops: {self.oops}"}.get(self.outcome, self.error)
        out = self.stdout
        if self.warnings:
            out += "\n--- qemukit: kernel warnings on the console ---\n" + "\n".join(self.warnings)
        return ReportCase(
            name=name if name is not None else " ".join(self.command) or "boot",
            outcome=self.outcome, duration=self.duration, message=message,
            details=self.stderr if self.outcome is Outcome.FAILED else self.console_tail,
            stdout=out, stderr=self.stderr, crash_bundle=self.crash_bundle,
            properties=[("command", " ".join(self.command) if name is not None else None),
                        ("exit_status", self.exit_status), ("accel", self.accel),
                        ("boot_time", self.boot_time), ("panic", self.panic),
                        ("oops", self.oops), ("dump", self.dump), ("arch", self.arch),
                        ("kernel_release", self.kernel_release),
                        ("kernel_config_sha256", self.kernel_config_sha256),
                        ("console_log_error", self.console_log_error),
                        *(("warning", w) for w in self.warnings)])

    def write_junit(self, path: str | Path, *, suite: str = "qemukit") -> None:
        """Write the result as a JUnit XML report with one test case (always well-formed)."""
        write_junit([self.report_case()], path, suite=suite)


#: Console lines a panic or oops result keeps (other results keep the last 40).
REPORT_TAIL_LINES = 120


def _throwaway(spec: VMSpec) -> bool:
    """True if nothing the guest wrote can outlive the VM: every disk is read-only or a
    throwaway overlay, and no host directory is shared (the guest's page cache could
    still hold its writes). Then the run ends with a kill, not a power-off."""
    return not spec.all_shares and all(d.read_only or d.overlay for d in spec.drives)


def run_in_vm(
    spec: VMSpec,
    command: str | Sequence[str],
    *,
    timeout: float = 300.0,
    console_log: str | Path | None = None,
    modules: str | Path | None = None,
    on_started: Callable[[VM], None] | None = None,
    continue_on_oops: bool = False,
    dump_on_panic: str | Path | None = None,
    crash_dir: str | Path | None = None,
    vmlinux: str | Path | None = None,
    on_starting: Callable[[Callable[[], None]], None] | None = None,
) -> KernelTestResult:
    """Boot ``spec``, run ``command`` in the guest, stop the VM, return the verdict.

    ``timeout`` bounds boot plus command. A warm spec's first start builds its
    warm state first (a boot bounded by ``timeout`` as well, then a save): that
    is reported apart (``warm_build_time``) and does not shorten the command's
    time. ``console_log`` keeps a copy of the
    whole serial console (the VM's runtime directory is removed afterwards); a
    copy that cannot be written is logged and said in the result's
    ``console_log_error``, and the verdict stands.
    ``modules`` (see :func:`run_kernel`) is appended to the spec's initrd.
    ``on_started`` is called once QEMU is up (e.g. to say which accelerator).
    ``on_starting`` is called (on qemukit's loop thread) as the start begins, with
    a function that cancels the start from any thread: the start stops what it
    began (QEMU, a warm state half built) and the call raises
    :class:`asyncio.CancelledError`. A start can take long (a warm state is built
    by booting the guest); this is how a test runner stops one (see
    :mod:`qemukit.matrix`). Either callback may raise to end the run.
    An oops or BUG ends the run as ``oops`` unless ``continue_on_oops``, which
    records it (``oops``, ``warnings``) and lets the command finish.
    With ``dump_on_panic`` (a new file's path) a panicking kernel waits
    (``panic=0``) instead of rebooting, and the guest's memory is written there
    as an ELF core before the VM stops; the result names it (``dump``).
    With ``crash_dir`` a panic or oops writes a crash bundle in a new directory
    under it (see :mod:`qemukit.crashdir`: the verdict, the console, the dump,
    the kernel's identity, QEMU's argv, a triage text); the result names it
    (``crash_bundle``). ``vmlinux`` (default: the tree's, or one beside the
    image) lets drgn read the kernel log and the crashing task's stack for it.
    ``spec.kernel`` may be a kernel build tree (see :func:`qemukit.kconfig.find_tree`):
    its built image boots, and if it has modules they are installed from it
    (``make modules_install``) and appended as ``modules`` are, in the VM's
    runtime directory (removed with the VM; see :class:`~qemukit.vm.AsyncVM`).
    When the kernel's config can be found (a tree's ``.config``,
    ``config-<release>`` beside the image), options the spec needs and the
    config lacks raise :class:`SpecError` naming them before boot.
    Afterwards the VM is powered off (the ladder), or killed at once when
    nothing the guest wrote could outlive it (only read-only or overlay disks, no
    shares). Raises :class:`SpecError` or :class:`HostError` for bad input (e.g.
    a modules directory that cannot be read) before anything starts.
    """
    if dump_on_panic is not None and Path(dump_on_panic).exists():
        raise SpecError("dump_on_panic", str(dump_on_panic), "already exists; dumps never overwrite")
    if crash_dir is not None and Path(crash_dir).exists() and not Path(crash_dir).is_dir():
        raise SpecError("crash_dir", str(crash_dir), "exists and is not a directory")
    if vmlinux is not None and not Path(vmlinux).is_file():
        raise SpecError("vmlinux", str(vmlinux), "no such file")
    # Every mistake about the kernel, its config or the modules, before anything starts; the
    # VM resolves the same way at its start and writes the initramfs in its runtime directory.
    about = kconfig.resolve_kernel(spec, modules)
    return _run_resolved(spec, command, about, timeout=timeout, console_log=console_log,
                         modules=modules, on_started=on_started, on_starting=on_starting,
                         continue_on_oops=continue_on_oops, dump_on_panic=dump_on_panic,
                         crash_dir=crash_dir, vmlinux=vmlinux)


def bzimage_release(kernel: str | Path) -> str | None:
    """The release an x86 bzImage names in its setup header (None for other images)."""
    return kconfig.bzimage_release(kernel)


def _run_resolved(
    spec: VMSpec,
    command: str | Sequence[str],
    about: kconfig.ResolvedKernel,
    *,
    timeout: float,
    console_log: str | Path | None,
    modules: str | Path | None,
    on_started: Callable[[VM], None] | None,
    on_starting: Callable[[Callable[[], None]], None] | None,
    continue_on_oops: bool,
    dump_on_panic: str | Path | None,
    crash_dir: str | Path | None = None,
    vmlinux: str | Path | None = None,
) -> KernelTestResult:
    """run_in_vm once the kernel, its config and the modules were checked (``about``)."""
    if dump_on_panic is not None or crash_dir is not None:
        # The kernel must stay put after its panic (not reboot, which ends QEMU under
        # -no-reboot) until it is dumped: the last panic= on the command line wins.
        spec = spec.replace(append=f"{spec.append or ''} panic=0".strip())
    argv = (command,) if isinstance(command, str) else tuple(command)
    start = time.monotonic()
    vm = VM(spec, boot_timeout=timeout, continue_on_oops=continue_on_oops, modules=modules)
    fields: dict[str, Any] = dict(exit_status=None, stdout="", stderr="", boot_time=None,
                                  panic=None, error=None, accel=None, oops=None, dump=None)
    outcome = Outcome.ERROR
    tail = ""
    events: list[ConsoleEvent] = []
    log_copy_error: OSError | None = None
    failure_console = ""  # the console the error carries, for a VM that never had its own
    bundle: Path | None = None
    notes: list[str] = []
    crash_log: Path | None = None
    qemu_argv: list[str] = []
    try:
        _start(vm, on_starting)
        # A first start that built the warm state (its own boot, bounded by timeout too):
        # reported apart, and not taken out of the time the command has.
        built = vm.warm_start.build_seconds if vm.warm_start is not None else 0.0
        if built:
            fields["warm_build_time"] = round(built, 3)
        fields["accel"] = vm.accel.accel if vm.accel else None
        if on_started is not None:
            on_started(vm)
        fields["boot_time"] = round(vm.wait_ready(timeout), 3)
        remaining = max(1.0, timeout - (time.monotonic() - start - built))
        result = vm.exec(command, timeout=remaining)
        fields.update(exit_status=result.exit_status, stdout=result.stdout_text,
                      stderr=result.stderr_text)
        outcome = Outcome.PASSED if result.exit_status == 0 else Outcome.FAILED
    except GuestPanic as exc:
        outcome, fields["panic"], fields["error"] = Outcome.PANIC, exc.line, str(exc).split("\n")[0]
        failure_console = exc.console
        if crash_dir is not None:
            bundle = _new_bundle(crash_dir, Outcome.PANIC, vm.name, fields)
        target = (Path(dump_on_panic) if dump_on_panic is not None
                  else bundle / "vmcore" if bundle is not None else None)
        if target is not None:
            fields["dump"], dump_error = _dump_after_panic(vm, target)
            if dump_error:
                fields["error"] += f"; {dump_error}"
                notes.append(dump_error)
    except GuestOops as exc:
        outcome, fields["oops"], fields["error"] = Outcome.OOPS, exc.line, str(exc).split("\n")[0]
        failure_console = exc.console
        if crash_dir is not None:
            # The kernel runs on after an oops: its memory then is the bundle's dump.
            bundle = _new_bundle(crash_dir, Outcome.OOPS, vm.name, fields)
            if bundle is not None:
                fields["dump"], dump_error = _dump_after_panic(vm, bundle / "vmcore")
                if dump_error:
                    notes.append(dump_error)
    except WaitTimeout as exc:
        outcome, fields["error"] = Outcome.TIMEOUT, str(exc).split("\n")[0]
        failure_console = exc.console
        if fields["boot_time"] is None and spec.agent == "qemukit" and about.config is None and (
                _INIT_READY in vm.console_tail(400)):
            # The init got as far as starting the agent, which never answered: the
            # commonest cause with one's own kernel is no virtio-console to talk over.
            fields["error"] += (f"; the guest's init reported ready but the agent never "
                                f"answered: {_NO_AGENT_HINT}")
    except QemukitError as exc:
        fields["error"] = str(exc)
        failure_console = getattr(exc, "console", "") or ""
    finally:
        events = vm.console_events()
        # A panic's or an oops's whole report (registers, the call trace: about 40 lines
        # here, more with a longer trace or another QEMU's CPU model), not just its end.
        lines = REPORT_TAIL_LINES if outcome in (Outcome.PANIC, Outcome.OOPS) else 40
        tail = vm.console_tail(lines)
        if not tail.strip() and failure_console.strip():
            # It failed in a VM this one started first (the builder of its warm state):
            # that VM's console is the one to show.
            tail = "\n".join(failure_console.splitlines()[-lines:])
        if console_log is not None and vm.console_log is not None and vm.console_log.exists():
            try:
                shutil.copyfile(vm.console_log, console_log)
            except OSError as exc:
                log_copy_error = exc
        if bundle is not None:
            # Everything of the VM that the bundle keeps, before its runtime directory goes.
            crash_log, qemu_argv = _keep_console(vm, bundle, notes), list(vm.argv)
        if vm.state is VMState.RUNNING:
            if _throwaway(vm.spec):
                vm.kill()  # nothing of the guest outlives it: no power-off to wait for
            else:
                # A guest that never became ready will hardly honour the power button.
                vm.shutdown(timeout=10 if fields["boot_time"] is not None else 2)
    if log_copy_error is not None:
        # The verdict is what the run is for (a bisection judges by it): the copy's failure
        # goes beside it, never in its place.
        fields["console_log_error"] = (f"cannot write the console log to {console_log}: "
                                       f"{log_copy_error.strerror or log_copy_error}")
        log.warning("%s", fields["console_log_error"])
        console_log = None
    oopses = [e.line for e in events if e.kind == "oops"]
    if fields["oops"] is None and oopses:
        fields["oops"] = oopses[0]
    warnings = [e.line for e in events
                if e.kind == "warning" or (e.kind == "oops" and outcome is not Outcome.OOPS)]
    verdict = KernelTestResult(
        command=argv, outcome=outcome, duration=round(time.monotonic() - start, 3),
        console_log=str(console_log) if console_log is not None else None, console_tail=tail,
        warnings=tuple(warnings), arch=spec.arch, kernel_release=about.release,
        reports=tuple(e.to_dict() for e in events if e.kind != "share"),
        kernel_config_sha256=about.config_sha256,
        crash_bundle=str(bundle) if bundle is not None else None, **fields,
    )
    if bundle is not None:
        try:
            crashdir.finish_run_bundle(bundle, json_clean(verdict.to_dict()), about=about,
                                       spec=spec, argv=qemu_argv, console_log=crash_log,
                                       vmlinux=vmlinux, notes=notes)
        except HostError as exc:
            # The verdict stands (a bisection must still judge a panicking commit bad).
            verdict = replace(verdict, error=_also(verdict.error, f"crash bundle incomplete: {exc}"))
    return verdict


def _also(error: str | None, more: str) -> str:
    """``error`` with ``more`` added."""
    return f"{error}; {more}" if error else more


def _new_bundle(crash_dir: str | Path, outcome: Outcome, name: str,
                fields: dict[str, Any]) -> Path | None:
    """A new crash bundle directory, or None with why not added to ``fields["error"]``: a
    crash directory that cannot be written never takes the place of the verdict."""
    try:
        return crashdir.new_bundle(crash_dir, outcome, name)
    except HostError as exc:
        fields["error"] = _also(fields["error"], f"no crash bundle: {exc}")
        return None


def _keep_console(vm: VM, bundle: Path, notes: list[str]) -> Path | None:
    """Copy the VM's console log into ``bundle`` (it goes with the VM); None if it cannot."""
    if vm.console_log is None or not vm.console_log.exists():
        notes.append("no console log: QEMU never started")
        return None
    try:
        shutil.copyfile(vm.console_log, bundle / "console.log")
    except OSError as exc:
        notes.append(f"console log not kept: {exc.strerror or exc}")
        return None
    return bundle / "console.log"


def _start(vm: VM, on_starting: Callable[[Callable[[], None]], None] | None) -> None:
    """``vm.start()``, which the function handed to ``on_starting`` cancels from any thread."""
    if on_starting is None:
        vm.start()
        return

    async def start() -> None:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None

        def cancel() -> None:
            loop.call_soon_threadsafe(task.cancel)

        on_starting(cancel)
        await vm.aio.start()

    run_sync(start())


_INIT_READY = "qemukit-init: ready"
_NO_AGENT_HINT = ("does the kernel have CONFIG_VIRTIO_CONSOLE (the agent's channel)? "
                  "qemukit kconfig --print lists what qemukit needs")


def _dump_after_panic(vm: VM, path: Path) -> tuple[str | None, str | None]:
    """Pause the panicked guest and dump its memory to ``path``: (the dump, or the reason not)."""
    if vm.state is not VMState.RUNNING or not vm.aio.qemu_alive():
        return None, "no crash dump: QEMU had already exited"
    no_room = crashdir.dump_space_note(path, crashdir.spec_memory_mib(vm.spec))
    if no_room is not None:
        return None, no_room
    try:
        vm.pause()
        return str(vm.dump_memory(path).path), None
    except QemukitError as exc:
        return None, f"no crash dump: {exc}"


def run_kernel(
    kernel: str | Path,
    command: str | Sequence[str] = ("true",),
    *,
    initrd: str | Path | None = None,
    modules: str | Path | None = None,
    shares: Sequence[Share | str] = (),
    append: str | None = None,
    timeout: float = 300.0,
    console_log: str | Path | None = None,
    continue_on_oops: bool = False,
    dump_on_panic: str | Path | None = None,
    crash_dir: str | Path | None = None,
    vmlinux: str | Path | None = None,
    **spec_fields: Any,
) -> KernelTestResult:
    """Boot ``kernel`` with the tiny initramfs (or ``initrd``), run ``command``, report.

    ``modules`` is a directory as ``make modules_install INSTALL_MOD_PATH=DIR``
    leaves it (``DIR/lib/modules/<release>``) or the ``<release>`` directory
    itself; it is appended to the initramfs so the guest loads its virtio
    drivers from it. ``append`` adds to the default kernel command line;
    ``continue_on_oops``, ``dump_on_panic``, ``crash_dir`` and ``vmlinux`` as for
    :func:`run_in_vm`; other keyword arguments are VMSpec fields (``accel``,
    ``memory``, ...), ``warm`` among them (unset: as every front end decides, see
    :mod:`qemukit.resolve`: a kernel not run here before boots on microvm when
    nothing needs q35, a repeated one on q35 from a warm state).
    """
    if not Path(kernel).exists():
        raise SpecError("kernel", str(kernel), "no such file or kernel tree")
    fields = dict(spec_fields)
    arch = fields.pop("arch", None)
    warm = fields.pop("warm", None)
    if initrd is not None:
        fields["initrd"] = str(initrd)
    if shares:
        fields["shares"] = tuple(shares)
    resolution = resolve(Request(kernel=str(kernel), arch=arch, overrides=fields,
                                 append_extra=append, warm=warm, purpose="command",
                                 modules=modules, build=True))
    return run_in_vm(resolution.spec, command, timeout=timeout, console_log=console_log,
                     modules=modules, continue_on_oops=continue_on_oops,
                     dump_on_panic=dump_on_panic, crash_dir=crash_dir, vmlinux=vmlinux)
