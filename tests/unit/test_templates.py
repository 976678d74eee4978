"""Spec files with a base: resolution, overrides, errors; the built-in templates; ``templates ls``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qemukit import templates
from qemukit.cli import main
from qemukit.errors import SpecError
from qemukit.spec import VMSpec, resolve_spec_file


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_base_file_override_and_merge_rules(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    _write(tmp_path / "sub" / "base.toml", """
        cpus = 2
        memory = "1G"
        kernel = "/k"
        extra_args = ["-a", "-b"]
        [[shares]]
        host_path = "${PWD}/src"
        guest_path = "/src"
        tag = "src"
        """.replace("        ", ""))
    top = _write(tmp_path / "vm.toml", 'base = "sub/base.toml"\nmemory = "2G"\nextra_args = ["-c"]\n')
    spec = VMSpec.load(top)
    assert (spec.cpus, spec.memory, spec.kernel) == (2, 2048, "/k")
    assert spec.extra_args == ("-c",)  # a list is replaced whole, not appended to
    assert spec.shares[0].host_path == str(Path.cwd()) + "/src"
    data, origins = resolve_spec_file(top, cwd="/elsewhere")
    assert data["shares"][0]["host_path"] == "/elsewhere/src"
    assert origins["memory"] == str(top) and origins["cpus"].endswith("sub/base.toml")


def test_tables_merge_key_by_key(tmp_path: Path) -> None:
    _write(tmp_path / "a.toml", '[cloud_init]\nhostname = "a"\nssh_user = "alice"\n')
    b = _write(tmp_path / "b.toml", 'base = "a.toml"\n[cloud_init]\nhostname = "b"\n')
    data, _ = resolve_spec_file(b)
    assert data["cloud_init"] == {"hostname": "b", "ssh_user": "alice"}


def test_unknown_key_names_the_file_and_key(tmp_path: Path) -> None:
    _write(tmp_path / "a.toml", "memroy = 512\n")
    b = _write(tmp_path / "b.toml", 'base = "a.toml"\ncpus = 1\n')
    with pytest.raises(SpecError) as err:
        VMSpec.load(b)
    assert err.value.field == f"{(tmp_path / 'a.toml').resolve()}: memroy"
    assert "unknown key" in str(err.value)


def test_bad_value_in_a_base_names_that_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.toml", "cpus = 0\n")
    b = _write(tmp_path / "b.toml", 'base = "a.toml"\nmemory = 256\n')
    with pytest.raises(SpecError) as err:
        VMSpec.load(b)
    assert err.value.field == f"{(tmp_path / 'a.toml').resolve()}: cpus"


def test_cycle_shows_the_chain(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.toml", 'base = "b.toml"\n')
    _write(tmp_path / "b.toml", 'base = "a.toml"\n')
    with pytest.raises(SpecError) as err:
        VMSpec.load(a)
    b_path, a_path = (tmp_path / "b.toml").resolve(), (tmp_path / "a.toml").resolve()
    assert f"a cycle of bases: {a} -> {b_path} -> {a_path}" in str(err.value)


def test_self_base_is_a_cycle(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.toml", 'base = "./a.toml"\n')
    with pytest.raises(SpecError, match="a cycle of bases"):
        VMSpec.load(a)


def test_unknown_template_and_missing_file(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.toml", 'base = "debain-dev"\n')
    with pytest.raises(SpecError) as err:
        VMSpec.load(a)
    assert err.value.field == f"{a}: base" and "unknown template" in err.value.reason
    assert "debian-dev" in err.value.reason
    b = _write(tmp_path / "b.toml", 'base = "gone.toml"\n')
    with pytest.raises(SpecError, match="no such file"):
        VMSpec.load(b)


def test_unknown_placeholder(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.toml", 'kernel = "${CWD}/bzImage"\n')
    with pytest.raises(SpecError, match=r"unknown placeholder \$\{CWD\}"):
        VMSpec.load(a)


def test_image_needs_the_template_loader(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.toml", 'base = "tiny"\n')
    with pytest.raises(SpecError, match="qemukit.templates.load_spec"):
        VMSpec.load(a)


def test_builtin_templates_resolve() -> None:
    names = [t.name for t in templates.list_templates()]
    assert names == ["debian", "debian-dev", "kernel-test", "tiny"]
    dev, origins = templates.resolve("debian-dev", cwd="/proj")
    assert dev["image"] == "debian" and origins["image"] == "template debian"
    assert (dev["cpus"], dev["memory"]) == (4, "4G")
    assert dev["shares"] == [{"host_path": "/proj", "guest_path": "/mnt/host", "tag": "pwd"}]
    kt, _ = templates.resolve("kernel-test")
    assert kt["image"] == "tiny" and "quiet" not in kt["append"] and kt["no_reboot"] is True


def test_load_spec_puts_the_image_under_the_chain(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.toml", 'base = "kernel-test"\nkernel = "/my/bzImage"\n'
               'initrd = "/my/initrd"\nmemory = "1G"\n')
    spec = templates.load_spec(a)  # kernel and initrd given: no built image needed
    assert (spec.kernel, spec.initrd, spec.memory, spec.no_reboot) == (
        "/my/bzImage", "/my/initrd", 1024, True)
    assert spec.append == "console=ttyS0 panic=-1 memhp_default_state=online"


def test_templates_ls_and_show() -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["templates", "ls"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split() == ["NAME", "BASE", "DESCRIPTION"]
    assert lines[2].split()[:2] == ["debian-dev", "debian"]
    as_json = json.loads(runner.invoke(main, ["templates", "ls", "--json"]).output)
    assert {"name": "kernel-test", "base": "tiny", "image": "tiny"}.items() <= as_json[2].items()
    shown = runner.invoke(main, ["templates", "show", "debian-dev"])
    assert shown.exit_code == 0 and 'image = "debian"' in shown.output
    assert "[[shares]]" in shown.output
    bad = runner.invoke(main, ["templates", "show", "nope"])
    assert bad.exit_code != 0 and "unknown template" in bad.output


def test_forward_auto_in_a_base_is_inherited_and_checked_naming_its_file(tmp_path: Path) -> None:
    _write(tmp_path / "a.toml", 'forward_auto = true\nkernel = "/k"\n')
    ok = _write(tmp_path / "ok.toml", 'base = "a.toml"\n[[nics]]\nkind = "user"\n')
    assert VMSpec.load(ok).forward_auto is True
    off = _write(tmp_path / "off.toml", 'base = "a.toml"\nforward_auto = false\n')
    assert VMSpec.load(off).forward_auto is False
    bad = _write(tmp_path / "bad.toml", 'base = "a.toml"\nmemory = 256\n')
    with pytest.raises(SpecError) as err:
        VMSpec.load(bad)
    assert err.value.field == f"{(tmp_path / 'a.toml').resolve()}: forward_auto"
    assert "user network" in str(err.value)
