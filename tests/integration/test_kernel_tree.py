"""A kernel built here from Debian's linux-source-6.1 (tinyconfig + qemukit kconfig), booted as a tree.

The tree is built once and cached (tests/kernel_build.py); these tests boot it with
``qemukit run --kernel TREE`` and check from inside the guest: its release, a command's exit
status, virtiofs and 9p shares, the module installed from the tree, and the JSON result.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qemukit import kconfig
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
