"""What a start needs to know of this host: the facts for the launch plan, the probe image."""

from __future__ import annotations

from .. import host
from .._launch.plan import HostFacts
from ..arch import DEFAULT_ARCH
from ..paths import cache_dir


def host_facts(qemu: host.QemuBinary, accel: host.AccelChoice) -> HostFacts:
    """The host facts a launch plan needs, for ``qemu`` under the chosen ``accel``."""
    return HostFacts(
        qemu=qemu.path, accel=accel.accel, cpu=accel.cpu,
        sandbox=qemu.has_sandbox, run_with=qemu.has_run_with, tsc_khz=host.tsc_khz(),
        ovmf=host.find_ovmf(),
    )


def default_probe_image(arch: str = DEFAULT_ARCH) -> tuple[str, str] | None:
    """(kernel, initrd) of the ``arch`` tiny image a KVM probe boots, if it is built."""
    from ..images.tiny import find_tiny

    image = find_tiny(cache_dir(), arch=arch)
    return (str(image.kernel), str(image.initrd)) if image else None
