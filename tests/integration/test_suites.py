"""kselftest and KUnit verdicts from a real guest, per test.

kselftest: a kernel tree laid out as the kernel's (its real ``tools/testing/selftests``
Makefile, lib.mk, ``run_kselftest.sh`` and ``kselftest/`` runner, from Debian's
linux-source-6.1) with one small target of our own (one passing, one failing, one skipped
program: shell scripts), built and installed by the kernel's own ``make install`` and run by
its own runner in the tiny guest; and a real target of linux-source (size: one static C
program) built from the suite's kernel tree and run on that kernel. Larger real targets are
left out: too slow to build for the default tier.

KUnit: a real KUnit log from the kernel's own test data, printed by the guest's kernel
(through /dev/kmsg, at KUnit's level) and read back from the serial console; the verdicts
are compared with the kernel's kunit_parser and ``kunit.py parse`` on the same console log.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

import junitparser
import pytest

from qemukit.paths import cache_dir
from tests.unit.test_ktap import TARBALL, kunit_parser, kunit_tool, theirs  # noqa: F401

pytestmark = pytest.mark.integration

_SRC = "linux-source-6.1"
_MEMBERS = [f"{_SRC}/tools/testing/selftests/Makefile", f"{_SRC}/tools/testing/selftests/lib.mk",
            f"{_SRC}/tools/testing/selftests/run_kselftest.sh",
            f"{_SRC}/tools/testing/selftests/kselftest/*", f"{_SRC}/scripts/subarch.include"]
PROGRAMS = {"pass.sh": "echo 'all good'\nexit 0\n", "fail.sh": "echo broken >&2\nexit 1\n",
            "skip.sh": "echo 'no such feature'\nexit 4\n"}  # 4: kselftest's KSFT_SKIP


@pytest.fixture(scope="session")
def selftests_skeleton() -> Path:
    """The kernel's selftests build and runner files, extracted from the tarball once."""
    st = TARBALL.stat()
    key = hashlib.sha256(f"{TARBALL}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = cache_dir() / "kselftest-skeleton" / key
    if not (root / _SRC / "tools/testing/selftests/run_kselftest.sh").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))
        try:
            subprocess.run(["tar", "-xJf", str(TARBALL), "-C", str(tmp), "--no-same-owner",
                            "--wildcards", *_MEMBERS], check=True, timeout=600)
            with contextlib.suppress(OSError):
                tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root / _SRC


@pytest.fixture
def tree(tmp_path: Path, selftests_skeleton: Path) -> Path:
    """A kernel source tree with the kernel's selftests machinery and our target ``qkdemo``."""
    tree = tmp_path / "linux"
    shutil.copytree(selftests_skeleton, tree)
    target = tree / "tools/testing/selftests/qkdemo"
    target.mkdir()
    for name, body in PROGRAMS.items():
        (target / name).write_text("#!/bin/sh\n" + body)
        (target / name).chmod(0o755)
    (target / "Makefile").write_text(f"TEST_PROGS := {' '.join(PROGRAMS)}\ninclude ../lib.mk\n")
    return tree


def test_kselftest_gives_a_result_per_test(qk: Any, tree: Path, tmp_path: Path) -> None:
    out = qk("run", "--image", "tiny", "--accel", "tcg", "--kselftest", "qkdemo",
             "--kselftest-src", str(tree), "--json", str(tmp_path / "r.jsonl"),
             "--junit", str(tmp_path / "r.xml"))
    assert out.returncode == 1, out.stderr  # one test failed
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    outcomes = {d["name"]: d["outcome"] for d in lines}
    assert outcomes == {"selftests: qkdemo: pass.sh": "passed",
                        "selftests: qkdemo: fail.sh": "failed",
                        "selftests: qkdemo: skip.sh": "skipped", "qemukit.run": "passed"}
    assert lines[-1]["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 0}
    assert "qemukit: kselftest: 1 passed, 1 failed, 1 skipped, 0 error" in out.stderr
    (suite,) = junitparser.JUnitXml.fromfile(str(tmp_path / "r.xml"))
    kinds = {c.name: type(c.result[0]).__name__ if c.result else "passed" for c in suite}
    assert kinds == {"selftests: qkdemo: pass.sh": "passed",
                     "selftests: qkdemo: fail.sh": "Failure",
                     "selftests: qkdemo: skip.sh": "Skipped"}
    assert (suite.tests, suite.failures, suite.skipped, suite.errors) == (3, 1, 1, 0)


def test_kselftest_bad_target_is_refused_before_a_vm(qk: Any, tree: Path) -> None:
    out = qk("run", "--image", "tiny", "--kselftest", "nosuch", "--kselftest-src", str(tree))
    assert out.returncode == 125 and "no such target" in out.stderr
    out = qk("run", "--image", "tiny", "--kselftest", "../x", "--kselftest-src", str(tree))
    assert out.returncode == 125 and "not a selftests target name" in out.stderr


def test_kunit_results_match_kunit_py_parse(qk: Any, tmp_path: Path, kunit_tool: Path,  # noqa: F811
                                            kunit_parser: ModuleType) -> None:  # noqa: F811
    sample = (kunit_tool / "test_data" / "test_is_test_passed-failure.log").read_text()
    share = tmp_path / "share"
    share.mkdir()
    (share / "ktap").write_text(sample)
    log = tmp_path / "console.log"
    # KUnit prints at KERN_INFO: so does this, through the guest kernel's printk. The first
    # line takes the shell prompt that the console's idle shell left without a newline.
    out = qk("kunit", "--image", "tiny", "--accel", "tcg", "--share", f"{share}:/mnt/ktap,ro",
             "--console-log", str(log), "--json", str(tmp_path / "r.jsonl"), "--",
             "sh", "-c", "echo '<6>sample follows' > /dev/kmsg; "
             "while IFS= read -r l; do echo \"<6>$l\" > /dev/kmsg; done < /mnt/ktap/ktap")
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    ours = {tuple(d["name"].split("/")): d["outcome"] for d in lines if d["name"] != "qemukit.run"}
    console = log.read_text(errors="replace")
    counts, tests = theirs(kunit_parser, console)
    assert ours == dict(tests) and ours, out.stderr
    assert out.returncode == (0 if all(v in ("passed", "skipped") for v in ours.values()) else 1)
    cmd = subprocess.run([sys.executable, str(kunit_tool / "kunit.py"), "parse", str(log)],
                         capture_output=True, text=True, timeout=120, check=False)
    summary = re.search(r"Ran (\d+) tests?", re.sub(r"\x1b\[[0-9;]*m", "", cmd.stdout))
    assert summary and int(summary.group(1)) == len(ours), cmd.stdout


def test_a_real_target_from_the_kernel_tree_on_its_own_kernel(qk: Any, tmp_path: Path) -> None:
    """The command as the issue writes it: ``run --kernel TREE --kselftest TARGET``, with the
    suite's kernel tree and a real target of its source (size: one static C program, built
    in seconds), run by the kernel's runner on that kernel."""
    from tests.kernel_build import build_test_kernel

    kernel_tree = build_test_kernel(progress=print)
    out = qk("run", "--kernel", str(kernel_tree), "--accel", "tcg", "--kselftest", "size",
             "--junit", str(tmp_path / "r.xml"), timeout=900)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["ok     selftests: size: get_size"]
    (suite,) = junitparser.JUnitXml.fromfile(str(tmp_path / "r.xml"))
    assert [(c.name, c.result) for c in suite] == [("selftests: size: get_size", [])]
