"""The host facts the warm-cache and warm-start unit tests key their states with."""

from __future__ import annotations

from pathlib import Path

from qemukit import host
from qemukit._launch.plan import HostFacts

#: An x86_64 QEMU under TCG.
FACTS = HostFacts(qemu="/usr/bin/qemu-system-x86_64", accel="tcg")


def qemu(path: Path, version: tuple[int, int, int] = (7, 2, 0)) -> host.QemuBinary:
    """A QEMU binary at ``path`` (the ``files`` fixture's ``qemu``) of ``version``."""
    return host.QemuBinary(str(path), version, "", frozenset({"q35"}), True, None)
