"""The share guard: what a file server for a guest may not do to the host, enforced by the host.

A share's file server (QEMU itself for 9p, virtiofsd for virtiofs) does what
the guest asks, with the powers of the user who runs it. Run as this script in
front of the server::

    python -I -S _fsguard.py [--ro PATH]... -- SERVER ARGS...

it installs, then execs the server:

* a seccomp filter (inherited by every thread and child, kept across exec, and
  not removable) under which no file can get a set-user-ID or set-group-ID bit
  (``chmod``/``fchmod``/``fchmodat``/``fchmodat2``, ``open``/``openat``/``creat``
  creating with such a mode, ``mknod``/``mknodat``) and no character or block
  device node can be made: the call fails with EPERM, so the guest sees an
  error and the host file stays as it was. ``openat2`` (whose mode sits in a
  structure a filter cannot read) answers ENOSYS, the usual way to make a
  program fall back to ``openat``;
* for each ``--ro PATH``: a private mount namespace in which PATH is a
  recursive read-only (and nosuid, nodev) bind mount of itself, so writes
  through the server fail with EROFS whatever the guest mounts;
* as root: CAP_MKNOD, CAP_SETFCAP and CAP_FSETID dropped from the bounding set
  (``--drop-caps``), so no device node and no file capability
  (``security.capability``, as strong as a setuid-root bit) can be made even
  by a path the filter does not see, and a write through the server clears the
  set-ID bits of a file that already had them (the kernel keeps them only for
  a writer with CAP_FSETID).

It imports only the standard library (it runs with ``-S``, before the server,
on every start of a VM with a share), and its filter is pure data
(:func:`seccomp_program`), tested without running it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["GuardError", "exec_guarded", "guard_prefix", "seccomp_program", "supported"]

# -- the seccomp filter: classic BPF over struct seccomp_data ---------------------------------

_LD_ABS_W = 0x20   # BPF_LD | BPF_W | BPF_ABS
_JEQ = 0x15        # BPF_JMP | BPF_JEQ | BPF_K
_JGE = 0x35        # BPF_JMP | BPF_JGE | BPF_K
_JSET = 0x45       # BPF_JMP | BPF_JSET | BPF_K
_AND = 0x54        # BPF_ALU | BPF_AND | BPF_K
_RET = 0x06        # BPF_RET | BPF_K
_ALLOW = 0x7FFF0000
_ERRNO = 0x00050000

_SETID = 0o6000                 # S_ISUID | S_ISGID
_S_IFMT, _S_IFCHR, _S_IFBLK = 0o170000, 0o020000, 0o060000
_CREATES = 0o100 | 0o20000000   # O_CREAT | __O_TMPFILE (the same on x86_64 and arm64)
_X32_BIT = 0x40000000

#: Per host machine: (AUDIT_ARCH_*, whether x32 calls (the x32 bit set) exist and are
#: refused, {syscall: its role and the argument positions}).
#: Roles: "mode" (args: the mode), "create" (the flags, the mode), "node" (the mode),
#: "nosys" (refused with ENOSYS).
_ARCHES: dict[str, tuple[int, bool, dict[int, tuple[str, tuple[int, ...]]]]] = {
    "x86_64": (0xC000003E, True, {
        2: ("create", (1, 2)),      # open
        85: ("create_always", (1,)),  # creat (always creates)
        90: ("mode", (1,)),         # chmod
        91: ("mode", (1,)),         # fchmod
        133: ("node", (1,)),        # mknod
        257: ("create", (2, 3)),    # openat
        259: ("node", (2,)),        # mknodat
        268: ("mode", (2,)),        # fchmodat
        437: ("nosys", ()),         # openat2
        452: ("mode", (2,)),        # fchmodat2
    }),
    "aarch64": (0xC00000B7, False, {
        33: ("node", (2,)),         # mknodat
        52: ("mode", (1,)),         # fchmod
        53: ("mode", (2,)),         # fchmodat
        56: ("create", (2, 3)),     # openat
        437: ("nosys", ()),         # openat2
        452: ("mode", (2,)),        # fchmodat2
    }),
}


class GuardError(Exception):
    """The guard cannot be set up on this host (the server is then not started)."""


def supported(machine: str | None = None) -> bool:
    """Whether the guard knows this host's system calls (x86_64 and arm64 hosts)."""
    return (machine or platform.machine()) in _ARCHES and sys.byteorder == "little"


