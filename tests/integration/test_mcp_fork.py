"""``qemukit mcp``'s checkpoint_vm, rollback_vm and fork_vm, driven by the mcp SDK's own stdio
client, with the tiny guest in real QEMU (the server's VMs in a private state directory)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from qemukit import images
from tests.helpers import QEMUKIT, qemu_processes_under

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("mcp")]

#: Generous: the first start boots the guest and saves its warm state, under TCG on a busy host.
CALL_TIMEOUT = 600.0


def _params(state: Path) -> StdioServerParameters:
    assert QEMUKIT, "the qemukit console script is not installed (pip install -e .)"
    env = {"QEMUKIT_STATE": str(state)}
    if os.environ.get("QEMUKIT_CACHE"):
        env["QEMUKIT_CACHE"] = os.environ["QEMUKIT_CACHE"]
    return StdioServerParameters(command=QEMUKIT, args=["mcp", "--max-vms", "3"], env=env)


async def _call(client: Client, tool: str, **arguments: Any) -> Any:
    result = await client.call_tool(tool, arguments, read_timeout_seconds=CALL_TIMEOUT)
    text = "".join(getattr(c, "text", "") for c in result.content)
    assert not result.is_error, f"{tool} failed: {text}"
    if result.structured_content is not None:
        content = result.structured_content
        return content.get("result", content) if set(content) == {"result"} else content
    return text


async def _refused(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments, read_timeout_seconds=CALL_TIMEOUT)
    assert result.is_error, f"{tool} {arguments} was not refused"
    return json.dumps(result.model_dump(mode="json"))


def test_checkpoint_rollback_and_fork(tiny_image: images.TinyImage, tmp_path: Path) -> None:
    state = tmp_path / "state"

    async def session() -> None:
        async with Client(_params(state)) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"checkpoint_vm", "rollback_vm", "fork_vm"} <= tools
            name = (await _call(client, "start_vm", image="tiny", name="agent"))["name"]
            await _call(client, "write_file", name=name, path="/root/work.txt", content="good\n")
            cp = await _call(client, "checkpoint_vm", name=name)
            assert cp["id"] == "cp1", cp
            # Something risky: the file is changed, another one made; then back.
            await _call(client, "exec", name=name,
                        command="echo broken > /root/work.txt; touch /root/junk")
            assert await _call(client, "read_file", name=name, path="/root/work.txt") == "broken\n"
            back = await _call(client, "rollback_vm", name=name, id=cp["id"])
            assert back["seconds"] < 30, back  # measured, not asserted tight: TCG, loaded host
            assert await _call(client, "read_file", name=name, path="/root/work.txt") == "good\n"
            gone = await _call(client, "exec", name=name, command="test -e /root/junk")
            assert gone["exit_status"] == 1, gone
            # Hostile ids and counts are refused with the field named.
            assert "not a checkpoint of VM" in await _refused(client, "rollback_vm", name=name,
                                                            id="../cp1")
            assert "not a checkpoint of VM" in await _refused(client, "rollback_vm", name=name,
                                                            id="cp2")
            assert "max-vms" in await _refused(client, "fork_vm", name=name, n=3)
            assert "1 to 16" in await _refused(client, "fork_vm", name=name, n=0)
            # N alternatives in N forks: each starts from the parent's file, writes its own.
            forked = await _call(client, "fork_vm", name=name, n=2)
            a, b = forked["forks"]
            assert (a, b) == (f"{name}-1", f"{name}-2"), forked
            listed = {vm["name"] for vm in await _call(client, "list_vms")}
            assert listed == {name, a, b}
            for fork in (a, b):
                assert await _call(client, "read_file", name=fork,
                                   path="/root/work.txt") == "good\n"
                await _call(client, "write_file", name=fork, path="/root/mine.txt",
                            content=f"{fork}\n")
            for fork, other in ((a, b), (b, a)):
                assert await _call(client, "read_file", name=fork,
                                   path="/root/mine.txt") == f"{fork}\n"
                assert other not in (await _call(client, "exec", name=fork,
                                                 command="cat /root/mine.txt"))["stdout"]
            parent_sees = await _call(client, "exec", name=name, command="test -e /root/mine.txt")
            assert parent_sees["exit_status"] == 1, parent_sees
            await _call(client, "stop_vm", name=a)
            assert {vm["name"] for vm in await _call(client, "list_vms")} == {name, b}

    asyncio.run(session())
    deadline = asyncio.run(_settle(state))
    assert deadline == [], f"QEMU processes left: {deadline}"


async def _settle(state: Path) -> list[int]:
    """The QEMUs still running under ``state`` after a few seconds (the server exited)."""
    for _ in range(60):
        left = [p.pid for p in qemu_processes_under(state) if p.status() != "zombie"]
        if not left:
            return []
        await asyncio.sleep(0.5)
    return left
