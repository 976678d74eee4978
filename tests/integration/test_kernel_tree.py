"""A kernel built here from Debian's linux-source-6.1 (tinyconfig + qemukit kconfig), booted as a tree.

The tree is built once and cached (tests/kernel_build.py); these tests boot it with
``qemukit run --kernel TREE`` and check from inside the guest: its release, a command's exit
status, virtiofs and 9p shares, the module installed from the tree, the JSON result, the host's
root (--rootfs host), a gdb stub's handshake and a crash dump on panic.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qemukit import images, kconfig
from tests.kernel_build import build_test_kernel

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("kernel-tree")]
TCG = ("--accel", "tcg")


@pytest.fixture(scope="module")
def tree() -> Path:
    """The suite's kernel tree (a make O= directory), built on first use."""
    return build_test_kernel(progress=print)


@pytest.fixture(scope="module")
def release(tree: Path) -> str:
    proc = subprocess.run(["make", "-s", "kernelrelease"], cwd=tree, capture_output=True,
                          text=True, check=True, timeout=120)
    return proc.stdout.strip()


def test_the_fragment_merged_whole_and_the_tree_is_found(tree: Path) -> None:
    config = kconfig.read_config(tree / ".config")
    wanted = kconfig.fragment_options("x86_64")
    assert {k: config.get(k) for k in wanted} == wanted  # olddefconfig dropped nothing
    found = kconfig.find_tree(tree)
    assert found.arch == "x86_64" and found.image == tree / "arch/x86/boot/bzImage"
    assert found.modules  # CONFIG_MODULES=y and virtio_balloon.ko built


def test_uname_in_the_tree_kernel_prints_its_release(tree: Path, release: str, qk: Any) -> None:
    out = qk("run", *TCG, "--kernel", str(tree), "--", "uname", "-r")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == release


def test_exit_status_shares_modules_and_json(tree: Path, release: str, qk: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    host = tmp_path / "host"
    host.mkdir()
    (host / "f").write_text("from-the-host\n")
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))  # where modules_install goes, for the run
    script = ("cat /mnt/v/f /mnt/p/f; grep -E ' /mnt/(v|p) ' /proc/mounts | cut -d' ' -f2,3; "
              "test -d /sys/module/virtio_balloon && echo module-loaded; exit 7")
    out = qk("run", *TCG, "--kernel", str(tree), "--json",
             "--share", f"{host}:/mnt/v", "--share", f"{host}:/mnt/p,9p,tag=p9",
             "--", "sh", "-c", script)
    assert out.returncode == 7, out.stderr
    data = json.loads(out.stdout)
    assert data["outcome"] == "failed" and data["exit_status"] == 7
    assert data["stdout"].splitlines() == ["from-the-host", "from-the-host", "/mnt/v virtiofs",
                                           "/mnt/p 9p", "module-loaded"]
    assert data["kernel_release"] == release and data["arch"] == "x86_64"
    assert data["kernel_config_sha256"] == hashlib.sha256(
        (tree / ".config").read_bytes()).hexdigest()
    assert list(private_tmp.iterdir()) == []  # the installed modules were removed


def test_a_matrix_job_boots_the_tree(tree: Path, qk: Any, tmp_path: Path) -> None:
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'[defaults]\nkernel = "{tree}"\naccel = "tcg"\ntimeout = 240\n\n'
                      '[[job]]\nname = "modules"\ncommand = ["test", "-d", '
                      '"/sys/module/virtio_balloon"]\n')
    out = qk("matrix", str(matrix))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "passed   modules" in out.stdout


