"""Optional (``--with-virtme``): ``vng --run KERNEL --exec true`` against ``qemukit run -- true``.

virtme-ng is given the QEMU binary qemukit found (``vng --qemu PATH``; that is
``$QEMUKIT_QEMU`` or qemu-system-x86_64 on PATH), and ``qemukit run``
inherits the environment, so both sides run the same QEMU. If vng does not
run here, the result says why instead of timing anything.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from qemukit import images

from .common import (
    Result,
    interleave,
    qemu_binary,
    qemukit_run_binary,
    qemukit_run_true,
    ratio,
    summary,
)

VIRTME_HINT = ("pass --with-virtme to pip-install virtme-ng into this venv if it is missing "
               "and try it (or: .venv/bin/pip install virtme-ng)")
# Where vng 1.42 looks for virtiofsd (virtme/commands/run.py, VirtioFS._get_virtiofsd_path).
VIRTIOFSD_PATHS = ("/usr/libexec/virtiofsd", "/usr/lib/virtiofsd/virtiofsd",
                   "/usr/lib/virtiofsd", "/usr/lib/qemu/virtiofsd")
_STRONG = re.compile(r"Kernel panic|Cannot open root|Failed to mount|does not have "
                     r"module fs-|cannot find script|Traceback|RuntimeError")
_WEAK = re.compile(r"[Ee]rror|not found|failed")


def run_group(argv: list[str], env: dict[str, str], timeout: float) -> tuple[int | None, str]:
    """Run argv in its own session; on timeout (exit None) kill its whole process group.

    vng starts virtiofsd in the background through a shell: whatever is left of the
    group once vng has exited is killed too.
    """
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    return rc, out.decode(errors="replace")


def vng_diagnosis(kernel: Path, release: str, output: str) -> dict[str, str]:
    """What keeps vng from running here: virtiofsd, the kernel's modules, depmod, udev."""
    found: dict[str, str] = {}
    if "fallback to 9p" in output:
        for path in (shutil.which("virtiofsd"), *VIRTIOFSD_PATHS):
            if path and os.access(path, os.X_OK):
                found["virtiofsd"] = (
                    f"{path} did not start: QEMU 7.2's C virtiofsd passes vng's `--version` "
                    "check, then rejects the Rust daemon's options vng starts it with "
                    "(`--socket-path S --shared-dir / --sandbox none --cache always`: \"fuse: "
                    "invalid argument\"), so vng fell back to 9p")
                break
        else:
            found["virtiofsd"] = "no virtiofsd found, so vng fell back to 9p"
    root = kernel.resolve().parent
    while root != root.parent and not (root / "lib/modules").exists():
        root = root.parent
    moddir = root / "lib/modules" / release
    if not moddir.is_dir():
        found["modules"] = (
            f"no lib/modules/{release} above {kernel}: vng's guest gets neither the virtiofs "
            "nor the 9p module (Debian's cloud kernel builds virtiofs as a module and has "
            "no 9p)")
    elif not (moddir / "modules.dep").exists() and not shutil.which("depmod"):
        found["depmod"] = "no depmod (Debian package kmod): vng needs it to index the modules"
    if not any(Path(p).exists() for p in ("/lib/systemd/systemd-udevd",
                                          "/usr/lib/systemd/systemd-udevd")):
        found["udev"] = ("once the guest boots: no systemd-udevd on this host (vng's guest "
                         "runs the host's root), so without /dev/virtio-ports links the "
                         "command runs on the console and vng exits 255")
    return found


def _error_lines(output: str) -> list[str]:
    """The lines of vng's verbose output that look like the reason it failed, deduplicated."""
    lines: list[str] = []
    for line in output.replace("fallback to 9p", "fallback to 9p\n").splitlines():
        text = re.sub(r"^\[\s*\d+\.\d+\]\s*", "", line).strip()
        if (_STRONG.search(text) or _WEAK.search(text)) and text not in lines:
            lines.append(text)
    return lines


def _find_vng(install: bool) -> tuple[str | None, Result | None]:
    """vng's path, pip-installing virtme-ng first if allowed; else why not, as a result."""
    bindir = Path(sys.executable).parent
    vng = shutil.which("vng", path=str(bindir)) or shutil.which("vng")
    if vng is not None:
        return vng, None
    if not install:
        return None, {"skipped": f"virtme-ng is not installed: {VIRTME_HINT}"}
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "virtme-ng"],
                         capture_output=True, text=True, timeout=600, check=False)
    vng = shutil.which("vng", path=str(bindir))
    if pip.returncode != 0 or vng is None:
        tail = (pip.stderr or pip.stdout).strip().splitlines()[-1:]
        return None, {"unavailable": f"pip install virtme-ng failed: {' '.join(tail)}"}
    return vng, None


def bench_virtme(runs: int, install: bool, kernel: Path | None) -> Result:
    """`vng --run KERNEL --disable-kvm --qemu QEMU --exec true` against `qemukit run -- true`.

    Tried once (with --verbose, deadline 180 s); if that does not exit 0 the result is
    {"unavailable": reason} with the console lines that show why. Both sides are TCG.
    """
    vng, why_not = _find_vng(install)
    if vng is None:
        return why_not or {"unavailable": "vng not found"}
    image = images.build("tiny")
    kernel = kernel or image.kernel
    qemu = qemu_binary()
    # vng runs virtme-run through a shell: it must be on PATH.
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    argv = [vng, "--run", str(kernel), "--disable-kvm", "--qemu", qemu, "--exec", "true"]
    version = subprocess.run([vng, "--version"], capture_output=True, text=True, env=env,
                             timeout=30, check=False).stdout.strip()
    rc, out = run_group([*argv, "--verbose"], env, timeout=180)
    if rc != 0:
        lines = _error_lines(out)
        key = next((t for t in lines if _STRONG.search(t)), None) or (
            lines[0] if lines else (out.strip().splitlines() or ["no output"])[-1])
        diagnosis = vng_diagnosis(kernel, image.kernel_release, out)
        return {
            "unavailable": f"`{' '.join(argv)}` "
                           + ("timed out after 180 s" if rc is None else f"exited {rc}")
                           + f": {key}; " + "; ".join(diagnosis.values()),
            "error_lines": lines[:8],
            "diagnosis": diagnosis,
            "virtme_ng": version,
            "qemu_binary": {"found": qemu, "vng": qemu},
        }

    def vng_run() -> float:
        t0 = time.perf_counter()
        code, text = run_group(argv, env, timeout=180)
        if code != 0:
            raise RuntimeError(f"vng exited {code}: {text[-2000:]}")
        return time.perf_counter() - t0

    res = interleave(runs, vng_exec_true=vng_run, qemukit_run_true=qemukit_run_true())
    v, qk = summary(res["vng_exec_true"]), summary(res["qemukit_run_true"])
    return {"vng_exec_true": v, "qemukit_run_true": qk,
            "ratio_vng_vs_qemukit": ratio(v, qk),
            "vng_command": " ".join(argv), "virtme_ng": version,
            "qemu_binary": {"found": qemu, "vng": qemu, "qemukit_run": qemukit_run_binary()}}
