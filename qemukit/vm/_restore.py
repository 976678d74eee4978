"""A clone started from a saved-state bundle (:meth:`qemukit.vm.AsyncVM.restore`).

The bundle's spec becomes the clone's (its disks overlays over the bundle's
copies, its QEMU the one found for the bundle's architecture, checked against
the version that saved it); the clone launches with ``-incoming defer``, is fed
the state and reseeded (:func:`qemukit.vm._warm.restore_clone`). A clone whose
restore fails is killed before the restore's error is raised.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .. import host
from ..errors import QemukitError
from ..snapshot import Bundle
from ..spec import VMSpec
from ..timeouts import SAVE_TIMEOUT
from . import _warm

if TYPE_CHECKING:
    from ._core import AsyncVM

__all__ = ["start_clone"]


async def start_clone(bundle: str | Path, name: str | None,
                      make: Callable[[VMSpec, host.QemuBinary], AsyncVM],
                      timeout: float = SAVE_TIMEOUT) -> AsyncVM:
    """Start a clone of ``bundle`` named ``name``; ``make`` makes the VM of the clone's
    spec on the QEMU found for it (launched with ``incoming="defer"``). Returns it running."""
    saved = Bundle.open(bundle)
    qemu = await asyncio.to_thread(host.find_qemu, saved.spec.arch)
    saved.check_qemu(qemu)
    vm = make(saved.clone_spec(name, qemu_version=qemu.version), qemu)
    await vm.start()
    try:
        await _warm.restore_clone(vm, saved, timeout)
    except BaseException:
        with contextlib.suppress(QemukitError):  # the restore's own error is raised
            await vm.kill()
        raise
    return vm