def test_rootfs_host_with_the_tree_kernel(tree: Path, release: str, qk: Any, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's /usr/bin in the guest; a write outside --rw stays in the guest, one inside
    reaches the host; the kernel is the tree's."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    monkeypatch.chdir(work)
    script = (f"uname -r; ls /usr/bin | grep -cx python3; echo guest > outside.txt; "
              f"echo guest > {out}/inside.txt; cat outside.txt")
    out_run = qk("run", *TCG, "--kernel", str(tree), "--rootfs", "host", "--rw", str(out),
                 "--", "sh", "-c", script)
    assert out_run.returncode == 0, out_run.stderr
    assert out_run.stdout.split() == [release, "1", "guest"]
    assert not (work / "outside.txt").exists()
    assert (out / "inside.txt").read_text() == "guest\n"


def test_gdb_handshake_with_the_tree_kernel(tree: Path, qk: Any) -> None:
    from tests.integration.test_gdb import rsp

    # --gdb-wait: the vCPUs wait for gdb, as a developer debugging the boot has them.
    out = qk("run", *TCG, "--kernel", str(tree), "--detach", "--json", "--gdb", "--gdb-wait",
             "--name", "tree-gdb")
    assert out.returncode == 0, out.stderr
    address = json.loads(out.stdout)["gdb"]
    try:
        # The default stub: a Unix socket in the VM's private runtime directory.
        assert address.endswith("/tree-gdb/gdb.sock")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(address)
            assert "PacketSize=" in rsp(sock, "qSupported:multiprocess+")
            assert rsp(sock, "?").startswith("T")  # halted, with a stop reason
            # The halted vCPU's registers ('g' answers them as hex text).
            assert len(rsp(sock, "g")) > 100
    finally:
        assert qk("kill", "tree-gdb").returncode == 0


def test_dump_on_panic_with_the_tree_kernel(tree: Path, release: str, qk: Any,
                                            tmp_path: Path) -> None:
    from tests.integration.test_dump import NT_PRSTATUS, drgn_release, elf_notes

    core = tmp_path / "panic.core"
    out = qk("run", *TCG, "--kernel", str(tree), "--dump-on-panic", str(core), "--",
             "sh", "-c", "echo c > /proc/sysrq-trigger")
    assert out.returncode == 255, out.stderr
    (prstatus,) = [n for n in elf_notes(core) if n[0] == "CORE" and n[1] == NT_PRSTATUS]
    pr_pid, = struct.unpack_from("<i", prstatus[2], 32)
    assert pr_pid == 1  # the crashed vCPU's registers
    assert b"sysrq triggered crash" in core.read_bytes()
    # The fragment's FW_CFG_SYSFS (built in) and CRASH_CORE gave QEMU's vmcoreinfo device
    # the note: drgn opens the core as this kernel's.
    assert drgn_release(core) == release


#: In the guest: the tree's module is unloaded, then loaded again from the initramfs.
RELOAD = ("modprobe -r virtio_balloon; test ! -d /sys/module/virtio_balloon || exit 3; "
          "modprobe virtio_balloon && test -d /sys/module/virtio_balloon && "
          "echo reloaded $(uname -r)")


def test_a_detached_tree_vm_carries_its_modules_in_its_runtime_dir(
        tree: Path, release: str, qk: Any, state_root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))  # nothing of the VM may live here
    out = qk("run", *TCG, "--kernel", str(tree), "--detach", "--wait", "agent", "--name",
             "tree-detached", timeout=480)
    assert out.returncode == 0, out.stderr
    try:
        # The initramfs with the modules lives in the VM's runtime directory, as long as it.
        assert (state_root / "tree-detached" / "kernel" / "initrd-with-modules.img").is_file()
        assert list(private_tmp.iterdir()) == []
        loaded = qk("exec", "tree-detached", "--", "sh", "-c", RELOAD)
        assert loaded.returncode == 0, loaded.stdout + loaded.stderr
        assert loaded.stdout.split() == ["reloaded", release]
    finally:
        stopped = qk("stop", "tree-detached", "--timeout", "30")
    assert stopped.returncode == 0, stopped.stderr
    assert not (state_root / "tree-detached").exists()


def test_a_vm_of_a_tree_spec_boots_its_image_with_its_modules(
        tree: Path, release: str, tiny_image: Any, state_root: Path) -> None:
    from qemukit import VM, VMSpec
    from qemukit.images import tiny_append

    spec = VMSpec(kernel=str(tree), initrd=str(tiny_image.initrd), append=tiny_append("x86_64"),
                  accel="tcg", no_reboot=True)
    with VM(spec, boot_timeout=480) as vm:
        assert vm.spec.kernel == str(tree / "arch/x86/boot/bzImage")
        assert vm.kernel is not None and vm.kernel.release == release
        assert vm.runtime is not None
        initrd = vm.runtime.path / "kernel" / "initrd-with-modules.img"
        assert vm.spec.initrd == str(initrd) and initrd.is_file()
        result = vm.exec(["sh", "-c", RELOAD], timeout=240)
        assert result.exit_status == 0, result.stderr_text
        assert result.stdout_text.split() == ["reloaded", release]
        runtime = vm.runtime.path
    assert not runtime.exists()


