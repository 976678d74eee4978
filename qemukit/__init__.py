"""qemukit: launch, supervise and control QEMU virtual machines, without libvirt.

>>> from qemukit import VM, images
>>> with VM(images.spec("tiny", accel="tcg")) as vm:
...     print(vm.exec(["uname", "-r"]).stdout_text)
"""

from __future__ import annotations

from .errors import (
    AcceleratorError,
    AgentError,
    GuestError,
    GuestIOError,
    GuestPanic,
    HostError,
    HotplugError,
    LaunchError,
    QemukitError,
    QMPCommandError,
    QMPConnectionError,
    QMPError,
    SnapshotError,
    SpecError,
    StateError,
    WaitTimeout,
)
from .guest import ExecResult
from .spec import Drive, Nic, PortForward, Share, VMSpec, parse_drive, parse_nic, parse_size
from .vm import VM, AsyncVM, ShutdownResult, ShutdownRung, VMState, preview_argv

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
