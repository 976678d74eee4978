"""What operations on a running VM may use of it: the :class:`VMTarget` protocol.

Hotplug, snapshots, saved state and the guarded guest agent are written
against this interface, never against :class:`~qemukit.vm.AsyncVM`'s
private parts; ``AsyncVM`` implements it, and unit tests pass small fakes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from qemu.qmp import EventListener

    from ._launch.runtime import RuntimeDir
    from .host import AccelChoice, QemuBinary
    from .spec import VMSpec

__all__ = ["EventMonitor", "VMTarget"]

T = TypeVar("T")


class EventMonitor(Protocol):
    """The side of a VM's QMP connection that operations wait on (``vm.monitor``).

    qemukit's QMP connection is one; :class:`qemukit.testing.FakeMonitor` another.
    """

    def listen(self, *names: str, match: Callable[[Mapping[str, Any]], bool] | None = None
               ) -> AbstractContextManager[EventListener]:
        """Listen for the events ``names`` while the block runs."""

    async def wait_event(self, listener: EventListener, timeout: float | None,
                         what: str) -> dict[str, Any]:
        """The listener's next event, or :class:`~qemukit.errors.WaitTimeout` naming ``what``."""

    async def hand_over_fd(self, fd: int, prefix: str, *, timeout: float = ...) -> str:
        """Pass the open file ``fd`` to QEMU under a new name (``getfd``); returns the name."""

    async def wait_disconnected(self) -> None:
        """Return once the connection is gone (QEMU exited)."""


class VMTarget(Protocol):
    """The least a running VM offers the operations built on it."""

    @property
    def spec(self) -> VMSpec:
        """The VM's description."""

    @property
    def name(self) -> str:
        """The VM's name."""

    @property
    def runtime(self) -> RuntimeDir | None:
        """Its runtime directory (None before start)."""

    @property
    def accel(self) -> AccelChoice | None:
        """The accelerator QEMU runs with."""

    @property
    def qemu(self) -> QemuBinary:
        """The QEMU binary the VM runs on (and its qemu-img), found once for its architecture."""

    @property
    def monitor(self) -> EventMonitor:
        """The QMP connection, for event listeners."""

    @property
    def guest_booted(self) -> bool:
        """True once the guest agent has answered (in any process)."""

    @property
    def has_agent(self) -> bool:
        """True if the spec has an in-guest agent."""

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = ..., **kwargs: Any) -> Any:
        """Run one QMP command."""

    async def status(self) -> str:
        """QEMU's run state."""

    async def pause(self) -> None:
        """Stop the vCPUs (waits for STOP)."""

    async def resume(self) -> None:
        """Let the vCPUs run (waits for RESUME)."""

    async def wait_ready(self, timeout: float | None = None) -> float:
        """Wait until the guest agent answers."""

    async def guarded(self, aw: Awaitable[T], timeout: float | None, what: str, *,
                      guest_io: bool = False, guest_faults: bool = True) -> T:
        """Await ``aw``, ending early with the right error if QEMU exits or the guest panics."""

    def qemu_alive(self) -> bool:
        """True while QEMU runs."""

    async def reset_agent(self) -> None:
        """Forget the agent connection and readiness (the guest is rebooting)."""

    def forget_guest_faults(self) -> None:
        """Forget console faults: the guest's state is being replaced (snapshot load)."""

    def operation_lock(self, timeout: float = ...) -> AbstractAsyncContextManager[None]:
        """The VM's operation lock, held while its state files change."""

    async def shutdown(self, timeout: float = ..., *, quit_timeout: float = ...,
                       term_timeout: float = ..., kill_timeout: float = ...) -> Any:
        """Stop the VM through the shutdown ladder."""
