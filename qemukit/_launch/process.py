"""The one place that spawns processes: QEMU itself and short helper commands.

QEMU gets its own stdout/stderr file (never a pipe a harness might block
on), no shell, a private umask, and by default a parent-death signal so it
cannot outlive the Python process that started it. Exit is awaited through a
pidfd, so waiting costs no polling and the child is reaped at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import HostError, LaunchError, WaitTimeout
from ._pids import is_same_process, process_start_time

log = logging.getLogger(__name__)

__all__ = [
    "QemuProcess", "die_with_parent", "is_same_process", "process_start_time", "run_command",
    "run_streaming",
]

_PR_SET_PDEATHSIG = 1


# Resolved here, in the parent, once: the preexec_fn below runs between fork and exec
# of a possibly threaded process, where loading a library (dlopen takes locks another
# thread may have held at the fork) can deadlock. Calling a resolved symbol does not load.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent_pid: int) -> None:
    """Runs in the child before exec: SIGKILL it when the spawning thread dies."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died between fork and prctl: then nobody would signal us.
    if os.getppid() != parent_pid:
        os._exit(1)


def die_with_parent(parent_pid: int) -> None:
    """A ``preexec_fn`` for a child of a daemon (the network switch's gateway): SIGKILL it
    when the spawning thread dies; ``parent_pid`` is the spawner's pid."""
    _die_with_parent(parent_pid)


@functools.lru_cache(maxsize=1)
def _setpriv() -> str | None:
    """util-linux's setpriv if it can set a parent-death signal, else None."""
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if "--pdeathsig" in out.stdout else None


