"""The verbs test writers know from the NixOS test driver, as functions of a :class:`VerbTarget`.

``succeed``/``fail``, the ``wait_until_*`` retries, ``wait_for_open_port``
(read from the guest's ``/proc/net/tcp{,6}``, so no host forward is needed),
``wait_for_unit`` (systemd guests), ``wait_for_console_text``,
``screenshot`` (QMP ``screendump``), ``send_key``/``send_chars`` (QMP
``send-key``), ``crash`` (sysrq-c through the agent) and ``block``/``unblock``
(QMP ``set_link``). :class:`Verbs` carries a thin method for each, with
its docstring; :class:`AsyncVM` inherits them, and the sync :class:`VM`
derives its twins from those.

Every wait has a deadline. A wait that retries (nothing in the guest tells
the host that a port opened or a command would now succeed) tries at a
bounded interval, each try bounded by what is left of the deadline, and its
:class:`WaitTimeout` shows what the last try saw. A panic, an oops or QEMU's
exit ends any wait at once with its own error (the agent calls are guarded).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ipaddress
import logging
import math
import os
import re
import secrets
import struct
import time
import zlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from .._wire.agent import ExecResult
from .._wire.console import ConsoleWatcher
from ..errors import (
    CommandFailed,
    GuestError,
    GuestPanic,
    QMPCommandError,
    SpecError,
    StateError,
    WaitTimeout,
)
from ..timeouts import QMP_TIMEOUT

if TYPE_CHECKING:
    from .._launch.runtime import RuntimeDir
    from ..guest import AsyncGuest

__all__ = [
    "COMMAND_TIMEOUT",
    "KEY_NAMES",
    "RETRY_INTERVAL",
    "WAIT_TIMEOUT",
    "ConsoleSince",
    "ListeningSocket",
    "VerbTarget",
    "Verbs",
    "block",
    "char_keys",
    "crash",
    "fail",
    "listening_sockets",
    "png_size",
    "ppm_to_png",
    "screenshot",
    "send_chars",
    "send_key",
    "succeed",
    "wait_for_console_text",
    "wait_for_open_port",
    "wait_for_unit",
    "wait_until",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


class VerbTarget(Protocol):
    """The least a VM offers the verbs: its guest agent, monitor, console log and guarded wait.

    :class:`~qemukit.vm.AsyncVM` is one; a unit test passes a small fake.
    """

    #: Its runtime directory (None before start): a screenshot's scratch file goes there.
    runtime: RuntimeDir | None

    @property
    def name(self) -> str:
        """The VM's name, for errors."""

    @property
    def console_log(self) -> Path | None:
        """The serial console's log file."""

    @property
    def has_agent(self) -> bool:
        """True if the spec has an in-guest agent."""

    @property
    def guest(self) -> AsyncGuest:
        """The guarded guest agent."""

    def console_tail(self, max_lines: int = 30) -> str:
        """The last lines the guest printed."""

    async def qmp(self, /, command: str, arguments: Mapping[str, Any] | None = None, *,
                  timeout: float = ..., **kwargs: Any) -> Any:
        """Run one QMP command."""

    async def guarded(self, aw: Awaitable[T], timeout: float | None, what: str, *,
                      launching: bool = False, guest_io: bool = False,
                      guest_faults: bool = True) -> T:
        """Await ``aw``, ending early with the right error if QEMU exits or the guest panics."""

    async def wait_ready(self, timeout: float | None = None) -> float:
        """Wait until the guest agent answers."""

    async def exec(self, command: str | Sequence[str], *, timeout: float | None = 60.0,
                   check: bool = False, stdin: bytes | None = None) -> ExecResult:
        """Run a command in the guest."""

#: Default deadline of one command run by :func:`succeed` or :func:`fail`.
COMMAND_TIMEOUT = 60.0
#: Default deadline of the waits that retry (a port, a unit, a command, console text).
WAIT_TIMEOUT = 300.0
#: The longest pause between two tries of a retried wait (the first pauses are shorter).
RETRY_INTERVAL = 1.0
_FIRST_INTERVAL = 0.1

#: Where the console text is looked for: output from the call on, or also what came before.
ConsoleSince = Literal["now", "start"]
#: How much of the console log ``since="start"`` reads (its end).
_LOG_READ_LIMIT = 8 * 1024 * 1024
#: A console "line" without a newline is matched in pieces of at most this size.
_MAX_LINE = 64 * 1024
#: A line without a newline yet is matched after the console was quiet this long (seconds).
_QUIET = 0.3

