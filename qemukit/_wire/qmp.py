"""The boundary to qemu.qmp: connect, execute, wait for events.

qemu.qmp's exceptions are translated here into qemukit's own, carrying
QEMU's error class and description. Every call takes a timeout; events are
awaited through listeners registered *before* the command that causes them,
so an event can never slip by between the command and the wait.

qemu.qmp logs each connection's troubles (at ERROR, and a CRITICAL "This is a
bug in the QMP library" when QEMU dies while a connect is being cancelled),
which qemukit reports through its own exceptions, with QEMU's own output. So
each client's logger is replaced by one that logs under ``qemukit.qmp`` at
DEBUG, naming qemu.qmp's level in the text: an application whose logging
shows warnings (pytest's log capture, a service's basicConfig) is not told
about a QMP library bug that is not one, an application that asks for
qemukit's debug output gets all of it, and qemu.qmp's own loggers are left
alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, Runstate
from qemu.qmp import QMPError as _LibQMPError

from ..errors import QMPCommandError, QMPConnectionError, WaitTimeout

__all__ = ["QMP", "EventListener", "connect_unix"]

log = logging.getLogger(__name__)


class _ClientLog(logging.LoggerAdapter[logging.Logger]):
    """One qemu.qmp connection's log records, sent to ``qemukit.qmp`` at DEBUG.

    Each message starts with the connection's name and qemu.qmp's own level;
    the record's ``client`` attribute holds the name too. An adapter rather
    than a child logger per connection: loggers live as long as the process,
    and every VM would add one.
    """

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        """Log ``msg`` at DEBUG, prefixed with the connection and qemu.qmp's level."""
        if not self.isEnabledFor(logging.DEBUG):
            return
        prefix = f"{(self.extra or {}).get('client')}: {logging.getLevelName(level)}: "
        if args:  # the prefix becomes part of a %-format string
            prefix = prefix.replace("%", "%%")
        text, options = self.process(prefix + str(msg), kwargs)
        self.logger.log(logging.DEBUG, text, *args, **options)


def _accept_none(event: Mapping[str, Any]) -> bool:
    """An event filter that lets nothing through (for qemu.qmp's unread default listener)."""
    return False


async def connect_unix(path: str, timeout: float) -> socket.socket:
    """Connect to a QEMU server socket, waiting (bounded) while another client holds it.

    QEMU serves one client per chardev socket and keeps later ones in a tiny
    listen backlog. A non-blocking connect fails with EAGAIN when that backlog
    is full; a blocking connect with a timeout instead sleeps in the kernel
    until there is room, so concurrent clients queue up without polling.
    """

    def blocking_connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    try:
        return await asyncio.to_thread(blocking_connect)
    except TimeoutError:
        raise WaitTimeout(f"a free connection slot on {path}", timeout) from None
    except OSError as exc:
        raise QMPConnectionError(f"cannot connect to {path}: {exc.strerror or exc}") from exc


class QMP:
    """One QMP connection (async). Commands and event waits are bounded in time."""

    def __init__(self, name: str = "qemukit") -> None:
        # No name for qemu.qmp: it would register a 'qemu.qmp.protocol.<name>' logger per VM.
        self._client = QMPClient()
        # qemu.qmp only calls the logging methods, which an adapter has too.
        self._client.logger = cast(logging.Logger, _ClientLog(log, {"client": name}))
        # qemu.qmp registers a default listener for every event (and refuses to remove
        # it); nothing here reads it, so it would queue every event QEMU ever sent, a
        # slow leak on a long-lived VM. qemukit waits on events through its own
        # listeners (listen()), so the default one is told to accept none.
        self._client.events.event_filter = _accept_none
        self.name = name

    def __repr__(self) -> str:
        return f"<QMP {self.name!r} {'connected' if self.connected else 'not connected'}>"

    @property
    def connected(self) -> bool:
        """True while the session is up."""
        return bool(self._client.runstate == Runstate.RUNNING)

    async def connect(self, address: str | socket.socket, timeout: float) -> None:
        """Connect to a monitor socket path, or over an already-connected socket."""
        try:
            await asyncio.wait_for(self._client.connect(address), timeout)
        except TimeoutError:
            await self._abort()
            raise WaitTimeout(f"the QMP greeting on {self._describe(address)}", timeout) from None
        except ConnectError as exc:
            raise QMPConnectionError(
                f"cannot connect to QMP at {self._describe(address)}: {exc.exc or exc}"
            ) from exc

    @staticmethod
    def _describe(address: str | socket.socket) -> str:
        return address if isinstance(address, str) else f"fd {address.fileno()}"

    async def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Run one QMP command and return its ``return`` value."""
        try:
            # asyncio.timeout, not wait_for: no extra task per command (about 10 us of the
            # ~0.3 ms round trip on Python 3.11, and every sync call pays it).
            async with asyncio.timeout(timeout):
                return await self._client.execute(command, arguments)
        except ExecuteError as exc:
            error = exc.error.error
            raise QMPCommandError(command, error.class_, error.desc) from exc
        except TimeoutError:
            raise WaitTimeout(f"QEMU's reply to QMP {command}", timeout) from None
        except (_LibQMPError, OSError, EOFError) as exc:
            raise QMPConnectionError(f"QMP {command}: connection lost ({exc})") from exc

    async def hand_over_fd(self, fd: int, prefix: str, *, timeout: float = 30.0) -> str:
        """Pass the open file ``fd`` to QEMU and name it there (``getfd``).

        Returns the name, for a ``fd:NAME`` URI or protocol (migrate, dump).
        QEMU keeps its own copy: the caller closes ``fd`` whenever it likes.
        """
        name = f"{prefix}-{secrets.token_hex(3)}"
        self.send_fd(fd)
        await self.execute("getfd", {"fdname": name}, timeout=timeout)
        return name

    def send_fd(self, fd: int) -> None:
        """Pass an open file descriptor to QEMU (for a following ``getfd``)."""
        try:
            self._client.send_fd_scm(fd)
        except (_LibQMPError, OSError) as exc:
            raise QMPConnectionError(f"cannot pass fd {fd} to QEMU: {exc}") from exc

    @contextlib.contextmanager
    def listen(
        self, *names: str, match: Callable[[Mapping[str, Any]], bool] | None = None
    ) -> Iterator[EventListener]:
        """Register a listener for events named ``names`` (optionally filtered)."""
        listener = EventListener(names or None, match)
        with self._client.listen(listener):
            yield listener

    async def wait_event(
        self, listener: EventListener, timeout: float | None, what: str
    ) -> dict[str, Any]:
        """The next event from ``listener``, or :class:`WaitTimeout` naming ``what``."""
        try:
            event = await asyncio.wait_for(listener.get(), timeout)
        except TimeoutError:
            raise WaitTimeout(what, timeout or 0) from None
        return dict(event)

    async def wait_disconnected(self) -> None:
        """Return once QEMU has closed the connection (e.g. after ``quit``)."""
        while self._client.runstate not in (Runstate.IDLE, Runstate.DISCONNECTING):
            await self._client.runstate_changed()

    async def close(self) -> None:
        """Disconnect; never raises for a connection that already died."""
        await self._abort()

    async def _abort(self) -> None:
        with contextlib.suppress(_LibQMPError, OSError, EOFError):
            await self._client.disconnect()
