"""The benchmark's way of calling a tool through an MCP client: the structured result, or an error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ToolCall", "tool_caller"]

ToolCall = Callable[..., Awaitable[dict[str, Any]]]


def tool_caller(client: Any) -> ToolCall:
    """``call(tool, progress=None, **arguments)`` on ``client`` (an ``mcp.Client``): the tool's structured
    result; a tool error raises RuntimeError with the tool's message, so a bench run stops at the first."""

    async def call(tool: str, progress: Any = None, **kw: object) -> dict[str, Any]:
        r = await client.call_tool(tool, kw, progress_callback=progress)
        if r.is_error:
            raise RuntimeError(f"{tool}: {r.content}")
        return r.structured_content  # type: ignore[no-any-return]

    return call
