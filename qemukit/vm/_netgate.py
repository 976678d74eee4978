"""The host on a private network when asked: :func:`network_forward`.

The network's switch runs a gateway QEMU for it (see :mod:`qemukit._launch.netgate`);
this module finds the pieces a request needs (the VM's name on the network, the
state directory, a QEMU binary) from a VM object or a name.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .._launch.netswitch import JOIN_TIMEOUT, forward
from ..errors import StateError

if TYPE_CHECKING:
    from ._core import AsyncVM
    from ._facade import VM

__all__ = ["network_forward"]


def network_forward(network: str, vm: str | VM | AsyncVM, port: int, *,
                    state_root: Path | None = None, timeout: float = JOIN_TIMEOUT) -> int:
    """Give the host a port into ``vm``'s TCP ``port`` on private network ``network``.

    Returns the port on 127.0.0.1 that reaches ``port`` of the VM (a running
    :class:`~qemukit.VM`/:class:`~qemukit.AsyncVM` on the network, or the name it
    goes by there). A network is closed to the host until this is asked: the
    first forward starts the network's gateway, a QEMU with no guest whose
    user-mode network (``restrict=on``) sits on the network at the address ``.254``
    and lets no connection of a VM out; it stops with the network (its last VM).
    Only this user's processes can ask (the switch's socket is 0700/0600).

    Raises :class:`~qemukit.SpecError` for a bad network name or port,
    :class:`~qemukit.StateError` if the VM is not on the network or nothing runs
    there, :class:`~qemukit.WaitTimeout` after ``timeout`` seconds. Blocks for a
    moment (the gateway's start): from async code, run it in a thread.
    """
    from ..arch import ARCHES, DEFAULT_ARCH
    from ..host import find_qemu, host_arch
    from ..paths import state_dir

    if isinstance(vm, str):
        member = vm
        root = Path(state_root) if state_root is not None else state_dir()
        # Any qemu-system runs a machine-less gateway: the host's own architecture's first.
        arch = host_arch()
        qemu = find_qemu(arch if arch in ARCHES else DEFAULT_ARCH).path
    else:
        try:
            member = vm.networks[network].name
        except KeyError as exc:
            raise StateError(str(exc.args[0]) if exc.args else f"VM {vm.name!r} is not on "
                             f"network {network!r}") from None
        if vm.runtime is None:
            raise StateError(f"VM {vm.name!r} is not running")
        root = Path(state_root) if state_root is not None else vm.runtime.path.parent
        qemu = vm.qemu.path
    return forward(root, network, member, port, qemu, timeout)
