"""Moving files in and out of a workspace: read_file, write_file, list_dir."""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from ..models import DirListing, FileContent, Name, WriteResult
from .base import ToolContext, tool, workspaces

__all__ = ["register"]


def register(mcp: MCPServer) -> None:
    """Add this module's tools to ``mcp``."""

    @tool(mcp, title="Read a file from a workspace", read_only=True, idempotent=True)
    async def read_file(
        ctx: ToolContext,
        name: Name,
        path: Annotated[str, Field(description="File path; relative paths resolve against the workspace directory")],
        offset: Annotated[int, Field(description="Byte offset to start at", ge=0)] = 0,
        limit: Annotated[
            int | None, Field(description="Bytes to read (default 256 KiB, capped at 4 MiB)", ge=1)
        ] = None,
    ) -> FileContent:
        """Read a file (or a chunk of it) from a running workspace.

        Text comes back as utf-8; anything else as base64 (see encoding). If truncated is true, call again
        with offset=next_offset to read the rest. For a directory, use list_dir. Regular files only: a named
        pipe, socket or device is refused (read those with exec and a timeout).
        """
        return await workspaces(ctx).read_file(name, path, offset, limit)

    @tool(mcp, title="Write a file in a workspace", idempotent=False)
    async def write_file(
        ctx: ToolContext,
        name: Name,
        path: Annotated[str, Field(description="File path; relative paths resolve against the workspace directory")],
        content: Annotated[str, Field(description="The file content, as text or base64 (see encoding)")],
        encoding: Annotated[
            Literal["utf-8", "base64"], Field(description="'base64' for binary content")
        ] = "utf-8",
        append: Annotated[bool, Field(description="Append instead of replacing the file")] = False,
        mode: Annotated[
            str | None, Field(description="Octal permissions such as '644' or '755'", pattern=r"^0?[0-7]{3}$")
        ] = None,
    ) -> WriteResult:
        """Write (replace or append) a file in a running workspace, creating missing parent directories.
        A replaced file is swapped in atomically. Owned by the workspace user. Large payloads: write in parts
        with append=true. Regular files only: a named pipe, socket or device is refused."""
        return await workspaces(ctx).write_file(name, path, content, encoding, append, mode)

    @tool(mcp, title="List a directory in a workspace", read_only=True, idempotent=True)
    async def list_dir(
        ctx: ToolContext,
        name: Name,
        path: Annotated[
            str, Field(description="Directory; relative paths resolve against the workspace directory")
        ] = ".",
    ) -> DirListing:
        """List a directory in a running workspace: each entry's name, type (file, dir, symlink, other),
        size and modification time. At most 10,000 entries: truncated=true means there are more (list them
        with exec, e.g. 'ls -A | head -n 20000')."""
        return await workspaces(ctx).list_dir(name, path)
