"""Facts about the host: the QEMU binary, its features, firmware, and KVM.

Everything here is probed, not assumed, and cached: the binary's facts per
process, the KVM probe boot per host boot (on disk). ``/dev/kvm`` existing is
not proof that KVM works (on some paravirtual hosts QEMU starts but Linux
guests hang), so ``accel='auto'`` uses KVM only after a short probe boot of
the tiny guest reached its init under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import grp
import json
import os
import pwd
import re
import resource
import shutil
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ._fs import write_atomic
from .argv import Plumbing, build_argv
from .errors import AcceleratorError, HostError, SpecError
from .paths import cache_dir
from .process import run_command, run_until_output
from .spec import Share, VMSpec

__all__ = [
    "AccelChoice",
    "KvmStatus",
    "QemuBinary",
    "create_overlay",
    "find_ovmf",
    "find_qemu",
    "find_virtiofsd",
    "image_format",
    "kvm_device_status",
    "kvm_status",
    "resolve_accel",
    "tsc_khz",
    "virtiofsd_argv",
    "virtiofsd_launcher",
]

INIT_MARKER = b"qemukit-init: ready"
KVM_PROBE_TIMEOUT = float(os.environ.get("QEMUKIT_KVM_PROBE_TIMEOUT", "8"))
_KVM_GET_API_VERSION = 0xAE00
_OVMF_CANDIDATES = [
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
]


@dataclass(frozen=True)
class QemuBinary:
    """A qemu-system binary and what it supports (read from its own help)."""

    path: str
    version: tuple[int, int, int]
    version_text: str
    machines: frozenset[str]
    has_sandbox: bool
    qemu_img: str | None
    has_run_with: bool = False

    @property
    def version_string(self) -> str:
        """The version as ``major.minor.micro``."""
        return ".".join(map(str, self.version))


@functools.lru_cache(maxsize=8)
def _probe_binary(path: str) -> QemuBinary:
    out = run_command([path, "-version"], timeout=20)
    m = re.search(r"version (\d+)\.(\d+)\.(\d+)", out.stdout)
    if out.returncode != 0 or not m:
        raise HostError(f"{path} -version failed: {(out.stdout + out.stderr).strip()[:300]}")
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    help_text = run_command([path, "-help"], timeout=20).stdout
    machines_text = run_command([path, "-machine", "help"], timeout=20).stdout
    machines = frozenset(
        line.split()[0] for line in machines_text.splitlines()[1:] if line.strip()
    )
    img = shutil.which("qemu-img", path=str(Path(path).parent)) or shutil.which("qemu-img")
    return QemuBinary(
        path=path,
        version=version,
        version_text=out.stdout.splitlines()[0].strip(),
        machines=machines,
        has_sandbox=bool(re.search(r"^-sandbox ", help_text, re.MULTILINE)),
        qemu_img=img,
        has_run_with=bool(re.search(r"^-run-with ", help_text, re.MULTILINE)),
    )


def find_qemu() -> QemuBinary:
    """The QEMU to use: ``$QEMUKIT_QEMU``, else ``qemu-system-x86_64`` on PATH."""
    env = os.environ.get("QEMUKIT_QEMU")
    path = env or shutil.which("qemu-system-x86_64")
    if not path or not os.access(path, os.X_OK):
        where = f"$QEMUKIT_QEMU={env!r}" if env else "qemu-system-x86_64 on PATH"
        raise HostError(
            f"no QEMU found ({where}); install it with: apt-get install qemu-system-x86 qemu-utils"
        )
    return _facts(str(Path(path).resolve()) if not env else path)


@functools.lru_cache(maxsize=8)
def _facts(path: str) -> QemuBinary:
    """The binary's facts: from the on-disk cache while the file is unchanged, else probed.

    Probing runs QEMU three times (about 45 ms), which every short-lived
    ``qemukit`` command would otherwise pay.
    """
    st = os.stat(path)
    key = f"{path}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}"
    cached = _read_cache("qemu-facts.json", key)
    if cached is not None:
        try:
            cached["version"] = tuple(cached["version"])
            cached["machines"] = frozenset(cached["machines"])
            return QemuBinary(**cached)
        except (KeyError, TypeError):
            pass
    facts = _probe_binary(path)
    _write_cache("qemu-facts.json", key, {**asdict(facts), "machines": sorted(facts.machines)})
    return facts


def _read_cache(name: str, key: str) -> dict[str, Any] | None:
    """The data cached under ``name`` in the cache dir, if it was stored for ``key``."""
    try:
        cached = json.loads((cache_dir() / name).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(cached, dict) or cached.get("key") != key:
        return None
    data = cached.get("data")
    return data if isinstance(data, dict) else None


def _write_cache(name: str, key: str, data: dict[str, Any]) -> None:
    """Store ``data`` for ``key``; an unwritable cache only costs a probe next time."""
    with contextlib.suppress(OSError):
        cache_dir().mkdir(parents=True, exist_ok=True)
        write_atomic(cache_dir() / name, json.dumps({"key": key, "data": data}))


_VIRTIOFSD_CANDIDATES = ("/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd")


@functools.lru_cache(maxsize=1)
def find_virtiofsd() -> tuple[str, str] | None:
    """virtiofsd's path and flavour (``rust`` or ``c``), or None if not installed."""
    path = os.environ.get("QEMUKIT_VIRTIOFSD") or shutil.which("virtiofsd")
    if not path:
        path = next((p for p in _VIRTIOFSD_CANDIDATES if os.access(p, os.X_OK)), None)
    if not path:
        return None
    help_text = run_command([path, "--help"], timeout=10)
    flavour = "rust" if "--shared-dir" in help_text.stdout + help_text.stderr else "c"
    return path, flavour


