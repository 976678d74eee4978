"""The one writer of the guest init's kernel command line.

qemukit's guests (the tiny image's init, and the debian image's share mounter)
read their part of the kernel command line: ``qemukit.share=TAG:PATH`` for each
host directory to mount, ``qemukit.rootfs=PATH`` when the host's root (a share
mounted at PATH) becomes the root of commands (``images/tiny/init`` documents
the protocol). This module writes those arguments from the spec, and nothing
else does: a spec says *what* (``shares``, ``host_root``), never the tokens.
"""

from __future__ import annotations

from ..spec import HOST_ROOT_MOUNT, VMSpec

__all__ = ["init_arguments", "kernel_cmdline"]


def init_arguments(spec: VMSpec) -> list[str]:
    """The ``qemukit.*`` arguments for ``spec``'s guest init, in the order it reads them."""
    args = [f"qemukit.share={sh.tag}:{sh.guest_path}" for sh in spec.all_shares]
    if spec.host_root is not None:
        args.append(f"qemukit.rootfs={HOST_ROOT_MOUNT}")
    return args


def kernel_cmdline(spec: VMSpec, tsc_khz: int | None = None) -> str | None:
    """The whole ``-append`` value: the spec's own, the init's arguments, and on microvm
    ``tsc_early_khz=`` (without it the kernel hangs in about 4 boots out of 10).

    None when there is nothing to add and the spec has no ``append`` (QEMU's default).
    """
    tsc = ""
    if spec.machine == "microvm" and tsc_khz and "tsc_early_khz=" not in (spec.append or ""):
        tsc = f"tsc_early_khz={tsc_khz}"
    parts = [spec.append or "", *init_arguments(spec), tsc]
    if spec.append is None and not any(parts):
        return None
    return " ".join(p for p in parts if p)
