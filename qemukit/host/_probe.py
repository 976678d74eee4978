"""One seam for the host's facts: :class:`HostProbe`, the real probes by default.

Code that asks the host something a unit test must be able to answer
differently (which machine this is, which QEMU serves an architecture, whether
KVM works, what a disk image is) asks :func:`host_probe` for the current
probe and calls it, instead of calling the module functions directly. A test
swaps in a probe with some answers replaced, for the code it runs::

    fake = dataclasses.replace(HostProbe(), machine=lambda: "aarch64")
    with using_host_probe(fake):
        ...

The probe is held in a :class:`contextvars.ContextVar`: it applies to the
thread or task that set it (and to ``asyncio.to_thread`` calls made from
there), not to other threads, so tests running side by side do not see each
other's. Used by ``qemukit doctor`` and the disk hotplug's preflight.
"""

from __future__ import annotations

import contextlib
import contextvars
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .._launch.plan import DiskImage
from ..arch import host_arch_name
from ._img import create_overlay, resolve_disk
from ._kvm import KvmStatus, kvm_device_status, kvm_status
from ._qemu import QemuBinary, find_qemu, qemu_path

__all__ = ["HostProbe", "host_probe", "using_host_probe"]


@dataclass(frozen=True)
class HostProbe:
    """The host's facts as replaceable functions (each field defaults to the real probe)."""

    #: The host's machine name (``platform.machine()``: ``x86_64``, ``aarch64``...).
    machine: Callable[[], str] = platform.machine
    #: The QEMU for guests of an architecture (:func:`qemukit.host.find_qemu`).
    find_qemu: Callable[[str], QemuBinary] = find_qemu
    #: Where the QEMU for an architecture is, or None (:func:`qemukit.host.qemu_path`).
    qemu_path: Callable[[str], str | None] = qemu_path
    #: Whether ``/dev/kvm`` opens and speaks KVM (:func:`qemukit.host.kvm_device_status`).
    kvm_device_status: Callable[[], tuple[bool, str]] = kvm_device_status
    #: Whether KVM runs guests (:func:`qemukit.host.kvm_status`, the cached probe boot).
    kvm_status: Callable[..., KvmStatus] = kvm_status
    #: What QEMU opens for a drive (:func:`qemukit.host.resolve_disk`).
    resolve_disk: Callable[..., DiskImage] = resolve_disk
    #: Create a qcow2 overlay over a base (:func:`qemukit.host.create_overlay`).
    create_overlay: Callable[..., None] = create_overlay

    def arch(self) -> str:
        """The host's architecture as a guest architecture name (its machine name else)."""
        machine = self.machine()
        return host_arch_name(machine) or machine


#: The real probes.
_REAL = HostProbe()
_current: contextvars.ContextVar[HostProbe | None] = contextvars.ContextVar("qemukit_host_probe",
                                                                             default=None)


def host_probe() -> HostProbe:
    """The probe in effect here: the real one unless :func:`using_host_probe` set another."""
    return _current.get() or _REAL


@contextlib.contextmanager
def using_host_probe(probe: HostProbe) -> Iterator[HostProbe]:
    """Use ``probe`` for the host's facts while the block runs (in this thread or task)."""
    if not isinstance(probe, HostProbe):
        raise TypeError(f"probe must be a HostProbe, not {type(probe).__name__}")
    token = _current.set(probe)
    try:
        yield probe
    finally:
        _current.reset(token)
