"""Exceptions raised by qemukit.

Every error qemukit raises derives from :class:`QemukitError`, so one
``except QemukitError`` catches them all. Each subclass carries the context a
user needs to act on it without rerunning anything::

    QemukitError
    ├── SpecError            a VM description field has a bad value (field, value)
    ├── HostError            the host lacks something (QEMU binary, firmware, image)
    │   └── AcceleratorError the asked-for accelerator does not work here (reason)
    ├── LaunchError          QEMU did not come up (argv, exit status, its stderr)
    ├── StateError           an operation does not fit the VM's lifecycle state
    ├── HotplugError         a hotplug or unplug was refused, rolled back or not released
    │                        (field, value, device, QEMU's error)
    ├── SnapshotError        a snapshot, state save or restore cannot be done (why, what to do)
    ├── WaitTimeout          a bounded wait expired (what, timeout, console tail)
    ├── QMPError             talking to QEMU's monitor failed
    │   ├── QMPCommandError  QEMU answered a command with an error (class, desc)
    │   └── QMPConnectionError the monitor connection was lost or never made
    └── GuestError           the guest misbehaved
        ├── CommandFailed    a guest command ended other than expected by succeed()/fail()
        │                    (command, exit status, stdout and stderr tails)
        ├── GuestPanic       the guest kernel panicked (panic line, console tail)
        ├── GuestOops        the guest kernel oopsed or hit a BUG and runs on (line, console tail)
        ├── ShareMountError  the guest could not mount a host share (tag, path, transport,
        │                    the kernel's error, the likely missing CONFIG_ option)
        ├── GuestIOError     QEMU paused the guest on a disk I/O error (node, reason)
        └── AgentError       the in-guest agent answered garbage or went away
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: `import qemukit` stays cheap
    from collections.abc import Sequence
    from typing import Any

__all__ = [
    "AcceleratorError",
    "AgentError",
    "CommandFailed",
    "GuestError",
    "GuestIOError",
    "GuestOops",
    "GuestPanic",
    "HostError",
    "HotplugError",
    "LaunchError",
    "QMPCommandError",
    "QMPConnectionError",
    "QMPError",
    "QemukitError",
    "ShareMountError",
    "SnapshotError",
    "SpecError",
    "StateError",
    "WaitTimeout",
]


def _tail_block(title: str, text: str | None) -> str:
    if not text:
        return ""
    return f"\n--- {title} ---\n{text.rstrip()}"


class QemukitError(Exception):
    """Root of every exception qemukit raises."""


class SpecError(QemukitError, ValueError):
    """A VM description has a bad value; raised before any process starts."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}={value!r}: {reason}")


class HostError(QemukitError):
    """The host lacks something qemukit needs (a QEMU binary, firmware, an image)."""


class AcceleratorError(HostError):
    """The requested accelerator cannot be used on this host."""

    def __init__(self, accel: str, reason: str) -> None:
        self.accel = accel
        self.reason = reason
        super().__init__(f"accelerator {accel!r} is not usable on this host: {reason}")


class LaunchError(QemukitError):
    """QEMU exited or refused to start; carries its argv, exit status and stderr."""

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str] = (),
        returncode: int | None = None,
        stderr: str = "",
        console: str = "",
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        self.console = console
        text = message
        if returncode is not None:
            text += f" (exit status {returncode})"
        text += _tail_block("QEMU output", stderr)
        text += _tail_block("console", console)
        if self.argv:
            text += "\n--- command line ---\n" + " ".join(self.argv)
        super().__init__(text)


class StateError(QemukitError):
    """The VM is not in a state that allows the operation (e.g. used after shutdown)."""


class HotplugError(QemukitError):
    """A hotplug or unplug could not be done; QEMU is left as it was, or as the message says.

    Raised by the preflight before QEMU is touched (``field`` and ``value``
    name what was rejected), after a refused ``device_add`` whose backend was
    rolled back (``qmp_error`` is QEMU's own error), and when the guest
    refuses or does not release a device in time (the device stays plugged).
    ``device`` is the device id concerned, when there is one.
    """

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        value: Any = None,
        device: str | None = None,
        qmp_error: str | None = None,
    ) -> None:
        self.field = field
        self.value = value
        self.device = device
        self.qmp_error = qmp_error
        super().__init__(message)


class SnapshotError(QemukitError):
    """A snapshot, state save or restore was refused or failed.

    ``problems`` lists each reason found by the preflight (the device and
    what to do instead); ``job_error`` is QEMU's own error for a failed job.
    """

    def __init__(
        self, message: str, *, problems: Sequence[str] = (), job_error: str | None = None
    ) -> None:
        self.problems = list(problems)
        self.job_error = job_error
        text = message + "".join(f"\n  - {p}" for p in self.problems)
        super().__init__(text)


