"""The qemukit command through click's test runner: cmdline, doctor, help, exit codes.

``cmdline`` only probes the QEMU binary (its -version and -help); with
``--accel tcg`` no KVM probe boot runs, so nothing here starts a guest.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from qemukit import Drive, Nic, SpecError, VMSpec, parse_nic
from qemukit.cli import EXIT_ERROR, build_spec, main

from .optsplit import parse_opts

QEMU = "/usr/bin/qemu-system-x86_64"
needs_qemu = pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU not installed")


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``qemukit ARGS`` in an empty directory with private cache and state dirs."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    env = {
        "QEMUKIT_STATE": str(tmp_path / "state"),
        "QEMUKIT_CACHE": str(tmp_path / "cache"),
        "QEMUKIT_QEMU": None,
    }

    def run(*args: str, **kwargs: Any) -> Result:
        return CliRunner().invoke(main, list(args), env={**env, **kwargs.pop("env", {})}, **kwargs)

    return run


def json_argv(result: Result) -> list[str]:
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    argv = data["argv"]
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    return argv


def option_values(argv: list[str], option: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == option]


@needs_qemu
def test_cmdline_quotes_comma_in_disk_path(cli: Any) -> None:
    result = cli("cmdline", "--accel", "tcg", "--disk", "x,y.qcow2")
    assert result.exit_code == 0, result.output
    path = Path.cwd() / "x,y.qcow2"
    assert f"filename={Path.cwd()}/x,,y.qcow2" in result.stdout
    argv = shlex.split(result.stdout)
    (file_node,) = [b for b in option_values(argv, "-blockdev") if "node-name=disk0-file" in b]
    assert parse_opts(file_node)["filename"] == str(path)
    # The missing file is assumed qcow2, and the note says so on stderr, not in the argv.
    assert "no such file" in result.stderr


@needs_qemu
def test_cmdline_json(cli: Any) -> None:
    argv = json_argv(cli("cmdline", "--accel", "tcg", "--json", "--name", "j1", "--memory", "1G"))
    assert Path(argv[0]).name.startswith("qemu-system-x86_64")
    assert option_values(argv, "-name") == ["j1"]
    assert option_values(argv, "-m") == ["1024M"]
    assert option_values(argv, "-machine") == ["q35,accel=tcg"]
    assert "-cpu" not in argv


@needs_qemu
def test_cmdline_json_notes_are_a_list(cli: Any) -> None:
    result = cli("cmdline", "--accel", "tcg", "--json")
    notes = json.loads(result.stdout)["notes"]
    assert isinstance(notes, list)
    assert any("TCG" in n for n in notes)


@needs_qemu
@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--memory", "12Q"], "memory"),
        (["--cpus", "0"], "cpus"),
        (["--name", "../x"], "name"),
        (["--disk", "d.img,if=ide"], "drive.interface"),
        (["--nic", "tap"], "nic.ifname"),
        (["--slots", "2"], "slots"),
        (["--max-memory", "4G", "--slots", "-1"], "slots"),
        (["--initrd", "i.img"], "kernel"),
        (["--arch", "aarch64", "--machine", "q35"], "machine='q35': not a machine for arch aarch64"),
        (["--gdb-wait"], "gdb_wait"),
        (["--gdb", "1234"], "gdb='1234': expected nothing"),
        (["--gdb", "tcp:x"], "gdb='tcp:x'"),
    ],
)
def test_cmdline_bad_value_exits_125(cli: Any, args: list[str], field: str) -> None:
    result = cli("cmdline", "--accel", "tcg", *args)
    assert result.exit_code == EXIT_ERROR == 125
    assert field in result.stderr
    assert result.stdout == ""


@needs_qemu
@pytest.mark.parametrize(("args", "memory"), [
    (["--max-memory", "2G"], "512M,slots=8,maxmem=2048M"),
    (["--max-memory", "2G", "--slots", "2"], "512M,slots=2,maxmem=2048M"),
])
def test_cmdline_max_memory_slots(cli: Any, args: list[str], memory: str) -> None:
    argv = json_argv(cli("cmdline", "--accel", "tcg", "--json", *args))
    assert option_values(argv, "-m") == [memory]


def test_help_says_the_default_slots(cli: Any) -> None:
    text = " ".join(cli("run", "--help").stdout.split())
    assert "gives 8 DIMM slots unless --slots" in text


@needs_qemu
def test_cmdline_reads_spec_file(cli: Any, tmp_path: Path) -> None:
    spec_file = tmp_path / "vm,1.toml"
    VMSpec(
        name="fromfile",
        accel="tcg",
        cpus=3,
        memory=768,
        machine="pc",
        nics=(parse_nic("user,hostfwd=2222:22"),),
        extra_args=("-S",),
    ).dump(spec_file)
    argv = json_argv(cli("cmdline", "-f", str(spec_file), "--json"))
    assert option_values(argv, "-name") == ["fromfile"]
    assert option_values(argv, "-smp") == ["3"]
    assert option_values(argv, "-m") == ["768M"]
    assert option_values(argv, "-machine") == ["pc,accel=tcg"]
    assert any("hostfwd=tcp:127.0.0.1:2222-:22" in n for n in option_values(argv, "-netdev"))
    assert argv[-1] == "-S"


@needs_qemu
def test_cmdline_options_override_spec_file(cli: Any, tmp_path: Path) -> None:
    spec_file = tmp_path / "vm.toml"
    VMSpec(name="fromfile", accel="tcg", cpus=3, drives=(Drive("a.img"),)).dump(spec_file)
    argv = json_argv(cli("cmdline", "-f", str(spec_file), "--cpus", "2", "--disk", "b.img", "--json"))
    assert option_values(argv, "-smp") == ["2"]
    files = [parse_opts(b)["filename"] for b in option_values(argv, "-blockdev") if "driver=file" in b]
    assert [Path(f).name for f in files] == ["a.img", "b.img"]


@needs_qemu
def test_cmdline_bad_spec_file(cli: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("cpus = 2\nbogus = 1\n")
    result = cli("cmdline", "-f", str(bad))
    assert result.exit_code == 125
    assert "bogus" in result.stderr
    missing = cli("cmdline", "-f", str(tmp_path / "missing.toml"))
    assert missing.exit_code == 125
    assert "missing.toml" in missing.stderr


def test_file_and_image_together_exit_125(cli: Any, tmp_path: Path) -> None:
    result = cli("cmdline", "-f", str(tmp_path / "vm.toml"), "--image", "tiny")
    assert result.exit_code == 125
    assert "image" in result.stderr


def test_main_help_lists_exit_codes(cli: Any) -> None:
    result = cli("--help")
    assert result.exit_code == 0
    for code in ("124", "125", "255"):
        assert code in result.stdout


def test_run_help_lists_exit_codes(cli: Any) -> None:
    result = cli("run", "--help")
    assert result.exit_code == 0
    for code in ("124", "125", "255"):
        assert code in result.stdout


@needs_qemu
def test_doctor_json(cli: Any) -> None:
    # An empty cache has no tiny image, so no KVM probe boot can run.
    result = cli("doctor", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert Path(report["qemu"]["path"]).name.startswith("qemu-system-x86_64")
    assert report["qemu"]["version"].count(".") == 2
    assert report["images"]["tiny"] is None
    assert report["accel_auto"] in ("kvm", "tcg")
    assert report["kvm"]["usable"] is False  # unverified without a probe image


def test_doctor_without_qemu_exits_1(cli: Any, tmp_path: Path) -> None:
    result = cli("doctor", "--json", env={"QEMUKIT_QEMU": str(tmp_path / "no-qemu")})
    assert result.exit_code == 1
    assert "error" in json.loads(result.stdout)["qemu"]


# -- build_spec: how -f and the options combine ------------------------------------------


def _opts(**given: Any) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "spec_file": None,
        "image": None,
        "name": None,
        "accel": None,
        "machine": None,
        "cpu_model": None,
        "cpus": None,
        "max_cpus": None,
        "memory": None,
        "max_memory": None,
        "slots": None,
        "kernel": None,
        "initrd": None,
        "append": None,
        "disks": (),
        "nics": (),
        "no_sandbox": None,
        "extra_args": (),
    }
    opts.update(given)
    return opts


def test_build_spec_defaults() -> None:
    assert build_spec(_opts()) == VMSpec()


def test_build_spec_appends_to_file_lists(tmp_path: Path) -> None:
    path = tmp_path / "vm.toml"
    VMSpec(drives=(Drive("a.img"),), nics=(Nic(),), extra_args=("-S",)).dump(path)
    spec = build_spec(
        _opts(
            spec_file=str(path),
            disks=("b,,c.img,format=raw",),
            nics=("tap,ifname=tap0",),
            extra_args=("-no-shutdown",),
            no_sandbox=True,
            cpu_model="max",
        )
    )
    assert [d.file for d in spec.drives] == ["a.img", "b,c.img"]
    assert [n.kind for n in spec.nics] == ["user", "tap"]
    assert spec.extra_args == ("-S", "-no-shutdown")
    assert spec.sandbox is False
    assert spec.cpu == "max"


def test_build_spec_validates() -> None:
    with pytest.raises(SpecError) as info:
        build_spec(_opts(memory="12Q"))
    assert (info.value.field, info.value.value) == ("memory", "12Q")


@pytest.mark.parametrize(("spec_text", "reason"), [
    ('kernel = "/no/vmlinuz"\n', "user network"),
    ('kernel = "/no/vmlinuz"\nagent = "none"\n[[nics]]\nkind = "user"\n', "agent"),
])
def test_run_detach_forward_auto_is_refused_naming_the_field_before_any_start(
        cli: Any, tmp_path: Path, spec_text: str, reason: str) -> None:
    spec_file = tmp_path / "vm.toml"
    spec_file.write_text(spec_text)
    for args in (["--detach", "--forward-auto"], ["--detach"]):
        if args == ["--detach"]:
            spec_file.write_text(spec_text.replace('kernel =', 'forward_auto = true\nkernel ='))
        result = cli("run", "-f", str(spec_file), *args)
        assert result.exit_code == EXIT_ERROR, result.output
        assert "forward_auto" in result.output and reason in result.output, result.output
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())


@needs_qemu
def test_cmdline_gdb_is_a_private_socket_and_tcp_only_when_asked(cli: Any) -> None:
    unix = json_argv(cli("cmdline", "--accel", "tcg", "--json", "--gdb", "--name", "g"))
    gdb = [c for c in option_values(unix, "-chardev") if "id=gdb0" in c]
    assert len(gdb) == 1 and "/g/gdb.sock," in gdb[0] and "port=" not in gdb[0]
    tcp = json_argv(cli("cmdline", "--accel", "tcg", "--json", "--gdb", "tcp:0"))
    gdb = [c for c in option_values(tcp, "-chardev") if "id=gdb0" in c]
    assert gdb == ["socket,id=gdb0,host=127.0.0.1,port=0,server=on,wait=off"]
