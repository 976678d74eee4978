"""The VM facade: process + QMP + console + agent, with an explicit lifecycle.

:class:`AsyncVM` is the async core; :class:`VM` is the same API for
synchronous code, run on qemukit's own loop thread. Both are context
managers: leaving the block shuts the VM down through the ladder. A start
that fails half-way stops what it started and removes its files before the
error is raised. :class:`AsyncVMPool` (and :class:`VMPool`) keep warm clones of one
spec for a test harness or a service, at most ``max_vms`` at once.
"""

from __future__ import annotations

from .._launch.start import AdoptedQemu
from ._core import AsyncVM
from ._facade import VM, VMPool
from ._ladder import ShutdownResult, ShutdownRung
from ._netgate import network_forward
from ._pool import AsyncVMPool
from ._preview import preview_argv
from ._state import VMState

__all__ = [
    "AdoptedQemu",
    "AsyncVM",
    "AsyncVMPool",
    "ShutdownResult",
    "ShutdownRung",
    "VM",
    "VMPool",
    "VMState",
    "network_forward",
    "preview_argv",
]
