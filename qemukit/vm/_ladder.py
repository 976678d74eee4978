"""The shutdown ladder: ACPI powerdown (or the guest agent's power-off), QMP quit, SIGTERM, SIGKILL.

Each rung has its own timeout and is logged (``qemukit`` logger, debug);
:class:`ShutdownResult` says which rung ended QEMU and which were tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from .._launch.process import QemuProcess
from .._wire.agent import Agent
from .._wire.qmp import QMP
from ..arch import ARCHES
from ..errors import QemukitError, QMPConnectionError, StateError, WaitTimeout
from ..spec import VMSpec

log = logging.getLogger(__name__)

#: Run by the guest agent to power the guest off: in the background of a command that
#: returns at once (the agent's reply must come back before the guest goes). The tiny
#: init's power-off script syncs and powers off; elsewhere ``poweroff`` asks the init system.
POWEROFF_SCRIPT = ("( sleep 0.2; if [ -x /sbin/qemukit-poweroff ]; then /sbin/qemukit-poweroff; "
                   "elif [ -d /run/systemd/system ]; then poweroff; else sync; poweroff -f; fi ) "
                   "</dev/null >/dev/null 2>&1 &")

#: Seconds between power-button presses while the ACPI rung waits.
ACPI_REPRESS_INTERVAL = 2.0


class ShutdownRung(enum.Enum):
    """The rung of the shutdown ladder that ended QEMU."""

    ALREADY_EXITED = "already-exited"
    ACPI = "acpi"
    #: The guest powered itself off when its agent asked: the graceful rung of a
    #: machine with no power button the guest hears (riscv64 ``virt`` on QEMU 7.2).
    AGENT = "agent"
    QUIT = "quit"
    SIGTERM = "sigterm"
    SIGKILL = "sigkill"


@dataclass(frozen=True)
class ShutdownResult:
    """How a shutdown went: the rung that worked, QEMU's exit status, time taken."""

    rung: ShutdownRung
    exit_status: int | None
    elapsed: float
    tried: tuple[ShutdownRung, ...]


async def poweroff_by_agent(agent: Agent, name: str) -> None:
    """Ask the guest, through its agent, to power itself off (returns once it was asked).

    The agent rung of :func:`run_ladder` for a machine without a power button.
    """
    result = await agent.exec(["sh", "-c", POWEROFF_SCRIPT], 20)
    if result.exit_status != 0:
        raise StateError(f"VM {name!r}: the guest agent could not start a power-off: "
                         f"{result.stderr_text.strip()[-300:]}")


def graceful_rung(spec: VMSpec, agent: Agent | None, name: str, timeout: float
                  ) -> tuple[float, Callable[[], Awaitable[None]] | None]:
    """The ladder's graceful rung for ``spec``'s machine: (its timeout, the agent's power-off).

    A machine whose guest hears the power button gets ACPI powerdown (no
    agent power-off); one without (riscv64 ``virt`` on QEMU 7.2) powers off
    through its agent when the agent is up, and skips the rung (timeout 0) when not.
    """
    info = ARCHES[spec.arch]
    if info.powerdown or timeout <= 0:
        return timeout, None
    if agent is not None and agent.ready:
        return timeout, functools.partial(poweroff_by_agent, agent, name)
    log.info("%s: %s (%s) has no power button the guest hears and its agent is not up: "
             "skipping the graceful rung, going to quit", name, spec.machine, info.name)
    return 0, None


