"""The VM's side of its in-guest agent: the client for the spec's agent, the wait for
the guest to answer, and a command's exit status checked.

:class:`~qemukit.vm.AsyncVM`'s ``wait_ready`` and ``exec`` are thin calls of these.
Readiness is also written to the runtime directory (``ready_stamp``), so other
processes controlling the VM (``qemukit exec NAME``) know the guest is up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .._launch.runtime import RuntimeDir
from .._wire.agent import Agent, ExecResult
from .._wire.qmp import QMP
from ..errors import GuestError
from ..spec import VMSpec
from . import _net

if TYPE_CHECKING:
    from ._core import AsyncVM

__all__ = ["checked", "make_agent", "wait_agent"]


def make_agent(spec: VMSpec, rd: RuntimeDir, connect_timeout: float = 30.0,
               monitor: QMP | None = None) -> Agent:
    """The client for the spec's in-guest agent (qemukit's own, or qemu-guest-agent).

    qemu-guest-agent's client watches ``monitor`` for the guest opening its port.
    """
    if spec.agent == "qga":
        from .._wire.qga import GuestAgent

        return GuestAgent(rd.agent_socket, connect_timeout=connect_timeout, monitor=monitor)
    return Agent(rd.agent_socket, connect_timeout=connect_timeout)


async def wait_agent(vm: AsyncVM, agent: Agent, timeout: float) -> None:
    """Wait (guarded) until ``agent`` answers, stamp the runtime directory, and write the
    private networks' addresses into the guest if not done yet."""
    if not agent.ready:
        await vm.guarded(agent.ping(timeout), timeout, "the guest agent (boot)", guest_io=True)
        if vm.runtime is not None and not vm.runtime.ready_stamp.exists():
            # Tells other processes (qemukit hotplug NAME ...) that the guest is up.
            vm.runtime.write_private(vm.runtime.ready_stamp, f"{time.time()}\n")
    if _net.needs_configuring(vm) and vm.has_agent:
        await _net.configure_guest(vm)


def checked(command: str | Sequence[str], result: ExecResult, check: bool) -> ExecResult:
    """``result``; with ``check``, a non-zero exit raises :class:`GuestError`."""
    if check and result.exit_status != 0:
        raise GuestError(
            f"{command!r} exited with {result.exit_status}: {result.stderr_text.strip()[-500:]}"
        )
    return result
