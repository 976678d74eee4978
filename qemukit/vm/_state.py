"""Where a VM is in its life: :class:`VMState` (checked by ``AsyncVM``'s guards)."""

from __future__ import annotations

import enum

__all__ = ["VMState"]


class VMState(enum.Enum):
    """Where a VM is in its life."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    DETACHED = "detached"