def run_command(argv: Sequence[str], *, timeout: float = 60.0,
                cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a short helper command (qemu-img, qemu -help; make in a kernel tree) and capture it.

    Raises :class:`HostError` if it cannot be started or times out; a non-zero
    exit is returned for the caller to judge.
    """
    log.debug("running %s", shlex.join(argv))
    try:
        return subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=cwd,
            errors="replace",
        )
    except FileNotFoundError as exc:
        raise HostError(f"cannot run {argv[0]}: not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise HostError(f"{' '.join(argv)} did not finish within {timeout:g}s") from exc


#: Bytes per read or write of :func:`run_streaming`'s pipes.
_STREAM_CHUNK = 1024 * 1024
#: How much of a streaming command's stderr is kept for its error message.
_STDERR_KEEP = 16 * 1024


def run_streaming(argv: Sequence[str], *, source: BinaryIO | None = None,
                  sink: BinaryIO | None = None, timeout: float,
                  progress: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Run ``argv`` with ``source`` streamed to its stdin and its stdout streamed to ``sink``.

    For commands that move data (``ssh ... tar``): both pipes are pumped 1 MiB
    at a time by threads, so memory stays bounded and neither side can block
    the other; ``progress(bytes)`` is called with the running total of bytes
    moved. Returns the exit status and the tail of stderr. The command dies
    with this process and is killed and reaped if it outlives ``timeout``
    (:class:`WaitTimeout`); a command that exits without reading all of
    ``source`` ends the feeding quietly (its status and stderr say why).
    """
    parent = os.getpid()
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if source is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if sink is not None else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
        )
    except OSError as exc:
        raise HostError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    log.debug("spawned pid %d: %s", popen.pid, shlex.join(argv))
    moved = [0]
    lock = threading.Lock()
    failures: list[Exception] = []
    stderr = bytearray()

    def count(n: int) -> None:
        with lock:
            moved[0] += n
            total = moved[0]
        if progress is not None:
            progress(total)

    def feed() -> None:
        assert popen.stdin is not None and source is not None
        try:
            while chunk := source.read(_STREAM_CHUNK):
                popen.stdin.write(chunk)
                count(len(chunk))
        except BrokenPipeError:
            pass  # the command stopped reading: its exit status tells why
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread below
            failures.append(exc)
        finally:
            with contextlib.suppress(BrokenPipeError):
                popen.stdin.close()

    def drain() -> None:
        assert popen.stdout is not None and sink is not None
        try:
            while chunk := popen.stdout.read1(_STREAM_CHUNK):  # type: ignore[attr-defined]
                sink.write(chunk)
                count(len(chunk))
        except Exception as exc:  # noqa: BLE001 - raised in the caller's thread below
            failures.append(exc)

    def errors_tail() -> None:
        assert popen.stderr is not None
        while chunk := popen.stderr.read1(65536):  # type: ignore[attr-defined]
            stderr.extend(chunk)
            del stderr[:-_STDERR_KEEP]

    threads = [threading.Thread(target=fn, daemon=True, name=f"stream-{fn.__name__}")
               for fn, wanted in ((feed, source), (drain, sink), (errors_tail, True))
               if wanted is not None]
    for thread in threads:
        thread.start()
    try:
        status = popen.wait(timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
        raise WaitTimeout(f"{argv[0]} to finish moving data ({moved[0]} bytes so far)",
                          timeout) from None
    except BaseException:
        popen.kill()
        popen.wait()
        raise
    finally:
        for thread in threads:
            thread.join(30)
        for pipe in (popen.stdout, popen.stderr):
            if pipe is not None:
                pipe.close()
    if failures:
        raise failures[0]
    return status, stderr.decode("utf-8", "replace")


class QemuProcess:
    """A QEMU process: one we spawned (a child) or one we adopted by pid.

    Exit is observed through a pidfd, which works for adopted processes too;
    only a child can be reaped and report its exit status.
    """

    def __init__(
        self,
        pid: int,
        start_time: float,
        argv: list[str],
        log_path: Path,
        popen: subprocess.Popen[bytes] | None = None,
        pidfd: int | None = None,
    ) -> None:
        self.pid = pid
        self.start_time = start_time
        self.argv = argv
        self.log_path = log_path
        self._popen = popen
        self._pidfd = pidfd
        self._exit_fut: asyncio.Future[int | None] | None = None
        # Monotonic time of the spawn: psutil's start time has jiffy/boot-time
        # rounding errors of up to a second, too coarse to time a boot with.
        self.spawned_at = time.monotonic() - max(0.0, time.time() - start_time)

    def __repr__(self) -> str:
        kind = "child" if self._popen is not None else "adopted"
        return f"<QemuProcess pid={self.pid} {kind} {os.path.basename(self.argv[0]) if self.argv else '?'}>"

    def uptime(self) -> float:
        """Seconds since QEMU was started (monotonic clock for our own children)."""
        return time.monotonic() - self.spawned_at

    def stats(self) -> dict[str, Any]:
        """The process's resource use from psutil: CPU seconds, RSS, threads, open files, fds."""
        import psutil

        proc = psutil.Process(self.pid)
        with proc.oneshot():
            times = proc.cpu_times()
            return {
                "pid": proc.pid,
                "cpu_seconds": round(times.user + times.system, 3),
                "rss": proc.memory_info().rss,
                "threads": proc.num_threads(),
                "open_files": len(proc.open_files()),
                "fds": proc.num_fds(),
                "uptime": round(self.uptime(), 3),
            }

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        log_path: Path,
        pass_fds: Sequence[int] = (),
        die_with_parent: bool = True,
        cwd: Path | None = None,
    ) -> QemuProcess:
        """Start QEMU with ``argv`` (a list, never a shell), output to ``log_path``.

        With ``die_with_parent`` QEMU is killed when the calling thread exits.
        It is started in its own session either way, so a terminal's Ctrl-C
        reaches the Python process, which then shuts QEMU down in order.
        """
        argv = list(argv)
        parent = os.getpid()
        exec_argv, preexec = argv, None
        if die_with_parent:
            # setpriv (util-linux) sets the parent-death signal and execs QEMU, so Popen
            # can vfork; a Python preexec_fn would force a full fork, ~4 ms in a large
            # process. Without setpriv, the preexec_fn (which also closes the race of a
            # parent that died before the prctl) is used.
            setpriv = _setpriv()
            if setpriv:
                exec_argv = [setpriv, "--pdeathsig", "KILL", "--", *argv]
            else:
                preexec = functools.partial(_die_with_parent, parent)
        spawned_at = time.monotonic()
        # Private from the start: the log may show guest or host details.
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        with open(fd, "ab") as log_file:
            try:
                popen = subprocess.Popen(
                    exec_argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    pass_fds=tuple(pass_fds),
                    cwd=cwd,
                    umask=0o077,
                    start_new_session=True,
                    preexec_fn=preexec,
                )
            except OSError as exc:
                raise LaunchError(f"cannot start {argv[0]}: {exc.strerror}", argv=argv) from exc
        pidfd = None
        with contextlib.suppress(OSError):
            pidfd = os.pidfd_open(popen.pid)
        start_time = process_start_time(popen.pid) or time.time()
        proc = cls(popen.pid, start_time, argv, log_path, popen, pidfd)
        proc.spawned_at = spawned_at
        log.debug("spawned pid %d: %s", popen.pid, shlex.join(argv))
        return proc

    @classmethod
    def adopt(cls, pid: int, start_time: float, argv: list[str], log_path: Path) -> QemuProcess | None:
        """Take control of a QEMU started by another process; None if it is gone.

        The pidfd is opened first and the start time checked afterwards, so
        the pidfd can never refer to a different process that reused the pid.
        """
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        if not is_same_process(pid, start_time):
            os.close(pidfd)
            return None
        return cls(pid, start_time, argv, log_path, None, pidfd)

    @property
    def is_child(self) -> bool:
        """True if this process spawned QEMU (so it can reap it and read its status)."""
        return self._popen is not None

    @property
    def returncode(self) -> int | None:
        """The exit status once a child QEMU exited (negative: killed by that signal)."""
        return self._popen.poll() if self._popen is not None else None

    def alive(self) -> bool:
        """True while QEMU runs (a zombie counts as exited)."""
        if self._popen is not None:
            return self._popen.poll() is None
        if self._exit_fut is not None and self._exit_fut.done():
            return False
        return is_same_process(self.pid, self.start_time)

    def output_tail(self, max_lines: int = 20) -> str:
        """The last lines QEMU wrote to stdout/stderr."""
        try:
            data = self.log_path.read_bytes()[-16384:]
        except OSError:
            return ""
        lines = data.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-max_lines:])

    def exit_future(self) -> asyncio.Future[int | None]:
        """A future resolved when QEMU exits: its status, or None for an adopted one.

        Bound to the running loop on first use; the pidfd wakes it, so nothing
        polls, and a child is reaped the moment it exits.
        """
        if self._exit_fut is not None:
            return self._exit_fut
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[int | None] = loop.create_future()
        self._exit_fut = fut
        popen = self._popen
        if not self.alive():
            fut.set_result(self.returncode)
        elif self._pidfd is not None:
            pidfd = self._pidfd

            def on_exit() -> None:
                loop.remove_reader(pidfd)
                if not fut.done():
                    fut.set_result(popen.wait() if popen is not None else None)

            loop.add_reader(pidfd, on_exit)
        elif popen is not None:
            # No pidfd (very old kernel): a thread blocks in wait() instead of polling.
            waiter = asyncio.ensure_future(asyncio.to_thread(popen.wait))
            waiter.add_done_callback(
                lambda t: fut.done() or fut.set_result(t.result())  # type: ignore[func-returns-value]
            )
        else:
            raise HostError("cannot watch an adopted process without pidfd support")
        return fut

    async def wait(self, timeout: float | None = None) -> int | None:
        """Wait for QEMU to exit (reaping a child); returns its status if known."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.exit_future()), timeout)
        except TimeoutError:
            raise WaitTimeout(f"QEMU (pid {self.pid}) to exit", timeout or 0) from None

    def send_signal(self, sig: int) -> None:
        """Signal QEMU if it is still running (never a process that reused its pid)."""
        if not self.alive():
            return
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)
        elif self._popen is not None:
            self._popen.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Send SIGKILL."""
        self.send_signal(signal.SIGKILL)

    def close(self) -> None:
        """Release the pidfd (QEMU has exited, or is left running on purpose)."""
        if self._pidfd is not None:
            if self._exit_fut is not None and not self._exit_fut.done():
                with contextlib.suppress(Exception):
                    self._exit_fut.get_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None


def run_until_output(
    argv: Sequence[str], marker: bytes, *, timeout: float
) -> tuple[bool, str, int | None]:
    """Run ``argv`` until ``marker`` appears on its stdout, it exits, or ``timeout``.

    The process is killed and reaped in every case (it dies with us too).
    Returns (marker seen, the output's tail, exit status if it exited by itself).
    Used for probe boots, where the console is the process's stdout.
    """
    import selectors

    parent = os.getpid()
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
        )
    except OSError as exc:
        raise HostError(f"cannot start {argv[0]}: {exc.strerror}") from exc
    log.debug("spawned pid %d: %s", popen.pid, shlex.join(argv))
    assert popen.stdout is not None
    output = bytearray()
    seen = False
    exited: int | None = None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(popen.stdout, selectors.EVENT_READ)
        while not seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                break
            chunk = os.read(popen.stdout.fileno(), 65536)
            if not chunk:
                exited = popen.wait()
                break
            output += chunk
            seen = marker in output
    if exited is None:
        popen.kill()
        popen.wait()
    popen.stdout.close()
    tail = "\n".join(output.decode("utf-8", "replace").splitlines()[-15:])
    return seen, tail, exited
