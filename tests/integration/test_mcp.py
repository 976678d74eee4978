"""``qemukit mcp`` driven by the mcp SDK's own stdio client, with the tiny guest in real QEMU.

The server runs as a user's agent would start it (the installed ``qemukit`` command);
its VMs live in a private state directory, so the QEMUs counted are its own.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
from pathlib import Path

import psutil
import pytest
from mcp import Client

from qemukit import images
from tests.helpers import qemu_gone, qemu_processes_under
from tests.integration.mcp_client import call, server_params

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("mcp")]

def _server_pid(qemu_pid: int) -> int:
    """The qemukit mcp process that owns QEMU ``qemu_pid`` (an ancestor running 'mcp')."""
    for proc in psutil.Process(qemu_pid).parents():
        if "mcp" in proc.cmdline():
            return proc.pid
    raise AssertionError(f"no qemukit mcp process above QEMU {qemu_pid}")


def _wait_gone(pid: int, what: str) -> None:
    try:
        psutil.Process(pid).wait(timeout=60)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        assert qemu_gone(pid), f"{what}: QEMU {pid} still runs 60 s later"


def test_session_start_exec_files_stop_and_nothing_left(tiny_image: images.TinyImage,
                                                        tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def session() -> int:
        async with Client(server_params(state, 2)) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"start_vm", "exec", "read_file", "write_file", "list_vms", "stop_vm"} <= tools
            started = await call(client, "start_vm", image="tiny")
            name = started["name"]
            uname = await call(client, "exec", name=name, command=["uname", "-m"])
            assert uname["exit_status"] == 0 and uname["stdout"].strip() == "x86_64", uname
            body = "written through MCP\nline 2 \u00e9\n"
            await call(client, "write_file", name=name, path="/tmp/mcp.txt", content=body)
            assert await call(client, "read_file", name=name, path="/tmp/mcp.txt") == body
            cat = await call(client, "exec", name=name, command="cat /tmp/mcp.txt")
            assert cat["stdout"] == body, cat
            # Beyond the old 1 MiB cap, binary: both ways on the copy channel, byte-identical.
            blob = os.urandom(3 * 1024 * 1024 + 5)
            encoded = base64.b64encode(blob).decode()
            await call(client, "write_file", name=name, path="/tmp/blob.bin", content=encoded,
                        encoding="base64")
            summed = await call(client, "exec", name=name, command=["md5sum", "/tmp/blob.bin"])
            assert summed["stdout"].split()[0] == hashlib.md5(blob).hexdigest(), summed
            assert await call(client, "read_file", name=name, path="/tmp/blob.bin",
                               encoding="base64") == encoded
            missing = await client.call_tool("read_file", {"name": name, "path": "/tmp/nope"})
            assert missing.is_error and "no such file" in json.dumps(missing.model_dump(mode="json"))
            listed = await call(client, "list_vms")
            assert [vm["name"] for vm in listed] == [name], listed
            first_pid = listed[0]["pid"]
            refused = await client.call_tool("start_vm", {"image": "tiny", "memory": "64G"})
            assert refused.is_error and "at most" in json.dumps(refused.model_dump(mode="json"))
            await call(client, "stop_vm", name=name)
            _wait_gone(first_pid, "after stop_vm")
            # A second VM left running: closing the session must end it.
            second = await call(client, "start_vm", image="tiny")
            listed = await call(client, "list_vms")
            assert [vm["name"] for vm in listed] == [second["name"]]
            return int(listed[0]["pid"])

    pid = asyncio.run(session())
    _wait_gone(pid, "after the server exited")
    assert qemu_processes_under(state) == []


def test_server_killed_takes_its_vms(tiny_image: images.TinyImage, tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def session() -> int:
        async with Client(server_params(state, 2)) as client:
            await call(client, "start_vm", image="tiny")
            qemu_pid = int((await call(client, "list_vms"))[0]["pid"])
            os.kill(_server_pid(qemu_pid), signal.SIGKILL)
            _wait_gone(qemu_pid, "after SIGKILL of the server")
            return qemu_pid

    asyncio.run(session())
    assert qemu_processes_under(state) == []
