"""Fixtures for tests that boot the tiny guest in real QEMU under TCG."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qemukit import VM, VMSpec, images
from tests.helpers import private_warm_cache


@pytest.fixture
def tiny_spec(tiny_image: images.TinyImage) -> VMSpec:
    """A spec booting the tiny guest under TCG (tests never rely on KVM)."""
    return images.spec("tiny", accel="tcg")


@pytest.fixture
def booted(tiny_spec: VMSpec) -> Iterator[Any]:
    """Factory: ``booted(**spec_overrides)`` returns a VM whose agent answers; all stopped after."""
    vms: list[VM] = []

    def make(**overrides: Any) -> VM:
        vm = VM(tiny_spec.replace(**overrides) if overrides else tiny_spec)
        vms.append(vm)
        vm.start()
        vm.wait_ready(120)
        return vm

    yield make
    for vm in vms:
        if vm.state.value == "running":
            vm.shutdown(timeout=10)


@pytest.fixture(scope="module")
def private_cache(tiny_image: images.TinyImage, tmp_path_factory: pytest.TempPathFactory,
                  request: pytest.FixtureRequest) -> Iterator[Path]:
    """``QEMUKIT_CACHE`` of the requesting module's own (the shared tiny image linked in), so
    its warm states start from nothing and other modules' are not touched."""
    module = request.module.__name__.rpartition(".")[2]
    with private_warm_cache(tmp_path_factory.mktemp(f"cache-{module}")) as root:
        yield root


@pytest.fixture(scope="session")
def debian_image() -> images.DebianImage:
    """The debian image, built once (about 80 s) if the cache lacks it."""
    built = images.find_image("debian")
    if built is None and os.geteuid() != 0:
        pytest.skip("building the debian image runs mmdebstrap as root (a normal user can use "
                    "an image root built: run 'qemukit images build debian' as root first)")
    return built or images.build("debian", progress=lambda msg: print(f"  {msg}", file=sys.stderr))


@pytest.fixture(scope="session")
def debug_kernel() -> Path:
    """The suite's kernel with DWARF debug info and the gdb scripts (a ``make O=`` tree): built
    once, cached by its inputs (many minutes on an empty cache: slow-tier tests only)."""
    from tests.kernel_build import build_debug_kernel

    return build_debug_kernel(progress=lambda msg: print(f"  {msg}", file=sys.stderr))