#: QEMU's key names (QAPI ``QKeyCode``, QEMU 7.2), for :func:`send_key`.
KEY_NAMES = frozenset((
    "unmapped shift shift_r alt alt_r ctrl ctrl_r menu esc 1 2 3 4 5 6 7 8 9 0 minus equal "
    "backspace tab q w e r t y u i o p bracket_left bracket_right ret a s d f g h j k l "
    "semicolon apostrophe grave_accent backslash z x c v b n m comma dot slash asterisk spc "
    "caps_lock f1 f2 f3 f4 f5 f6 f7 f8 f9 f10 num_lock scroll_lock kp_divide kp_multiply "
    "kp_subtract kp_add kp_enter kp_decimal sysrq kp_0 kp_1 kp_2 kp_3 kp_4 kp_5 kp_6 kp_7 kp_8 "
    "kp_9 less f11 f12 print home pgup pgdn end left up down right insert delete stop again "
    "props undo front copy open paste find cut lf help meta_l meta_r compose pause ro hiragana "
    "henkan yen muhenkan katakanahiragana kp_comma kp_equals power sleep wake audionext "
    "audioprev audiostop audioplay audiomute volumeup volumedown mediaselect mail calculator "
    "computer ac_home ac_back ac_forward ac_refresh ac_bookmarks lang1 lang2"
).split())

# A US keyboard: the key of each printable character, and the characters typed with shift.
_PLAIN = {" ": "spc", "\n": "ret", "\t": "tab", "-": "minus", "=": "equal", "[": "bracket_left",
          "]": "bracket_right", "\\": "backslash", ";": "semicolon", "'": "apostrophe",
          ",": "comma", ".": "dot", "/": "slash", "`": "grave_accent"}
_SHIFTED = {"!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8",
            "(": "9", ")": "0", "_": "minus", "+": "equal", "{": "bracket_left",
            "}": "bracket_right", "|": "backslash", ":": "semicolon", '"': "apostrophe",
            "<": "comma", ">": "dot", "?": "slash", "~": "grave_accent"}


# -- commands ----------------------------------------------------------------------


#: The status of a command that qemukit's agent killed at its deadline (``timeout -s KILL``).
_KILLED = 128 + 9


async def _run(vm: VerbTarget, command: str | Sequence[str], timeout: float) -> ExecResult:
    """``command``'s result, the wait for a booting guest's agent included in ``timeout``.

    A command still running at the deadline is killed in the guest:
    :class:`WaitTimeout` with what it had printed. (qemukit's agent reports
    such a command as killed by SIGKILL; qemu-guest-agent's client raises.)
    """
    started = time.monotonic()
    await vm.wait_ready(timeout)
    limit = max(1.0, timeout - (time.monotonic() - started))
    result = await vm.guest.exec(command, limit)
    if result.exit_status == _KILLED and result.duration >= math.ceil(limit) - 0.5:
        # The deadline the caller gave, not what was left of it after the agent's wait.
        raise WaitTimeout(f"the guest command {command!r} to finish", timeout,
                          vm.console_tail(10), last=_describe(result, None))
    return result


async def succeed(vm: VerbTarget, command: str | Sequence[str], timeout: float) -> str:
    """Run ``command`` in the guest; its stdout if it exits 0, else :class:`CommandFailed`."""
    result = await _run(vm, command, timeout)
    if result.exit_status != 0:
        raise CommandFailed(command, result.exit_status, result.stdout_text, result.stderr_text,
                            expected="success")
    return result.stdout_text


async def fail(vm: VerbTarget, command: str | Sequence[str], timeout: float) -> str:
    """Run ``command`` in the guest; its stdout if it exits non-zero, else :class:`CommandFailed`."""
    result = await _run(vm, command, timeout)
    if result.exit_status == 0:
        raise CommandFailed(command, 0, result.stdout_text, result.stderr_text,
                            expected="failure")
    return result.stdout_text


def _describe(result: ExecResult | None, error: WaitTimeout | None) -> str:
    if error is not None:
        return f"the try itself timed out after {error.timeout:g}s" + (
            f"\n{error.last}" if error.last else "")
    if result is None:
        return ""
    text = f"exit status {result.exit_status}"
    for name, out in (("stdout", result.stdout_text), ("stderr", result.stderr_text)):
        out = out.rstrip()
        if out:
            text += f"\n{name}: " + (out if len(out) <= 2000 else "..." + out[-2000:])
    return text