#: How many subordinate ids the user namespace maps (guest ids 1..65536 beyond root).
_SUBID_SPAN = 65536
_NORMAL_USER_HINT = "or run as root, or share over 9p (HOST:GUEST,9p) with a guest kernel that has it"


_SUBUID, _SUBGID = "/etc/subuid", "/etc/subgid"


def _subid_lines(file: str) -> list[list[str]]:
    try:
        lines = Path(file).read_text().splitlines()
    except OSError:
        return []
    return [f for f in (line.strip().split(":") for line in lines) if len(f) == 3]


def _free_subid_span() -> str:
    """A range of subordinate ids no entry uses yet, for the ``usermod`` advice."""
    start = 100000
    for fields in _subid_lines(_SUBUID) + _subid_lines(_SUBGID):
        if fields[1].isdigit() and fields[2].isdigit():
            start = max(start, int(fields[1]) + int(fields[2]))
    return f"{start}-{start + _SUBID_SPAN - 1}"


def _subid_range(file: str, user: str, uid: int) -> tuple[int, int] | None:
    """The first (start, count) range ``/etc/subuid``-style ``file`` gives ``user``."""
    for fields in _subid_lines(file):
        if fields[0] in (user, str(uid)):
            with contextlib.suppress(ValueError):
                start, count = int(fields[1]), int(fields[2])
                if count > 0:
                    return start, min(count, _SUBID_SPAN)
    return None


@functools.lru_cache(maxsize=4)
def _userns_prefix(uid: int) -> tuple[str, ...]:
    """``unshare`` options that make ``uid`` root in a new user namespace where setgroups works.

    ``unshare -r`` alone is not enough: an unprivileged process may map its own
    ids only with setgroups denied, and the C virtiofsd exits when it cannot
    drop supplementary groups. The setuid newuidmap/newgidmap may also map the
    user's subordinate ids, and then setgroups stays allowed.
    """
    user = _uid_name(uid)
    unshare = shutil.which("unshare") or shutil.which("unshare", path="/usr/bin:/bin")
    if unshare is None:
        raise HostError(f"a virtiofs share as a normal user ({user}) needs util-linux's unshare; "
                        f"{_NORMAL_USER_HINT}")
    if not (shutil.which("newuidmap", path="/usr/bin:/bin:" + os.environ.get("PATH", ""))
            and shutil.which("newgidmap", path="/usr/bin:/bin:" + os.environ.get("PATH", ""))):
        raise HostError(f"a virtiofs share as a normal user ({user}) needs newuidmap and "
                        f"newgidmap (as root: apt-get install uidmap); {_NORMAL_USER_HINT}")
    subuid = _subid_range(_SUBUID, user, uid)
    subgid = _subid_range(_SUBGID, user, uid)
    if subuid is None or subgid is None:
        missing = " and ".join(f for f, r in ((_SUBUID, subuid), (_SUBGID, subgid)) if r is None)
        span = _free_subid_span()
        raise HostError(
            f"a virtiofs share as a normal user ({user}) needs subordinate ids for {user} in "
            f"{missing} (as root: usermod --add-subuids {span} --add-subgids {span} {user}); "
            f"{_NORMAL_USER_HINT}")
    prefix = (unshare, "--map-user=0", "--map-group=0",
              f"--map-users={subuid[0]},1,{subuid[1]}", f"--map-groups={subgid[0]},1,{subgid[1]}")
    cat = shutil.which("cat") or "/bin/cat"
    out = run_command([*prefix, cat, "/proc/self/setgroups"], timeout=20)
    if out.returncode != 0 or out.stdout.strip() != "allow":
        said = (out.stderr.strip().splitlines() or [out.stdout.strip()])[-1][:200]
        raise HostError(
            f"a virtiofs share as a normal user ({user}) needs a user namespace, which this host "
            f"refused ({said}; see sysctl user.max_user_namespaces and any AppArmor userns "
            f"restriction); {_NORMAL_USER_HINT}")
    return prefix


