"""What :class:`~qemukit.vm.AsyncVM` adds to raw QMP: argument spelling, the refusal
of a device a mapped clone must not get, and pause/resume waiting for their events.

Functions of the target (:class:`qemukit.target.VMTarget`), so a unit test can
pass a fake; ``AsyncVM.qmp``, ``pause`` and ``resume`` are thin calls of these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import HotplugError
from ..snapshot._bundle import discarding_device_refusal
from ..target import VMTarget
from ..timeouts import QMP_TIMEOUT

__all__ = ["pause", "qmp_arguments", "resume"]


def qmp_arguments(command: str, arguments: Mapping[str, Any] | None, kwargs: Mapping[str, Any],
                  extra_args: Sequence[str]) -> dict[str, Any]:
    """The arguments of QMP ``command``: ``arguments`` and ``kwargs`` (``_`` -> ``-``).

    A ``device_add`` that would discard a mapped clone's RAM template raises
    :class:`HotplugError` (``extra_args``: the spec's, which say whether it maps one).
    """
    args = dict(arguments or {})
    args.update({k.replace("_", "-"): v for k, v in kwargs.items()})
    if command == "device_add":  # a mapped clone's RAM template must not be discarded
        refusal = discarding_device_refusal(extra_args, args.get("driver"))
        if refusal is not None:
            raise HotplugError(f"driver={args.get('driver')!r}: {refusal}", field="driver",
                               value=args.get("driver"), device=args.get("id"))
    return args


async def pause(vm: VMTarget) -> None:
    """Stop the guest's vCPUs; returns once QEMU reports the STOP event."""
    with vm.monitor.listen("STOP") as listener:
        if await vm.status() == "paused":
            return
        await vm.qmp("stop")
        await vm.monitor.wait_event(listener, QMP_TIMEOUT, "the STOP event after 'stop'")


async def resume(vm: VMTarget) -> None:
    """Let a paused guest run again; returns once QEMU reports the RESUME event."""
    with vm.monitor.listen("RESUME") as listener:
        if await vm.status() == "running":
            return
        await vm.qmp("cont")
        await vm.monitor.wait_event(listener, QMP_TIMEOUT, "the RESUME event after 'cont'")
