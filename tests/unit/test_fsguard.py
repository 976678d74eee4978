"""The share guard's seccomp filter, run in a small classic-BPF interpreter (no kernel)."""

from __future__ import annotations

import errno
import struct

import pytest

from qemukit.host._fsguard import GuardError, guard_prefix, seccomp_program, supported

ALLOW, EPERM, ENOSYS = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
O_CREAT, O_TMPFILE, O_WRONLY = 0o100, 0o20200000, 0o1
S_IFREG, S_IFCHR, S_IFBLK, S_IFIFO = 0o100000, 0o020000, 0o060000, 0o010000


def run(program: list[tuple[int, int, int, int]], arch: int, nr: int, *args: int) -> int:
    """What the filter answers for one system call (the opcodes the guard uses only)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    acc, pc = 0, 0
    for _ in range(10_000):
        code, jt, jf, k = program[pc]
        pc += 1
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == 0x54:
            acc &= k
        elif code == 0x06:
            return k
        elif code in (0x15, 0x35, 0x45):
            taken = {0x15: acc == k, 0x35: acc >= k, 0x45: bool(acc & k)}[code]
            pc += jt if taken else jf
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("the filter did not return")


# (machine, syscall number, args, answer)
CASES = [
    ("x86_64", 90, ("p", 0o4755), EPERM),             # chmod u+s
    ("x86_64", 90, ("p", 0o2755), EPERM),             # chmod g+s
    ("x86_64", 90, ("p", 0o1777), ALLOW),             # sticky is harmless
    ("x86_64", 91, (3, 0o755), ALLOW),                # fchmod
    ("x86_64", 91, (3, 0o4700), EPERM),
    ("x86_64", 268, (-100, "p", 0o4755), EPERM),      # fchmodat
    ("x86_64", 268, (-100, "p", 0o644), ALLOW),
    ("x86_64", 452, (-100, "p", 0o6755, 0), EPERM),   # fchmodat2
    ("x86_64", 257, (-100, "p", O_CREAT | O_WRONLY, 0o4755), EPERM),  # openat creating
    ("x86_64", 257, (-100, "p", O_TMPFILE | O_WRONLY, 0o2755), EPERM),
    ("x86_64", 257, (-100, "p", O_CREAT | O_WRONLY, 0o755), ALLOW),
    ("x86_64", 257, (-100, "p", O_WRONLY, 0o4755), ALLOW),  # no O_CREAT: the mode is ignored
    ("x86_64", 2, ("p", O_CREAT, 0o4755), EPERM),     # open
    ("x86_64", 85, ("p", 0o4755), EPERM),             # creat
    ("x86_64", 85, ("p", 0o644), ALLOW),
    ("x86_64", 259, (-100, "p", S_IFCHR | 0o600, 0x103), EPERM),  # mknodat a char device
    ("x86_64", 259, (-100, "p", S_IFBLK | 0o600, 0x800), EPERM),
    ("x86_64", 259, (-100, "p", S_IFREG | 0o4755, 0), EPERM),
    ("x86_64", 259, (-100, "p", S_IFIFO | 0o600, 0), ALLOW),
    ("x86_64", 259, (-100, "p", S_IFREG | 0o644, 0), ALLOW),
    ("x86_64", 133, ("p", S_IFCHR | 0o666, 0x103), EPERM),  # mknod
    ("x86_64", 437, (-100, "p", 0, 24), ENOSYS),      # openat2: its mode is out of reach
    ("x86_64", 0, (3, 0, 4096), ALLOW),               # read
    ("x86_64", 0x40000000 + 90, ("p", 0o4755), ENOSYS),  # the x32 ABI
    ("aarch64", 53, (-100, "p", 0o4755), EPERM),      # fchmodat
    ("aarch64", 52, (3, 0o4755), EPERM),              # fchmod
    ("aarch64", 56, (-100, "p", O_CREAT, 0o4755), EPERM),  # openat
    ("aarch64", 33, (-100, "p", S_IFCHR | 0o600, 0x103), EPERM),  # mknodat
    ("aarch64", 33, (-100, "p", S_IFIFO | 0o600, 0), ALLOW),
    ("aarch64", 63, (3, 0, 4096), ALLOW),             # read
]


@pytest.mark.parametrize(("machine", "nr", "args", "answer"), CASES)
def test_the_filter_refuses_set_id_bits_and_device_nodes(machine: str, nr: int,
                                                         args: tuple[object, ...],
                                                         answer: int) -> None:
    program = seccomp_program(machine)
    # A path pointer is some address; -100 (AT_FDCWD) is passed as the kernel sees it.
    values = [0x7FFF0000 if a == "p" else (a & 0xFFFFFFFFFFFFFFFF if isinstance(a, int) else 0)
              for a in args]
    assert run(program, ARCH[machine], nr, *values) == answer


def test_a_call_from_another_architecture_is_refused() -> None:
    # A 32-bit x86 chmod (int 0x80: the same number means another call) never gets through.
    assert run(seccomp_program("x86_64"), 0x40000003, 15, 0x7FFF0000, 0o4755) == ENOSYS


def test_the_guard_is_a_script_run_before_the_server() -> None:
    prefix = guard_prefix(["/srv/x"], drop_caps=True)
    assert prefix[1:3] == ["-I", "-S"] and prefix[3].endswith("_fsguard.py")
    assert prefix[4:] == ["--ro", "/srv/x", "--drop-caps", "--"]
    assert supported("x86_64") and not supported("ppc64le")
    with pytest.raises(GuardError, match="ppc64le"):
        seccomp_program("ppc64le")
