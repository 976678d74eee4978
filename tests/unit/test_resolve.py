"""One resolver: the same request gives the same spec and machine from every front end.

The front ends are driven as users drive them (the CLI through click, ``run_kernel``,
a matrix job, the pytest plugin's fixture spec), with the VM start replaced by a
recorder: no QEMU. Each front end runs against a cache of its own, so none sees the
others' record of kernels run before (which by design moves a repeated kernel to q35).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qemukit import VMSpec, kernel, matrix
from qemukit.cli import main
from qemukit.errors import SpecError
from qemukit.resolve import Request, job_request, resolve
from qemukit.spec import HostRoot, Nic

from .test_kconfig import base_initrd, fake_tree, full_config

_fresh = itertools.count()


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[VMSpec]:
    """Specs that reached the VM start (run_in_vm) or the preview (cmdline)."""
    seen: list[VMSpec] = []

    def fake_run_in_vm(spec: VMSpec, *_: object, **__: object) -> Any:
        seen.append(spec)
        raise SystemExit(0)

    def fake_preview(spec: VMSpec, **__: object) -> tuple[list[str], list[str]]:
        seen.append(spec)
        return ["qemu-system-x86_64"], []

    monkeypatch.setattr("qemukit.kernel.run_in_vm", fake_run_in_vm)
    monkeypatch.setattr("qemukit.vm.preview_argv", fake_preview)
    monkeypatch.setattr("qemukit.host.tsc_khz", lambda: 2_000_000)
    monkeypatch.setattr("qemukit.kconfig._depmod", lambda: "/bin/true")
    return seen


def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / f"cache-{next(_fresh)}"
    root.mkdir()
    monkeypatch.setenv("QEMUKIT_CACHE", str(root))


class _Config:
    """The plugin's view of pytest's options."""

    def __init__(self, **options: object) -> None:
        self.options = {"--qemukit-image": "tiny", "--qemukit-arch": "x86_64",
                        "--qemukit-accel": "tcg", "--qemukit-cold": False,
                        "--qemukit-crash-dir": None, **options}

    def getoption(self, name: str) -> object:
        return self.options[name]


def _front_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seen: list[VMSpec],
                cli_args: list[str], run_kernel_call: Any, job: matrix.Job,
                plugin: Any = None) -> dict[str, VMSpec]:
    got: dict[str, VMSpec] = {}
    for name in ("run", "cmdline"):
        _own_cache(tmp_path, monkeypatch)
        args = ([*cli_args, "--", "true"] if name == "run"
                else [*cli_args, "--", "true"])
        out = CliRunner().invoke(main, [name, *args])
        assert out.exit_code == 0, out.output
        got[name] = seen[-1]
    if run_kernel_call is not None:
        _own_cache(tmp_path, monkeypatch)
        with pytest.raises(SystemExit):
            run_kernel_call()
        got["run_kernel"] = seen[-1]
    _own_cache(tmp_path, monkeypatch)
    got["matrix job"] = job.spec()
    if plugin is not None:
        _own_cache(tmp_path, monkeypatch)
        got["plugin"] = plugin()
    return got


def test_a_kernel_resolves_to_one_spec_and_machine_from_every_front_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: list[VMSpec]) -> None:
    tree = fake_tree(tmp_path / "tree", config=full_config())
    initrd = base_initrd(tmp_path / "initrd.img")
    got = _front_ends(
        tmp_path, monkeypatch, recorded,
        ["--accel", "tcg", "--kernel", str(tree), "--initrd", str(initrd)],
        lambda: kernel.run_kernel(tree, ["true"], initrd=initrd, accel="tcg"),
        matrix.Job("j", ("true",), vm={"kernel": str(tree), "initrd": str(initrd),
                                       "accel": "tcg"}))
    first = got["run"]
    # Before: run --kernel booted microvm, run_kernel and the matrix job q35, cmdline q35.
    assert first.machine == "microvm" and not first.warm
    assert first.kernel == str(tree) and first.initrd == str(initrd)
    for front_end, spec in got.items():
        assert spec == first, front_end


def test_an_image_resolves_to_one_spec_from_every_front_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: list[VMSpec]) -> None:
    from qemukit import pytest_plugin

    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"kernel")
    initrd = base_initrd(tmp_path / "initrd.img")
    fields = {"kernel": str(vmlinuz), "initrd": str(initrd), "memory": 256}
    got = _front_ends(
        tmp_path, monkeypatch, recorded,
        ["--image", "tiny", "--accel", "tcg", "--kernel", str(vmlinuz), "--initrd", str(initrd),
         "--memory", "256"],
        None,
        matrix.Job("j", ("true",), image="tiny", vm={**fields, "accel": "tcg"}),
        lambda: pytest_plugin._base_spec(_Config(), **fields))  # type: ignore[arg-type]
    first = got["run"]
    assert first.machine == "q35" and first.warm and first.memory == 256
    for front_end, spec in got.items():
        assert spec == first, front_end


def test_cmdline_says_why_and_does_not_record_a_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorded: list[VMSpec]) -> None:
    tree = fake_tree(tmp_path / "tree", config=full_config())
    initrd = base_initrd(tmp_path / "initrd.img")
    _own_cache(tmp_path, monkeypatch)
    args = ["--accel", "tcg", "--kernel", str(tree), "--initrd", str(initrd)]
    for _ in range(2):  # a preview notes nothing: the second still shows a first run
        out = CliRunner().invoke(main, ["cmdline", "-v", *args, "--", "true"])
        assert out.exit_code == 0, out.output
        assert "# machine microvm: nothing in this run needs q35" in out.output
        assert "# cold: microvm cannot start warm" in out.output
    # Without a command (the console), as run would: q35, warm.
    out = CliRunner().invoke(main, ["cmdline", "-v", *args])
    assert "# machine q35: a VM without a command" in out.output and recorded[-1].warm
    # A kernel run twice goes to q35 from a warm state, as the record says.
    req = Request(kernel=str(tree), overrides={"initrd": str(initrd)})
    assert resolve(req).machine.machine == "microvm"
    again = resolve(req)
    assert again.machine.machine == "q35" and "ran here before" in again.machine.reason
    assert again.warm.warm and again.spec.warm


def test_requests_are_checked_before_anything_is_looked_up(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        Request(image="tiny", spec_file="vm.toml")
    assert err.value.field == "spec_file"
    with pytest.raises(SpecError) as err:
        Request(purpose="forever")  # type: ignore[arg-type]
    assert err.value.field == "purpose"
    with pytest.raises(SpecError) as err:
        resolve(Request(arch="aarch64", overrides={"machine": "q35"}))
    assert err.value.field == "machine" and "virt" in err.value.reason
    with pytest.raises(SpecError) as err:
        resolve(Request(kernel=str(tmp_path / "nothing")))
    assert err.value.field == "kernel"


def test_forward_auto_asked_for_a_vm_that_is_not_detached_is_refused(tmp_path: Path) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"k")
    spec = VMSpec(kernel=str(vmlinuz), nics=(Nic(),))
    with pytest.raises(SpecError) as err:
        resolve(Request(spec=spec, overrides={"forward_auto": True}))
    assert err.value.field == "forward_auto" and "detached" in err.value.reason
    detached = resolve(Request(spec=spec, overrides={"forward_auto": True}, purpose="detached"))
    assert detached.spec.forward_auto


def test_a_matrix_job_carries_host_root_to_its_spec(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    vmlinuz = tmp_path / "vmlinuz"
    vmlinuz.write_bytes(b"k")
    initrd = base_initrd(tmp_path / "initrd.img")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    job = matrix.parse_matrix({"job": [{
        "name": "j", "command": ["true"], "kernel": str(vmlinuz), "initrd": str(initrd),
        "host_root": {"rw": ["out"], "transport": "9p"}}]})[0]
    spec = job.spec()
    assert spec.host_root == HostRoot(rw=(str(tmp_path / "out"),), transport="9p")
    assert job_request(image=None, vm=job.vm).kernel == str(vmlinuz)
