"""The accelerator line every ``qemukit run`` prints: short by default, the whole story under -v.

``--accel`` is left at its default (auto), so the KVM probe verdict of this
host (cached per boot) decides, as it does for a user who types the command.
"""

from __future__ import annotations

from typing import Any

import pytest

from qemukit import host, images

pytestmark = pytest.mark.integration


def _accel_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines()
             if ln.startswith("qemukit: ") and ("TCG" in ln or "KVM" in ln)]
    assert len(lines) == 1, stderr
    return lines[0]


def test_default_accel_line_is_short(qk: Any, tiny_image: images.TinyImage) -> None:
    out = qk("run", "--image", "tiny", "--", "true")
    assert out.returncode == 0, out.stderr
    line = _accel_line(out.stderr)
    assert len(line) < 100, line
    assert "Assertion" not in out.stderr


def test_verbose_accel_line_has_the_probe_verdict(qk: Any, tiny_image: images.TinyImage) -> None:
    out = qk("run", "-v", "--image", "tiny", "--", "true")
    assert out.returncode == 0, out.stderr
    status = host.kvm_status(host.find_qemu("x86_64"), (str(tiny_image.kernel), str(tiny_image.initrd)))
    assert status.reason in _accel_line(out.stderr)
