"""A restored clone's kernel RNG is reseeded before its first command (tiny guest, TCG).

Every clone of a warm state resumes with the RNG state the save captured. Host bytes
written to ``/dev/urandom`` are only mixed into the input pool (Linux 6.1 does not reseed
on a write) and the tiny image's cloud kernel has no vmgenid driver, so without the
reseed program (:func:`qemukit.identity.reseed_script`) two clones could hand out the
same keys, nonces and ASLR-free "random" tokens. The very first command of each clone
here reads 16 bytes through ``getrandom(2)`` (a static program, sent in that command) and
16 from ``/dev/urandom``; they must differ between clones, and the restore's reseed
command must have run in each (both ioctls succeeded: exit status 0).

Why no test that fails on the old restore: for the tiny guest the old one passed by
timing. Its state is saved about 3 s after boot, when the kernel reseeds on its own
whenever its seed is older than half the uptime (about 1.5 s of guest time), and the
restore's first command usually comes later than that. A state saved after 120 s of
uptime (a cloud-init guest) is reseeded by time only every 60 s: there the old restore
handed two clones the same bytes for up to a minute.
"""

from __future__ import annotations

import base64
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, images
from qemukit.identity import static_elf
from qemukit.paths import cache_dir
from qemukit.vm import _core

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("warm")]

#: getrandom(buf, 16, 0); write(1, buf, 16); exit (x86_64, assembled with GNU as):
#:     sub rsp, 16; mov eax, 318; mov rdi, rsp; mov esi, 16; xor edx, edx; syscall
#:     mov edi, 1; cmp rax, 16; jne done
#:     mov eax, 1; mov edi, 1; mov rsi, rsp; mov edx, 16; syscall
#:     xor edi, edi; cmp rax, 16; setne dil
#:     done: mov eax, 60; syscall
GETRANDOM = static_elf(bytes.fromhex(
    "4883ec10b83e0100004889e7be1000000031d20f05bf010000004883f810751eb801000000bf01000000"
    "4889e6ba100000000f0531ff4883f810400f95c7b83c0000000f05"))

FIRST_COMMAND = (
    f"printf %s {base64.b64encode(GETRANDOM).decode()} | base64 -d > /run/getrandom && "
    "chmod 700 /run/getrandom && /run/getrandom | od -An -tx1 | tr -d ' \\n' && echo && "
    "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'")


@pytest.fixture(scope="module")
def private_cache(tiny_image: images.TinyImage, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Path]:
    """A cache of this module's own (the shared tiny image linked in): its own warm state."""
    shared = cache_dir()
    root = tmp_path_factory.mktemp("warm-rng-cache")
    (root / "tiny").symlink_to(shared / "tiny")
    for facts in shared.glob("*.json"):
        shutil.copy(facts, root / facts.name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QEMUKIT_CACHE", str(root))
        yield root


def _spec() -> Any:
    return images.spec("tiny", accel="tcg", memory=256, warm=True)


def _first_reads(spec: Any) -> tuple[str, str, list[int]]:
    """Start a clone; its very first command's getrandom and urandom bytes (hex), and the exit
    status of the restore's clock-and-reseed command."""
    statuses: list[int] = []
    real = _core.AsyncVM.exec

    async def spying(self: Any, command: Any, **kwargs: Any) -> Any:
        result = await real(self, command, **kwargs)
        if isinstance(command, list) and "qemukit-reseed" in command[-1]:
            statuses.append(result.exit_status)
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_core.AsyncVM, "exec", spying)
        with VM(spec) as vm:
            assert vm.warm_start is not None and vm.warm_start.warm, vm.warm_start
            out = vm.exec(FIRST_COMMAND, check=True).stdout_text.split()
    assert len(out) == 2 and all(len(part) == 32 for part in out), out
    return out[0], out[1], statuses


def test_two_clones_read_different_bytes_as_their_first_command(private_cache: Path) -> None:
    spec = _spec()
    with VM(spec) as builder:
        assert builder.warm_start is not None and not builder.warm_start.warm
    got_a, urandom_a, status_a = _first_reads(spec)
    got_b, urandom_b, status_b = _first_reads(spec)
    # The reseed ran in each clone, before the first command, and both ioctls succeeded.
    assert status_a == status_b == [0]
    assert got_a != got_b, "two clones got the same bytes from getrandom"
    assert urandom_a != urandom_b, "two clones read the same bytes from /dev/urandom"
