"""``tb_size`` against real QEMU: the TCG code buffer is the size asked for, and the guest runs."""

from __future__ import annotations

import re
from typing import Any

import pytest

pytestmark = [pytest.mark.integration]


def test_a_small_code_buffer_boots_and_runs(booted: Any) -> None:
    vm = booted(tb_size=16, warm=False)
    assert ["-accel", "tcg,tb-size=16"] == vm.argv[vm.argv.index("-accel"):][:2]
    out = vm.exec(["sh", "-c", "i=0; while [ $i -lt 20 ]; do ls -R /proc/self >/dev/null 2>&1; "
                   "i=$((i+1)); done; echo ran"], timeout=300)
    assert out.stdout_text.strip() == "ran"
    jit = str(vm.qmp("human-monitor-command", {"command-line": "info jit"}))
    used, size = map(int, re.search(r"gen code size\s+(\d+)/(\d+)", jit).groups())  # type: ignore[union-attr]
    assert 15 << 20 < size <= 16 << 20  # QEMU's buffer, less its guard page
    assert used <= size
    # The tiny guest translates more than 16 MiB to boot: the buffer was flushed, and it ran on.
    flushes = int(re.search(r"TB flush count\s+(\d+)", jit).group(1))  # type: ignore[union-attr]
    assert flushes >= 1
