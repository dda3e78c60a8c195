"""The MCP tool contract as the server really serves it, for tests that check documents against it.

Read from ``build_server(...)``'s tool list through a real in-process client (no hand-written copy
that could drift): tool name -> its input JSON schema. ``tests/test_server.py`` pins the contract
itself (names, arguments, annotations); everything that describes the tools (skills, README, the
CLI) is checked against this.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any

import anyio
from mcp import Client

from sandbox_mcp.config import Settings
from sandbox_mcp.server import build_server

__all__ = ["arguments", "tool_schemas"]


@functools.cache
def tool_schemas() -> dict[str, dict[str, Any]]:
    """Every tool the server lists, with its input schema (needs no root: nothing is created)."""

    async def fetch(tmp: Path) -> dict[str, dict[str, Any]]:
        settings = Settings(mode="direct", state_dir=tmp / "state", image_dir=tmp / "img", bridge="sbxc-br",
                            hosts_file=tmp / "hosts")
        async with Client(build_server(settings)) as client:
            return {t.name: t.input_schema for t in (await client.list_tools()).tools}

    with tempfile.TemporaryDirectory() as tmp:
        return anyio.run(fetch, Path(tmp))


def arguments(tool: str) -> tuple[set[str], set[str]]:
    """(required, optional) argument names of ``tool``."""
    schema = tool_schemas()[tool]
    required = set(schema.get("required", []))
    return required, set(schema.get("properties", {})) - required
