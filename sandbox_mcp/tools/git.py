"""A workspace's branch: what changed (workspace_diff) and bringing it into the host repository (fetch_workspace).

Both work on a workspace created with ``repo=``; the logic is :mod:`sandbox_mcp.gitflow`'s.
"""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from ..models import FetchResult, Name, WorkspaceDiff
from .base import ToolContext, tool, workspaces

__all__ = ["register"]


def register(mcp: MCPServer) -> None:
    """Add this module's tools to ``mcp``."""

    @tool(mcp, title="Changes in a workspace's clone", read_only=True, idempotent=True)
    async def workspace_diff(
        ctx: ToolContext,
        name: Name,
        stat_only: Annotated[
            bool, Field(description="Only the file list with line counts, no patch (cheap, for a quick look)")
        ] = False,
    ) -> WorkspaceDiff:
        """What changed in a workspace made with create_workspace(repo=...) since the commit it started from:
        committed, staged, unstaged and untracked (not ignored) work, against base.

        Returns base, head, commits (on the branch since base), files ([{path, status, added, deleted}];
        added/deleted are null for binary files) and patch (a unified diff, cut at the server's bound with
        truncated=true: then read the files themselves, or run `git diff BASE -- PATH` with exec). Use it
        before telling the user the work is ready; it changes nothing (a private index is used).

        Errors: not created from a repository -> only workspaces made with repo= have a base; not
        running -> start_workspace.
        """
        return await workspaces(ctx).git_diff(name, stat_only)

    @tool(mcp, title="Bring a workspace's branch into the host repository", idempotent=True)
    async def fetch_workspace(
        ctx: ToolContext,
        name: Name,
        include_uncommitted: Annotated[
            bool,
            Field(description="First commit all uncommitted work inside (on the workspace's branch), so it comes too"),
        ] = False,
    ) -> FetchResult:
        """Copy the workspace's branch 'sandbox/<name>' into the host repository it was cloned from, as
        refs/heads/sandbox/<name> with the same commit ids. Nothing else in the host repository changes:
        the user reviews and merges it (`git merge sandbox/<name>` or `sandbox-mcp git <name> merge`).

        The host never runs git in the workspace's directory: git's protocol runs over the exec channel
        and the host checks every object. Only commits on that branch travel: commit first, or pass
        include_uncommitted=true. A pack larger than the server's bound is refused with nothing written.

        Returns ref, head (the commit id, the same as inside), commits (since base), repo and committed.
        Errors: no such branch inside -> commit on 'sandbox/<name>' (git switch sandbox/<name>); too large
        -> drop big files from the branch's history; the host repository has that branch checked out ->
        the user must switch away from it first.
        """
        return await workspaces(ctx).git_fetch(name, include_uncommitted)
