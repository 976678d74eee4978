"""Child processes that take their own children with them: a process group per command."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence

__all__ = ["run_group", "stop_group"]

#: Seconds a process group has between SIGTERM and SIGKILL, and to be reaped after SIGKILL.
STOP_GRACE = 10.0


def stop_group(proc: subprocess.Popen[str], grace: float = STOP_GRACE) -> None:
    """End ``proc`` and every process of its group (it was started with
    ``start_new_session=True``): SIGTERM, ``grace`` seconds, SIGKILL, then reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=grace)
            if sig == signal.SIGTERM:
                # The leader is gone; what it started may not be: no one of the group stays.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


def run_group(argv: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(argv, capture_output=True, text=True, timeout=timeout)``, but in a
    process group of its own that is killed as a whole on the timeout or any exception
    (``make``'s compilers and linkers too, not just ``make``). Raises
    :class:`subprocess.TimeoutExpired` after ``timeout`` and :class:`OSError` when
    ``argv`` cannot start."""
    proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True, errors="replace",
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        stop_group(proc, grace=2.0)
        try:
            proc.communicate(timeout=STOP_GRACE)  # close the pipes
        except (subprocess.TimeoutExpired, ValueError, OSError):
            pass
        raise
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)
