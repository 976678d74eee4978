"""Facts about the host: the QEMU binary, its features, firmware, and KVM.

Everything here is probed, not assumed, and cached: the binary's facts per
process, the KVM probe boot per host boot (on disk). ``/dev/kvm`` existing is
not proof that KVM works (on some paravirtual hosts QEMU starts but Linux
guests hang), so ``accel='auto'`` uses KVM only after a short probe boot of
the tiny guest reached its init under it.
"""

from __future__ import annotations

from ._binfmt import foreign_exec_problem
from ._firmware import find_ovmf, tsc_khz
from ._img import Qcow2Header, create_overlay, image_format, open_regular, read_qcow2_header, resolve_disk
from ._kvm import AccelChoice, KvmStatus, host_arch, kvm_device_status, kvm_status, resolve_accel
from ._probe import HostProbe, host_probe, using_host_probe
from ._qemu import QemuBinary, find_qemu, find_qemu_img, qemu_env_var, qemu_path
from ._virtiofsd import find_virtiofsd, qemu_share_guard, virtiofsd_argv, virtiofsd_launcher

__all__ = [
    "AccelChoice",
    "HostProbe",
    "KvmStatus",
    "Qcow2Header",
    "QemuBinary",
    "create_overlay",
    "find_ovmf",
    "find_qemu",
    "find_qemu_img",
    "find_virtiofsd",
    "foreign_exec_problem",
    "host_arch",
    "host_probe",
    "image_format",
    "kvm_device_status",
    "kvm_status",
    "open_regular",
    "qemu_env_var",
    "qemu_path",
    "qemu_share_guard",
    "read_qcow2_header",
    "resolve_accel",
    "resolve_disk",
    "tsc_khz",
    "using_host_probe",
    "virtiofsd_argv",
    "virtiofsd_launcher",
]