async def _tries(deadline: float) -> AsyncGenerator[float, None]:
    """Yield the seconds left before each try until ``deadline``; between tries wait
    :data:`_FIRST_INTERVAL`, doubling up to :data:`RETRY_INTERVAL` (never past the deadline)."""
    interval = _FIRST_INTERVAL
    while (remaining := deadline - time.monotonic()) > 0:
        yield remaining
        await asyncio.sleep(max(0.0, min(interval, deadline - time.monotonic())))
        interval = min(interval * 2, RETRY_INTERVAL)


async def wait_until(vm: VerbTarget, command: str | Sequence[str], timeout: float, *,
                     succeeds: bool) -> str:
    """Run ``command`` until it exits 0 (``succeeds``) or non-zero; returns that try's stdout.

    Tries at most every :data:`RETRY_INTERVAL` seconds until ``timeout``; a
    try that does not finish within what is left is killed and counts as a
    failed try. The :class:`WaitTimeout` shows the last try's status and output.
    """
    last: ExecResult | None = None
    last_error: WaitTimeout | None = None
    async with contextlib.aclosing(_tries(time.monotonic() + timeout)) as tries:
        async for remaining in tries:
            try:
                last = await _run(vm, command, max(1.0, remaining))
                last_error = None
                if (last.exit_status == 0) == succeeds:
                    return last.stdout_text
            except WaitTimeout as exc:
                last_error = exc
            log.debug("%r: not yet (%s)", command, _describe(last, last_error))
    goal = "succeed" if succeeds else "fail"
    raise WaitTimeout(f"the guest command {command!r} to {goal}", timeout,
                      vm.console_tail(10), last=_describe(last, last_error))


# -- ports -------------------------------------------------------------------------


@dataclass(frozen=True)
class ListeningSocket:
    """A TCP socket listening in the guest, as ``/proc/net/tcp{,6}`` shows it."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int

    def accepts(self, addr: str | None) -> bool:
        """True if a connection to ``addr`` (any address if None) on :attr:`port` reaches it."""
        if addr is None or self.address.is_unspecified:
            return True
        wanted = ipaddress.ip_address(addr)
        mine = self.address
        if isinstance(mine, ipaddress.IPv6Address) and mine.ipv4_mapped is not None:
            mine = mine.ipv4_mapped
        return mine == wanted

    def __str__(self) -> str:
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        return f"{host}:{self.port}"


def _proc_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in the host's (little) endian."""
    raw = bytes.fromhex(text)
    if len(raw) not in (4, 16):
        raise ValueError(f"bad address {text!r}")
    # Each 32-bit word is printed as a number: undo x86's (and arm64's) little endian.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def listening_sockets(proc_net_tcp: str) -> list[ListeningSocket]:
    """The listening sockets in the text of ``/proc/net/tcp`` and ``/proc/net/tcp6``.

    Lines that do not parse (headers, a truncated read) are skipped: the text
    comes from the guest.
    """
    found = []
    for line in proc_net_tcp.splitlines():
        fields = line.split()
        # sl local_address rem_address st ...; state 0A is TCP_LISTEN.
        if len(fields) < 4 or fields[3] != "0A" or ":" not in fields[1]:
            continue
        addr_hex, _, port_hex = fields[1].partition(":")
        try:
            found.append(ListeningSocket(_proc_address(addr_hex), int(port_hex, 16)))
        except ValueError:
            continue
    return found


def _check_port(port: int, addr: str | None) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise SpecError("port", port, "must be a TCP port number, 1 to 65535")
    if addr is not None:
        try:
            ipaddress.ip_address(addr)
        except ValueError:
            raise SpecError("addr", addr, "must be an IP address (or None for any)") from None


