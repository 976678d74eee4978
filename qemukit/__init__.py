"""qemukit: launch, supervise and control QEMU virtual machines, without libvirt.

>>> import qemukit
>>> with qemukit.VM(qemukit.images.spec("tiny", accel="tcg")) as vm:
...     print(vm.exec(["uname", "-r"]).stdout_text)

The public modules (:data:`SUBMODULES`: ``qemukit.images``, ``qemukit.kernel``,
``qemukit.hotplug``, ...) are attributes of the package, imported on first
use, and so are the names of the public surface (:class:`VMSpec`, :class:`VM`, ...):
``import qemukit`` loads only the errors and the logger, and ``qemukit.VMSpec``
loads the spec module at its first use (no dataclasses machinery, no asyncio,
no qemu.qmp, psutil or click before a call needs them; tests/unit/test_imports.py
keeps it so).

qemukit logs under the ``qemukit`` logger (``qemukit.qmp`` carries qemu.qmp's
records), which has a NullHandler: nothing reaches the terminal unless the
application configures logging.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .errors import (
    AcceleratorError,
    AgentError,
    CommandFailed,
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

if TYPE_CHECKING:
    # For type checkers: the lazily loaded modules (see SUBMODULES and __getattr__).
    from . import dump as dump
    from . import guest as guest
    from . import host as host
    from . import hotplug as hotplug
    from . import images as images
    from . import kconfig as kconfig
    from . import kernel as kernel
    from . import matrix as matrix
    from . import paths as paths
    from . import qga as qga
    from . import results as results
    from . import seed as seed
    from . import snapshot as snapshot
    from . import timeouts as timeouts
    from . import vm as vm
    from .guest import ExecResult
    from .spec import (
        Drive,
        HostRoot,
        Nic,
        PortForward,
        Share,
        VMSpec,
        parse_drive,
        parse_nic,
        parse_size,
    )
    from .vm import (
        VM,
        AsyncVM,
        AsyncVMPool,
        ShutdownResult,
        ShutdownRung,
        VMPool,
        VMState,
        network_forward,
        preview_argv,
    )

# The VM machinery pulls in asyncio and qemu.qmp (most of qemukit's import time), the
# spec dataclasses (dataclasses, inspect, ipaddress, tomllib): load each on first use, so
# `import qemukit`, the CLI's --help and `qemukit ls` stay fast.
_LAZY = {
    "Drive": "spec",
    "HostRoot": "spec",
    "Nic": "spec",
    "PortForward": "spec",
    "Share": "spec",
    "VMSpec": "spec",
    "parse_drive": "spec",
    "parse_nic": "spec",
    "parse_size": "spec",
    "ExecResult": "guest",
    "VM": "vm",
    "AsyncVM": "vm",
    "AsyncVMPool": "vm",
    "VMPool": "vm",
    "ShutdownResult": "vm",
    "ShutdownRung": "vm",
    "VMState": "vm",
    "preview_argv": "vm",
    "network_forward": "vm",
}


#: The public modules, reachable as ``qemukit.<name>`` and imported on first use
#: (errors and spec are imported at once anyway). The rest (cli, _launch, _wire,
#: ...) is internal.
SUBMODULES = (
    "dump", "errors", "guest", "host", "hotplug", "images", "kconfig", "kernel", "matrix",
    "paths", "qga", "results", "seed", "snapshot", "spec", "timeouts", "vm",
)

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    import importlib

    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in SUBMODULES:
        # import_module also binds the module as an attribute of this package.
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(SUBMODULES))

__version__ = "0.1.0"

__all__ = [
    "VM",
    "AcceleratorError",
    "AgentError",
    "AsyncVM",
    "AsyncVMPool",
    "CommandFailed",
    "Drive",
    "ExecResult",
    "GuestError",
    "GuestIOError",
    "GuestOops",
    "GuestPanic",
    "HostError",
    "HostRoot",
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
    "VMPool",
    "VMSpec",
    "VMState",
    "WaitTimeout",
    "parse_drive",
    "parse_nic",
    "network_forward",
    "parse_size",
    "preview_argv",
]
