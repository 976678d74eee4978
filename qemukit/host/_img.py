"""qemu-img, the one wrapper: an image's real format, throwaway overlays."""

from __future__ import annotations

import json
import os

from .._launch.process import run_command
from ..errors import HostError, SpecError
from ._qemu import QemuBinary, find_qemu


def image_format(path: str, qemu: QemuBinary) -> str:
    """The format of a disk image as ``qemu-img info`` detects it (read-only, -U)."""
    if not os.path.exists(path):
        raise SpecError("drive.file", path, "no such file")
    if qemu.qemu_img is None:
        raise HostError("qemu-img not found; install it with: apt-get install qemu-utils")
    out = run_command([qemu.qemu_img, "info", "-U", "--output=json", "--", path], timeout=30)
    if out.returncode != 0:
        raise SpecError("drive.file", path, f"qemu-img cannot read it: {out.stderr.strip()}")
    fmt = str(json.loads(out.stdout).get("format", ""))
    if fmt not in ("qcow2", "raw"):
        raise SpecError("drive.format", fmt, f"{path}: only qcow2 and raw images are supported")
    return fmt


def create_overlay(base: str, base_format: str, target: str | os.PathLike[str], *,
                   size: int | None = None, unsafe: bool = False) -> None:
    """Create a private (0600) qcow2 overlay at ``target`` over ``base``.

    The base is only recorded as the backing file, never written. ``unsafe``
    skips opening the base (needed while a running QEMU holds its lock).
    Raises :class:`HostError` with qemu-img's own message on failure.
    """
    qemu_img = find_qemu().qemu_img
    if qemu_img is None:
        raise HostError("qemu-img not found; install it with: apt-get install qemu-utils")
    argv = [qemu_img, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", base]
    argv += ["-u"] if unsafe else []
    argv += [os.fspath(target)] + ([str(size)] if size is not None else [])
    out = run_command(argv, timeout=60)
    if out.returncode != 0:
        raise HostError(f"cannot create an overlay over {base}: {out.stderr.strip()}")
    os.chmod(target, 0o600)
