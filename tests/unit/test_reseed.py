"""The program a restored clone runs first: host bytes in, then RNDRESEEDCRNG (see qemukit.identity).

The integration test (tests/integration/test_warm_rng.py) shows its effect in clones.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import secrets
import shutil
import struct
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from qemukit import VMSpec, identity
from qemukit.vm import AsyncVM, _warm

# -- the reseed program -------------------------------------------------------------------

RESEED_ASM = """\
    .intel_syntax noprefix
_start:
    mov rdi, [rsp + 8]
    mov eax, 87
    syscall
    mov edi, 4
    mov rax, [rip + ts]
    test rax, rax
    jz rng
    mov eax, 227
    xor edi, edi
    lea rsi, [rip + ts]
    syscall
    mov edi, 4
    test rax, rax
    jnz done
rng:
    mov eax, 2
    lea rdi, [rip + path]
    mov esi, 1
    xor edx, edx
    syscall
    mov edi, 1
    test rax, rax
    js done
    mov r12, rax
    mov eax, 16
    mov rdi, r12
    mov esi, 0x40085203
    lea rdx, [rip + info]
    syscall
    mov edi, 2
    test rax, rax
    jnz done
    mov eax, 16
    mov rdi, r12
    mov esi, 0x5207
    xor edx, edx
    syscall
    mov edi, 3
    test rax, rax
    jnz done
    xor edi, edi
done:
    mov eax, 60
    syscall
path:
    .asciz "/dev/urandom"
ts:
    .quad 0, 0