class WaitTimeout(QemukitError, TimeoutError):
    """A bounded wait expired; says what was awaited and shows the latest output.

    ``last`` is what the last try saw, for waits that retry (a command's
    output, the ports that were open).
    """

    def __init__(self, what: str, timeout: float, console: str = "", *, last: str = "") -> None:
        self.what = what
        self.timeout = timeout
        self.console = console
        self.last = last
        super().__init__(
            f"timed out after {timeout:g}s waiting for {what}" + _tail_block("last try", last)
            + _tail_block("console", console)
        )


class QMPError(QemukitError):
    """Talking to QEMU's QMP monitor failed."""


class QMPCommandError(QMPError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, description: str) -> None:
        self.command = command
        self.error_class = error_class
        self.description = description
        super().__init__(f"QMP {command}: {error_class}: {description}")


class QMPConnectionError(QMPError):
    """The QMP connection could not be made or was lost."""


class GuestError(QemukitError):
    """The guest did something that stops the operation."""


#: How much of a failed command's stdout and stderr :class:`CommandFailed` quotes.
OUTPUT_TAIL = 2000


def _output_tail(text: str) -> str:
    text = text.rstrip()
    return text if len(text) <= OUTPUT_TAIL else "..." + text[-OUTPUT_TAIL:]


class CommandFailed(GuestError):
    """A guest command run by ``succeed()`` exited non-zero, or by ``fail()`` exited 0.

    ``command`` is the argv (a tuple) or the shell script (a string) as given,
    ``exit_status`` its status, ``stdout`` and ``stderr`` its output (whole;
    the message quotes their last :data:`OUTPUT_TAIL` characters) and
    ``expected`` what the caller wanted: ``"success"`` or ``"failure"``.
    """

    def __init__(self, command: str | Sequence[str], exit_status: int, stdout: str = "",
                 stderr: str = "", *, expected: str = "success") -> None:
        self.command: str | tuple[str, ...] = (command if isinstance(command, str)
                                               else tuple(command))
        self.exit_status = exit_status
        self.stdout = stdout
        self.stderr = stderr
        self.expected = expected
        super().__init__(
            f"guest command {self.command!r} exited with status {exit_status} "
            f"(expected {expected})" + _tail_block("stdout", _output_tail(stdout))
            + _tail_block("stderr", _output_tail(stderr))
        )


class GuestPanic(GuestError):
    """The guest kernel panicked (it stopped); carries the panic line."""

    def __init__(self, line: str, console: str = "") -> None:
        self.line = line
        self.console = console
        super().__init__(f"guest kernel panic: {line}" + _tail_block("console", console))


class GuestOops(GuestError):
    """The guest kernel oopsed or hit a ``BUG:``; it kept running, but the result is untrustworthy.

    ``line`` is the first line of the report (e.g. ``BUG: kernel NULL pointer
    dereference, address: 0000000000000000``). Raised unless the VM was made
    with ``continue_on_oops=True``.
    """

    def __init__(self, line: str, console: str = "") -> None:
        self.line = line
        self.console = console
        super().__init__(f"guest kernel oops (the kernel kept running): {line}"
                         + _tail_block("console", console))


class ShareMountError(GuestError):
    """The guest could not mount a host share, so a command would run without it.

    ``tag`` and ``guest_path`` name the share, ``transport`` the file system
    meant (``virtiofs`` or ``9p``), ``reason`` the guest kernel's error and
    ``hint`` what is likely missing (e.g. ``CONFIG_9P_FS``).
    """

    def __init__(self, tag: str, guest_path: str, transport: str, reason: str, *,
                 host_path: str | None = None, hint: str = "", console: str = "") -> None:
        self.tag = tag
        self.guest_path = guest_path
        self.transport = transport
        self.reason = reason
        self.host_path = host_path
        self.hint = hint
        self.console = console
        host = f" (host {host_path})" if host_path else ""
        super().__init__(
            f"the guest could not mount share {tag!r}{host} on {guest_path} with {transport}: "
            f"{reason}" + (f"; {hint}" if hint else "") + _tail_block("console", console)
        )


class AgentError(GuestError):
    """The in-guest agent answered something unexpected or went away."""


class GuestIOError(GuestError):
    """QEMU stopped the guest after a disk I/O error (e.g. the host disk is full)."""

    def __init__(self, node: str, operation: str, reason: str) -> None:
        self.node = node
        self.operation = operation
        self.reason = reason
        super().__init__(
            f"QEMU paused the guest: {operation} error on block node {node!r}: {reason}"
            + (" (the disk holding the image or overlay is full)" if "space" in reason else "")
        )
