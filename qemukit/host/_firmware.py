"""Firmware and clock facts: UEFI (OVMF) files, the host's TSC rate."""

from __future__ import annotations

import functools
import os
from pathlib import Path

_OVMF_CANDIDATES = [
    ("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ("/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_VARS.fd"),
]


@functools.lru_cache(maxsize=1)
def tsc_khz() -> int | None:
    """The host's TSC frequency in kHz (what a guest's TSC ticks at), if it can be read."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    except (OSError, ValueError, IndexError):
        pass
    return None


def find_ovmf() -> tuple[str, str] | None:
    """OVMF's code and variable-template files, if the ovmf package is installed."""
    for code, vars_ in _OVMF_CANDIDATES:
        if os.path.exists(code) and os.path.exists(vars_):
            return code, vars_
    return None
