"""Crash dumps from a real guest: an ELF core whose notes hold each vCPU's registers,
opened by drgn (the real one, qemukit[debug]) as a Linux kernel core."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qemukit import SpecError, VMSpec

pytestmark = pytest.mark.integration

NT_PRSTATUS = 1


def drgn_release(core: Path) -> str:
    """``UTS_RELEASE`` as drgn reads it from the core's VMCOREINFO (no debug info needed).

    drgn refuses a QEMU dump without VMCOREINFO ("unrecognized QEMU memory
    dump"): this passing means QEMU's vmcoreinfo device got the note from
    the guest's qemu_fw_cfg driver.
    """
    import drgn

    prog = drgn.Program()
    prog.set_core_dump(str(core))
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    return str(prog["UTS_RELEASE"].string_().decode())


def elf_notes(path: Path) -> list[tuple[str, int, bytes]]:
    """(name, type, descriptor) of every note in the PT_NOTE segments of an ELF64 LE core."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 LE file"
    e_type, = struct.unpack_from("<H", data, 16)
    assert e_type == 4, f"ELF type {e_type}, not a core (4)"
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    notes = []
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            pos += 12
            name = data[pos:pos + namesz].rstrip(b"\0").decode()
            pos += (namesz + 3) & ~3
            notes.append((name, ntype, data[pos:pos + descsz]))
            pos += (descsz + 3) & ~3
    return notes


def test_dump_writes_an_elf_core_with_a_note_per_vcpu(booted: Any, tmp_path: Path) -> None:
    vm = booted(cpus=2)
    marker = "qemukit-dump-marker-7f3a"
    assert vm.exec(["sh", "-c", f"echo {marker} > /dev/shm/m; cat /dev/shm/m"]).ok
    core = tmp_path / "guest.core"
    result = vm.dump_memory(core)
    assert result.path == core and result.size == core.stat().st_size > 256 * 2**20
    prstatus = [n for n in elf_notes(core) if n[0] == "CORE" and n[1] == NT_PRSTATUS]
    assert len(prstatus) == 2, "one NT_PRSTATUS note per vCPU"
    assert marker.encode() in core.read_bytes()  # the guest's RAM is in it
    assert drgn_release(core) == vm.exec(["uname", "-r"]).stdout.decode().strip()
    assert vm.exec(["true"]).ok  # the guest runs on
    with pytest.raises(SpecError, match="already exists"):
        vm.dump_memory(core)  # never overwritten
    assert (core.stat().st_mode & 0o777) == 0o600


def test_dump_command(qk: Any, tmp_path: Path, tiny_spec: VMSpec) -> None:
    assert qk("run", "--detach", "--name", "dumpme", "--image", "tiny", "--accel", "tcg",
              "--wait", "agent").returncode == 0
    try:
        out = qk("dump", "dumpme", str(tmp_path / "c.core"), "--json")
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        assert info["format"] == "elf" and info["bytes"] == (tmp_path / "c.core").stat().st_size
        assert any(n[1] == NT_PRSTATUS for n in elf_notes(tmp_path / "c.core"))
        bad = qk("dump", "dumpme", str(tmp_path / "missing-dir" / "c.core"))
        assert bad.returncode == 125 and "cannot create it" in bad.stderr
    finally:
        assert qk("stop", "dumpme").returncode == 0


def test_dump_on_panic_writes_the_core_before_the_run_ends(qk: Any, tmp_path: Path,
                                                           tiny_image: Any) -> None:
    core = tmp_path / "panic.core"
    out = qk("run", "--image", "tiny", "--accel", "tcg", "--dump-on-panic", str(core),
             "--json", str(tmp_path / "r.json"), "--", "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert out.returncode == 255, out.stderr
    assert f"crash dump in {core}" in out.stderr
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["outcome"] == "panic" and result["dump"] == str(core)
    (prstatus,) = [n for n in elf_notes(core) if n[0] == "CORE" and n[1] == NT_PRSTATUS]
    # The crashed CPU's registers: pr_pid in elf_prstatus is the vCPU (QEMU numbers it 1).
    pr_pid, = struct.unpack_from("<i", prstatus[2], 32)
    assert pr_pid == 1
    assert b"sysrq triggered crash" in core.read_bytes()  # the panic is in the guest's memory
    # As a user would open it: the drgn command line (the README's `drgn -c FILE`).
    drgn = subprocess.run([str(Path(sys.executable).parent / "drgn"), "-q", "-c", str(core), "-e",
                           "print(prog['UTS_RELEASE'].string_().decode())"],
                          capture_output=True, text=True, timeout=300)
    assert drgn.returncode == 0, drgn.stderr
    # The image's release is its kernel's `uname -r` (the test above checks that in a guest).
    assert drgn.stdout.strip() == tiny_image.kernel_release
