"""The launch plan: every file, daemon and argument a VM's start needs, decided at once.

:func:`plan_launch` is pure: from the spec, the host's facts, the chosen
accelerator and the runtime directory it decides which files QEMU opens
(overlays in the runtime directory for throwaway drives), which firmware
copy it gets, which virtiofsd socket serves each share, where the cloud-init
seed goes, and the whole argv. ``AsyncVM.start`` carries the plan out (makes
the overlays, copies the firmware, starts the daemons, writes the seed);
``preview_argv`` and ``qemukit cmdline`` only print it. One plan for both
means the printed command line is the one a start runs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..spec import Share, VMSpec
from .argv import SEED_FILE, Plumbing, build_argv, drive_ids, seed_device_args

if TYPE_CHECKING:
    from .runtime import RuntimeDir

__all__ = ["DiskImage", "HostFacts", "LaunchPlan", "OverlayStep", "plan_launch"]

#: The fd number QEMU's end of the owner's monitor socketpair has in a preview.
PREVIEW_QMP_FD = 3


@dataclass(frozen=True)
class HostFacts:
    """What the plan needs to know about the host (found by :mod:`qemukit.host`)."""

    qemu: str
    accel: str
    cpu: str | None = None
    sandbox: bool = False
    run_with: bool = False
    tsc_khz: int | None = None
    #: (code, vars template) of the UEFI firmware, if installed.
    ovmf: tuple[str, str] | None = None


@dataclass(frozen=True)
class DiskImage:
    """A drive's file as the start will open it, decided before (see ``host.resolve_disk``).

    ``format`` is never probed on a file the guest can write; ``backing`` is
    the chain below the file, top first, as (path, format) pairs: each a
    file qemukit made or the user named, opened read-only in that format.
    """

    format: str
    backing: tuple[tuple[str, str], ...] = ()
    #: The disk's size in bytes (what an overlay over it is made with), if known.
    virtual_size: int | None = None


@dataclass(frozen=True)
class OverlayStep:
    """A throwaway qcow2 overlay to create over a drive's base (never written).

    ``size`` given, qemu-img makes it without opening the base (so it never
    follows the base's own header).
    """

    base: str
    base_format: str
    overlay: str
    size: int | None = None


@dataclass(frozen=True)
class LaunchPlan:
    """What a start of one VM will do; :meth:`argv` is QEMU's command line."""

    spec: VMSpec
    runtime: RuntimeDir
    facts: HostFacts
    plumbing: Plumbing
    overlays: tuple[OverlayStep, ...]
    #: (firmware vars template, the VM's private copy) for OVMF guests.
    firmware_copy: tuple[str, str] | None
    #: One virtiofsd per virtiofs share: (share, the socket it listens on).
    virtiofs: tuple[tuple[Share, str], ...]
    #: The cloud-init seed ISO to write, and the arguments attaching it.
    seed_iso: str | None
    seed_args: tuple[str, ...]
    #: The launcher reads the serial console from QEMU's start and writes its log
    #: (:class:`~qemukit._wire.console.ConsoleWatcher`); else QEMU logs it (``logfile=``),
    #: for a VM that outlives the launcher (detached) and that nobody else reads.
    console_reader: bool = False

    def argv(self, qmp_fd: int = PREVIEW_QMP_FD,
             network_fds: Sequence[int] | None = None, console_fd: int | None = None
             ) -> list[str]:
        """QEMU's argv, with ``qmp_fd`` the inherited end of the owner's monitor socket.

        ``network_fds`` are QEMU's ends of its switch connections, one per
        ``spec.networks`` (a preview numbers them after ``qmp_fd``);
        ``console_fd`` QEMU's end of the console's connection when :attr:`console_reader`
        (a preview numbers it after the networks').
        """
        facts = self.facts
        if network_fds is None:
            network_fds = range(qmp_fd + 1, qmp_fd + 1 + len(self.spec.networks))
        plumbing = replace(self.plumbing, qmp_fd=qmp_fd, network_fds=tuple(network_fds))
        if self.console_reader and self.spec.serial:
            if console_fd is None:
                console_fd = max([qmp_fd, *network_fds]) + 1
            # The launcher writes the log from what it reads: QEMU logs nothing.
            plumbing = replace(plumbing, console_fd=console_fd, console_log=None)
        return build_argv(
            self.spec,
            qemu=facts.qemu,
            accel=facts.accel,
            plumbing=plumbing,
            sandbox=facts.sandbox,
            name=self.runtime.name,
            cpu=facts.cpu,
            run_with=facts.run_with,
            tsc_khz=facts.tsc_khz,
        ) + list(self.seed_args)


def plan_launch(
    spec: VMSpec,
    facts: HostFacts,
    runtime: RuntimeDir,
    images: Sequence[DiskImage | str],
    *,
    incoming: str | None = None,
    console_reader: bool = True,
) -> LaunchPlan:
    """Decide a start of ``spec`` in ``runtime`` (pure; nothing is created).

    ``images`` is each drive's :class:`DiskImage` (its format and backing
    chain, decided by the caller; a bare format string means no backing
    file). An ``overlay=True`` drive gets a qcow2 overlay whose backing is
    the drive's file, then that file's chain. ``incoming`` is
    ``-incoming``'s value for a VM that will be fed saved state (``defer``).
    ``console_reader`` says the launcher reads the console from QEMU's start
    and writes its log (false for a VM that outlives it: QEMU logs it).
    """
    files: list[str] = []
    final_formats: list[str] = []
    chains: list[tuple[tuple[str, str], ...]] = []
    overlays: list[OverlayStep] = []
    for drive, image, dev_id in zip(spec.drives, images, drive_ids(spec), strict=True):
        image = DiskImage(image) if isinstance(image, str) else image
        path = os.path.abspath(drive.file)
        if drive.overlay:
            overlay = str(runtime.overlay(dev_id))
            overlays.append(OverlayStep(path, image.format, overlay, image.virtual_size))
            files.append(overlay)
            final_formats.append("qcow2")
            chains.append(((path, image.format), *image.backing))
        else:
            files.append(path)
            final_formats.append(image.format)
            chains.append(image.backing)
    firmware_copy = None
    ovmf_code = ovmf_vars = None
    if spec.firmware == "ovmf":
        code, template = facts.ovmf or ("OVMF_CODE.fd", "OVMF_VARS.fd")
        ovmf_code, ovmf_vars = code, str(runtime.path / "ovmf-vars.fd")
        firmware_copy = (template, ovmf_vars)
    virtiofs = tuple(
        (share, str(runtime.path / f"vfs-{share.tag}.sock"))
        for share in spec.all_shares if share.transport == "virtiofs"
    )
    seed_iso = str(runtime.path / SEED_FILE) if spec.cloud_init is not None else None
    plumbing = Plumbing(
        share_sockets=tuple(sock for _, sock in virtiofs),
        qmp_path=str(runtime.qmp_socket),
        console_path=str(runtime.console_socket),
        console_log=str(runtime.console_log),
        agent_path=str(runtime.agent_socket),
        drive_files=tuple(files),
        drive_formats=tuple(final_formats),
        drive_backing=tuple(chains),
        ovmf_code=ovmf_code,
        ovmf_vars=ovmf_vars,
        incoming=incoming,
        gdb_path=str(runtime.gdb_socket) if spec.gdb and spec.gdb_port is None else None,
    )
    return LaunchPlan(
        spec=spec,
        runtime=runtime,
        facts=facts,
        plumbing=plumbing,
        overlays=tuple(overlays),
        firmware_copy=firmware_copy,
        virtiofs=virtiofs,
        seed_iso=seed_iso,
        seed_args=tuple(seed_device_args(spec, seed_iso)) if seed_iso else (),
        console_reader=console_reader,
    )