async def wait_for_open_port(vm: VerbTarget, port: int, addr: str | None, timeout: float) -> None:
    """Wait until a TCP socket listens on ``port`` in the guest (on ``addr``, or any address).

    Reads ``/proc/net/tcp`` and ``/proc/net/tcp6`` through the agent: no
    host forward, no ``ss`` or ``netstat`` needed in the guest. A socket bound
    to the wildcard address counts for every ``addr``.
    """
    _check_port(port, addr)
    where = "any address" if addr is None else addr
    seen = ""
    async with contextlib.aclosing(_tries(time.monotonic() + timeout)) as tries:
        async for remaining in tries:
            try:
                result = await _run(vm, ["cat", "/proc/net/tcp", "/proc/net/tcp6"],
                                    max(1.0, remaining))
            except WaitTimeout:
                seen = "reading /proc/net/tcp timed out"
                continue
            sockets = listening_sockets(result.stdout_text)
            if any(s.port == port and s.accepts(addr) for s in sockets):
                return
            seen = "listening: " + (", ".join(sorted({str(s) for s in sockets})) or "nothing")
    raise WaitTimeout(f"TCP port {port} to open in the guest (on {where})", timeout,
                      vm.console_tail(10), last=seen)


# -- systemd units -----------------------------------------------------------------


async def wait_for_unit(vm: VerbTarget, unit: str, timeout: float) -> None:
    """Wait until the systemd ``unit`` is active; fail at once if it failed or there is no systemd.

    A unit that is ``inactive`` or ``activating`` is waited for (it may be
    started later); ``failed`` raises :class:`GuestError` with ``systemctl
    status``. On a guest without systemd (no ``/run/systemd/system``)
    :class:`StateError` is raised at once.
    """
    if not isinstance(unit, str) or not unit or "\n" in unit or unit.startswith("-"):
        raise SpecError("unit", unit, "must be a systemd unit name, e.g. 'sshd.service'")
    deadline = time.monotonic() + timeout
    probe = await _run(vm, ["test", "-d", "/run/systemd/system"], max(1.0, timeout))
    if probe.exit_status != 0:
        raise StateError(f"VM {vm.name!r} does not run systemd (its guest has no "
                         f"/run/systemd/system): wait_for_unit({unit!r}) needs a systemd guest")
    state = ""
    async with contextlib.aclosing(_tries(deadline)) as tries:
        async for remaining in tries:
            try:
                result = await _run(vm, ["systemctl", "is-active", "--", unit], max(1.0, remaining))
            except WaitTimeout:
                state = "systemctl is-active timed out"
                continue
            state = result.stdout_text.strip() or result.stderr_text.strip()
            if state == "active":
                return
            if state == "failed":
                status = await _run(vm, ["systemctl", "status", "--no-pager", "--lines=20",
                                         "--", unit], 30.0)
                raise GuestError(f"systemd unit {unit!r} failed in VM {vm.name!r}"
                                 f"\n--- systemctl status ---\n{status.stdout_text.rstrip()}")
    raise WaitTimeout(f"systemd unit {unit!r} to be active", timeout, vm.console_tail(10),
                      last=f"systemctl is-active: {state}")


# -- console -----------------------------------------------------------------------


class _LineMatcher:
    """A console sink that resolves :attr:`found` with the first line matching a pattern.

    It also passes every chunk to the sink it replaced (``follow_console``'s).
    A line not ended yet (a ``login:`` prompt) is matched once the console has
    been quiet for :data:`_QUIET` seconds, so a line printed in pieces is not
    matched half-way.
    """

    def __init__(self, pattern: re.Pattern[str], previous: Callable[[bytes], None] | None) -> None:
        self.pattern = pattern
        self.previous = previous
        self._loop = asyncio.get_running_loop()
        self.found: asyncio.Future[str] = self._loop.create_future()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._partial = ""
        self._quiet: asyncio.TimerHandle | None = None

    def _match(self, line: str) -> bool:
        if not self.found.done() and self.pattern.search(line):
            self.found.set_result(line)
        return self.found.done()

    def feed_text(self, text: str) -> None:
        if self.found.done():
            return
        if self._quiet is not None:
            self._quiet.cancel()
            self._quiet = None
        data = self._partial + text.replace("\r", "")
        *lines, self._partial = data.split("\n")
        if len(self._partial) > _MAX_LINE:
            lines.append(self._partial)
            self._partial = ""
        if any(self._match(line) for line in lines):
            return
        if self._partial and self.pattern.search(self._partial):
            self._quiet = self._loop.call_later(_QUIET, self._match, self._partial)

    def close(self) -> None:
        if self._quiet is not None:
            self._quiet.cancel()
        if not self.found.done():
            self.found.cancel()

    def __call__(self, chunk: bytes) -> None:
        if self.previous is not None:
            try:
                self.previous(chunk)
            except Exception:
                log.exception("console sink failed; no longer showing the console")
                self.previous = None
        self.feed_text(self._decoder.decode(chunk))