def _arg(index: int) -> int:
    """Offset of the low 32 bits of ``args[index]`` in struct seccomp_data (little-endian)."""
    return 16 + 8 * index


def seccomp_program(machine: str | None = None) -> list[tuple[int, int, int, int]]:
    """The filter for ``machine`` (default: this host) as (code, jt, jf, k) instructions."""
    machine = machine or platform.machine()
    if machine not in _ARCHES:
        raise GuardError(f"no share guard for a {machine} host (x86_64 and aarch64 only)")
    audit_arch, has_x32, calls = _ARCHES[machine]
    # Written with labels, then laid out: ("jump", code, k, true_label, false_label).
    body: list[tuple[Any, ...]] = [
        ("op", _LD_ABS_W, 4), ("jump", _JEQ, audit_arch, None, "nosys"),
        ("op", _LD_ABS_W, 0),
    ]
    if has_x32:
        body.append(("jump", _JGE, _X32_BIT, "nosys", None))
    for nr, (role, args) in sorted(calls.items()):
        nxt = f"after{nr}"
        body.append(("jump", _JEQ, nr, None, nxt))
        if role == "nosys":
            body.append(("label_ret", "nosys"))
        elif role in ("mode", "create_always"):
            body += [("op", _LD_ABS_W, _arg(args[0])), ("jump", _JSET, _SETID, "deny", "allow")]
        elif role == "create":
            body += [("op", _LD_ABS_W, _arg(args[0])), ("jump", _JSET, _CREATES, None, "allow"),
                     ("op", _LD_ABS_W, _arg(args[1])), ("jump", _JSET, _SETID, "deny", "allow")]
        elif role == "node":
            body += [("op", _LD_ABS_W, _arg(args[0])), ("jump", _JSET, _SETID, "deny", None),
                     ("op", _AND, _S_IFMT), ("jump", _JEQ, _S_IFCHR, "deny", None),
                     ("jump", _JEQ, _S_IFBLK, "deny", "allow")]
        body.append(("label", nxt))
        # Reload the syscall number for the next comparison (the checks clobbered A).
        body.append(("op", _LD_ABS_W, 0))
    body += [("label", "allow"), ("ret", _ALLOW),
             ("label", "deny"), ("ret", _ERRNO | errno.EPERM),
             ("label", "nosys"), ("ret", _ERRNO | errno.ENOSYS)]
    # "label_ret" is a jump to a label: always-true jump.
    positions: dict[str, int] = {}
    count = 0
    for item in body:
        if item[0] == "label":
            positions[item[1]] = count
        else:
            count += 1
    program: list[tuple[int, int, int, int]] = []
    for item in body:
        kind = item[0]
        if kind == "label":
            continue
        here = len(program)

        def offset(label: str | None, here: int = here) -> int:
            if label is None:
                return 0
            off = positions[label] - here - 1
            if not 0 <= off <= 255:
                raise GuardError(f"filter jump to {label} out of range ({off})")
            return off

        if kind == "op":
            program.append((item[1], 0, 0, item[2]))
        elif kind == "ret":
            program.append((_RET, 0, 0, item[1]))
        elif kind == "label_ret":
            program.append((_JEQ, offset(item[1]), offset(item[1]), 0))
        else:
            _, code, k, true_label, false_label = item
            program.append((code, offset(true_label), offset(false_label), k))
    return program


def guard_prefix(read_only: Sequence[str] = (), drop_caps: bool = False) -> list[str]:
    """The argv to put before a file server's to run it guarded (this file as a script).

    Raises :class:`GuardError` on a host the guard does not know.
    """
    if not supported():
        raise GuardError(f"qemukit's share guard knows x86_64 and aarch64 hosts only, not "
                         f"{platform.machine()}: a writable or virtiofs share cannot be served "
                         "safely here (share read-only over 9p instead)")
    python = sys.executable or "/usr/bin/python3"
    prefix = [python, "-I", "-S", os.path.abspath(__file__)]
    for path in read_only:
        prefix += ["--ro", str(path)]
    if drop_caps:
        prefix.append("--drop-caps")
    return [*prefix, "--"]


