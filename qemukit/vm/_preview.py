"""What a start would run, without starting anything.

``preview_argv`` (``qemukit cmdline``) renders the same launch plan a start carries out.
"""

from __future__ import annotations

import os

from .. import host
from .._launch.plan import DiskImage, plan_launch
from .._launch.runtime import RuntimeDir
from ..kconfig import resolve_kernel
from ..spec import VMSpec
from ._facts import default_probe_image, host_facts


def preview_argv(spec: VMSpec, *, name: str | None = None,
                 detached: bool = False) -> tuple[list[str], list[str]]:
    """The argv :class:`VM` would run for ``spec``, without starting anything.

    ``detached``: as a VM that outlives its starter (``run --detach``), whose
    console QEMU logs itself instead of handing it to qemukit's reader.

    Returns (argv, notes). It is the launch plan a start would carry out
    (:mod:`qemukit.plan`), in the runtime directory the VM would get; a
    drive file that does not exist yet is shown with its declared format
    (or qcow2) and a note. The accelerator is resolved as at a real start.
    """
    from ..paths import state_dir

    notes: list[str] = []
    kernel = resolve_kernel(spec)  # a tree: its image, and its config checked
    if kernel.tree is not None:
        notes.append(f"kernel: {kernel.spec.kernel}, built in the tree {kernel.tree.root}")
    if kernel.needs_files:
        notes.append(f"initrd: a copy of {spec.initrd} with the tree's modules, written in "
                     "the runtime directory at start")
    spec = kernel.spec
    qemu = host.find_qemu(spec.arch)
    formats: list[DiskImage] = []
    for drive in spec.drives:
        if os.path.exists(drive.file):
            # As a start decides it, but a first-sight probe is not recorded by a preview.
            formats.append(host.resolve_disk(drive, qemu, record=False))
        else:
            formats.append(DiskImage(drive.format or "qcow2", drive.backing_chain))
            notes.append(f"{drive.file}: no such file yet; assuming {formats[-1].format}")
    accel = host.resolve_accel(spec.accel, qemu, default_probe_image(spec.arch), arch=spec.arch)
    notes.append(f"accelerator: {accel.reason}")
    rd = RuntimeDir(state_dir() / (name or spec.name or "NAME"))
    plan = plan_launch(spec, host_facts(qemu, accel), rd, formats, console_reader=not detached)
    if plan.firmware_copy is not None and plan.facts.ovmf is None:
        notes.append("OVMF is not installed (apt-get install ovmf); a start would fail")
    for share, sock in plan.virtiofs:
        notes.append(f"share {share.tag}: virtiofsd serves {share.host_path} on {sock}")
    if plan.seed_iso is not None:
        notes.append(f"cloud-init seed: written to {plan.seed_iso} at start")
    return plan.argv(), notes
