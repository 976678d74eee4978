"""A restored clone's kernel RNG is reseeded before its first command (tiny guest, TCG).

Every clone of a warm state resumes with the RNG state the save captured. Host bytes
written to ``/dev/urandom`` are only mixed into the input pool (Linux 6.1 does not reseed
on a write) and the tiny image's cloud kernel has no vmgenid driver, so without the
reseed program (:func:`qemukit.identity.reseed_script`) two clones could hand out the
same keys, nonces and ASLR-free "random" tokens. The very first command of each clone
here runs a static program (sent in that command) that makes 1024 ``getrandom(2)`` calls
and 1024 reads of ``/dev/urandom``, 16 bytes each. Each call takes the next key of the
kernel's crng chain (fast key erasure), so two clones in one RNG state read overlapping
streams, even if something in one guest drew a few more numbers first: the two clones
must share no 16-byte block, and the restore's reseed command must have run in each
(both ioctls succeeded: exit status 0).

The attack is made deterministic, not left to timing. Linux 6.1 reseeds its crng on a
read only when the seed is older than the reseed interval, ``max(1 s, uptime / 2)``
until 120 s of uptime (``crng_reseed_interval`` in drivers/char/random.c). A warm state
saved 3 s after boot has an old seed and an interval of about 1.5 s, so the clone's
first read reseeded anyway and the old restore (host bytes written to ``/dev/urandom``,
no reseed) passed by luck. Here the builder waits until the guest's uptime is
:data:`AGE` seconds and forces a reseed (``RNDRESEEDCRNG``) just before the save: a clone
then resumes with a seed younger than half its uptime, and the kernel reseeds on its
own only after about :data:`AGE` seconds of the clone's guest time (the seed's age ``t``
must exceed ``(AGE + t) / 2``). Without qemukit's reseed two clones read the same
blocks: against the restore of commit 10295cf (``date -s`` and host bytes written to
``/dev/urandom``) all 2048 were equal.

The same holds for :meth:`qemukit.VM.restore` of a bundle written by ``save_state``:
two clones of one bundle, each reseeded by the restore before its first command.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from qemukit import VM, images
from qemukit.identity import reseed_script, static_elf
from qemukit.vm import _core
from qemukit.warm import WarmCache

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("warm")]

#: The builder's guest uptime (s) at the forced reseed before the save. A clone's kernel
#: reseeds by itself only after about this long of its own guest time.
AGE = 30

#: The clone's first reads: 1024 x getrandom(16 bytes), then 1024 x read(/dev/urandom, 16),
#: all written to stdout (32 KiB); exit status 0, or 1-4 for the step that failed
#: (x86_64, assembled with GNU as; the buffer is on the stack):
#:     sub rsp, 32768; mov r13, rsp; mov r12d, 1024
#:     1: mov eax, 318; mov rdi, r13; mov esi, 16; xor edx, edx; syscall      # getrandom
#:        mov edi, 1; cmp rax, 16; jne 9f; add r13, 16; dec r12d; jnz 1b
#:     mov eax, 2; lea rdi, [rip+path]; xor esi, esi; xor edx, edx; syscall   # open
#:     mov edi, 2; test rax, rax; js 9f; mov r14, rax; mov r12d, 1024
#:     2: xor eax, eax; mov rdi, r14; mov rsi, r13; mov edx, 16; syscall       # read
#:        mov edi, 3; cmp rax, 16; jne 9f; add r13, 16; dec r12d; jnz 2b
#:     mov r13, rsp; mov r12d, 32768
#:     3: mov eax, 1; mov edi, 1; mov rsi, r13; mov edx, r12d; syscall        # write
#:        mov edi, 4; test rax, rax; jle 9f; add r13, rax; sub r12d, eax; jnz 3b
#:     xor edi, edi
#:     9: mov eax, 60; syscall
#:     path: .asciz "/dev/urandom"
STREAMS = static_elf(bytes.fromhex(
    "4881ec008000004989e541bc00040000b83e0100004c89efbe1000000031d20f05bf010000004883f810"
    "0f85800000004983c51041ffcc75d7b802000000488d3d7200000031f631d20f05bf020000004885c078"
    "5b4989c641bc0004000031c04c89f74c89eeba100000000f05bf030000004883f81075384983c51041ff"
    "cc75dd4989e541bc00800000b801000000bf010000004c89ee4489e20f05bf040000004885c07e0a4901"
    "c54129c475dc31ffb83c0000000f052f6465762f7572616e646f6d00"))

#: Reads per source in STREAMS.
READS = 1024

FIRST_COMMAND = (
    f"printf %s {base64.b64encode(STREAMS).decode()} | base64 -d > /run/rng-streams && "
    "chmod 700 /run/rng-streams && exec /run/rng-streams")

#: Waits (guest time, in the guest) until the uptime is AGE seconds; prints the uptime.
AGE_COMMAND = (f"while [ $(cut -d. -f1 /proc/uptime) -lt {AGE} ]; do sleep 1; done; "
               "cut -d' ' -f1 /proc/uptime")


@pytest.fixture(scope="module")
def aged_saves(private_cache: Path) -> Iterator[list[float]]:
    """Every ``save_state`` of this module first waits for AGE s of guest uptime, then
    forces a crng reseed: the saved seed is fresh, with a long interval ahead (see above).
    Yields the guest uptimes at those saves."""
    uptimes: list[float] = []
    real_exec = _core.AsyncVM.exec
    real_save = _core.AsyncVM.save_state

    async def aged_save(self: Any, path: Any, **kwargs: Any) -> Any:
        aged = await real_exec(self, AGE_COMMAND, timeout=AGE + 120, check=True)
        reseeded = await real_exec(self, ["sh", "-c", reseed_script()], timeout=60)
        assert reseeded.exit_status == 0, (reseeded.exit_status, reseeded.stderr_text)
        uptimes.append(float(aged.stdout_text))
        return await real_save(self, path, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_core.AsyncVM, "save_state", aged_save)
        yield uptimes


class Reads(NamedTuple):
    """The 16-byte blocks a clone's first command read (see STREAMS)."""

    getrandom: set[bytes]
    urandom: set[bytes]


