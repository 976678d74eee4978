"""KVM: is /dev/kvm usable, does a probe boot reach the guest's init under it, and the accelerator choice."""

from __future__ import annotations

import contextlib
import fcntl
import grp
import logging
import os
import platform
import pwd
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .._fs import locked
from .._launch.argv import Plumbing, build_argv
from .._launch.process import run_until_output
from ..arch import ARCHES, DEFAULT_ARCH, host_arch_name
from ..errors import AcceleratorError
from ..paths import cache_dir
from ..spec import VMSpec
from ._qemu import QemuBinary, read_cache, write_cache

log = logging.getLogger(__name__)

INIT_MARKER = b"qemukit-init: ready"
KVM_PROBE_TIMEOUT = float(os.environ.get("QEMUKIT_KVM_PROBE_TIMEOUT", "8"))
_KVM_GET_API_VERSION = 0xAE00


def kvm_device_status() -> tuple[bool, str]:
    """Whether ``/dev/kvm`` can be opened and speaks the expected KVM API."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False, "/dev/kvm does not exist (no KVM in this kernel or VM)"
    except PermissionError:
        return False, f"/dev/kvm is not accessible: {_kvm_access_advice()}"
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return False, f"/dev/kvm rejected KVM_GET_API_VERSION: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return False, f"/dev/kvm speaks KVM API {version}, expected 12"
    return True, "/dev/kvm is usable"


def _kvm_access_advice() -> str:
    """What a user who cannot open ``/dev/kvm`` can do about it, on this host.

    The kvm-group advice only helps where the device really is group ``kvm``
    with group read-write; elsewhere (``root:root 0600``) it says what does.
    """
    user = _user_name()
    try:
        st = os.stat("/dev/kvm")
    except OSError as exc:
        return f"cannot stat it ({exc.strerror})"
    try:
        group = grp.getgrgid(st.st_gid)
        group_name = group.gr_name
    except KeyError:
        group_name = str(st.st_gid)
    owner = f"{uid_name(st.st_uid)}:{group_name} {stat.S_IMODE(st.st_mode):04o}"
    group_rw = st.st_mode & 0o060 == 0o060
    try:
        kvm_group: grp.struct_group | None = grp.getgrnam("kvm")
    except KeyError:
        kvm_group = None
    if kvm_group is not None and group_rw and st.st_gid == kvm_group.gr_gid:
        if user in kvm_group.gr_mem and kvm_group.gr_gid not in os.getgroups():
            return (f"{user} is in the kvm group but this session is not yet: "
                    "log in again (or run 'newgrp kvm')")
        return f"add {user} to the kvm group (usermod -aG kvm {user}), then log in again"
    why = "this host has no kvm group" if kvm_group is None else "its group cannot open it"
    return (f"it is {owner} and {why}; as root, grant {user} access with "
            f"'setfacl -m u:{user}:rw /dev/kvm' (until reboot) or for good with 'groupadd kvm' "
            "and a udev rule KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\" "
            f"(then usermod -aG kvm {user}), or run as root")


def uid_name(uid: int) -> str:
    """The user name of ``uid`` (the number as text when it has none)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user_name() -> str:
    """The name of the user this process runs as (its uid if it has no name)."""
    return uid_name(os.geteuid())


def _kvm_summary(status: KvmStatus) -> str:
    """A few words for the one-line verdict; ``reason`` keeps the whole story."""
    if status.usable:
        return f"KVM works (probe boot passed with -cpu {status.cpu})" if status.cpu \
            else "KVM works"
    if not status.probed:
        return status.reason.split(":")[0].split(" (")[0]
    if status.busy_timeout:  # provisional: a slow boot and a hung one look the same then
        return "KVM not verified: the probe boot timed out on a busy host"
    if "did not reach its init" in status.reason:
        return "this host's KVM cannot run Linux guests"
    return "QEMU aborts under this host's KVM with every CPU model tried"


