"""qemukit: launch, supervise and control QEMU virtual machines, without libvirt.

>>> from qemukit import VM, images
>>> with VM(images.spec("tiny", accel="tcg")) as vm:
...     print(vm.exec(["uname", "-r"]).stdout_text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    AcceleratorError,
    AgentError,
    GuestError,
    GuestIOError,
    GuestOops,
    GuestPanic,
    HostError,
    HotplugError,
    LaunchError,
    QemukitError,
    QMPCommandError,
    QMPConnectionError,
    QMPError,
    ShareMountError,
    SnapshotError,
    SpecError,
    StateError,
    WaitTimeout,
)
from .spec import Drive, Nic, PortForward, Share, VMSpec, parse_drive, parse_nic, parse_size

if TYPE_CHECKING:
    from .guest import ExecResult
    from .vm import VM, AsyncVM, ShutdownResult, ShutdownRung, VMState, preview_argv

# The VM machinery pulls in asyncio and qemu.qmp (most of qemukit's import time):
# load it on first use, so `import qemukit`, the CLI's --help and `qemukit ls` stay fast.
_LAZY = {
    "ExecResult": "guest",
    "VM": "vm",
    "AsyncVM": "vm",
    "ShutdownResult": "vm",
    "ShutdownRung": "vm",
    "VMState": "vm",
    "preview_argv": "vm",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "VM",
    "AcceleratorError",
    "AgentError",
    "AsyncVM",
    "Drive",
    "ExecResult",
    "GuestError",
    "GuestIOError",
    "GuestOops",
    "GuestPanic",
    "HostError",
    "HotplugError",
    "LaunchError",
    "Nic",
    "PortForward",
    "QMPCommandError",
    "QMPConnectionError",
    "QMPError",
    "QemukitError",
    "ShareMountError",
    "ShutdownResult",
    "Share",
    "ShutdownRung",
    "SnapshotError",
    "SpecError",
    "StateError",
    "VMSpec",
    "VMState",
    "WaitTimeout",
    "parse_drive",
    "parse_nic",
    "parse_size",
    "preview_argv",
]