# -- applying it -------------------------------------------------------------------------------

_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2
_CAP_FSETID, _CAP_MKNOD, _CAP_SETFCAP = 4, 27, 31
_CLONE_NEWNS = 0x00020000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 1 << 18
_AT_FDCWD, _AT_RECURSIVE = -100, 0x8000
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NOSUID, _MOUNT_ATTR_NODEV = 0x1, 0x2, 0x4
_SYS_MOUNT_SETATTR = 442  # the same number on every architecture


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise GuardError(f"{what}: {os.strerror(err)}")


def _read_only(libc: ctypes.CDLL, paths: Sequence[str]) -> None:
    """Make each of ``paths`` a recursive read-only bind of itself, in a new mount namespace."""
    _check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    # Nothing done here may reach the host's namespace.
    _check(libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None), "making / private")
    attr = struct.pack("QQQQ", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID | _MOUNT_ATTR_NODEV,
                       0, 0, 0)
    for path in paths:
        real = os.path.realpath(path).encode()
        if real != b"/":
            # A bind of the path onto itself, so only it (and what is mounted below it)
            # turns read-only, not the file system that holds it.
            _check(libc.mount(real, real, None, _MS_BIND | _MS_REC, None), f"binding {path}")
        buf = ctypes.create_string_buffer(attr, len(attr))
        result = libc.syscall(ctypes.c_long(_SYS_MOUNT_SETATTR), ctypes.c_long(_AT_FDCWD), real,
                              ctypes.c_long(_AT_RECURSIVE), buf, ctypes.c_long(len(attr)))
        _check(result, f"making {path} read-only (mount_setattr)")


def _install_filter(libc: ctypes.CDLL) -> None:
    program = seccomp_program()
    raw = b"".join(struct.pack("HBBI", *ins) for ins in program)
    buf = ctypes.create_string_buffer(raw, len(raw))
    prog = _SockFprog(len(program), ctypes.cast(buf, ctypes.c_void_p))
    ul = ctypes.c_ulong
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, ul(1), ul(0), ul(0), ul(0)),
           "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(libc.prctl(_PR_SET_SECCOMP, ul(_SECCOMP_MODE_FILTER), ctypes.byref(prog), ul(0), ul(0)),
           "installing the seccomp filter")


def exec_guarded(argv: Sequence[str], read_only: Sequence[str] = (),
                 drop_caps: bool = False) -> None:
    """Set up the guard in this process and exec ``argv`` (returns only by raising)."""
    libc = _libc()
    libc.syscall.restype = ctypes.c_long
    if read_only:
        _read_only(libc, read_only)
    if drop_caps:
        for cap in (_CAP_FSETID, _CAP_MKNOD, _CAP_SETFCAP):
            _check(libc.prctl(_PR_CAPBSET_DROP, ctypes.c_ulong(cap), ctypes.c_ulong(0),
                              ctypes.c_ulong(0), ctypes.c_ulong(0)), f"dropping capability {cap}")
    _install_filter(libc)
    os.execv(argv[0], list(argv))


def main(args: Sequence[str]) -> int:
    """``[--ro PATH]... [--drop-caps] -- ARGV...``: see the module's text."""
    read_only: list[str] = []
    drop_caps = False
    rest = list(args)
    while rest and rest[0] != "--":
        opt = rest.pop(0)
        if opt == "--ro" and rest:
            read_only.append(rest.pop(0))
        elif opt == "--drop-caps":
            drop_caps = True
        else:
            print(f"qemukit share guard: unknown option {opt!r}", file=sys.stderr)
            return 125
    if len(rest) < 2:
        print("qemukit share guard: usage: [--ro PATH]... [--drop-caps] -- ARGV...",
              file=sys.stderr)
        return 125
    try:
        exec_guarded(rest[1:], read_only, drop_caps)
    except (GuardError, OSError) as exc:
        print(f"qemukit share guard: {exc}", file=sys.stderr)
        return 125
    return 0  # not reached: exec_guarded execs


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
