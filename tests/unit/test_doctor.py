"""``qemukit doctor`` on hosts this machine is not: the host's facts come from a
:class:`qemukit.host.HostProbe` swapped in with :func:`qemukit.host.using_host_probe`.

doctor reports the QEMU of the host's own architecture (the one KVM can run) and
lists the other installed ones; it never starts QEMU here (the probe answers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from qemukit import HostError, host
from qemukit.arch import ARCHES
from qemukit.cli import main
from qemukit.host import HostProbe, KvmStatus, QemuBinary


@dataclass
class FakeHost:
    """A host of ``machine`` with QEMU installed for ``installed`` (under /opt/qemu)."""

    machine: str
    installed: tuple[str, ...]
    kvm_asked: list[str] = field(default_factory=list)

    def path(self, arch: str) -> str | None:
        return f"/opt/qemu/{ARCHES[arch].qemu_binary}" if arch in self.installed else None

    def find_qemu(self, arch: str) -> QemuBinary:
        path = self.path(arch)
        if path is None:
            raise HostError(f"no QEMU for {arch} guests found")
        return QemuBinary(path=path, version=(7, 2, 0), version_text="QEMU emulator version 7.2.0",
                          machines=frozenset(ARCHES[arch].machines) | {"none"},
                          has_sandbox=True, qemu_img="/opt/qemu/qemu-img")

    def kvm_status(self, qemu: QemuBinary, probe_image: Any, **kwargs: Any) -> KvmStatus:
        self.kvm_asked.append(kwargs.get("arch", "?"))
        return KvmStatus(False, "/dev/kvm is absent (fake host)", probed=False)

    def probe(self) -> HostProbe:
        return replace(HostProbe(), machine=lambda: self.machine, find_qemu=self.find_qemu,
                       qemu_path=self.path, kvm_status=self.kvm_status,
                       kvm_device_status=lambda: (False, "/dev/kvm is absent (fake host)"))


@pytest.fixture
def doctor(tmp_path: Path) -> Iterator[Any]:
    env = {"QEMUKIT_CACHE": str(tmp_path / "cache"), "QEMUKIT_STATE": str(tmp_path / "state"),
           "QEMUKIT_QEMU": None}

    def run(fake: FakeHost, *args: str) -> Result:
        with host.using_host_probe(fake.probe()):
            return CliRunner().invoke(main, ["doctor", *args], env=env)

    yield run


def test_an_arm64_host_gets_its_own_qemu_and_the_others_listed(doctor: Any) -> None:
    fake = FakeHost("aarch64", installed=("x86_64", "aarch64", "riscv64"))
    result = doctor(fake, "--json")
    assert result.exit_code == 0, result.output
    qemu = json.loads(result.stdout)["qemu"]
    assert qemu["arch"] == "aarch64"
    assert qemu["path"] == "/opt/qemu/qemu-system-aarch64"
    assert qemu["machines"] == ["virt"]
    assert qemu["others"] == {"x86_64": "/opt/qemu/qemu-system-x86_64",
                              "riscv64": "/opt/qemu/qemu-system-riscv64"}
    assert fake.kvm_asked == ["aarch64"], "KVM is judged with the host architecture's QEMU"

    text = doctor(fake).output
    assert "qemu-system-aarch64 7.2.0 (this aarch64 host's)" in text
    assert "also: x86_64 (/opt/qemu/qemu-system-x86_64), riscv64" in text
    assert "qemukit images build tiny --arch aarch64" in text


def test_an_arm64_host_with_only_an_x86_64_qemu_is_a_problem(doctor: Any) -> None:
    # The default architecture's QEMU is installed, the host's is not: KVM cannot be used.
    result = doctor(FakeHost("aarch64", installed=("x86_64",)), "--json")
    assert result.exit_code == 1
    qemu = json.loads(result.stdout)["qemu"]
    assert qemu["arch"] == "aarch64" and "no QEMU for aarch64" in qemu["error"]
    assert qemu["others"] == {"x86_64": "/opt/qemu/qemu-system-x86_64"}


def test_an_x86_64_host_names_amd64_as_x86_64(doctor: Any) -> None:
    fake = FakeHost("amd64", installed=("x86_64",))
    result = doctor(fake, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["qemu"]["arch"] == "x86_64" and report["qemu"]["others"] == {}
    assert report["qemu"]["machines"] == sorted(ARCHES["x86_64"].machines)
    assert report["architectures"]["aarch64"]["accel"].startswith("tcg (aarch64 guest emulated")


def test_without_any_qemu_doctor_exits_1(doctor: Any) -> None:
    result = doctor(FakeHost("x86_64", installed=()), "--json")
    assert result.exit_code == 1
    assert "error" in json.loads(result.stdout)["qemu"]


def test_the_probe_is_only_swapped_inside_the_block() -> None:
    fake = FakeHost("riscv64", installed=()).probe()
    with host.using_host_probe(fake):
        assert host.host_probe() is fake and host.host_probe().arch() == "riscv64"
    assert host.host_probe() is not fake
    with pytest.raises(TypeError, match="HostProbe"), host.using_host_probe(object()):  # type: ignore[arg-type]
        pass
