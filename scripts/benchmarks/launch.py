"""Spawn to the first answered QMP command: qemukit's ``VM.start()`` against a bare Popen.

The raw side runs qemukit's own argv (so the same QEMU binary, the one
``$QEMUKIT_QEMU`` picks, and the same devices), with the runtime paths moved
to a temporary directory and the owner monitor on a socketpair of its own.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from qemukit import VM

from .common import Result, interleave, qemu_binary, ratio, summary, tiny_spec


def raw_qmp_handshake(sock: socket.socket) -> None:
    """Read QEMU's greeting, negotiate capabilities, wait for the answer (blocking)."""
    stream = sock.makefile("rwb")
    stream.readline()
    stream.write(b'{"execute": "qmp_capabilities"}\n')
    stream.flush()
    while True:
        line = stream.readline()
        if not line:
            raise RuntimeError("QEMU closed its monitor before answering qmp_capabilities")
        if b'"return"' in line:
            return


def _raw_argv(qemukit_argv: list[str], runtime: Path, qmp_fd: int,
              console_fd: int) -> list[str]:
    """qemukit's argv with its runtime directory replaced by ``runtime``, the monitor by
    ``qmp_fd`` and the console connection qemukit hands over (``fd=``) by ``console_fd``."""
    shared = next(a for a in qemukit_argv if "qmp.sock" in a)
    old_dir = str(Path(shared.split("path=")[1].split(",")[0]).parent)
    argv = [a.replace(old_dir, str(runtime)) for a in qemukit_argv]
    fds = {"socket,id=qmp-owner,fd=": qmp_fd, "socket,id=console0,fd=": console_fd}

    def handed(arg: str) -> str:
        for prefix, fd in fds.items():
            if arg.startswith(prefix):
                rest = arg[len(prefix):]
                return f"{prefix}{fd}{rest[rest.find(','):] if ',' in rest else ''}"
        return arg

    return [handed(a) for a in argv]


def bench_launch(runs: int) -> Result:
    """Median spawn-to-QMP-ready time of qemukit (with and without deathsig) and raw QEMU."""
    spec = tiny_spec()
    VM(spec).start().kill()  # warm caches (host facts, page cache)
    found = qemu_binary()
    used: dict[str, str] = {}

    def qemukit_launch(die_with_parent: bool = True) -> float:
        vm = VM(spec, die_with_parent=die_with_parent)
        t0 = time.perf_counter()
        vm.start()
        elapsed = time.perf_counter() - t0
        argv_holder[:] = vm.argv
        used["qemukit"] = vm.argv[0]
        vm.kill()
        return elapsed

    def qemukit_launch_detached() -> float:
        # Without the parent-death signal the spawn needs no setpriv/preexec_fn: the
        # difference is what orphan-proofing costs at spawn.
        return qemukit_launch(die_with_parent=False)

    argv_holder: list[str] = []
    qemukit_launch()

    def raw_launch() -> float:
        tmp = Path(tempfile.mkdtemp(prefix="qk-raw-"))
        ours, theirs = socket.socketpair()
        console, console_end = socket.socketpair()
        try:
            argv = _raw_argv(argv_holder, tmp, theirs.fileno(), console_end.fileno())
            if argv[0] != found:
                raise RuntimeError(f"raw side would run {argv[0]}, qemukit found {found}")
            used["raw"] = argv[0]
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, pass_fds=[theirs.fileno(), console_end.fileno()],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            theirs.close()  # QEMU's now: a QEMU that exits closes the monitor (EOF, no hang)
            console_end.close()
            ours.settimeout(60)
            try:
                raw_qmp_handshake(ours)
                elapsed = time.perf_counter() - t0
            finally:
                proc.kill()
                proc.wait(timeout=30)
            return elapsed
        finally:
            for sock in (ours, theirs, console, console_end):
                sock.close()
            shutil.rmtree(tmp, ignore_errors=True)

    res = interleave(runs, raw=raw_launch, qemukit=qemukit_launch,
                     qemukit_no_deathsig=qemukit_launch_detached)
    raw, qk = summary(res["raw"]), summary(res["qemukit"])
    nods = summary(res["qemukit_no_deathsig"])
    return {"raw_qemu": raw, "qemukit": qk, "qemukit_no_deathsig": nods,
            "ratio": ratio(qk, raw), "ratio_no_deathsig": ratio(nods, raw), "goal": "<= 1.10",
            "qemu_binary": {"found": found, **used}}

