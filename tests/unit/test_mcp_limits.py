"""qemukit mcp's refusals, before any VM starts (the image lookup is faked; no QEMU)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from click.testing import CliRunner

from qemukit import mcp as qmcp
from qemukit.cli import _mcp as cli_mcp
from qemukit.cli import main
from qemukit.errors import SpecError
from qemukit.spec import VMSpec


@pytest.fixture
def sandbox(monkeypatch: pytest.MonkeyPatch) -> qmcp.Sandbox:
    def fake_spec(name: str = "tiny", **overrides: Any) -> VMSpec:
        return VMSpec(kernel="/k", initrd="/i", **overrides)

    monkeypatch.setattr(qmcp.images, "spec", fake_spec)
    return qmcp.Sandbox(qmcp.Limits(max_vms=1, max_memory_mib=1024, max_cpus=2))


def _start(sandbox: qmcp.Sandbox, **kwargs: Any) -> SpecError:
    with pytest.raises(SpecError) as err:
        asyncio.run(sandbox.start(**kwargs))
    return err.value


def test_limits_refuse_with_the_field_and_the_limit(sandbox: qmcp.Sandbox) -> None:
    err = _start(sandbox, memory="2G")
    assert err.field == "memory" and "at most 1024 MiB" in err.reason
    err = _start(sandbox, cpus=3)
    assert err.field == "cpus" and "at most 2 vCPUs" in err.reason
    err = _start(sandbox, image="fedora")
    assert err.field == "image" and "tiny" in err.reason
    err = _start(sandbox, image="tiny", template="tiny")
    assert err.field == "template"


def test_forwards_bind_loopback_only(sandbox: qmcp.Sandbox) -> None:
    err = _start(sandbox, forwards=["0.0.0.0:8080:80"])
    assert err.field == "forward" and "127.0.0.1 only" in err.reason
    spec = sandbox._spec(None, None, None, None, None, None, ["8080:80"])
    assert [str(f) for f in spec.nics[0].forwards] == ["tcp:127.0.0.1:8080:80"]
    assert spec.shares == () and spec.warm is True


def test_share_must_be_a_host_directory(sandbox: qmcp.Sandbox, tmp_path: Any) -> None:
    err = _start(sandbox, share=f"{tmp_path}/missing:/mnt")
    assert err.field == "share" and "not a directory" in err.reason


def test_unknown_vm_name(sandbox: qmcp.Sandbox) -> None:
    with pytest.raises(SpecError, match="no VM of this server"):
        asyncio.run(sandbox.exec("nope", ["true"]))


def test_missing_sdk_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_mcp.importlib.util, "find_spec", lambda name: None)
    out = CliRunner().invoke(main, ["mcp"])
    assert out.exit_code != 0
    assert out.output.strip() == "qemukit: qemukit mcp needs the MCP SDK: pip install 'qemukit[mcp]'"