def _read_log(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - _LOG_READ_LIMIT))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


async def wait_for_console_text(vm: VerbTarget, console: ConsoleWatcher | None, regex: str,
                                timeout: float, since: ConsoleSince) -> str:
    """Wait for a console line matching ``regex``; returns the line.

    ``since="now"`` matches what the guest prints from the call on;
    ``since="start"`` also what it printed before (from the console log).
    """
    if since not in ("now", "start"):
        raise SpecError("since", since, "must be 'now' or 'start'")
    try:
        pattern = re.compile(regex)
    except (re.error, TypeError) as exc:
        raise SpecError("regex", regex, f"not a regular expression: {exc}") from None
    if console is None:
        raise StateError(f"VM {vm.name!r} has no console watcher (no serial console, or "
                         "attached from another process): cannot wait for console text")
    matcher = _LineMatcher(pattern, console.sink)
    console.sink = matcher
    try:
        if since == "start":
            # Installed first, read second: a line printed in between is seen (maybe twice).
            await console.settle()
            for line in _read_log(vm.console_log).replace("\r", "").split("\n"):
                if matcher._match(line):
                    break
        return await vm.guarded(asyncio.shield(matcher.found), timeout,
                                f"console text matching {regex!r}")
    finally:
        if console.sink is matcher:
            console.sink = matcher.previous
        matcher.close()


