"""qemu-guest-agent: the client (:class:`GuestAgent`) and the guarded guest API.

The client lives in :mod:`qemukit._wire.qga`; :class:`AsyncGuest` and
:class:`SyncGuest` (what ``vm.guest`` is) in :mod:`qemukit.guest`. This module
is where users import them from.
"""

from __future__ import annotations

from ._wire.qga import AGENT_PORT_ID, GuestAgent, exec_request
from .guest import AsyncGuest, SyncGuest

__all__ = ["AGENT_PORT_ID", "AsyncGuest", "GuestAgent", "SyncGuest", "exec_request"]
