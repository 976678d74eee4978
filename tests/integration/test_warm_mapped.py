"""Mapped warm restores in real QEMU (VM templating): clones map the state's RAM file copy on
write, stay separate machines, and never write the file; a device that blocks mapping makes
the state copy the RAM as before, and says why.

The module has its own ``QEMUKIT_CACHE`` (the tiny image linked in): two builds, five clones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qemukit import VM, HotplugError, images
from qemukit.vm import _warm
from qemukit.warm import WarmCache

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("warm-mapped")]

MARKER = "cat /tmp/marker 2>/dev/null || echo none"


@pytest.fixture(scope="module")
def private_cache(private_cache: Path) -> Iterator[Path]:
    """The module's own cache (conftest.py's), with mapped restores on."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_warm.MAP_ENV, "1")
        yield private_cache


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def urandom(vm: VM) -> str:
    return vm.exec("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'", check=True).stdout_text


def test_mapped_clones_are_separate_and_never_write_the_template(private_cache: Path) -> None:
    spec = images.spec("tiny", accel="tcg", memory=256, warm=True)
    with VM(spec) as first:
        assert first.warm_start is not None and not first.warm_start.warm
        assert first.warm_start.memory == "memory mapped"
        key = first.warm_start.key
    entry = WarmCache().get(key or "")
    assert entry is not None
    ram = entry.bundle_path / "ram"
    assert ram.stat().st_size == 256 << 20
    # The state holds the devices only: the RAM stayed in the file.
    assert (entry.bundle_path / "state.bin").stat().st_size < 8 << 20
    before = digest(ram)

    a, b = VM(spec), VM(spec)
    try:
        with ThreadPoolExecutor(2) as pool:  # both restored at once, from one file
            list(pool.map(lambda vm: vm.start(), (a, b)))
        for vm in (a, b):
            assert vm.warm_start is not None and vm.warm_start.warm
            assert vm.warm_start.memory == "memory mapped", vm.warm_start
            assert any(f"mem-path={ram},share=off" in arg for arg in vm.argv)
        assert a.name != b.name and a.pid != b.pid
        # Fresh entropy from the first read on: the saved RNG state is shared by both.
        bytes_a, bytes_b = urandom(a), urandom(b)
        assert len(bytes_a) == 64 and bytes_a != bytes_b
        # Writes are each clone's own: a marker and 64 MiB in a's RAM (its /tmp is RAM).
        a.exec("echo CLONE-A > /tmp/marker && dd if=/dev/urandom of=/tmp/fill bs=1M count=64"
               " 2>/dev/null", check=True, timeout=120)
        assert a.exec(MARKER, check=True).stdout_text.strip() == "CLONE-A"
        assert b.exec(MARKER, check=True).stdout_text.strip() == "none"
    finally:
        for vm in (a, b):
            if vm.state.value == "running":
                vm.shutdown(timeout=10)
    with VM(spec) as third:
        assert third.warm_start is not None and third.warm_start.memory == "memory mapped"
        assert third.exec(MARKER, check=True).stdout_text.strip() == "none"
        assert urandom(third) not in (bytes_a, bytes_b)
        # QEMU 7.2 opens the file read-write and would punch holes in it for what a balloon
        # gives back: a balloon plugged at run time is refused before QEMU is asked.
        if third.qemu.version < (8, 2, 0):
            with pytest.raises(HotplugError, match=r"virtio-balloon-pci.*punching holes"):
                third.qmp("device_add", driver="virtio-balloon-pci", id="balloon0")
            assert "balloon0" not in str(third.qmp("qom-list", path="/machine/peripheral"))
    # A mapped bundle restores by VM.restore too, mapping the same file.
    with VM.restore(entry.bundle_path, name="mapped-restore") as restored:
        assert any(f"mem-path={ram},share=off" in arg for arg in restored.argv)
        assert restored.exec(MARKER, check=True).stdout_text.strip() == "none"
    assert digest(ram) == before  # no clone wrote the template


def test_a_balloon_blocks_mapping_and_the_ram_is_copied_as_before(private_cache: Path) -> None:
    spec = images.spec("tiny", accel="tcg", memory=200, warm=True,
                       extra_args=("-device", "virtio-balloon-pci,free-page-reporting=on"))
    with VM(spec) as first:
        assert first.warm_start is not None
        key = first.warm_start.key
        assert first.warm_start.memory.startswith("memory copied: a virtio-balloon device")
    entry = WarmCache().get(key or "")
    assert entry is not None and not (entry.bundle_path / "ram").exists()
    with VM(spec) as clone:
        assert clone.warm_start is not None and clone.warm_start.warm
        assert "memory copied: a virtio-balloon" in clone.warm_start.describe()
        assert not any("memory-backend-file" in arg for arg in clone.argv)
        assert clone.exec(["true"]).ok