info:
"""


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                    reason="GNU binutils not installed")
def test_the_reseed_code_is_what_its_listing_says(tmp_path: Path) -> None:
    (tmp_path / "r.s").write_text(RESEED_ASM)
    ts_and_info = 16
    subprocess.run(["as", "--64", "-o", str(tmp_path / "r.o"), str(tmp_path / "r.s")], check=True)
    subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(tmp_path / "r.o"),
                    str(tmp_path / "r.bin")], check=True)
    # GNU as also emits the (zero) timespec: the code is what comes before it.
    assert (tmp_path / "r.bin").read_bytes() == identity._RESEED_CODE + bytes(ts_and_info)


def test_the_reseed_program_carries_the_entropy_and_the_time_in_a_loadable_elf() -> None:
    entropy = bytes(range(32))
    program = identity.reseed_program(entropy, clock_ns=1_700_000_000_123_456_789)
    assert program[:4] == b"\x7fELF"
    assert program.endswith(struct.pack("<qq", 1_700_000_000, 123_456_789)
                            + struct.pack("<ii", 256, 32) + entropy)
    assert len(program) == 64 + 56 + len(identity._RESEED_CODE) + 16 + 8 + 32
    assert identity.reseed_program(entropy)[-56:-40] == bytes(16)  # no time: clock untouched


@pytest.mark.skipif(platform.machine() != "x86_64", reason="an x86_64 program")
def test_the_reseed_program_runs_deletes_itself_and_needs_cap_sys_admin(tmp_path: Path) -> None:
    path = tmp_path / "reseed"

    def write() -> None:
        path.write_bytes(identity.reseed_program(secrets.token_bytes(32)))
        path.chmod(0o700)

    if os.geteuid() == 0:  # reseeds this host's RNG with 32 more random bytes: harmless
        write()
        assert subprocess.run([str(path)], timeout=30).returncode == 0
        assert not path.exists()
    if shutil.which("unshare"):  # a user namespace: root there, no CAP_SYS_ADMIN here
        write()
        denied = subprocess.run(["unshare", "--user", str(path)], timeout=30)
        if denied.returncode != 1:  # unshare itself may be refused on some hosts
            assert identity.RESEED_STEPS[denied.returncode] == "RNDADDENTROPY"


def _in_dirs(script: str, *dirs: Path) -> str:
    return script.replace("for d in /run /dev/shm /tmp;", f"for d in {' '.join(map(str, dirs))};")


@pytest.mark.parametrize("shell", ["dash", "bash"])
def test_the_reseed_script_writes_the_program_with_printf_alone(tmp_path: Path,
                                                               shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} not installed")
    script = _in_dirs(identity.reseed_script(), tmp_path).replace('"$f" 2>/dev/null; s=$?', 'cat "$f"; exit')
    out = subprocess.run([shell, "-c", script], capture_output=True, timeout=30)
    assert out.stdout[:4] == b"\x7fELF" and len(out.stdout) == 346
    assert out.stdout[-40:] != identity.reseed_program(bytes(32))[-40:]
    (written,) = tmp_path.iterdir()
    assert written.stat().st_mode & 0o777 == 0o700  # umask 077: never readable by others


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None
                    or platform.machine() != "x86_64", reason="needs root, unshare, x86_64")
def test_a_noexec_dir_is_skipped_and_left_clean(tmp_path: Path) -> None:
    """Debian mounts /run noexec: the script moves on to the next directory."""
    noexec, other = tmp_path / "noexec", tmp_path / "other"
    noexec.mkdir()
    other.mkdir()
    script = _in_dirs(identity.reseed_script(), noexec, other)
    result = subprocess.run(["unshare", "--mount", "sh", "-c",
                             f"mount -t tmpfs -o noexec none {noexec} && {{ {script}; }}"],
                            capture_output=True, text=True, timeout=60)
    if "mount" in result.stderr and result.returncode != 0 and "Permission" in result.stderr:
        pytest.skip(f"cannot mount here: {result.stderr}")
    assert result.returncode == 0, result.stderr
    assert list(other.iterdir()) == []  # the program deleted itself


def test_a_file_planted_under_the_name_is_not_written_through(tmp_path: Path) -> None:
    """set -C: in a world-writable directory a guest user's link is never followed."""
    victim = tmp_path / "victim"
    victim.write_text("root's file")
    planted = tmp_path / "dir"
    planted.mkdir()
    script = _in_dirs(identity.reseed_script(), planted)
    # The shell's $$ is only known inside: plant the link there, then run the script.
    result = subprocess.run(["sh", "-c", f"ln -s {victim} {planted}/qemukit-reseed.$$; {script}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 5, result.stderr  # no directory left to use
    assert victim.read_text() == "root's file"


def test_the_reseed_script_sends_a_fresh_program_each_time() -> None:
    one, two = identity.reseed_script(), identity.reseed_script()
    assert one != two and "d/qemukit-reseed.$$" in one and one.endswith("exit 5")


@pytest.mark.parametrize(("guest", "agent", "arch", "reseeds"), [
    ("running", "qemukit", "x86_64", True),
    ("running", "qga", "aarch64", True),  # qemu-guest-agent: a failed reseed is logged
    ("paused", "qemukit", "x86_64", False),
    ("running", "none", "x86_64", False),
    ("running", "qemukit", "aarch64", False),
])
def test_vm_restore_reseeds_the_clone_where_it_can_and_warns_where_not(
        guest: str, agent: str, arch: str, reseeds: bool, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[object] = []

    async def set_clock(vm: object) -> None:
        calls.append(vm)

    monkeypatch.setattr(_warm, "set_guest_clock", set_clock)
    vm = AsyncVM(VMSpec(name="clone", agent=agent, arch=arch,  # type: ignore[arg-type]
                        kernel="/boot/vmlinuz", initrd="/boot/initrd.img"))
    bundle = SimpleNamespace(manifest={"guest": guest}, path=Path("/saved/bundle"))
    with caplog.at_level(logging.WARNING, logger="qemukit"):
        asyncio.run(_warm.reseed_restored(vm, bundle))  # type: ignore[arg-type]
    assert calls == ([vm] if reseeds else [])
    warned = [r.getMessage() for r in caplog.records if "not reseeded" in r.getMessage()]
    assert bool(warned) != reseeds, warned
    if warned:
        assert "clone" in warned[0] and "/saved/bundle" in warned[0], warned
