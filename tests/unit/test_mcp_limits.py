"""qemukit mcp's refusals and caps, without QEMU (the image lookup and the VM are faked).

The client is hostile: every test here is a door it could try, and the field
and limit the refusal must name.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from qemukit import mcp as qmcp
from qemukit.cli import main
from qemukit.errors import SpecError
from qemukit.guest import ExecResult
from qemukit.spec import CloudInit, Drive, Nic, PortForward, Share, VMSpec


def _fake_spec(name: str = "tiny", **overrides: Any) -> VMSpec:
    return VMSpec(kernel="/k", initrd="/i", **overrides)


class FakeRuntime:
    def __init__(self, path: Path) -> None:
        self.path = path


class FakeVM:
    """What Sandbox uses of an AsyncVM; records what was asked of it."""

    made: list[FakeVM] = []

    def __init__(self, spec: VMSpec, **kwargs: Any) -> None:
        self.spec = spec
        self.name = spec.name or f"vm{len(FakeVM.made)}"
        self.pid = 4242
        self.killed = False
        self.state = type("S", (), {"value": "new"})()
        self.runtime: FakeRuntime | None = None
        self.console_log: Path | None = None
        self.scripts: list[Any] = []
        self.stdout = b""
        self.stat_answer = "10\n"
        self.copied_out: list[str] = []
        self.grow = 0
        FakeVM.made.append(self)

    async def start(self) -> None:
        self.state.value = "running"

    async def wait_ready(self, timeout: float) -> float:
        return 0.5

    async def kill(self) -> str:
        self.killed = True
        self.state.value = "stopped"
        return "SIGKILL"

    async def shutdown(self, timeout: float) -> str:
        return await self.kill()

    async def exec(self, command: Any, timeout: float | None = 60.0) -> ExecResult:
        self.scripts.append(command)
        if isinstance(command, list) and "stat" in command[2]:
            return ExecResult(tuple(command), 0, self.stat_answer.encode(), b"", 0.1)
        if isinstance(command, list):
            return ExecResult(tuple(command), 0, b"", b"", 0.1)
        return ExecResult((command,), 0, self.stdout, b"err", 0.1)

    async def copy_out(self, path: str, host: Path, timeout: float) -> Path:
        self.copied_out.append(path)
        if self.grow:  # the guest grew the file after the stat: bytes keep coming
            (Path(host).parent / ".file.tmp").write_bytes(b"x" * self.grow)
            await asyncio.sleep(60)
        Path(host).write_bytes(b"x" * 10)
        return Path(host)


@pytest.fixture
def fake_vms(monkeypatch: pytest.MonkeyPatch) -> list[FakeVM]:
    FakeVM.made = []
    monkeypatch.setattr(qmcp, "AsyncVM", FakeVM)
    return FakeVM.made


@pytest.fixture(autouse=True)
def fake_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemukit.mcp.images.spec", _fake_spec)


@pytest.fixture
def sandbox() -> qmcp.Sandbox:
    return qmcp.Sandbox(qmcp.Limits(max_vms=1, max_memory_mib=1024, max_cpus=2))


def _refused(sandbox: qmcp.Sandbox, **kwargs: Any) -> SpecError:
    with pytest.raises(SpecError) as err:
        asyncio.run(sandbox.start(**kwargs))
    return err.value


def test_limits_refuse_with_the_field_and_the_limit(sandbox: qmcp.Sandbox,
                                                    fake_vms: list[FakeVM]) -> None:
    err = _refused(sandbox, memory="2G")
    assert err.field == "memory" and "at most 1024 MiB" in err.reason
    err = _refused(sandbox, cpus=3)
    assert err.field == "cpus" and "at most 2 vCPUs" in err.reason
    err = _refused(sandbox, image="fedora")
    assert err.field == "image" and "tiny" in err.reason
    err = _refused(sandbox, image="tiny", template="tiny")
    assert err.field == "template"
    assert fake_vms == [], "a refusal started a VM"


def test_vm_count_and_total_memory(fake_vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_vms=2, max_memory_mib=1024, max_total_memory_mib=1536))

    async def go() -> None:
        await box.start(memory="1G")
        err = await _arefused(box.start(memory="1G"))
        assert err.field == "memory" and "at most 1536 MiB" in err.reason
        await box.start(memory="512M")
        err = await _arefused(box.start(memory="16M"))
        assert err.field == "vms" and "at most 2 VMs" in err.reason
        await box.stop_all()

    asyncio.run(go())
    assert len(fake_vms) == 2 and all(vm.killed for vm in fake_vms)


async def _arefused(call: Any) -> SpecError:
    with pytest.raises(SpecError) as err:
        await call
    return err.value


def test_no_network_unless_allowed(sandbox: qmcp.Sandbox, fake_vms: list[FakeVM]) -> None:
    err = _refused(sandbox, forwards=["8080:80"])
    assert err.field == "forwards" and "--allow-network" in err.reason and "10.0.2.2" in err.reason
    # An image's own NIC (debian's ssh forward) is removed too.
    debian_like = _fake_spec(nics=(Nic(forwards=(PortForward(0, 22),)),))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("qemukit.mcp.images.spec", lambda name="tiny", **kw: debian_like)
        spec, _ = sandbox._spec("debian", None, None, None, None, None, None)
    assert spec.nics == ()
    with pytest.raises(SpecError, match="--allow-network"):
        sandbox.check_spec(debian_like, debian_like)
    assert fake_vms == []


def test_forwards_bind_loopback_only() -> None:
    sandbox = qmcp.Sandbox(network=True)
    err = _refused(sandbox, forwards=["0.0.0.0:8080:80"])
    assert err.field == "forward" and "127.0.0.1 only" in err.reason
    err = _refused(sandbox, forwards=["22:22"])
    assert err.field == "forward" and "below 1024" in err.reason
    spec, _ = sandbox._spec(None, None, None, None, None, None, ["8080:80"])
    assert [str(f) for f in spec.nics[0].forwards] == ["tcp:127.0.0.1:8080:80"]
    assert spec.shares == () and spec.warm is True and spec.forward_auto is False


# -- host shares ---------------------------------------------------------------------


def test_no_share_without_a_grant(sandbox: qmcp.Sandbox, fake_vms: list[FakeVM]) -> None:
    for share in ("/:/mnt/host", "/:/m", f"{os.getcwd()}:/mnt", "/etc:/m,ro"):
        err = _refused(sandbox, share=share)
        assert err.field == "share" and "--allow-share" in err.reason and "none" in err.reason
    assert fake_vms == []


def test_share_inside_a_grant_gets_its_mode_at_most(tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    (ro / "sub").mkdir(parents=True)
    (rw / "sub").mkdir(parents=True)
    box = qmcp.Sandbox(shares=[qmcp.ShareGrant.parse(f"{ro}"), qmcp.ShareGrant.parse(f"{rw}:rw")])
    spec, _ = box._spec(None, None, None, None, None, f"{ro}/sub:/m", None)
    assert spec.shares[0].host_path == str(ro / "sub") and spec.shares[0].read_only
    spec, _ = box._spec(None, None, None, None, None, f"{rw}/sub:/m", None)
    assert not spec.shares[0].read_only
    spec, _ = box._spec(None, None, None, None, None, f"{rw}:/m,ro", None)
    assert spec.shares[0].read_only


def test_share_escapes_are_resolved_before_the_check(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "out").symlink_to("/")
    box = qmcp.Sandbox(shares=[qmcp.ShareGrant.parse(f"{allowed}:rw")])
    for share in (f"{allowed}/..:/m", f"{allowed}/../..:/m", f"{allowed}/out:/m",
                  f"{allowed}/out/etc:/m", f"{tmp_path}/allowed2:/m"):
        with pytest.raises(SpecError) as err:
            box._spec(None, None, None, None, None, share, None)
        assert err.value.field == "share" and "outside every directory" in err.value.reason, share
    with pytest.raises(SpecError, match="not a directory"):
        box._spec(None, None, None, None, None, f"{allowed}/missing:/m", None)


def test_share_grant_parse(tmp_path: Path) -> None:
    assert qmcp.ShareGrant.parse(str(tmp_path)) == qmcp.ShareGrant(tmp_path.resolve(), False)
    assert qmcp.ShareGrant.parse(f"{tmp_path}:rw").writable
    assert not qmcp.ShareGrant.parse(f"{tmp_path}:ro").writable
    with pytest.raises(SpecError) as err:
        qmcp.ShareGrant.parse(f"{tmp_path}/nope:rw")
    assert err.value.field == "allow_share"


def test_builtin_template_share_dropped_unless_granted(tmp_path: Path) -> None:
    box = qmcp.Sandbox(cwd=tmp_path)
    spec, notes = box._spec(None, "debian-dev", None, None, None, None, None)
    assert spec.shares == () and "dropped" in notes[0] and str(tmp_path) in notes[0]
    box = qmcp.Sandbox(limits=qmcp.Limits(max_cpus=4), cwd=tmp_path,
                       shares=[qmcp.ShareGrant.parse(str(tmp_path))])
    spec, notes = box._spec(None, "debian-dev", None, None, None, None, None)
    assert notes == [] and spec.shares[0].host_path == str(tmp_path.resolve())
    assert spec.shares[0].read_only, "a read-only grant makes the template's share read-only"


# -- templates -----------------------------------------------------------------------


@pytest.mark.parametrize("template", ["/etc/passwd", "/tmp/evil.toml", "evil.toml",
                                      "../evil", "a/b", ".hidden", "", "x" * 70])
def test_template_is_a_name_never_a_path(sandbox: qmcp.Sandbox, template: str,
                                        fake_vms: list[FakeVM]) -> None:
    err = _refused(sandbox, template=template)
    assert err.field == "template"
    assert "never a path" in err.reason or "unknown template" in err.reason
    assert fake_vms == []


def test_host_toml_template_path_refused(sandbox: qmcp.Sandbox, tmp_path: Path,
                                         fake_vms: list[FakeVM]) -> None:
    evil = tmp_path / "evil.toml"
    evil.write_text('image = "tiny"\nextra_args = ["-device", "x"]\n')
    err = _refused(sandbox, template=str(evil))
    assert err.field == "template" and "never a path" in err.reason
    err = _refused(sandbox, template="evil")
    assert err.field == "template" and "unknown template" in err.reason
    assert fake_vms == []


@pytest.mark.parametrize("line", [
    'extra_args = ["-drive", "file=/etc/shadow"]',
    "sandbox = false",
    "qmp_tcp_port = 4444",
    "gdb_port = 1234",
    'run_as = "root"',
    'kernel = "/boot/vmlinuz"',
    'initrd = "/etc/shadow"',
    'drives = [{file = "/dev/sda"}]',
    'cloud_init = {user_data = "/etc/shadow"}',
    'nics = [{kind = "tap", ifname = "tap0"}]',
    'accel = "tcg"',
    "max_memory = 65536",
    'firmware = "ovmf"',
])
def test_template_dir_file_may_not_smuggle_fields(tmp_path: Path, line: str) -> None:
    tdir = tmp_path / "templates"
    tdir.mkdir()
    (tdir / "mine.toml").write_text(f'image = "tiny"\n{line}\n')
    box = qmcp.Sandbox(template_dirs=[tdir])
    with pytest.raises(SpecError) as err:
        box._spec(None, "mine", None, None, None, None, None)
    key = line.split(" ", 1)[0]
    assert err.value.field.endswith(f": {key}") and "may set only" in err.value.reason


def test_template_dir_chain_stays_in_the_dir(tmp_path: Path) -> None:
    tdir, outside = tmp_path / "templates", tmp_path / "outside"
    tdir.mkdir()
    outside.mkdir()
    (outside / "evil.toml").write_text('image = "tiny"\n')
    (tdir / "mine.toml").write_text('base = "../outside/evil.toml"\nmemory = "256M"\n')
    (tdir / "link.toml").symlink_to(outside / "evil.toml")
    (tdir / "ok-base.toml").write_text('image = "tiny"\ncpus = 2\n')
    (tdir / "ok.toml").write_text('base = "ok-base.toml"\nmemory = "256M"\n')
    (tdir / "noimage.toml").write_text('memory = "256M"\n')
    box = qmcp.Sandbox(template_dirs=[tdir])
    with pytest.raises(SpecError) as err:
        box._spec(None, "mine", None, None, None, None, None)
    assert err.value.field == "mine.toml: base" and "--template-dir" in err.value.reason
    with pytest.raises(SpecError, match="leads out of"):
        box._spec(None, "link", None, None, None, None, None)
    with pytest.raises(SpecError, match="must name a built-in image"):
        box._spec(None, "noimage", None, None, None, None, None)
    spec, _ = box._spec(None, "ok", None, None, None, None, None)
    assert (spec.memory, spec.cpus, spec.kernel) == (256, 2, "/k")


def test_builtin_templates_pass_the_whitelist() -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_cpus=4))
    for name in ("tiny", "debian", "debian-dev", "kernel-test"):
        spec, _ = box._spec(None, name, None, None, None, None, None)
        assert spec.extra_args == () and spec.sandbox and spec.qmp_tcp_port is None


# -- the resolved spec ---------------------------------------------------------------


@pytest.mark.parametrize("change", [
    {"extra_args": ("-monitor", "stdio")},
    {"sandbox": False},
    {"qmp_tcp_port": 4444},
    {"gdb": True},
    {"gdb_port": 0},
    {"kernel": "/etc/passwd"},
    {"initrd": "/etc/shadow"},
    {"drives": (Drive("/etc/shadow", format="raw", read_only=True),)},
    {"cloud_init": CloudInit(user_data="/etc/shadow")},
    {"run_as": "nobody"},
    {"max_cpus": 8},
])
def test_check_spec_is_a_whitelist(change: dict[str, Any]) -> None:
    base = _fake_spec()
    box = qmcp.Sandbox()
    with pytest.raises(SpecError) as err:
        box.check_spec(base.replace(**change), base)
    # gdb_port (a TCP stub) implies gdb: either name is the refused field.
    named = {"gdb", "gdb_port"} if "gdb_port" in change else {next(iter(change))}
    assert err.value.field in named and "built-in image only" in err.value.reason


def test_check_spec_nics_shares_and_disks(tmp_path: Path) -> None:
    base = _fake_spec()
    box = qmcp.Sandbox(network=True)
    with pytest.raises(SpecError, match="user networking only"):
        box.check_spec(base.replace(nics=(Nic(kind="tap", ifname="tap0"),)), base)
    with pytest.raises(SpecError, match="at most one NIC"):
        box.check_spec(base.replace(nics=(Nic(), Nic())), base)
    with pytest.raises(SpecError, match="outside every directory"):
        box.check_spec(base.replace(shares=(Share(str(tmp_path)),)), base)
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    writable = base.replace(drives=(Drive(disk, format="raw"),))
    with pytest.raises(SpecError, match="throwaway overlay"):
        box.check_spec(writable, writable)


def test_unknown_tool_arguments_are_refused() -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    server = qmcp.build_server(qmcp.Sandbox())
    for tool, args in (("start_vm", {"extra_args": ["-monitor", "stdio"]}),
                       ("start_vm", {"sandbox": False}),
                       ("exec", {"name": "x", "command": "true", "user": "root"})):
        with pytest.raises(ToolError) as err:
            asyncio.run(server.call_tool(tool, args))
        assert next(iter(set(args) - {"name", "command"})) in str(err.value)
        assert "takes only" in str(err.value)


# -- caps while VMs run ----------------------------------------------------------------


def test_lifetime_stops_the_vm(fake_vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_lifetime=0.3), watch_interval=0.05)

    async def go() -> SpecError:
        started = await box.start()
        for _ in range(200):
            if fake_vms[0].killed:
                break
            await asyncio.sleep(0.05)
        return await _arefused(box.exec(started["name"], ["true"]))

    err = asyncio.run(go())
    assert fake_vms[0].killed and err.field == "name"
    assert "lifetime of 0.3 s" in err.reason and "--max-lifetime" in err.reason
    assert box.list() == []


def test_disk_overlay_cap_stops_the_vm(fake_vms: list[FakeVM], tmp_path: Path) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_disk=1 << 20), watch_interval=0.05)

    async def go() -> None:
        await box.start()
        vm = fake_vms[0]
        vm.runtime = FakeRuntime(tmp_path)
        with open(tmp_path / "overlay-disk0.qcow2", "wb") as fh:
            fh.truncate(2 << 20)
        for _ in range(200):
            if vm.killed:
                return
            await asyncio.sleep(0.05)

    asyncio.run(go())
    assert fake_vms[0].killed
    reason = box.ended[fake_vms[0].name]
    assert "over the cap of 1 MiB" in reason and "--max-disk" in reason


def test_console_log_is_cut_back(fake_vms: list[FakeVM], tmp_path: Path) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_console_log=64 * 1024), watch_interval=0.05)
    log = tmp_path / "console.log"

    async def go() -> None:
        await box.start()
        fake_vms[0].console_log = log
        log.write_bytes(b"a" * 200_000 + b"the newest line\n")
        for _ in range(200):
            if log.stat().st_size < 64 * 1024:
                break
            await asyncio.sleep(0.05)
        await box.stop_all()

    asyncio.run(go())
    text = log.read_bytes()
    assert len(text) <= 64 * 1024 and text.endswith(b"the newest line\n")
    assert text.startswith(b"qemukit mcp: console log passed 64 KiB")
    assert not qmcp.cap_console_log(log, 64 * 1024)


def test_exec_output_is_bounded(fake_vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_output=100))

    async def go() -> dict[str, Any]:
        started = await box.start()
        fake_vms[0].stdout = b"y\n" * 1000  # a changed guest agent sends more than asked
        return await box.exec(started["name"], ["yes"])

    out = asyncio.run(go())
    assert len(out["stdout"]) == 100 and out["stdout_truncated"] and not out["stderr_truncated"]
    assert out["output_limit_bytes"] == 100
    assert "head -c 101" in fake_vms[0].scripts[-1]


@pytest.mark.skipif(shutil.which("mkfifo") is None, reason="needs mkfifo")
@pytest.mark.parametrize(("command", "status", "out", "err"), [
    (["yes"], 141, b"y\n" * 50 + b"y", b""),
    ("echo out; echo err >&2; exit 7", 7, b"out\n", b"err\n"),
    (["printf", "%s", "it's \"quoted\" $HOME"], 0, b"it's \"quoted\" $HOME", b""),
    ("cat /dev/zero | tr '\\0' x >&2", None, b"", b"x" * 101),
])
def test_bounded_script_in_a_real_shell(command: Any, status: int | None, out: bytes,
                                        err: bytes) -> None:
    # The same script the guest runs, in the host's sh: the endless writer ends on SIGPIPE.
    proc = subprocess.run(["sh", "-c", qmcp.bounded_script(command, 100)], capture_output=True,
                          timeout=60, check=False)
    assert (proc.stdout, proc.stderr) == (out, err)
    if status is not None:
        assert proc.returncode == status


def test_read_file_size_checked_before_the_copy(fake_vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_file=1 << 20))

    async def go() -> None:
        name = (await box.start())["name"]
        vm = fake_vms[0]
        vm.stat_answer = f"{1 << 30}\n"
        err = await _arefused(box.read_file(name, "/big"))
        assert err.field == "path" and f"{1 << 30} bytes" in err.reason
        assert "at most 1 MiB" in err.reason and "--max-file" in err.reason
        vm.stat_answer = "missing\n"
        err = await _arefused(box.read_file(name, "/nope"))
        assert "no such file" in err.reason
        vm.stat_answer = "special\n"
        err = await _arefused(box.read_file(name, "/dev/zero"))
        assert "not a regular file" in err.reason
        assert vm.copied_out == []
        vm.stat_answer = "10\n"
        assert await box.read_file(name, "/small") == b"x" * 10
        assert vm.copied_out == ["/small"]

    asyncio.run(go())


def test_read_file_stops_a_copy_that_grows_past_the_cap(fake_vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_file=1 << 20))

    async def go() -> SpecError:
        name = (await box.start())["name"]
        fake_vms[0].grow = (1 << 20) + 1
        return await asyncio.wait_for(_arefused(box.read_file(name, "/growing")), 30)

    err = asyncio.run(go())
    assert err.field == "path" and "grew past 1 MiB" in err.reason


def test_write_file_size_checked_first(fake_vms: list[FakeVM]) -> None:
    box = qmcp.Sandbox(qmcp.Limits(max_file=1024))

    async def go() -> None:
        name = (await box.start())["name"]
        err = await _arefused(box.write_file(name, "/x", b"z" * 1025))
        assert err.field == "content" and "at most 1 KiB" in err.reason
        assert fake_vms[0].scripts == []

    asyncio.run(go())


def test_unknown_vm_name(sandbox: qmcp.Sandbox) -> None:
    with pytest.raises(SpecError, match="no VM of this server"):
        asyncio.run(sandbox.exec("nope", ["true"]))


# -- the command line ------------------------------------------------------------------


def test_cli_passes_caps_grants_and_template_dirs(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    seen: dict[str, Any] = {}

    def fake_serve(limits: qmcp.Limits, *, shares: Any, template_dirs: Any,
                   network: bool) -> None:
        seen.update(limits=limits, shares=shares, template_dirs=template_dirs, network=network)

    monkeypatch.setattr(qmcp, "serve", fake_serve)
    out = CliRunner().invoke(main, ["mcp", "--max-output", "64K", "--max-file", "2M",
                                    "--max-disk", "1G", "--max-console-log", "1M",
                                    "--max-lifetime", "60", "--allow-share", f"{tmp_path}:rw",
                                    "--allow-share", "/usr", "--template-dir", str(tmp_path),
                                    "--allow-network"])
    assert out.exit_code == 0, out.output
    lim = seen["limits"]
    assert (lim.max_output, lim.max_file, lim.max_disk, lim.max_console_log, lim.max_lifetime) \
        == (64 << 10, 2 << 20, 1 << 30, 1 << 20, 60.0)
    assert [str(g) for g in seen["shares"]] == [f"{tmp_path.resolve()}:rw", "/usr:ro"]
    assert seen["template_dirs"] == (str(tmp_path),) and seen["network"] is True


def test_cli_defaults_are_safe(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(qmcp, "serve", lambda limits, **kw: seen.update(limits=limits, **kw))
    assert CliRunner().invoke(main, ["mcp"]).exit_code == 0
    assert seen["shares"] == [] and seen["template_dirs"] == () and seen["network"] is False
    assert seen["limits"] == qmcp.Limits()


def test_cli_bad_sizes_and_grants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qmcp, "serve", lambda *a, **kw: None)
    out = CliRunner().invoke(main, ["mcp", "--max-output", "lots"])
    assert out.exit_code != 0 and "max_output" in out.output
    out = CliRunner().invoke(main, ["mcp", "--allow-share", "/no/such/dir:rw"])
    assert out.exit_code != 0 and "allow_share" in out.output


def test_missing_sdk_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("qemukit.cli._mcp.importlib.util.find_spec", lambda name: None)
    out = CliRunner().invoke(main, ["mcp"])
    assert out.exit_code != 0
    assert out.output.strip() == "qemukit: qemukit mcp needs the MCP SDK: pip install 'qemukit[mcp]'"


def test_a_template_host_root_needs_the_operator_to_grant_the_root_and_its_rw_dirs(
        tmp_path: Path) -> None:
    """The host's root is a share of "/": a template asking for it is refused unless the
    operator granted "/" (read-only), and each rw directory is refused unless granted :rw."""
    tdir, out = tmp_path / "templates", tmp_path / "out"
    tdir.mkdir()
    out.mkdir()
    (tdir / "hr.toml").write_text(f'image = "tiny"\n[host_root]\nrw = ["{out}"]\n'
                                  'transport = "9p"\n')
    for grants in ([], [f"{out}:rw"], ["/", f"{out}"]):
        box = qmcp.Sandbox(template_dirs=[tdir],
                           shares=[qmcp.ShareGrant.parse(g) for g in grants])
        with pytest.raises(SpecError) as err:
            box._spec(None, "hr", None, None, None, None, None)
        assert err.value.field == "share", grants
    box = qmcp.Sandbox(template_dirs=[tdir],
                       shares=[qmcp.ShareGrant.parse("/"), qmcp.ShareGrant.parse(f"{out}:rw")])
    spec, _ = box._spec(None, "hr", None, None, None, None, None)
    assert spec.host_root is not None and spec.host_root.rw == (str(out),)
    assert [(s.host_path, s.read_only) for s in spec.all_shares] == [("/", True),
                                                                     (str(out), False)]


def test_standby_clones_count_against_the_limits(fake_vms: list[FakeVM],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The attack: a client starting VMs of ever other sizes leaves one standby clone per
    size (each a QEMU with its memory) that --max-vms and --max-total-memory never saw.
    The server asks for a standby only where the limits leave room for it, and ends its
    standbys before a start or fork that would not fit beside them."""
    kept: list[int] = []
    ended: list[list[int]] = []

    async def end_all() -> None:
        ended.append(list(kept))
        kept.clear()

    monkeypatch.setattr("qemukit.mcp.images.spec",
                        lambda name, **kw: _fake_spec(name, standby=True, **kw))
    monkeypatch.setattr("qemukit.vm._standby.kept_memory", lambda: list(kept))
    monkeypatch.setattr("qemukit.vm._standby.end_all", end_all)
    box = qmcp.Sandbox(qmcp.Limits(max_vms=2, max_memory_mib=1024, max_total_memory_mib=1536))

    async def go() -> None:
        await box.start(memory="512M")
        assert fake_vms[-1].spec.standby is True  # room for it and its standby
        kept.append(512)  # the standby that start left
        await box.start(memory="256M")  # 1 running + this one: no room for a standby
        assert fake_vms[-1].spec.standby is False
        assert ended == [[512]], "the standby was not ended though 3 QEMUs would run"
        await box.stop_all()
        kept.append(1024)  # a standby of another size
        await box.start(memory="512M")  # 2 QEMUs fit, 512 + 512 + 1024 MiB do not
        assert ended[-1] == [1024] and fake_vms[-1].spec.standby is True
        await box.stop_all()

    asyncio.run(go())