def _spec() -> Any:
    return images.spec("tiny", accel="tcg", memory=256, warm=True)


def _first_reads(start: Any) -> tuple[Reads, list[int], Any]:
    """Start a clone with ``start()``; its very first command's reads (see STREAMS), the exit
    statuses of the restore's reseed commands, and its warm_start."""
    statuses: list[int] = []
    real = _core.AsyncVM.exec

    async def spying(self: Any, command: Any, **kwargs: Any) -> Any:
        result = await real(self, command, **kwargs)
        text = command if isinstance(command, str) else command[-1]
        if "qemukit-reseed" in text:
            statuses.append(result.exit_status)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_core.AsyncVM, "exec", spying)
        with start() as vm:
            warm_start = vm.warm_start
            out = vm.exec(FIRST_COMMAND, timeout=120, check=True).stdout
    assert len(out) == 2 * 16 * READS, len(out)
    blocks = [out[i:i + 16] for i in range(0, len(out), 16)]
    reads = Reads(set(blocks[:READS]), set(blocks[READS:]))
    assert len(reads.getrandom | reads.urandom) == 2 * READS, "a clone read a block twice"
    return reads, statuses, warm_start


def _assert_apart(a: Reads, b: Reads) -> None:
    """The two clones' reads share no 16-byte block (two clones in the same state walk the
    same chain of crng keys, so their streams overlap unless each was reseeded)."""
    same_getrandom = a.getrandom & b.getrandom
    same_urandom = a.urandom & b.urandom
    shared = (a.getrandom | a.urandom) & (b.getrandom | b.urandom)
    assert len(shared) == 0, (f"two clones got the same random bytes: {len(same_getrandom)} of "
                        f"{READS} getrandom blocks, {len(same_urandom)} of {READS} "
                        f"/dev/urandom blocks, {len(shared)} in all")


def test_two_warm_clones_read_different_bytes_as_their_first_command(
        aged_saves: list[float]) -> None:
    spec = _spec()
    # The first start builds the state (the builder's save is aged and reseeded), then is
    # itself the first clone of it.
    reads_a, status_a, start_a = _first_reads(lambda: VM(spec))
    assert start_a is not None and not start_a.warm, start_a
    assert len(aged_saves) == 1 and aged_saves[0] >= AGE, aged_saves
    reads_b, status_b, start_b = _first_reads(lambda: VM(spec))
    assert start_b is not None and start_b.warm and start_b.key == start_a.key, start_b
    _assert_apart(reads_a, reads_b)
    # The reseed ran in each clone, before the first command, and both ioctls succeeded.
    assert status_a == status_b == [0]


def test_two_restored_clones_read_different_bytes_as_their_first_command(
        aged_saves: list[float]) -> None:
    # The aged and reseeded state the warm test saved (built here when run alone), restored
    # by VM.restore: the same bundle format save_state writes.
    if not WarmCache().entries():
        with VM(_spec()):
            pass
    (entry,) = WarmCache().entries()
    bundle = entry.bundle_path
    reads_a, status_a, _ = _first_reads(lambda: VM.restore(bundle, name="rng-a"))
    reads_b, status_b, _ = _first_reads(lambda: VM.restore(bundle, name="rng-b"))
    _assert_apart(reads_a, reads_b)
    assert status_a == status_b == [0]
