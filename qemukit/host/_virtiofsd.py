"""virtiofsd: which daemon, its argv, and how a normal user runs it (a user namespace)."""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
from collections.abc import Sequence
from pathlib import Path

from .._launch.process import run_command
from ..errors import HostError
from ..spec import Share, VMSpec
from ._fsguard import GuardError, guard_prefix
from ._kvm import uid_name

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
    user = uid_name(uid)
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


def _guard(read_only: Sequence[str] = (), drop_caps: bool = False) -> list[str]:
    try:
        return guard_prefix(read_only, drop_caps)
    except GuardError as exc:
        raise HostError(str(exc)) from exc


def virtiofsd_argv(daemon: tuple[str, str], share: Share, fd: int,
                   launcher: Sequence[str] = ()) -> list[str]:
    """The argv to serve ``share`` on the listening socket ``fd`` (both flavours).

    ``launcher`` is :func:`virtiofsd_launcher`'s prefix, if any. The daemon runs
    under the share guard (:mod:`qemukit.host._fsguard`): whatever the guest asks,
    it can make no set-user-ID or set-group-ID file and no device node on the
    host. A read-only share is read-only on the host: the Rust daemon's
    ``--readonly``; the C daemon (which has no such option) is served a
    read-only bind mount of the directory in a mount namespace of its own.
    """
    path, flavour = daemon
    if flavour == "rust":
        argv = [path, f"--fd={fd}", f"--shared-dir={share.host_path}", "--cache=auto"]
        return [*launcher, *_guard(), *argv, *(["--readonly"] if share.read_only else [])]
    # C virtiofsd parses -o with libfuse's option parser: ',' separates options and a
    # backslash escapes (so '\\,' is a literal comma), unlike QEMU's ',,'.
    source = str(share.host_path).replace("\\", "\\\\").replace(",", "\\,")
    # modcaps: it keeps neither the power to make device nodes nor to set file
    # capabilities (its xattr support is off anyway; the guard refuses both too), nor
    # CAP_FSETID, so a write clears the set-ID bits of a file that already had them.
    argv = [path, f"--fd={fd}", "-o", f"source={source}", "-o", "cache=auto",
            "-o", "modcaps=-mknod:-setfcap:-fsetid"]
    if os.path.realpath(share.host_path) == "/":
        # Its default sandbox pivot_root()s into the source, which fails for "/" (EBUSY).
        argv += ["-o", "sandbox=chroot"]
    if launcher:
        # Its default raises RLIMIT_NOFILE to ~1e6, which needs CAP_SYS_RESOURCE outside
        # the namespace: ask only for what this user's hard limit allows.
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        limit = 1_000_000 if hard == resource.RLIM_INFINITY else min(hard, 1_000_000)
        argv.insert(2, f"--rlimit-nofile={limit}")
    # The guard runs inside the launcher's user namespace (where it may make a mount
    # namespace), just before the daemon.
    ro = [str(share.host_path)] if share.read_only else []
    return [*launcher, *_guard(ro), *argv]


def qemu_share_guard(spec: VMSpec) -> list[str]:
    """What to put before QEMU's argv when QEMU itself serves a writable 9p share.

    QEMU's 9p server (``security_model=none``) does what the guest asks with
    QEMU's powers: as root it would store a setuid-root bit, a device node or a
    file capability on the host. Under the guard it cannot (root's QEMU also
    loses CAP_MKNOD and CAP_SETFCAP); a read-only 9p share is refused every
    write by QEMU (``readonly=on``) and needs no guard. Empty when not needed.
    """
    if not any(sh.transport == "9p" and not sh.read_only for sh in spec.all_shares):
        return []
    return _guard(drop_caps=os.geteuid() == 0)
