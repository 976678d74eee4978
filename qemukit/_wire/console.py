"""The guest's serial console: drained continuously, scanned for kernel events.

A connected console socket that nobody reads fills up and stalls the guest's
UART, so once connected the watcher keeps reading. QEMU also writes every
byte to the console log, which is what error messages quote.

Who writes the log: a VM's launcher that lives as long as the VM (the usual
case) hands QEMU a console connection made before QEMU starts (loopback TCP,
which holds megabytes of the UART's one-byte writes where a Unix socket holds
about 280 bytes: see :func:`qemukit._launch.start._console_connection`) and
the watcher writes the log itself, every chunk as it is read: the log is the
stream, byte for byte.
QEMU's own ``logfile=`` is not: QEMU 7.2's ``qemu_chr_write_buffer`` logs a
write that failed with ``EAGAIN`` (a full socket: the reader is slow) as if
it were final, and the UART (``hw/char/serial.c``) then retries the byte,
which is logged again when it goes through, so a loaded host's log reads
``skiipped``. A detached VM, whose launcher exits, keeps QEMU's log: nobody
reads its socket then (a write to an unconnected socket fails with ``EIO``,
which the UART does not retry, so each byte is logged once), except a
``qemukit console`` or ``logs -f`` attached for a while.

Each console line is classified by :func:`classify` (formats from the Linux
sources, checked against real output of Debian's 6.1 kernel):

``panic``
    ``Kernel panic - not syncing``: the kernel stopped. Always ends the run.
``oops``
    an oops or ``BUG:`` after which the kernel keeps running (the task is
    killed): ``BUG: kernel NULL pointer dereference``, ``BUG: unable to
    handle page fault``, ``kernel BUG at FILE:LINE!``, ``general protection
    fault``, any die header ``...: 0000 [#1]``, ``Unable to handle kernel
    ...`` (arm, arm64, riscv). Ends the run unless ``continue_on_oops``.
``warning``
    soft and hard lockups, workqueue lockups, RCU stalls, hung tasks,
    ``WARNING:`` and ``UBSAN:`` reports, lockdep and kmemleak reports:
    recorded, never end anything (emulated CPUs stall for seconds on a loaded
    host).

Reports of the kernel's debugging tools also get a :attr:`ConsoleEvent.report`
naming the tool, and every kernel event collects the report's first lines
(:data:`REPORT_LINES`) in :attr:`ConsoleEvent.lines`:

``kasan``, ``kcsan`` (kind ``oops``)
    ``BUG: KASAN: ...`` (mm/kasan/report.c), ``BUG: KCSAN: ...``
    (kernel/kcsan/report.c). The kernel calls them bugs: KASAN saw memory
    used out of bounds or after free, KCSAN a data race, so what the test
    ran on is broken whether or not it crashed. They end the run like an
    oops (unless ``continue_on_oops``); with ``panic_on_warn`` the kernel
    itself panics after them.
``ubsan`` (kind ``warning``)
    ``UBSAN: <what> in FILE:LINE:COL`` (lib/ubsan.c): undefined behaviour the
    compiler's checks caught, often in arithmetic that has no effect (a shift
    too large); the kernel treats it as a warning (``panic_on_warn`` panics).
``lockdep``, ``hung_task``, ``kmemleak`` (kind ``warning``)
    lockdep's ``WARNING: possible circular locking dependency detected`` and
    its other reports (kernel/locking/lockdep.c: a deadlock that could happen,
    not one that did), ``INFO: task NAME:PID blocked for more than N
    seconds.`` (kernel/hung_task.c: on an emulated CPU, often only slowness),
    ``kmemleak: N new suspected memory leaks`` and ``unreferenced object``
    (mm/kmemleak.c). Warnings in the kernel's own terms.
``share``
    the tiny guest's ``qemukit-init: share-error`` line: a host share could
    not be mounted (see :func:`share_error`). Ends the run.

The log is capped: a guest printing without end (``yes > /dev/console``)
must not fill the disk. Once ``console.log`` passes ``max_log_bytes``
(:data:`CONSOLE_LOG_MAX`) the watcher moves it to ``console.log.1`` (replacing
the one before) and empties it, so the log keeps between one and two caps'
worth of the latest output; :func:`log_tail` reads across the two. When QEMU
writes the log (in append mode) it goes on at the start of the emptied file,
and what it writes between the copy and the truncation (microseconds) is lost
from the log, never from the events: those come from the socket's stream.
When the watcher writes the log it renames it instead, and nothing is lost.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import re
import shutil
import socket
import termios
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .._aio import cancel_and_wait
from ..errors import GuestOops, GuestPanic, QemukitError, ShareMountError

__all__ = [
    "CONSOLE_LOG_MAX",
    "MAX_EVENTS",
    "REPORT_KINDS",
    "REPORT_LINES",
    "ConsoleEvent",
    "ConsoleWatcher",
    "EventKind",
    "classify",
    "classify_text",
    "first_fatal",
    "log_tail",
    "rotate_log",
    "share_error",
]

log = logging.getLogger(__name__)

EventKind = Literal["panic", "oops", "warning", "share"]

#: Bytes of console log past which the watcher rotates it (see the module's docstring).
CONSOLE_LOG_MAX = 16 << 20

#: At most this many events are kept per VM (a storm of stall reports is not a memory leak).
MAX_EVENTS = 200
#: A "line" longer than this (a program writing without newlines) is scanned in pieces.
_MAX_LINE = 64 * 1024
#: At most this many lines of a report (its first line included) are kept in the event.
REPORT_LINES = 16
#: The debugging tools whose reports are told apart (:attr:`ConsoleEvent.report`).
REPORT_KINDS = ("kasan", "kcsan", "ubsan", "lockdep", "hung_task", "kmemleak")

_PANIC = re.compile(r"Kernel panic - not syncing")
# The debugging tools' reports, by tool, with the event kind each is (see the module doc).
_REPORTS: tuple[tuple[str, EventKind, re.Pattern[str]], ...] = (
    ("kasan", "oops", re.compile(r"\bBUG: KASAN: ")),            # mm/kasan/report.c
    ("kcsan", "oops", re.compile(r"\bBUG: KCSAN: ")),            # kernel/kcsan/report.c
    ("ubsan", "warning", re.compile(r"\bUBSAN: \S.* in ")),       # lib/ubsan.c ubsan_prologue
    ("lockdep", "warning", re.compile(                          # kernel/locking/lockdep.c
        r"\bWARNING: (?:possible circular locking dependency detected"
        r"|possible recursive locking detected|inconsistent lock state"
        r"|possible irq lock inversion dependency detected|\S+-safe -> \S+-unsafe lock order"
        r"|bad unlock balance detected|held lock freed|Nested lock was not taken"
        r"|lock held when returning to user space|chain_key collision|bad contention detected"
        r"|suspicious RCU usage|\S+/\d+ still has locks held)"
        r"|\bINFO: trying to register non-static key"
        r"|\bBUG: MAX_\w+ too low!")),                              # lockdep turns itself off
    ("hung_task", "warning",
     re.compile(r"\bINFO: task .+ blocked for more than \d+ seconds")),  # kernel/hung_task.c
    ("kmemleak", "warning", re.compile(                         # mm/kmemleak.c
        r"\bkmemleak: \d+ new suspected memory leaks"
        # kmemleak=on verbose scans print it (pr_fmt "kmemleak: "); so does a cat of
        # /sys/kernel/debug/kmemleak to the console, without the prefix (syzkaller's way).
        r"|\bunreferenced object 0x[0-9a-f]+ \(size \d+\):")),
)
# The line that closes a KASAN, KCSAN or UBSAN report (and opens one; lockdep's too).
_RULE = re.compile(r"^={20,}$")
# Checked before the oops patterns: "BUG: soft lockup" is a BUG: line that is only a warning.
_WARNINGS = re.compile(
    r"BUG: soft lockup - CPU#\d+ stuck for"              # kernel/watchdog.c
    r"|Watchdog detected hard LOCKUP on cpu"             # kernel/watchdog_hld.c
    r"|BUG: workqueue lockup - pool"                     # kernel/workqueue.c
    r"|INFO: \S+ (?:self-)?detected (?:expedited )?stalls? on"  # kernel/rcu/tree_stall.h, tasks.h
    r"|INFO: task .+ blocked for more than \d+ seconds"   # kernel/hung_task.c
    r"|\bWARNING: "                                      # kernel/panic.c __warn, lockdep
    r"|\bUBSAN: "                                        # lib/ubsan.c
)
_OOPS = re.compile(
    r"\bBUG: "                                           # mm/fault, sched, KASAN, ...
    r"|\bkernel BUG at \S+!"                             # lib/bug.c (BUG_ON)
    r"|general protection fault"                         # arch/x86/kernel/traps.c
    r"|: [0-9a-f]+(?: ilc:\d+)? \[#\d+\]"                # die header: x86, arm, arm64, ppc, s390
    r"|\bOops(?: - \w+)?(?::| \[#\d+\])"                 # "Oops: 0002 [#1]", riscv "Oops [#1]"
    r"|\bUnable to handle kernel (?:NULL pointer|paging request|access|data access)"
)
# The end of an oops or WARN report (kernel/panic.c print_oops_end_marker).
_END_TRACE = re.compile(r"---\[ end trace [0-9a-f]+ \]---")
# The last line of a panic's report when the kernel stays put (panic=0); with a reboot
# (panic=-1) the kernel resets the machine before it, and QEMU exits instead.
_END_PANIC = re.compile(r"---\[ end Kernel panic")
# printk's timestamp (and caller id): what precedes it is shell prompt or other noise.
_STAMP = re.compile(r"\[\s*\d+\.\d+\](?:\[\s*[CT]\d+\])?\s?")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]|\x1b\[[0-9;?]*[A-Za-z]")

# Printed by the tiny image's init when a share does not mount (images/tiny/init).
_SHARE = re.compile(
    r"qemukit-init: share-error tag=(?P<tag>\S+) path=(?P<path>\S+)"
    r" virtiofs=\[(?P<virtiofs>[^\]]*)\] 9p=\[(?P<p9>[^\]]*)\] filesystems=\[(?P<have>[^\]]*)\]"
)


@dataclass(frozen=True)
class ConsoleEvent:
    """One classified console line: ``kind`` and the line (timestamp and noise removed).

    ``fields`` holds the parsed parts of a ``share`` event (``tag``, ``path``,
    ``virtiofs`` and ``9p`` (each the guest's mount error), ``filesystems``).
    ``report`` names the debugging tool that printed it (one of
    :data:`REPORT_KINDS`), else None. ``lines`` are the report's first lines
    (at most :data:`REPORT_LINES`, ``line`` first), timestamps removed: the
    watcher adds them as the kernel prints them, until the report's closing
    rule or end marker, or the next event.
    """

    kind: EventKind
    line: str
    fields: Mapping[str, str] = field(default_factory=dict)
    report: str | None = None
    lines: list[str] = field(default_factory=list, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: ``kind``, ``report``, ``line`` and ``lines``."""
        return {"kind": self.kind, "report": self.report, "line": self.line,
                "lines": list(self.lines)}


def _clean(line: str, start: int) -> str:
    """The message part of a console line: after printk's timestamp, else from ``start``."""
    stamps = list(_STAMP.finditer(line, 0, start + 1))
    text = line[stamps[-1].end():] if stamps else line[start:]
    return _CONTROL.sub("", text).strip()


def classify(line: str) -> ConsoleEvent | None:
    """The kernel event a console line reports, or None for an ordinary line."""
    m = _SHARE.search(line)
    if m:
        fields = {"tag": m["tag"], "path": m["path"], "virtiofs": m["virtiofs"], "9p": m["p9"],
                  "filesystems": m["have"]}
        return ConsoleEvent("share", _clean(line, m.start()), fields)
    m = _PANIC.search(line)
    if m:
        text = _clean(line, m.start())
        return ConsoleEvent("panic", text, lines=[text])
    for report, kind, pattern in _REPORTS:
        m = pattern.search(line)
        if m:
            text = _clean(line, m.start())
            return ConsoleEvent(kind, text, report=report, lines=[text])
    for kind, pattern in (("warning", _WARNINGS), ("oops", _OOPS)):
        m = pattern.search(line)
        if m:
            text = _clean(line, m.start())
            return ConsoleEvent(kind, text, lines=[text])
    return None


class _ReportLines:
    """Adds the lines after an event's first one to its :attr:`~ConsoleEvent.lines`."""

    def __init__(self) -> None:
        self.open: ConsoleEvent | None = None

    def close(self) -> ConsoleEvent | None:
        """End the open report; returns it (None if there was none)."""
        event, self.open = self.open, None
        return event

    def start(self, event: ConsoleEvent) -> None:
        """``event`` was just classified: its report is the one lines go to now."""
        self.open = event if event.kind != "share" else None

    def add(self, line: str) -> bool:
        """Add an unclassified line to the open report; True if it was the closing rule."""
        event = self.open
        if event is None:
            return False
        text = _CONTROL.sub("", _STAMP.sub("", line, count=1)).strip()
        if _RULE.match(text):
            self.open = None
            return True
        if text and len(event.lines) < REPORT_LINES:
            event.lines.append(text)
        return False


def classify_text(text: str) -> list[ConsoleEvent]:
    """Every event in a block of console output, in order, each with its report's lines."""
    events: list[ConsoleEvent] = []
    reports = _ReportLines()
    for line in text.replace("\r", "").splitlines():
        if _END_PANIC.search(line) or _END_TRACE.search(line):
            reports.close()
            continue
        event = classify(line)
        if event is None:
            reports.add(line)
            continue
        events.append(event)
        reports.start(event)
    return events


def share_error(event: ConsoleEvent, shares: Sequence[object] = (),
                console: str = "") -> ShareMountError:
    """The error for a ``share`` event, told with what the spec says about that share.

    ``shares`` are the spec's :class:`~qemukit.spec.Share` objects: the one with
    the event's tag gives the transport that was meant and the host path.
    """
    tag = event.fields.get("tag", "?")
    share = next((s for s in shares if getattr(s, "tag", None) == tag), None)
    transport = str(getattr(share, "transport", "virtiofs"))
    host_path = getattr(share, "host_path", None)
    said = event.fields.get("9p" if transport == "9p" else "virtiofs", "")
    # busybox: "mount: mounting TAG on PATH failed: No such device" -> the kernel's errno text.
    reason = said.rpartition("failed: ")[2].strip() or said.strip() or "mount failed"
    have = set(event.fields.get("filesystems", "").split())
    if transport == "9p":
        options = "CONFIG_9P_FS and CONFIG_NET_9P_VIRTIO"
        fs_name = "9p"
    else:
        options = "CONFIG_VIRTIO_FS (with CONFIG_FUSE_FS)"
        fs_name = "virtiofs"
    if fs_name not in have:
        hint = (f"the guest kernel has no {fs_name} file system: it needs {options} "
                f"(built in, or as modules given with --modules)")
        if transport == "9p" and "virtiofs" in have:
            hint += "; this kernel has virtiofs: drop ',9p' from the share"
        elif transport != "9p" and "9p" in have:
            hint += "; this kernel has 9p: add ',9p' to the share"
    elif transport == "9p" and reason == "Protocol not supported":
        hint = "the guest kernel has 9p but not its virtio transport: it needs CONFIG_NET_9P_VIRTIO"
    else:
        hint = f"the guest kernel has {fs_name} ({options}); the mount itself failed"
    return ShareMountError(tag, event.fields.get("path", "?"), transport, reason,
                           host_path=None if host_path is None else str(host_path), hint=hint,
                           console=console)


def _read_tail(path: Path | str, limit: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read()
    except OSError:
        return b""


def log_tail(path: Path, max_lines: int = 30) -> str:
    """The last ``max_lines`` lines of a log file ('' if it does not exist).

    Just after a rotation (see :func:`rotate_log`) the rest comes from ``path.1``.
    """
    data = _read_tail(path, 65536)
    if len(data) < 65536:
        data = _read_tail(f"{path}.1", 65536 - len(data)) + data
    lines = data.decode("utf-8", "replace").replace("\r", "").splitlines()
    return "\n".join(lines[-max_lines:])


def rotate_log(path: Path) -> None:
    """Move the log ``path`` (one its writer appends to) to ``path.1`` and empty it in place.

    The writer keeps its file descriptor, so the log is copied (to a temporary
    file renamed over ``path.1``) and then truncated, never renamed.
    """
    old = Path(f"{path}.1")
    partial = Path(f"{path}.1.tmp")
    shutil.copyfile(path, partial)
    os.replace(partial, old)
    os.truncate(path, 0)


def _unread_bytes(fd: int) -> int:
    """Bytes waiting in a socket's receive queue (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


class _Reader(asyncio.Protocol):
    """Hands every chunk to the watcher as soon as the loop reads it."""

    def __init__(self, watcher: ConsoleWatcher) -> None:
        self.watcher = watcher

    def data_received(self, data: bytes) -> None:
        self.watcher._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.watcher._feed_eof()


class ConsoleWatcher:
    """Reads a console socket until it closes and classifies what the guest prints.

    :attr:`fatal` (also reachable as :attr:`panic`) is resolved with the first
    event that ends the VM's usefulness: a ``panic``, an ``oops`` (unless
    :attr:`continue_on_oops` is true when it is printed) or a ``share`` error.
    :attr:`events` lists every event seen, in order (at most :data:`MAX_EVENTS`).
    """

    def __init__(self, log_path: Path, *, continue_on_oops: bool = False,
                 max_log_bytes: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.log_path = log_path
        #: The log's cap in bytes (None: :data:`CONSOLE_LOG_MAX`; 0: no cap).
        self.max_log_bytes = CONSOLE_LOG_MAX if max_log_bytes is None else max_log_bytes
        self._unchecked = 0
        #: When true an oops is recorded and the guest goes on; read at each oops line.
        self.continue_on_oops = continue_on_oops
        self.fatal: asyncio.Future[ConsoleEvent] = loop.create_future()
        self.events: list[ConsoleEvent] = []
        #: Called with every chunk the guest prints (e.g. to show the console live).
        self.sink: Callable[[bytes], None] | None = None
        self._kernel_panic: asyncio.Future[ConsoleEvent] = loop.create_future()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._oops_ended = asyncio.Event()
        #: Set at the last line of a panic's report (printed when the kernel does not reboot).
        self.panic_ended = asyncio.Event()
        self._received = 0
        self._settling: list[tuple[int, asyncio.Future[None]]] = []
        self._transport: asyncio.Transport | None = None
        self._partial = b""
        self._reports = _ReportLines()
        #: The log's file descriptor while the watcher writes it (see the module's docstring).
        self._log_fd: int | None = None
        self._log_failed = False

    @property
    def panic(self) -> asyncio.Future[ConsoleEvent]:
        """The same future as :attr:`fatal` (the name the VM's guard has always used)."""
        return self.fatal

    @property
    def warnings(self) -> list[str]:
        """Lines of the non-fatal events: warnings, and oopses continued past."""
        fatal = self.fatal.result() if self.fatal.done() and not self.fatal.cancelled() else None
        return [e.line for e in self.events
                if e.kind == "warning" or (e.kind == "oops" and e is not fatal)]

    @property
    def writes_log(self) -> bool:
        """True when the watcher writes the log from what it reads (else QEMU writes it)."""
        return self._log_fd is not None

    async def start(self, socket_path: Path, *, sock: socket.socket | None = None) -> None:
        """Start draining the console in the background.

        With ``sock``, a connection made before the guest ran (see
        :func:`qemukit._launch.start.spawn_qemu`), the watcher reads it and
        writes everything it reads to :attr:`log_path` (appending). Without,
        it connects to ``socket_path`` and QEMU writes the log.
        """
        loop = asyncio.get_running_loop()
        if sock is not None:
            self._open_log()
            transport, _ = await loop.create_connection(lambda: _Reader(self), sock=sock)
            self._transport = transport
            return
        transport, _ = await loop.create_unix_connection(lambda: _Reader(self), str(socket_path))
        self._transport = transport
        # Output that arrived before we connected is only in QEMU's log: scan it once.
        for line in log_tail(self.log_path, 200).splitlines():
            self._scan(line)

    def _open_log(self) -> None:
        # O_APPEND: another appender (a warm clone's boot log) or a truncation (the MCP
        # server's cap) never makes this write over anything or leave a hole.
        self._log_fd = os.open(self.log_path,
                               os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _write_log(self, chunk: bytes) -> None:
        """Append ``chunk`` to the log at once (no buffer: the log is as current as the stream)."""
        assert self._log_fd is not None
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self._log_fd, view):]
        except OSError as exc:  # a full disk must not stop the draining (the guest would stall)
            if not self._log_failed:
                log.warning("console log %s: cannot write it: %s", self.log_path, exc)
            self._log_failed = True

    def _feed(self, chunk: bytes) -> None:
        if self._log_fd is not None:
            self._write_log(chunk)
        if self.sink is not None:
            try:
                self.sink(chunk)
            except Exception:
                # A broken sink must not stop the draining (the guest would stall).
                log.exception("console sink failed; no longer showing the console")
                self.sink = None
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        if len(self._partial) > _MAX_LINE:
            lines.append(self._partial)
            self._partial = b""
        for raw in lines:
            self._scan(raw.decode("utf-8", "replace").rstrip("\r"))
        self._received += len(chunk)
        self._unchecked += len(chunk)
        if self.max_log_bytes and self._unchecked >= max(4096, self.max_log_bytes // 16):
            self._unchecked = 0
            self._cap_log()
        self._wake_settlers()

    def _cap_log(self) -> None:
        """Rotate the log if it passed its cap (a check every 1/16 of the cap received)."""
        try:
            if self._log_fd is not None:
                if os.fstat(self._log_fd).st_size > self.max_log_bytes:
                    # Ours alone: renamed whole, and a new one opened; nothing is lost.
                    os.replace(self.log_path, f"{self.log_path}.1")
                    os.close(self._log_fd)
                    self._log_fd = None
                    self._open_log()
            elif os.stat(self.log_path).st_size > self.max_log_bytes:
                rotate_log(self.log_path)
        except OSError as exc:  # a full disk must not stop the draining either
            log.warning("console log %s: cannot rotate it: %s", self.log_path, exc)

    def _wake_settlers(self) -> None:
        for target, fut in self._settling:
            if not fut.done() and (self._received >= target or self._closed.done()):
                fut.set_result(None)
        self._settling = [(t, f) for t, f in self._settling if not f.done()]

    def _feed_eof(self) -> None:
        if self._partial:
            self._scan(self._partial.decode("utf-8", "replace"))
            self._partial = b""
        if not self._closed.done():
            self._closed.set_result(None)
        self._wake_settlers()

    def _scan(self, line: str) -> None:
        if _END_PANIC.search(line):
            self._reports.close()
            self.panic_ended.set()
            return
        if _END_TRACE.search(line):
            self._reports.close()
            self._oops_ended.set()
            return
        event = classify(line)
        if event is None:
            report = self._reports.open
            if self._reports.add(line) and report is not None and report.kind == "oops":
                # KASAN and KCSAN end their report with a rule, not an end-trace marker.
                self._oops_ended.set()
            return
        self._reports.start(event)
        if len(self.events) < MAX_EVENTS:
            self.events.append(event)
        if event.kind == "panic" and not self._kernel_panic.done():
            self._kernel_panic.set_result(event)
        if event.kind == "oops":
            self._oops_ended.clear()
            if self.continue_on_oops:
                return
        if event.kind != "warning" and not self.fatal.done():
            self.fatal.set_result(event)

    async def settle(self, timeout: float = 5.0) -> None:
        """Return once everything already sent to the console socket has been scanned.

        The guest's console output and its agent's replies travel on different
        sockets; after a command returns, this makes sure what the kernel
        printed meanwhile is in :attr:`events`.
        """
        transport = self._transport
        if transport is None or transport.is_closing() or self._closed.done():
            return
        sock = transport.get_extra_info("socket")
        if sock is None:
            return
        try:
            target = self._received + _unread_bytes(sock.fileno())
        except OSError:
            return
        reached: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._settling.append((target, reached))
        self._wake_settlers()
        with contextlib.suppress(TimeoutError):
            # Bounded, in case the connection stalls (QEMU stopped, say).
            await asyncio.wait_for(reached, timeout)

    async def oops_outcome(self, event: ConsoleEvent, timeout: float = 3.0) -> ConsoleEvent:
        """After an oops: the panic it turned into (panic_on_oops, an oops in an
        interrupt), or the oops itself once its report ended without one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        stopped: set[asyncio.Future[Any]] = {self._kernel_panic, self._closed}
        ended = asyncio.ensure_future(self._oops_ended.wait())
        try:
            await asyncio.wait({ended, *stopped}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
        if not any(f.done() for f in stopped):
            # The report is out; a panic would follow within moments (oops_end()).
            await asyncio.wait(stopped, timeout=max(0.0, min(0.5, deadline - loop.time())),
                               return_when=asyncio.FIRST_COMPLETED)
        if self._kernel_panic.done() and not self._kernel_panic.cancelled():
            return self._kernel_panic.result()
        return event

    def reset(self) -> None:
        """Forget a fatal event (panic, oops, share error): the guest's state was replaced.

        Called when a snapshot taken before the event is loaded: the running
        guest is then the one from before it. The events stay in :attr:`events`.
        """
        loop = asyncio.get_running_loop()
        if self.fatal.done():
            self.fatal = loop.create_future()
        if self._kernel_panic.done():
            self._kernel_panic = loop.create_future()

    def tail(self, max_lines: int = 30) -> str:
        """The console's last lines, from the log."""
        return log_tail(self.log_path, max_lines)

    async def drain(self, timeout: float = 5.0) -> None:
        """Once QEMU has exited: read what is left on the socket, up to its end (bounded)."""
        if self._transport is None or self._closed.done():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)

    async def close(self) -> None:
        """Stop draining and disconnect (the log, if the watcher writes it, is complete)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._log_fd is not None:
            os.close(self._log_fd)
            self._log_fd = None
        for fut in (self.fatal, self._kernel_panic):
            if not fut.done():
                fut.cancel()


def first_fatal(events: Iterable[ConsoleEvent], continue_on_oops: bool) -> ConsoleEvent | None:
    """The event that ends a run among ``events``: a panic first, else an oops, else a share error."""
    events = list(events)
    for kind in ("panic", "oops", "share"):
        if kind == "oops" and continue_on_oops:
            continue
        for event in events:
            if event.kind == kind:
                return event
    return None


#: How long a panicking kernel gets to finish its report before the panic is raised.
PANIC_REPORT_TIMEOUT = 10.0


async def console_verdict(event: ConsoleEvent, console: ConsoleWatcher | None,
                          exited: asyncio.Future[Any], shares: Sequence[object],
                          tail: Callable[[int], str]) -> QemukitError:
    """The error for a fatal console ``event``, once the kernel has said all it will.

    An oops waits for the end of its report (``panic_on_oops``, or one in an
    interrupt, turns it into a panic); a panic for the end of its backtrace,
    which comes with QEMU's exit (``exited``: a reboot under ``-no-reboot``)
    or the kernel's end line, bounded by :data:`PANIC_REPORT_TIMEOUT` (a
    loaded host prints slowly). ``tail(n)`` gives the console's last lines;
    ``shares`` are the spec's, for a share that did not mount.
    """
    if event.kind == "oops" and console is not None:
        event = await console.oops_outcome(event)
    if event.kind == "panic":
        ended: set[asyncio.Future[Any]] = {exited}
        if console is not None:
            ended.add(asyncio.ensure_future(console.panic_ended.wait()))
        try:
            await asyncio.wait(ended, timeout=PANIC_REPORT_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in ended - {exited}:
                await cancel_and_wait(waiter)
        if console is not None:
            await console.settle()
        return GuestPanic(event.line, tail(40))
    if event.kind == "oops":
        return GuestOops(event.line, tail(60))
    return share_error(event, shares, tail(20))