def test_a_dask_cluster_runs_the_tree_from_its_image_and_modules(
        tree: Path, release: str, tiny_image: Any, tmp_path: Path) -> None:
    """The tree is not shipped: its image and its installed modules reach each worker (own
    cache, own state), once, under their hashes, and the job loads the module there."""
    from tests.helpers import qemu_processes_under
    from tests.integration.test_matrix import _env, _run_matrix, dask_cluster

    text = (f'[defaults]\nkernel = "{tree}"\naccel = "tcg"\ntimeout = 480\n\n'
            f'[matrix.n]\na = {{}}\nb = {{}}\n\n'
            f'[matrix.commands]\nreload = ["sh", "-c", "{RELOAD}"]\n')
    (tmp_path / "cluster").mkdir()
    with dask_cluster(tmp_path / "cluster", tiny_image) as cluster:
        roots = (cluster.state("w1"), cluster.state("w2"))
        run = _run_matrix(tmp_path, text, _env(tmp_path / "client-state"), "--scheduler",
                          cluster.address, roots=roots)
        assert run.proc.returncode == 0, run.proc.stdout + run.proc.stderr
        assert sorted(run.results) == ["a/reload", "b/reload"]
        for data in run.results.values():
            assert data["outcome"] == "passed", json.dumps(data)[-3000:]
            assert data["result"]["stdout"].split() == ["reloaded", release]
            assert data["result"]["kernel_release"] == release
        config = hashlib.sha256((tree / ".config").read_bytes()).hexdigest()
        for data in run.results.values():  # the worker found the config beside the image
            assert data["result"]["kernel_config_sha256"] == config
        for worker in {d["worker"] for d in run.results.values()}:
            shipped = cluster.root / worker / "cache" / "matrix-files"
            kept = {p.name: sorted(q.name for q in p.iterdir()) for p in shipped.iterdir()}
            (bundle,) = [d for d, names in kept.items() if names[0].endswith(".kernel")]
            (bundle_dir,) = (shipped / bundle).iterdir()
            # The image and its .config, not the tree.
            assert sorted(q.name for q in bundle_dir.iterdir()) == [".config", "bzImage"]
            assert (bundle_dir / "bzImage").read_bytes() == (
                tree / "arch/x86/boot/bzImage").read_bytes()
            del kept[bundle]
            ((_, modules),) = kept.items()
            assert modules == ["modules-0"]
            (placed,) = shipped.glob(f"*/modules-0/lib/modules/{release}/kernel/**/virtio_balloon.ko")
            assert placed.is_file()
            assert qemu_processes_under(cluster.state(worker)) == []


def test_a_kernel_run_again_starts_warm_after_its_first_microvm_boot(tree: Path, release: str,
                                                                     qk: Any) -> None:
    """New kernel: microvm, the quickest cold boot. The same kernel again: q35 and a warm
    state saved, so the third run is a restore. (The image, not the tree: the tree's modules
    would be installed at each start, which boots cold.)"""
    image = tree / "arch/x86/boot/bzImage"
    # A word no other run's command line has: this kernel is new to the warm cache here.
    append = f"{images.spec('tiny').append} qk.loop={secrets.token_hex(4)}"
    lines = []
    for _ in range(3):
        out = qk("run", *TCG, "-v", "--kernel", str(image), "--append", append, "--", "uname", "-r")
        assert (out.returncode, out.stdout.strip()) == (0, release), out.stderr
        lines.append(out.stderr)
    assert "machine microvm: " in lines[0] and ": warm: " not in lines[0]
    assert "machine q35: this kernel ran here before" in lines[1]
    assert ": cold: first start of this spec, state saved" in lines[1]
    assert "machine q35: this kernel ran here before" in lines[2]
    assert ": warm: restored " in lines[2]


def test_cmdline_prints_the_argv_run_spawns_for_a_kernel(tree: Path, tiny_image: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``cmdline`` with run's arguments resolves the same request the same way: for a new
    kernel with a command, microvm (it printed q35 before) and the very argv QEMU gets."""
    import re

    from click.testing import CliRunner

    from qemukit._launch.process import QemuProcess
    from qemukit.cli import main

    spawned: list[list[str]] = []
    real = QemuProcess.spawn.__func__  # type: ignore[attr-defined]

    def spy(cls: type[QemuProcess], /, argv: Any, **kw: Any) -> QemuProcess:
        spawned.append(list(argv))
        return real(cls, argv, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(QemuProcess, "spawn", classmethod(spy))
    image = tree / "arch/x86/boot/bzImage"
    name = f"same-{secrets.token_hex(3)}"
    # A word no other run's command line has: this kernel is new to the record of runs.
    append = f"{images.spec('tiny').append} qk.same={secrets.token_hex(4)}"
    args = [*TCG, "--name", name, "--kernel", str(image), "--append", append, "--", "true"]
    preview = CliRunner().invoke(main, ["cmdline", "--json", *args])
    assert preview.exit_code == 0, preview.output
    printed = json.loads(preview.stdout)["argv"]
    ran = CliRunner().invoke(main, ["run", *args])
    assert ran.exit_code == 0, ran.output
    (qemu_argv,) = [a for a in spawned if any("qemu-system" in x for x in a)]
    qemu_argv = qemu_argv[next(i for i, x in enumerate(qemu_argv) if "qemu-system" in x):]

    def same_fd(argv: list[str]) -> list[str]:  # the monitor's and console's inherited fds
        return [re.sub(r"(id=(?:qmp-owner|console0),fd=)\d+", r"\1N", x) for x in argv]

    assert "microvm,accel=tcg" in printed[printed.index("-machine") + 1]
    assert same_fd(printed) == same_fd(qemu_argv)