@dataclass(frozen=True)
class KvmStatus:
    """The verdict on KVM: usable or not, and why (with the probe's console tail).

    ``reason`` is the whole story (what each probe did, QEMU's own last words);
    ``summary`` is a few words for a one-line verdict, derived when not given.
    """

    usable: bool
    reason: str
    probed: bool
    console: str = ""
    cpu: str | None = None
    summary: str = ""
    #: The probe ran out of time on a host busier than its CPUs (load average >= CPU count):
    #: a slow boot and a hung one look the same then, so the verdict is only provisional.
    busy_timeout: bool = False
    #: When the probe ran (``time.time()``).
    probed_at: float = 0.0

    def __post_init__(self) -> None:
        if not self.summary:
            object.__setattr__(self, "summary", _kvm_summary(self))

    def still_valid(self, now: float | None = None) -> bool:
        """Whether a cached verdict still holds: one from a busy host's timeout only for a while."""
        if not self.busy_timeout:
            return True
        return ((time.time() if now is None else now) - self.probed_at) < BUSY_PROBE_TTL


@dataclass(frozen=True)
class AccelChoice:
    """The accelerator a VM will run under, why (``reason``) and in short (``summary``).

    ``reason`` is the full explanation (``qemukit doctor``, ``run -v``);
    ``summary`` is the short line printed by default. It defaults to ``reason``.
    """

    accel: str
    reason: str
    cpu: str | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if not self.summary:
            object.__setattr__(self, "summary", self.reason)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def _probe_key(qemu: QemuBinary, kernel: str, initrd: str) -> str:
    stamp = [str(os.stat(p).st_mtime_ns) for p in (kernel, initrd)]
    return "|".join([_boot_id(), qemu.path, qemu.version_string, kernel, initrd, *stamp])


def kvm_status(
    qemu: QemuBinary,
    probe_image: tuple[str, str] | None,
    *,
    timeout: float = KVM_PROBE_TIMEOUT,
    use_cache: bool = True,
    arch: str = DEFAULT_ARCH,
) -> KvmStatus:
    """Decide whether KVM really works: device check, then a cached probe boot.

    ``probe_image`` is a (kernel, initrd) pair whose init prints
    ``qemukit-init: ready``; without one KVM cannot be verified and is not used.
    """
    ok, reason = kvm_device_status()
    if not ok:
        return KvmStatus(False, reason, probed=False)
    if probe_image is None:
        return KvmStatus(
            False, "/dev/kvm is present but unverified: no probe image (qemukit images build tiny)",
            probed=False, summary="KVM not verified: no probe image",
        )
    kernel, initrd = probe_image
    key = _probe_key(qemu, kernel, initrd)
    cache_name = f"kvm-probe{ARCHES[arch].cache_suffix}.json"
    if use_cache and (cached := _cached_status(cache_name, key)) is not None:
        return cached
    # Concurrent first starts (a test matrix, a pytest -n run) probe once: the others wait for
    # the lock, then find the verdict in the cache.
    with _probe_lock(cache_name):
        if use_cache and (cached := _cached_status(cache_name, key)) is not None:
            return cached
        status = _probe_boot(qemu, kernel, initrd, timeout, arch)
        write_cache(cache_name, key, asdict(status))
    return status


#: How long a verdict from a probe that timed out on a busy host is kept before the next
#: start probes again (a verdict from an idle host, or from QEMU's own exit, lasts the boot).
BUSY_PROBE_TTL = 600.0


def _cached_status(name: str, key: str) -> KvmStatus | None:
    data = read_cache(name, key)
    if data is None:
        return None
    try:
        status = KvmStatus(**data)
    except TypeError:
        return None
    return status if status.still_valid() else None


