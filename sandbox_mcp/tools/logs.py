"""What a workspace said while booting: the workspace_logs tool."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from ..models import LogsResult, Name
from .base import ToolContext, tool, workspaces

__all__ = ["register"]


def register(mcp: MCPServer) -> None:
    """Add this module's tools to ``mcp``."""

    @tool(mcp, title="Workspace boot log", read_only=True, idempotent=True)
    async def workspace_logs(
        ctx: ToolContext,
        name: Name,
        lines: Annotated[int, Field(description="How many of the last lines", ge=1, le=10000)] = 200,
    ) -> LogsResult:
        """The tail of the workspace's boot/console log (or its systemd unit's journal on NixOS). Use it when
        a workspace fails to start or SSH does not answer."""
        return await workspaces(ctx).logs(name, lines)