# -- display and keyboard ----------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """A PNG's width and height from its IHDR chunk; :class:`ValueError` if it is not a PNG."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file (no signature and IHDR chunk)")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def ppm_to_png(ppm: bytes) -> bytes:
    """A binary PPM (P6, 8 bits, as QEMU's ``screendump`` writes it) as a PNG, in pure Python."""
    match = re.match(rb"P6\s+(?:#[^\n]*\n\s*)*(\d+)\s+(\d+)\s+(\d+)\s", ppm)
    if not match:
        raise ValueError("not a binary PPM (P6) image")
    width, height, maxval = (int(g) for g in match.groups())
    if maxval != 255 or width <= 0 or height <= 0:
        raise ValueError(f"unsupported PPM: {width}x{height}, maxval {maxval}")
    pixels = ppm[match.end():]
    stride = width * 3
    if len(pixels) < stride * height:
        raise ValueError(f"PPM data too short for {width}x{height}")
    rows = b"".join(b"\x00" + pixels[y * stride:(y + 1) * stride] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", zlib.compress(rows, 6)) + _png_chunk(b"IEND", b""))


async def screenshot(vm: VerbTarget, path: str | os.PathLike[str], timeout: float) -> Path:
    """Write the VM's display to ``path`` as a PNG; returns the absolute path.

    QEMU writes the image (``screendump``, PNG where it can, else PPM that is
    converted here) into the VM's private runtime directory; it is checked
    and then written to ``path`` (replaced if it exists). A VM without a
    display device raises :class:`StateError`.
    """
    target = Path(path).absolute()
    if not target.parent.is_dir():
        raise SpecError("path", str(target), "its directory does not exist")
    if vm.runtime is None:
        raise StateError(f"VM {vm.name!r} has no runtime directory to take a screenshot in")
    scratch = vm.runtime.path / f"screendump-{secrets.token_hex(4)}"
    try:
        try:
            await vm.qmp("screendump", filename=str(scratch), format="png", timeout=timeout)
            data = scratch.read_bytes()
        except QMPCommandError as exc:
            if "no console" in exc.description.lower():
                raise StateError(
                    f"VM {vm.name!r} has no display to take a screenshot of (add a display "
                    "device, e.g. extra_args=('-device', 'VGA'))") from exc
            if "format" not in exc.description:
                raise
            # A QEMU without PNG support (before 7.1, or built without libpng): PPM.
            await vm.qmp("screendump", filename=str(scratch), timeout=timeout)
            data = ppm_to_png(scratch.read_bytes())
    finally:
        scratch.unlink(missing_ok=True)
    png_size(data)  # written by QEMU: check it is what we promise before handing it on
    target.write_bytes(data)
    return target


def _keys(keys: Sequence[str]) -> list[str]:
    names = [name for key in keys for name in (key.split("-") if isinstance(key, str) else [key])]
    if not names:
        raise SpecError("keys", tuple(keys), "name at least one key, e.g. 'ret' or 'ctrl-alt-delete'")
    for name in names:
        if not isinstance(name, str) or name.lower() not in KEY_NAMES:
            raise SpecError("keys", name, "not a QEMU key name (QKeyCode), e.g. ret, spc, esc, "
                                          "ctrl, alt, shift, delete, a, 1, f1")
    return [name.lower() for name in names]


def char_keys(char: str) -> list[str]:
    """The keys pressed together to type ``char`` on a US keyboard (shift first if needed)."""
    if len(char) == 1 and ("a" <= char <= "z" or "0" <= char <= "9"):
        return [char]
    if len(char) == 1 and "A" <= char <= "Z":
        return ["shift", char.lower()]
    if char in _PLAIN:
        return [_PLAIN[char]]
    if char in _SHIFTED:
        return ["shift", _SHIFTED[char]]
    raise SpecError("text", char, "cannot be typed on a US keyboard (printable ASCII, "
                                  "newline and tab only)")


async def _press(vm: VerbTarget, names: Sequence[str], hold_time: int | None) -> None:
    args: dict[str, object] = {"keys": [{"type": "qcode", "data": n} for n in names]}
    if hold_time is not None:
        args["hold-time"] = hold_time
    await vm.qmp("send-key", args)


async def send_key(vm: VerbTarget, keys: Sequence[str], hold_time: float | None) -> None:
    """Press ``keys`` together and release them (``"ctrl-alt-delete"`` is three keys)."""
    names = _keys(keys)
    if hold_time is not None and not 0 < hold_time <= 60:
        raise SpecError("hold_time", hold_time, "must be between 0 and 60 seconds")
    await _press(vm, names, None if hold_time is None else max(1, round(hold_time * 1000)))


async def send_chars(vm: VerbTarget, text: str) -> None:
    """Type ``text`` on the VM's keyboard, one key press per character."""
    if not isinstance(text, str):
        raise SpecError("text", text, "must be a string")
    presses = [char_keys(c) for c in text]  # all checked before the first key goes out
    for names in presses:
        await _press(vm, names, None)


# -- crash and links ---------------------------------------------------------------


async def crash(vm: VerbTarget, timeout: float) -> GuestPanic:
    """Make the guest kernel panic (sysrq-c through the agent); returns the panic seen.

    The VM's console watcher reports the panic as it reports any other
    (:class:`GuestPanic`, returned here rather than raised); QEMU then exits
    (``no_reboot``) or the guest reboots.
    """
    if not vm.has_agent:
        raise StateError(f"VM {vm.name!r} has no guest agent to crash its kernel with")
    try:
        await vm.exec("echo c > /proc/sysrq-trigger", timeout=timeout)
    except GuestPanic as exc:
        return exc
    raise GuestError(f"the guest of VM {vm.name!r} did not panic on sysrq-c (its kernel may "
                     "lack CONFIG_MAGIC_SYSRQ)" + "\n--- console ---\n" + vm.console_tail(10))


async def _nic_ids(vm: VerbTarget) -> list[str]:
    """The ids of the VM's NICs: the devices with a ``netdev`` property (boot and hotplugged)."""
    ids = []
    for child in await vm.qmp("qom-list", path="/machine/peripheral"):
        if not str(child.get("type", "")).startswith("child<"):
            continue
        try:
            await vm.qmp("qom-get", path=f"/machine/peripheral/{child['name']}", property="netdev")
        except QMPCommandError:
            continue
        ids.append(str(child["name"]))
    return ids


async def block(vm: VerbTarget, nic: str | None, up: bool) -> list[str]:
    """Set the link of ``nic`` (a device id), or of every NIC, down or up; returns the ids."""
    ids = await _nic_ids(vm)
    if nic is not None:
        if nic not in ids:
            raise SpecError("nic", nic, f"VM {vm.name!r} has no such NIC; its NICs: "
                                        f"{', '.join(ids) or 'none'}")
        ids = [nic]
    elif not ids:
        raise StateError(f"VM {vm.name!r} has no NIC whose link could be "
                         f"{'restored' if up else 'cut'}")
    for dev in ids:
        await vm.qmp("set_link", name=dev, up=up)
    return ids


# -- the verbs as methods -------------------------------------------------------------

# Under mypy the mixin is a VerbTarget (AsyncVM, which inherits it, must implement the
# protocol, and each method hands ``self`` on as one); at run time a plain base class,
# so the methods' signatures (and the public surface) show an unannotated ``self``.
if TYPE_CHECKING:
    _Base = VerbTarget
else:
    _Base = object


class Verbs(_Base):
    """The verbs as methods, for :class:`~qemukit.vm.AsyncVM` to inherit (see the module)."""

    async def succeed(self, command: str | Sequence[str], *,
                      timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``command`` in the guest and return its stdout; it must exit 0.

        A list runs as argv, a string as shell code. A non-zero exit raises
        :class:`~qemukit.errors.CommandFailed` (status, stdout and stderr);
        a command still running at ``timeout`` is killed: :class:`WaitTimeout`.
        """
        return await succeed(self, command, timeout)

    async def fail(self, command: str | Sequence[str], *,
                   timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``command`` in the guest and return its stdout; it must exit non-zero.

        An exit status of 0 raises :class:`~qemukit.errors.CommandFailed`.
        """
        return await fail(self, command, timeout)

    async def wait_until_succeeds(self, command: str | Sequence[str], *,
                                  timeout: float = WAIT_TIMEOUT) -> str:
        """Run ``command`` until it exits 0 (at most about once a second); returns its stdout.

        Each try is bounded by what is left of ``timeout``; the
        :class:`WaitTimeout` shows the last try's exit status and output.
        """
        return await wait_until(self, command, timeout, succeeds=True)

    async def wait_until_fails(self, command: str | Sequence[str], *,
                               timeout: float = WAIT_TIMEOUT) -> str:
        """Run ``command`` until it exits non-zero; returns that try's stdout."""
        return await wait_until(self, command, timeout, succeeds=False)

    async def wait_for_open_port(self, port: int, *, addr: str | None = None,
                                 timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until a TCP socket listens on ``port`` inside the guest.

        Read from the guest's ``/proc/net/tcp{,6}`` through the agent, so no
        host forward is needed. ``addr`` (e.g. ``"127.0.0.1"``) asks for a
        socket that accepts connections to that address (a wildcard bind
        counts); None: any. :class:`WaitTimeout` names the port, the deadline
        and the sockets that were listening.
        """
        await wait_for_open_port(self, port, addr, timeout)

    async def wait_for_unit(self, unit: str, *, timeout: float = WAIT_TIMEOUT) -> None:
        """Wait until the systemd ``unit`` is active (``systemctl is-active``).

        A unit in state ``failed`` raises :class:`~qemukit.errors.GuestError`
        at once, with its ``systemctl status``; a guest without systemd
        raises :class:`StateError` at once.
        """
        await wait_for_unit(self, unit, timeout)

    async def screenshot(self, path: str | os.PathLike[str], *,
                         timeout: float = QMP_TIMEOUT) -> Path:
        """Save the VM's display as a PNG at ``path``; returns its absolute path.

        Needs a display device (e.g. ``extra_args=("-device", "VGA")``): a VM
        without one raises :class:`StateError`.
        """
        return await screenshot(self, path, timeout)

    async def send_key(self, *keys: str, hold_time: float | None = None) -> None:
        """Press ``keys`` together, then release them: ``send_key("ctrl", "alt", "delete")``.

        Keys are QEMU's names (QKeyCode: ``ret``, ``spc``, ``esc``, ``a``,
        ``f1``...); ``"ctrl-alt-delete"`` is the same as three names.
        ``hold_time`` (seconds) is how long they stay down (QEMU's default 0.1).
        """
        await send_key(self, keys, hold_time)

    async def send_chars(self, text: str) -> None:
        """Type ``text`` on the VM's keyboard (US layout; shift for capitals and symbols).

        Every character is checked before the first key is sent.
        """
        await send_chars(self, text)

    async def crash(self, *, timeout: float = COMMAND_TIMEOUT) -> GuestPanic:
        """Make the guest kernel panic (sysrq-c through the agent); returns the :class:`GuestPanic`.

        The panic is reported as any other (later waits raise it; QEMU exits
        under ``no_reboot``); here it is returned, since it was asked for.
        """
        return await crash(self, timeout)

    async def block(self, nic: str | None = None) -> list[str]:
        """Cut the link of ``nic`` (a device id, e.g. ``net0``), or of every NIC; returns the ids.

        QMP ``set_link``: the guest sees its carrier go down until :meth:`unblock`.
        """
        return await block(self, nic, up=False)

    async def unblock(self, nic: str | None = None) -> list[str]:
        """Restore the link of ``nic``, or of every NIC; returns the ids."""
        return await block(self, nic, up=True)