def virtiofsd_launcher(daemon: tuple[str, str]) -> list[str]:
    """What to put before virtiofsd's argv so it can run as this user ([] when none needed).

    Root runs it directly. A normal user runs the C virtiofsd (which needs root's
    powers over its sandbox and groups) as root of a private user namespace;
    the Rust virtiofsd runs unprivileged by itself. Raises :class:`HostError`
    with what the host lacks, before anything is started.
    """
    if os.geteuid() == 0 or daemon[1] == "rust":
        return []
    return list(_userns_prefix(os.geteuid()))


def virtiofsd_argv(daemon: tuple[str, str], share: Share, fd: int,
                   launcher: Sequence[str] = ()) -> list[str]:
    """The argv to serve ``share`` on the listening socket ``fd`` (both flavours).

    ``launcher`` is :func:`virtiofsd_launcher`'s prefix, if any.
    """
    path, flavour = daemon
    if flavour == "rust":
        argv = [path, f"--fd={fd}", f"--shared-dir={share.host_path}", "--cache=auto"]
        return [*launcher, *argv, *(["--readonly"] if share.read_only else [])]
    if share.read_only:
        raise SpecError("share.read_only", True, f"{path} (C virtiofsd) cannot share read-only; "
                        "use transport='9p' or the Rust virtiofsd")
    # C virtiofsd parses -o with libfuse's option parser: ',' separates options and a
    # backslash escapes (so '\\,' is a literal comma), unlike QEMU's ',,'.
    source = str(share.host_path).replace("\\", "\\\\").replace(",", "\\,")
    argv = [path, f"--fd={fd}", "-o", f"source={source}", "-o", "cache=auto"]
    if launcher:
        # Its default raises RLIMIT_NOFILE to ~1e6, which needs CAP_SYS_RESOURCE outside
        # the namespace: ask only for what this user's hard limit allows.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        limit = 1_000_000 if hard == resource.RLIM_INFINITY else min(hard, 1_000_000)
        argv.insert(2, f"--rlimit-nofile={limit}")
    return [*launcher, *argv]


@functools.lru_cache(maxsize=1)
def tsc_khz() -> int | None:
    """The host's TSC frequency in kHz (what a guest's TSC ticks at), if it can be read."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


def find_ovmf() -> tuple[str, str] | None:
    """OVMF's code and variable-template files, if the ovmf package is installed."""
    for code, vars_ in _OVMF_CANDIDATES:
        if os.path.exists(code) and os.path.exists(vars_):
            return code, vars_
    return None


def image_format(path: str, qemu: QemuBinary) -> str:
    """The format of a disk image as ``qemu-img info`` detects it (read-only, -U)."""
    if not os.path.exists(path):
        raise SpecError("drive.file", path, "no such file")
    if qemu.qemu_img is None:
        raise HostError("qemu-img not found; install it with: apt-get install qemu-utils")
    out = run_command([qemu.qemu_img, "info", "-U", "--output=json", "--", path], timeout=30)
    if out.returncode != 0:
        raise SpecError("drive.file", path, f"qemu-img cannot read it: {out.stderr.strip()}")
    fmt = str(json.loads(out.stdout).get("format", ""))
    if fmt not in ("qcow2", "raw"):
        raise SpecError("drive.format", fmt, f"{path}: only qcow2 and raw images are supported")
    return fmt


