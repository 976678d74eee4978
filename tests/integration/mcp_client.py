"""Talking to ``qemukit mcp`` through the MCP SDK's own client, for the MCP integration tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mcp import Client
from mcp.client.stdio import StdioServerParameters

from tests.helpers import QEMUKIT

#: Generous: the first start boots the guest and saves its warm state, under TCG on a busy host.
CALL_TIMEOUT = 600.0


def server_params(state: Path, max_vms: int) -> StdioServerParameters:
    """``qemukit mcp --max-vms N`` with its state under ``state`` (and the suite's cache)."""
    assert QEMUKIT, "the qemukit console script is not installed (pip install -e .)"
    env = {"QEMUKIT_STATE": str(state)}
    if os.environ.get("QEMUKIT_CACHE"):
        env["QEMUKIT_CACHE"] = os.environ["QEMUKIT_CACHE"]
    return StdioServerParameters(command=QEMUKIT, args=["mcp", "--max-vms", str(max_vms)], env=env)


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    """Call ``tool``; assert it did not fail; its structured result (or its text)."""
    result = await client.call_tool(tool, arguments, read_timeout_seconds=CALL_TIMEOUT)
    text = "".join(getattr(c, "text", "") for c in result.content)
    assert not result.is_error, f"{tool} failed: {text}"
    if result.structured_content is not None:
        content = result.structured_content
        return content.get("result", content) if set(content) == {"result"} else content
    return text
