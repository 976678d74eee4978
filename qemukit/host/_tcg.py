"""TCG's code buffer when many VMs share a host: the ``tb_size`` a pool gives each VM.

QEMU reserves 1 GiB of translated-code buffer per TCG VM and fills it as the
guest runs new code, resident once written: the tiny image translates about
50 MiB to boot and run a few commands, a Debian boot 843 MiB (measured here),
so four Debian VMs held 5.5 GiB between them. A smaller buffer is flushed
(and the code retranslated) when it fills: at 64 MiB the four held 1.8 GiB,
for 33 flushes each and a slower boot (scripts/bench's ``tbsize`` part;
docs/benchmarks.md has the figures).
"""

from __future__ import annotations

import os

__all__ = ["POOL_TB_SIZE_MAX", "POOL_TB_SIZE_MIN", "tb_size_for"]

#: The largest and smallest code buffer (MiB) a pool gives each VM.
POOL_TB_SIZE_MAX = 256
POOL_TB_SIZE_MIN = 64


def _host_memory_mib() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (OSError, ValueError):
        return 4096


def tb_size_for(vms_at_once: int, host_memory_mib: int | None = None) -> int | None:
    """The ``tb_size`` (MiB) for each of ``vms_at_once`` TCG VMs, or None for QEMU's default.

    One VM keeps QEMU's default (1 GiB). Several share a quarter of the host's
    memory for their code buffers, each between :data:`POOL_TB_SIZE_MIN` and
    :data:`POOL_TB_SIZE_MAX` MiB (a power of two, so the value is stable
    across hosts of similar size).
    """
    if vms_at_once <= 1:
        return None
    total = host_memory_mib if host_memory_mib is not None else _host_memory_mib()
    share = total // 4 // vms_at_once
    size = POOL_TB_SIZE_MIN
    while size * 2 <= min(share, POOL_TB_SIZE_MAX):
        size *= 2
    return size
