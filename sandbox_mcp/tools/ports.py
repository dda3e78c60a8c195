"""Workspace ports on the host's loopback: publish_port, unpublish_port (see :mod:`sandbox_mcp.ports`)."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from ..models import Name, PortUnpublished, PublishedPort
from .base import ToolContext, tool, workspaces

__all__ = ["register"]

Port = Annotated[int, Field(description="A TCP port inside the workspace", ge=1, le=65535, examples=[8000])]


def register(mcp: MCPServer) -> None:
    """Add this module's tools to ``mcp``."""

    @tool(mcp, title="Publish a workspace port", idempotent=True)
    async def publish_port(
        ctx: ToolContext,
        name: Name,
        port: Port,
        host_port: Annotated[
            int | None, Field(description="The port on the host's loopback; omit to get a free one", ge=1024, le=65535)
        ] = None,
    ) -> PublishedPort:
        """Make a TCP port of a running workspace reachable from the host at 127.0.0.1:host_port (url), e.g. to
        open a dev server in the user's browser or test it from the host. Only the workspace's owner (and
        root) can connect; the workspace's own network access is unchanged. The port goes when the workspace
        stops (publish it again after start_workspace); workspace_status lists the published ports.

        Errors: host_port in use -> omit it to get a free one.
        """
        return await workspaces(ctx).publish_port(name, port, host_port)

    @tool(mcp, title="Unpublish a workspace port", idempotent=True)
    async def unpublish_port(ctx: ToolContext, name: Name, port: Port) -> PortUnpublished:
        """Close the host side of a published port (and its open connections)."""
        return await workspaces(ctx).unpublish_port(name, port)