async def run_ladder(proc: QemuProcess, qmp: QMP | None, name: str, *, acpi_timeout: float,
                     quit_timeout: float, term_timeout: float, kill_timeout: float,
                     agent_poweroff: Callable[[], Awaitable[None]] | None = None
                     ) -> ShutdownResult:
    """Stop QEMU ``proc`` rung by rung; returns the rung that ended it.

    ``agent_poweroff`` (a machine without a power button, a guest whose agent
    answers) asks the guest to power itself off instead of the ACPI rung,
    under the same ``acpi_timeout``.

    ``qmp`` is a connected monitor (None: the QMP rungs are skipped).
    ``acpi_timeout`` bounds the guest's own shutdown after the power button
    (pressed again every few seconds while a booting guest ignores it), then
    QMP ``quit``, SIGTERM and SIGKILL each get their own timeout; a rung with
    timeout 0 is skipped. Each rung is logged at debug level. Raises
    :class:`StateError` if QEMU survives SIGKILL.
    """
    start = time.monotonic()
    tried: list[ShutdownRung] = []

    def done(rung: ShutdownRung) -> ShutdownResult:
        return ShutdownResult(rung, proc.returncode, time.monotonic() - start, tuple(tried))

    if qmp is None and proc.alive():
        # A monitor that went away usually means QEMU is exiting: it closes its
        # sockets before it becomes a zombie. Give it a moment before signalling.
        with contextlib.suppress(WaitTimeout):
            await proc.wait(0.5)
    if not proc.alive():
        return done(ShutdownRung.ALREADY_EXITED)
    if agent_poweroff is not None and acpi_timeout > 0:
        log.debug("%s: shutdown: power-off through the guest agent, up to %gs", name, acpi_timeout)
        tried.append(ShutdownRung.AGENT)
        deadline = time.monotonic() + acpi_timeout
        try:
            await asyncio.wait_for(agent_poweroff(), max(0.1, min(acpi_timeout, 30)))
            await proc.wait(max(0.1, deadline - time.monotonic()))
            return done(ShutdownRung.AGENT)
        except (QemukitError, TimeoutError) as exc:  # the agent or the guest did not: next rung
            log.debug("%s: shutdown: agent rung ended by %r", name, exc)
        acpi_timeout = 0  # no power button to press after it
    if qmp is not None and acpi_timeout > 0:
        log.debug("%s: shutdown: ACPI powerdown, up to %gs", name, acpi_timeout)
        tried.append(ShutdownRung.ACPI)
        deadline = time.monotonic() + acpi_timeout
        try:
            # A guest still booting ignores the button until its ACPI driver is up:
            # press again every few seconds, as a person would, until the deadline.
            while True:
                remaining = deadline - time.monotonic()
                await qmp.execute("system_powerdown", timeout=max(0.1, min(remaining, 5)))
                try:
                    await proc.wait(max(0.1, min(ACPI_REPRESS_INTERVAL, remaining)))
                    return done(ShutdownRung.ACPI)
                except WaitTimeout:
                    if time.monotonic() >= deadline:
                        break
        except QemukitError as exc:  # the monitor went away or QEMU refused: next rung
            log.debug("%s: shutdown: ACPI rung ended by %r", name, exc)
    if qmp is not None and qmp.connected and proc.alive() and quit_timeout > 0:
        log.debug("%s: shutdown: QMP quit, up to %gs", name, quit_timeout)
        tried.append(ShutdownRung.QUIT)
        try:
            with contextlib.suppress(QMPConnectionError):  # QEMU may hang up before replying
                await qmp.execute("quit", timeout=quit_timeout)
            await proc.wait(quit_timeout)
            return done(ShutdownRung.QUIT)
        except QemukitError as exc:
            log.debug("%s: shutdown: quit rung ended by %r", name, exc)
    for rung, sig, wait in (
        (ShutdownRung.SIGTERM, signal.SIGTERM, term_timeout),
        (ShutdownRung.SIGKILL, signal.SIGKILL, kill_timeout),
    ):
        if not proc.alive():
            break
        log.debug("%s: shutdown: %s, up to %gs", name, rung.value, wait)
        tried.append(rung)
        proc.send_signal(sig)
        with contextlib.suppress(WaitTimeout):
            await proc.wait(wait)
            return done(rung)
    if proc.alive():
        raise StateError(f"QEMU pid {proc.pid} survived SIGKILL for {kill_timeout:g}s")
    return done(tried[-1] if tried else ShutdownRung.ALREADY_EXITED)


async def kill_at_once(proc: QemuProcess, name: str, kill_timeout: float) -> ShutdownResult:
    """The SIGKILL rung alone (``AsyncVM.kill``): no QMP, no graceful rung.

    The result's rung is ``SIGKILL`` (``ALREADY_EXITED`` if QEMU was gone); a QEMU
    that outlives ``kill_timeout`` raises :class:`StateError`.
    """
    start = time.monotonic()
    if not proc.alive():
        return ShutdownResult(ShutdownRung.ALREADY_EXITED, proc.returncode,
                              time.monotonic() - start, ())
    log.debug("%s: kill: SIGKILL to QEMU pid %d", name, proc.pid)
    proc.kill()
    try:
        await proc.wait(kill_timeout)
    except WaitTimeout:
        raise StateError(f"QEMU pid {proc.pid} survived SIGKILL for {kill_timeout:g}s") from None
    return ShutdownResult(ShutdownRung.SIGKILL, proc.returncode, time.monotonic() - start,
                          (ShutdownRung.SIGKILL,))


class _Closable(Protocol):
    async def close(self) -> None: ...


async def close_connections(closers: Iterable[_Closable | None], name: str, step: str,
                            level: int = logging.DEBUG) -> None:
    """Close each of a VM's connections (agent, console, QMP), going on past failures.

    Closing a connection to a QEMU that died may fail; each failure is logged at
    ``level`` (a warning where the VM runs on, ``detach``) and the next is closed.
    """
    for closer in closers:
        if closer is not None:
            try:
                await closer.close()
            except Exception as exc:  # our side is closed either way
                log.log(level, "%s: %s: closing %s failed: %r", name, step,
                        type(closer).__name__, exc)