def create_overlay(base: str, base_format: str, target: str | os.PathLike[str], *,
                   size: int | None = None, unsafe: bool = False) -> None:
    """Create a private (0600) qcow2 overlay at ``target`` over ``base``.

    The base is only recorded as the backing file, never written. ``unsafe``
    skips opening the base (needed while a running QEMU holds its lock).
    Raises :class:`HostError` with qemu-img's own message on failure.
    """
    qemu_img = find_qemu().qemu_img
    if qemu_img is None:
        raise HostError("qemu-img not found; install it with: apt-get install qemu-utils")
    argv = [qemu_img, "create", "-q", "-f", "qcow2", "-F", base_format, "-b", base]
    argv += ["-u"] if unsafe else []
    argv += [os.fspath(target)] + ([str(size)] if size is not None else [])
    out = run_command(argv, timeout=60)
    if out.returncode != 0:
        raise HostError(f"cannot create an overlay over {base}: {out.stderr.strip()}")
    os.chmod(target, 0o600)


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
    owner = f"{_uid_name(st.st_uid)}:{group_name} {stat.S_IMODE(st.st_mode):04o}"
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


def _uid_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _user_name() -> str:
    """The name of the user this process runs as (its uid if it has no name)."""
    return _uid_name(os.geteuid())


def _kvm_summary(status: KvmStatus) -> str:
    """A few words for the one-line verdict; ``reason`` keeps the whole story."""
    if status.usable:
        return f"KVM works (probe boot passed with -cpu {status.cpu})" if status.cpu \
            else "KVM works"
    if not status.probed:
        return status.reason.split(":")[0].split(" (")[0]
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

    def __post_init__(self) -> None:
        if not self.summary:
            object.__setattr__(self, "summary", _kvm_summary(self))


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
    cached = _read_cache("kvm-probe.json", key) if use_cache else None
    if cached is not None:
        with contextlib.suppress(TypeError):
            return KvmStatus(**cached)
    status = _probe_boot(qemu, kernel, initrd, timeout)
    _write_cache("kvm-probe.json", key, asdict(status))
    return status


#: CPU models tried under KVM, in order. Some hosts (nested, paravirtual)
#: reject an MSR that ``host`` passes through and QEMU aborts at start; the
#: next model is tried only when QEMU exited, never after a hang.
KVM_CPU_CANDIDATES = ("host", "host,-arch-capabilities", "kvm64")


def _probe_boot(qemu: QemuBinary, kernel: str, initrd: str, timeout: float) -> KvmStatus:
    failures: list[str] = []
    for cpu in KVM_CPU_CANDIDATES:
        spec = VMSpec(
            name="kvm-probe",
            cpu=cpu,
            kernel=kernel,
            initrd=initrd,
            append="console=ttyS0 panic=-1 quiet qemukit.probe",
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
                True, f"a probe boot under KVM (-cpu {cpu}) reached the guest's init", True, tail, cpu
            )
        if exited is None:
            why = (
                f"QEMU starts under KVM (-cpu {cpu}) but the guest did not reach its init "
                f"within {timeout:g}s (this host's KVM does not run Linux guests)"
            )
            return KvmStatus(False, "; ".join([*failures, why]), True, tail)
        last_line = tail.strip().splitlines()[-1] if tail.strip() else ""
        failures.append(f"-cpu {cpu}: QEMU exited with status {exited} ({last_line[:160]})")
    return KvmStatus(False, "; ".join(failures), True, tail)


def resolve_accel(
    requested: str, qemu: QemuBinary, probe_image: tuple[str, str] | None
) -> AccelChoice:
    """Turn ``auto``/``kvm``/``tcg`` into the accelerator to run under.

    ``kvm`` on a host where KVM does not work raises :class:`AcceleratorError`;
    ``auto`` falls back to TCG and says why.
    """
    if requested == "tcg":
        return AccelChoice("tcg", "TCG (software emulation) as requested", summary="TCG (as requested)")
    status = kvm_status(qemu, probe_image)
    if requested == "kvm" and probe_image is None and kvm_device_status()[0]:
        return AccelChoice("kvm", "KVM as requested (/dev/kvm usable; no probe image to verify)",
                           summary="KVM (as requested, not verified by a probe boot)")
    if status.usable:
        return AccelChoice("kvm", f"KVM: {status.reason}", status.cpu, summary=status.summary)
    if requested == "kvm":
        raise AcceleratorError("kvm", status.reason)
    return AccelChoice("tcg", f"TCG (software emulation): {status.reason}",
                       summary=f"TCG: {status.summary} (qemukit doctor)")