@contextlib.contextmanager
def _probe_lock(cache_name: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        try:
            cache_dir().mkdir(parents=True, exist_ok=True)
            stack.enter_context(locked(cache_dir() / f"{cache_name}.lock"))
        except OSError as exc:
            # An unwritable cache only costs a probe per start (write_cache says the same).
            log.debug("KVM probe without the lock: %s", exc)
        yield


def _host_busy() -> tuple[bool, str]:
    """Whether the host has more runnable work than CPUs, and the figures to say so."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    return load >= cpus, f"load average {load:.1f} on {cpus} CPUs"


def _probe_boot(
    qemu: QemuBinary, kernel: str, initrd: str, timeout: float, arch: str = DEFAULT_ARCH
) -> KvmStatus:
    failures: list[str] = []
    candidates = ARCHES[arch].kvm_cpus
    for cpu in candidates:
        spec = VMSpec(
            name="kvm-probe",
            arch=arch,  # type: ignore[arg-type]
            cpu=cpu,
            kernel=kernel,
            initrd=initrd,
            append=f"console={ARCHES[arch].console} panic=-1 quiet qemukit.probe",
            no_reboot=True,
            agent=False,
            serial=False,
            hotplug_ports=0,
            extra_args=("-serial", "stdio"),
        )
        argv = build_argv(spec, qemu=qemu.path, accel="kvm", plumbing=Plumbing())
        seen, tail, exited = run_until_output(argv, INIT_MARKER, timeout=timeout)
        if seen:
            return KvmStatus(
                True, f"a probe boot under KVM (-cpu {cpu}) reached the guest's init", True, tail, cpu,
                probed_at=time.time(),
            )
        if exited is None:
            busy, load = _host_busy()
            why = (
                f"QEMU starts under KVM (-cpu {cpu}) but the guest did not reach its init "
                f"within {timeout:g}s (this host's KVM does not run Linux guests)"
            )
            if busy:
                why += (f"; the host was busy ({load}), so KVM is probed again after "
                        f"{BUSY_PROBE_TTL / 60:g} minutes")
            return KvmStatus(False, "; ".join([*failures, why]), True, tail,
                             busy_timeout=busy, probed_at=time.time())
        last_line = tail.strip().splitlines()[-1] if tail.strip() else ""
        failures.append(f"-cpu {cpu}: QEMU exited with status {exited} ({last_line[:160]})")
    return KvmStatus(False, "; ".join(failures), True, tail, probed_at=time.time())


def host_arch() -> str:
    """The host's architecture as a guest architecture name (``platform.machine()`` else)."""
    machine = platform.machine()
    return host_arch_name(machine) or machine


def resolve_accel(
    requested: str, qemu: QemuBinary, probe_image: tuple[str, str] | None,
    *, arch: str = DEFAULT_ARCH,
) -> AccelChoice:
    """Turn ``auto``/``kvm``/``tcg`` into the accelerator for a guest of ``arch``.

    KVM runs only guests of the host's own architecture, and only after the
    probe boot proved it: a foreign guest gets TCG (``kvm`` asked for one
    raises :class:`AcceleratorError`). ``kvm`` on a host where KVM does not
    work raises too; ``auto`` falls back to TCG and says why.
    """
    if requested == "tcg":
        return AccelChoice("tcg", "TCG (software emulation) as requested", summary="TCG (as requested)")
    native = host_arch()
    if arch != native:
        why = f"{arch} guests cannot use KVM on this {native} host (KVM runs only the host's architecture)"
        if requested == "kvm":
            raise AcceleratorError("kvm", why)
        return AccelChoice("tcg", f"TCG (software emulation): {why}",
                           summary=f"TCG: {arch} guest emulated on this {native} host")
    status = kvm_status(qemu, probe_image, arch=arch)
    if requested == "kvm" and probe_image is None and kvm_device_status()[0]:
        return AccelChoice("kvm", "KVM as requested (/dev/kvm usable; no probe image to verify)",
                           summary="KVM (as requested, not verified by a probe boot)")
    if status.usable:
        return AccelChoice("kvm", f"KVM: {status.reason}", status.cpu, summary=status.summary)
    if requested == "kvm":
        raise AcceleratorError("kvm", status.reason)
    return AccelChoice("tcg", f"TCG (software emulation): {status.reason}",
                       summary=f"TCG: {status.summary} (qemukit doctor)")
