"""Crash dumps: the guest's memory as an ELF core (or kdump-compressed), for ``crash`` or drgn.

:func:`dump_memory` asks QEMU for ``dump-guest-memory`` into a file qemukit
opened and passed over the monitor (so it works under QEMU's sandbox and after
QEMU dropped to another user), and returns once QEMU reports
``DUMP_COMPLETED``. The ELF core has a ``PT_NOTE`` segment with one
``NT_PRSTATUS`` note per vCPU (its registers) and the guest's RAM as
``PT_LOAD`` segments. A dump that fails leaves no file behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import QMPCommandError, SnapshotError, SpecError
from .timeouts import SAVE_TIMEOUT

if TYPE_CHECKING:
    from .target import VMTarget

__all__ = ["DUMP_FORMATS", "DumpFormat", "DumpResult", "dump_memory"]

DumpFormat = Literal["elf", "kdump-zlib", "kdump-lzo", "kdump-snappy"]
#: The formats QEMU's dump-guest-memory knows (kdump-* only where the binary has the library).
DUMP_FORMATS: tuple[DumpFormat, ...] = ("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy")


@dataclass(frozen=True)
class DumpResult:
    """A finished dump: where, which format, how many bytes."""

    path: Path
    format: DumpFormat
    size: int


async def dump_memory(vm: VMTarget, path: str | os.PathLike[str], *, format: DumpFormat = "elf",
                      timeout: float = SAVE_TIMEOUT) -> DumpResult:
    """Write ``vm``'s guest memory to the new file ``path``; returns once QEMU finished it.

    The guest is paused by QEMU while it dumps and runs on afterwards (a guest
    that was paused stays paused). Raises :class:`SpecError` for a bad format or
    an existing ``path``, :class:`SnapshotError` when QEMU cannot dump (its
    error is quoted), :class:`WaitTimeout` after ``timeout``.
    """
    if format not in DUMP_FORMATS:
        raise SpecError("format", format, f"one of {', '.join(DUMP_FORMATS)}")
    target = Path(path).absolute()
    if format != "elf":
        capability = await vm.qmp("query-dump-guest-memory-capability")
        if format not in capability.get("formats", []):
            raise SpecError("format", format, f"this QEMU can write only "
                            f"{', '.join(capability.get('formats', []))}")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise SpecError("path", str(target), "already exists; dumps never overwrite") from None
    except OSError as exc:
        raise SpecError("path", str(target), f"cannot create it: {exc.strerror}") from exc
    done = False
    try:
        async with vm.operation_lock():
            try:
                fdname = await vm.monitor.hand_over_fd(fd, "qemukit-dump")
            finally:
                os.close(fd)
            with vm.monitor.listen("DUMP_COMPLETED") as completed:
                try:
                    await vm.qmp("dump-guest-memory", paging=False, protocol=f"fd:{fdname}",
                                 detach=True, format=format)
                except QMPCommandError as exc:
                    raise SnapshotError(f"QEMU cannot dump VM {vm.name!r}'s memory: "
                                        f"{exc.description}") from exc
                what = f"QEMU to finish dumping VM {vm.name!r}'s memory to {target}"
                # A panicked guest is what one dumps: only QEMU's exit ends this wait.
                event = await vm.guarded(vm.monitor.wait_event(completed, timeout, what),
                                         timeout + 5, what, guest_faults=False)
        error = event.get("data", {}).get("error")
        if error:
            raise SnapshotError(f"QEMU's dump of VM {vm.name!r} failed: {error}")
        done = True
    finally:
        if not done:
            target.unlink(missing_ok=True)
    return DumpResult(target, format, target.stat().st_size)
