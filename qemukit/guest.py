"""The guest agent of a running VM, every call guarded: :class:`AsyncGuest` and :class:`SyncGuest`.

``vm.guest`` is one of these. The clients underneath speak the agents'
protocols (:class:`Agent` for qemukit's own agent in the tiny image,
:class:`~qemukit.qga.GuestAgent` for qemu-guest-agent); this layer adds what
a VM knows: a call ends at once, with the right error, when QEMU exits, the
guest panics or QEMU pauses it on a disk error.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from ._sync import SyncFacade, blocking
from ._wire.agent import Agent, ExecResult
from ._wire.qga import GuestAgent
from .errors import StateError

if TYPE_CHECKING:
    from .target import VMTarget

__all__ = ["Agent", "AsyncGuest", "ExecResult", "SyncGuest"]

T = TypeVar("T")

#: Extra seconds the VM's guard allows beyond a call's own deadline (which fires first).
_GUARD_SLACK = 10.0


class AsyncGuest:
    """The guest agent of one running VM (``vm.guest`` of an :class:`~qemukit.AsyncVM`).

    Every call is guarded like :meth:`AsyncVM.exec <qemukit.AsyncVM.exec>`:
    it ends at once with the right error if QEMU exits
    (:class:`~qemukit.errors.LaunchError`), the guest panics
    (:class:`~qemukit.errors.GuestPanic`) or QEMU pauses it on a disk error
    (:class:`~qemukit.errors.GuestIOError`), instead of waiting out its
    timeout. File transfer and fsfreeze need qemu-guest-agent
    (``agent="qga"``); the tiny image's own agent runs commands and answers
    pings.
    """

    def __init__(self, vm: VMTarget, agent: Agent) -> None:
        self._vm = vm
        self._agent = agent

    @property
    def agent(self) -> Agent:
        """The unguarded agent client (:class:`~qemukit.guest.Agent` or :class:`GuestAgent`)."""
        return self._agent

    def _qga(self, what: str) -> GuestAgent:
        if not isinstance(self._agent, GuestAgent):
            raise StateError(f"{what} needs qemu-guest-agent (spec agent='qga'); "
                             "the qemukit agent only runs commands")
        return self._agent

    async def _guarded(self, aw: Awaitable[T], timeout: float | None, what: str) -> T:
        limit = None if timeout is None else timeout + _GUARD_SLACK
        return await self._vm.guarded(aw, limit, what, guest_io=True)

    async def ping(self, timeout: float = 60.0) -> None:
        """Wait until the agent answers."""
        await self._guarded(self._agent.ping(timeout), timeout, "the guest agent to answer")

    async def exec(self, command: str | Sequence[str], timeout: float | None = 60.0, *,
                   stdin: bytes | None = None) -> ExecResult:
        """Run ``command`` in the guest (a list as argv, a string as shell code).

        ``stdin`` is fed to the command (qemu-guest-agent only). When
        ``timeout`` passes, the command is killed in the guest and
        :class:`~qemukit.errors.WaitTimeout` is raised.
        """
        what = f"the guest command {command!r}"
        if stdin is not None:
            call = self._qga("stdin for a guest command").exec(command, timeout, stdin=stdin)
        else:
            call = self._agent.exec(command, timeout)
        return await self._guarded(call, timeout, what)

    async def call(self, command: str, arguments: dict[str, Any] | None = None, *,
                   timeout: float = 30.0) -> Any:
        """Run one raw QGA command and return its ``return`` value."""
        return await self._guarded(self._qga(command).call(command, arguments, timeout=timeout),
                                   timeout, f"the guest agent to run {command}")

    async def read_file(self, path: str, *, timeout: float = 60.0) -> bytes:
        """The contents of ``path`` in the guest."""
        return await self._guarded(self._qga("reading a file").read_file(path, timeout=timeout),
                                   timeout, f"the guest agent to read {path}")

    async def write_file(self, path: str, data: bytes, *, timeout: float = 60.0,
                         append: bool = False) -> None:
        """Write ``data`` to ``path`` in the guest (created or truncated, unless ``append``)."""
        agent = self._qga("writing a file")
        await self._guarded(agent.write_file(path, data, timeout=timeout, append=append),
                            timeout, f"the guest agent to write {path}")

    async def freeze(self, *, timeout: float = 60.0) -> int:
        """Flush and freeze the guest's file systems; returns how many."""
        return await self._guarded(self._qga("fsfreeze").freeze(timeout=timeout), timeout,
                                   "the guest agent to freeze the file systems")

    async def thaw(self, *, timeout: float = 60.0) -> int:
        """Thaw the guest's file systems; returns how many were thawed."""
        return await self._guarded(self._qga("fsfreeze").thaw(timeout=timeout), timeout,
                                   "the guest agent to thaw the file systems")

    async def fsfreeze_status(self, *, timeout: float = 30.0) -> str:
        """``thawed`` or ``frozen``."""
        return await self._guarded(self._qga("fsfreeze").fsfreeze_status(timeout=timeout),
                                   timeout, "the guest agent's fsfreeze status")

    @contextlib.asynccontextmanager
    async def frozen(self, *, timeout: float = 60.0) -> AsyncIterator[int]:
        """``async with vm.guest.frozen():`` file systems frozen inside the block only."""
        count = await self.freeze(timeout=timeout)
        try:
            yield count
        finally:
            await self.thaw(timeout=timeout)

    async def info(self, *, timeout: float = 30.0) -> dict[str, Any]:
        """The agent's version and the commands it supports."""
        return await self._guarded(self._qga("guest-info").info(timeout=timeout), timeout,
                                   "the guest agent's info")


class SyncGuest(SyncFacade):
    """The guest agent for synchronous code (``VM.guest``), derived from :class:`AsyncGuest`."""

    _aio: AsyncGuest

    @property
    def aio(self) -> AsyncGuest:
        """The async (guarded) guest agent."""
        return self._aio

    ping = blocking(AsyncGuest.ping)
    exec = blocking(AsyncGuest.exec)
    call = blocking(AsyncGuest.call)
    read_file = blocking(AsyncGuest.read_file)
    write_file = blocking(AsyncGuest.write_file)
    freeze = blocking(AsyncGuest.freeze)
    thaw = blocking(AsyncGuest.thaw)
    fsfreeze_status = blocking(AsyncGuest.fsfreeze_status)
    info = blocking(AsyncGuest.info)

    @contextlib.contextmanager
    def frozen(self, *, timeout: float = 60.0) -> Iterator[int]:
        """``with vm.guest.frozen():`` freezes for the block, thaws after it whatever happens."""
        count = self.freeze(timeout=timeout)
        try:
            yield count
        finally:
            self.thaw(timeout=timeout)
