"""``qemukit run --rootfs host``: the host's programs and files in the guest, checked inside it.

One guest per test (each run is a fresh VM, as a kernel developer's loop is).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from pathlib import Path

import pytest

from qemukit import images
from tests.helpers import QEMUKIT

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("rootfs")]
pytest_plugins = ["pytester"]


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert QEMUKIT
    return subprocess.run([QEMUKIT, "run", "--image", "tiny", "--rootfs", "host", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL, check=False)


def test_the_guest_runs_the_hosts_programs_in_the_same_directory(
    tiny_image: images.TinyImage, tmp_path: Path
) -> None:
    token = secrets.token_hex(8)
    (tmp_path / "data.txt").write_text(token)
    result = _run(tmp_path, "--", "sh", "-c",
                  # The host's python3 (the tiny image has none), the host file, the cwd,
                  # and the guest's own kernel (the tiny image's, not the host's).
                  'pwd; cat data.txt; echo; python3 -c "import sys; print(sys.version_info[0])"; '
                  'uname -r; exit 7')
    assert result.returncode == 7, result.stderr
    assert result.stdout.split() == [str(tmp_path), token, "3", tiny_image.kernel_release]


def test_writes_stay_in_the_guest_except_in_rw_directories(
    tiny_image: images.TinyImage, tmp_path: Path
) -> None:
    ro, out = tmp_path / "ro", tmp_path / "out"
    ro.mkdir()
    out.mkdir()
    (ro / "keep.txt").write_text("host")
    result = _run(ro, "--rw", str(out), "--", "sh", "-c",
                  f"echo guest > keep.txt && echo new > made.txt && cat keep.txt && "
                  f"echo result > {out}/result.txt && ls {out}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["guest", "result.txt"]  # the guest saw its own writes
    assert (ro / "keep.txt").read_text() == "host"  # ... the host did not
    assert not (ro / "made.txt").exists()
    assert (out / "result.txt").read_text() == "result\n"  # --rw: written on the host


def test_the_raw_host_root_is_out_of_the_commands_reach(
    tiny_image: images.TinyImage, tmp_path: Path
) -> None:
    """The read-only mount of the host's / is outside the command's root (chroot), and
    read-only even for the guest's init: a remount to read-write is refused there."""
    result = _run(tmp_path, "--", "sh", "-c",
                  "test -e /run/qemukit-hostroot && echo visible || echo hidden; "
                  "touch /qk-root-write-test && echo overlay-ok")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["hidden", "overlay-ok"]
    assert not os.path.exists("/qk-root-write-test")


def test_a_working_directory_removed_meanwhile_is_a_clear_error(
    tiny_image: images.TinyImage, tmp_path: Path, state_root: Path
) -> None:
    """The command starts in the caller's directory: one that no longer exists is an
    error naming it before any VM starts (it was a traceback from os.getcwd())."""
    gone = tmp_path / "gone"
    gone.mkdir()
    assert QEMUKIT
    script = f"rmdir {gone} && exec {QEMUKIT} run --image tiny --rootfs host -- true"
    result = subprocess.run(["sh", "-c", script], cwd=gone, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 125, result.stderr
    assert "the current directory no longer exists" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(state_root.iterdir()) == [] if state_root.exists() else True


# -- host_root as a spec part: a TOML spec, a matrix job, the plugin -------------------------
# Each boots one tiny guest (cold: a share cannot be saved in a warm state) and checks from
# inside it: a host file read through the host's root, a write in an rw directory reaching
# the host, a write elsewhere staying in the guest.


def _script(token_file: Path, out: Path) -> str:
    return (f"cat {token_file}; echo; echo guest > {out}/inside.txt; "
            f"echo guest > {token_file.parent}/outside.txt; cat {token_file.parent}/outside.txt")


def _check(stdout: str, token: str, token_file: Path, out: Path) -> None:
    assert stdout.split() == [token, "guest"], stdout
    assert (out / "inside.txt").read_text() == "guest\n"  # rw: written on the host
    assert not (token_file.parent / "outside.txt").exists()  # elsewhere: the guest's only


def _layout(tmp_path: Path) -> tuple[str, Path, Path]:
    token = secrets.token_hex(8)
    (tmp_path / "ro").mkdir()
    (tmp_path / "out").mkdir()
    token_file = tmp_path / "ro" / "token.txt"
    token_file.write_text(token)
    return token, token_file, tmp_path / "out"


def test_host_root_from_a_toml_spec(tiny_image: images.TinyImage, tmp_path: Path) -> None:
    token, token_file, out = _layout(tmp_path)
    spec = tmp_path / "vm.toml"
    spec.write_text('image = "tiny"\naccel = "tcg"\n\n[host_root]\nrw = ["out"]\n')
    assert QEMUKIT
    result = subprocess.run([QEMUKIT, "run", "-f", str(spec), "--", "sh", "-c",
                             "pwd; " + _script(token_file, out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr
    where, *rest = result.stdout.split()
    assert where == str(tmp_path)  # the command starts in the caller's directory
    _check(" ".join(rest), token, token_file, out)


def test_host_root_from_a_matrix_job(tiny_image: images.TinyImage, tmp_path: Path) -> None:
    token, token_file, out = _layout(tmp_path)
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'[[job]]\nname = "hostroot"\nimage = "tiny"\naccel = "tcg"\n'
                      f'timeout = 240\ncommand = ["sh", "-c", "{_script(token_file, out)}"]\n'
                      f'host_root = {{ rw = ["{out}"] }}\n')
    assert QEMUKIT
    result = subprocess.run([QEMUKIT, "matrix", str(matrix), "--json", str(tmp_path / "r.jsonl")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=400,
                            stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    import json

    (line,) = (tmp_path / "r.jsonl").read_text().splitlines()
    _check(json.loads(line)["result"]["stdout"], token, token_file, out)


PLUGIN_HOST_ROOT = '''
from qemukit.spec import HostRoot

def test_host_root(qemu_vm_factory):
    vm = qemu_vm_factory(host_root=HostRoot(rw=({out!r},)))
    print("STDOUT:" + vm.exec(["sh", "-c", {script!r}]).stdout_text.replace("\\n", " "))
'''


def test_host_root_from_the_plugin(tiny_image: images.TinyImage, tmp_path: Path,
                                   pytester: pytest.Pytester) -> None:
    token, token_file, out = _layout(tmp_path)
    pytester.makepyfile(test_hr=PLUGIN_HOST_ROOT.format(out=str(out),
                                                        script=_script(token_file, out)))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s", timeout=400)
    result.assert_outcomes(passed=1)
    (line,) = [x for x in result.stdout.lines if "STDOUT:" in x]
    _check(line.split("STDOUT:", 1)[1], token, token_file, out)
