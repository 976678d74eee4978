"""A hostile MCP client against ``qemukit mcp``: the doors of issue #23, each tried for real.

The client is the mcp SDK's own stdio client driving the installed ``qemukit``
command, as an agent would; the guest is the tiny image in real QEMU. One
server and one VM serve the module (the machine is slow): a fixture keeps the
client's session open on an event loop in a thread of its own, and each test
sends its calls there. The server runs with small caps so the tests are quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from qemukit import images
from tests.helpers import QEMUKIT, qemu_processes_under, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("mcp-hostile")]

#: Generous: the first start may boot the guest and save its warm state, under TCG on a busy host.
CALL_TIMEOUT = 600.0
#: The caps the server runs with: small, so that the tests move little.
MAX_OUTPUT = 64 * 1024
MAX_FILE = 1 << 20
MAX_CONSOLE_LOG = 64 * 1024


def _params(state: Path, *args: str) -> StdioServerParameters:
    assert QEMUKIT, "the qemukit console script is not installed (pip install -e .)"
    env = {"QEMUKIT_STATE": str(state), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if os.environ.get("QEMUKIT_CACHE"):
        env["QEMUKIT_CACHE"] = os.environ["QEMUKIT_CACHE"]
    return StdioServerParameters(command=QEMUKIT, args=["mcp", *args], env=env)


class Session:
    """One MCP client session to a ``qemukit mcp`` server, kept open on a loop in a thread."""

    def __init__(self, params: StdioServerParameters) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._client: Client | None = None
        self._closed: asyncio.Event | None = None
        self._ready: Future[None] = Future()
        self._task: Future[None] = asyncio.run_coroutine_threadsafe(self._hold(params), self.loop)
        self._ready.result(timeout=120)

    async def _hold(self, params: StdioServerParameters) -> None:
        self._closed = asyncio.Event()
        try:
            async with Client(params) as client:
                self._client = client
                self._ready.set_result(None)
                await self._closed.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = CALL_TIMEOUT + 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def call(self, tool: str, **arguments: Any) -> tuple[bool, Any]:
        """(is_error, the result: structured content, or the text of an error)."""
        assert self._client is not None
        result = self.run(self._client.call_tool(tool, arguments,
                                                 read_timeout_seconds=CALL_TIMEOUT))
        text = "".join(getattr(c, "text", "") for c in result.content)
        if result.is_error:
            return True, text
        content = result.structured_content
        if content is None:
            return False, text
        return False, content.get("result", content) if set(content) == {"result"} else content

    def ok(self, tool: str, **arguments: Any) -> Any:
        is_error, value = self.call(tool, **arguments)
        assert not is_error, f"{tool} failed: {value}"
        return value

    def refused(self, tool: str, **arguments: Any) -> str:
        is_error, value = self.call(tool, **arguments)
        assert is_error, f"{tool}({arguments}) was not refused: {value}"
        return str(value)

    def close(self) -> None:
        if self._closed is not None:
            self.loop.call_soon_threadsafe(self._closed.set)
        try:
            self._task.result(timeout=120)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mcp-hostile")
    out = {"state": root / "state", "allowed": root / "allowed", "templates": root / "templates",
           "outside": root / "outside", "writable": root / "writable"}
    for key in ("allowed", "templates", "outside", "writable"):
        out[key].mkdir()
    (out["allowed"] / "hello.txt").write_text("from the host\n")
    (out["writable"] / "work").mkdir()
    (out["outside"] / "evil.toml").write_text(
        'image = "tiny"\nextra_args = ["-monitor", "tcp:127.0.0.1:4555,server=on,wait=off"]\n')
    (out["templates"] / "smuggle.toml").write_text(
        'image = "tiny"\nmemory = "256M"\nextra_args = ["-device", "virtio-rng-pci"]\n')
    (out["templates"] / "nosandbox.toml").write_text('image = "tiny"\nsandbox = false\n')
    (out["templates"] / "escape.toml").write_text('base = "../outside/evil.toml"\n')
    return out


@pytest.fixture(scope="module")
def session(tiny_image: images.TinyImage, dirs: dict[str, Path]) -> Iterator[Session]:
    s = Session(_params(dirs["state"], "--max-vms", "2", "--max-output", str(MAX_OUTPUT),
                        "--max-file", str(MAX_FILE), "--max-console-log", str(MAX_CONSOLE_LOG),
                        "--allow-share", f"{dirs['allowed']}:ro",
                        "--allow-share", f"{dirs['writable']}:rw",
                        "--template-dir", str(dirs["templates"])))
    try:
        yield s
    finally:
        s.close()
        wait_until(lambda: not qemu_processes_under(dirs["state"]), 60,
                   "the server's QEMUs to end with its session")


@pytest.fixture(scope="module")
def vm(session: Session) -> str:
    return str(session.ok("start_vm", image="tiny")["name"])


def _no_new_vm(session: Session, vm: str) -> None:
    assert [v["name"] for v in session.ok("list_vms")] == [vm]


def test_host_root_share_refused(session: Session, vm: str, dirs: dict[str, Path]) -> None:
    for share in ("/:/m", "/:/mnt/host", f"{dirs['allowed']}/..:/m", f"{dirs['outside']}:/m"):
        text = session.refused("start_vm", image="tiny", share=share)
        assert "share" in text and "outside every directory" in text and "--allow-share" in text
        assert f"{dirs['allowed']}:ro" in text, text
    _no_new_vm(session, vm)


def test_read_only_grant_is_never_served_writable(session: Session, vm: str,
                                                  dirs: dict[str, Path]) -> None:
    # The client asks read-write. QEMU 7.2's C virtiofsd cannot export read-only (and the
    # tiny kernel has no 9p): then the start is refused; with a Rust virtiofsd the guest
    # gets the share read-only.
    is_error, value = session.call("start_vm", image="tiny", share=f"{dirs['allowed']}:/mnt/s")
    if is_error:
        assert "read_only" in str(value) and "cannot share read-only" in str(value), value
    else:
        assert value["shares"][0]["read_only"] is True, value
        other = value["name"]
        wrote = session.ok("exec", name=other, command="cat /mnt/s/hello.txt; touch /mnt/s/x")
        assert wrote["stdout"] == "from the host\n" and wrote["exit_status"] != 0, wrote
        session.ok("stop_vm", name=other)
    assert not (dirs["allowed"] / "x").exists()
    wait_until(lambda: len(qemu_processes_under(dirs["state"])) == 1, 60, "only the shared VM")
    _no_new_vm(session, vm)


def test_writable_grant_share_works(session: Session, vm: str, dirs: dict[str, Path]) -> None:
    # Through a symlink inside the grant: resolved first, and still inside.
    (dirs["writable"] / "link").symlink_to(dirs["writable"] / "work")
    started = session.ok("start_vm", image="tiny", share=f"{dirs['writable']}/link:/mnt/w")
    other = started["name"]
    try:
        assert started["shares"] == [{"host": str(dirs["writable"] / "work"), "guest": "/mnt/w",
                                      "tag": "share0", "read_only": False}], started
        session.ok("exec", name=other, command="echo from the guest > /mnt/w/out.txt")
        assert (dirs["writable"] / "work" / "out.txt").read_text() == "from the guest\n"
    finally:
        session.ok("stop_vm", name=other)
    wait_until(lambda: len(qemu_processes_under(dirs["state"])) == 1, 60, "only the shared VM")


def test_host_toml_template_refused(session: Session, vm: str, dirs: dict[str, Path]) -> None:
    text = session.refused("start_vm", template=str(dirs["outside"] / "evil.toml"))
    assert "template" in text and "never a path" in text
    text = session.refused("start_vm", template="../outside/evil")
    assert "never a path" in text
    text = session.refused("start_vm", template="escape")
    assert "escape.toml: base" in text and "--template-dir" in text
    _no_new_vm(session, vm)


def test_extra_args_refused_through_every_path(session: Session, vm: str,
                                               dirs: dict[str, Path]) -> None:
    text = session.refused("start_vm", image="tiny", extra_args=["-monitor", "stdio"])
    assert "extra_args" in text and "start_vm takes only" in text
    # A file of the operator's template directory cannot smuggle it either.
    text = session.refused("start_vm", template="smuggle")
    assert "extra_args" in text and "may set only" in text
    text = session.refused("start_vm", template="nosandbox")
    assert "sandbox" in text and "may set only" in text
    text = session.refused("start_vm", image="tiny", sandbox=False)
    assert "sandbox" in text and "takes only" in text
    _no_new_vm(session, vm)
    assert len(qemu_processes_under(dirs["state"])) == 1


def test_no_network_unless_the_operator_allows_it(session: Session, vm: str) -> None:
    # User networking would reach the host's 127.0.0.1 services at 10.0.2.2.
    text = session.refused("start_vm", image="tiny", forwards=["8080:80"])
    assert "forwards" in text and "--allow-network" in text
    nets = session.ok("exec", name=vm, command="ls /sys/class/net")
    assert nets["stdout"].split() == ["lo"], nets
    _no_new_vm(session, vm)


def test_one_gib_read_file_refused_before_transfer(session: Session, vm: str) -> None:
    made = session.ok("exec", name=vm, command=(
        "dd if=/dev/zero of=/tmp/big bs=1M seek=1024 count=0 2>/dev/null; stat -c %s /tmp/big"))
    assert made["stdout"].strip() == str(1 << 30), made
    text = session.refused("read_file", name=vm, path="/tmp/big")
    assert "path" in text and f"is {1 << 30} bytes" in text and "at most 1 MiB" in text, text
    # The size comes from a stat in the guest, so no device or FIFO is ever read either.
    text = session.refused("read_file", name=vm, path="/dev/zero")
    assert "not a regular file" in text
    # A file under the cap still comes back whole.
    session.ok("exec", name=vm, command="head -c 1000 /dev/zero | tr '\\0' a > /tmp/small")
    assert session.ok("read_file", name=vm, path="/tmp/small") == "a" * 1000


def test_write_file_over_the_cap_refused(session: Session, vm: str) -> None:
    text = session.refused("write_file", name=vm, path="/tmp/w", content="z" * (MAX_FILE + 1))
    assert "content" in text and "at most 1 MiB" in text
    gone = session.ok("exec", name=vm, command=["sh", "-c", "test -e /tmp/w; echo $?"])
    assert gone["stdout"].strip() == "1"


def _server(dirs: dict[str, Path]) -> psutil.Process:
    qemu = qemu_processes_under(dirs["state"])[0]
    for proc in qemu.parents():
        if "mcp" in proc.cmdline():
            return proc
    raise AssertionError("no qemukit mcp process above the VM's QEMU")


@pytest.mark.parametrize("command", [["yes"], "cat /dev/zero | tr '\\0' x",
                                     "yes 1>&2"])
def test_endless_exec_output_comes_back_cut(session: Session, vm: str, dirs: dict[str, Path],
                                            command: Any) -> None:
    server = _server(dirs)
    before = server.memory_info().rss
    out = session.ok("exec", name=vm, command=command, timeout=300)
    stream = "stderr" if command == "yes 1>&2" else "stdout"
    assert out[f"{stream}_truncated"] is True and out["output_limit_bytes"] == MAX_OUTPUT, {
        k: v for k, v in out.items() if k not in ("stdout", "stderr")}
    assert len(out[stream]) == MAX_OUTPUT
    assert set(out[stream]) <= set("y\nx")
    # The writer ended on SIGPIPE when the cut was reached (not on the timeout).
    assert out["exit_status"] != 137, out["exit_status"]
    # Bounded while read: the server grew by nothing like an endless stream.
    assert server.memory_info().rss - before < 64 << 20
    # The VM still answers.
    assert session.ok("exec", name=vm, command=["echo", "alive"])["stdout"] == "alive\n"


def test_console_flood_is_cut_back(session: Session, vm: str, dirs: dict[str, Path]) -> None:
    log = dirs["state"] / vm / "console.log"
    assert log.is_file(), sorted(p.name for p in (dirs["state"] / vm).iterdir())
    flood = session.ok("exec", name=vm, timeout=300, command=(
        "head -c 400000 /dev/zero | tr '\\0' x > /dev/console; echo flood-end > /dev/console"))
    assert flood["exit_status"] == 0, flood

    def cut() -> bool:
        text = log.read_bytes()
        return b"flood-end" in text and len(text) <= MAX_CONSOLE_LOG

    wait_until(cut, 120, "the server to cut the console log back to its cap")
    assert log.read_bytes().startswith(b"qemukit mcp: console log passed 64 KiB")


def test_refusals_leave_nothing_running(session: Session, vm: str, dirs: dict[str, Path]) -> None:
    for arguments in ({"image": "tiny", "memory": "64G"}, {"image": "tiny", "cpus": 64},
                      {"image": "nope"}, {"template": "/etc/passwd"}):
        text = session.refused("start_vm", **arguments)
        assert json.dumps(text)
    _no_new_vm(session, vm)
    assert len(qemu_processes_under(dirs["state"])) == 1


def test_lifetime_ends_the_vm(tiny_image: images.TinyImage, tmp_path: Path) -> None:
    state = tmp_path / "state"
    s = Session(_params(state, "--max-vms", "1", "--max-lifetime", "20"))
    try:
        name = s.ok("start_vm", image="tiny")["name"]
        wait_until(lambda: s.ok("list_vms") == [], 300, "the server to stop the VM at its deadline")
        text = s.refused("exec", name=name, command=["true"])
        assert "this server stopped the VM" in text and "lifetime of 20 s" in text, text
        wait_until(lambda: not qemu_processes_under(state), 60, "QEMU to be gone")
    finally:
        s.close()
    assert qemu_processes_under(state) == []
