"""The lifecycle tools: create, start, stop, destroy a workspace; list them and see one's status."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from .. import budget
from ..models import CreateSpec, DestroyResult, Name, Workspace, WorkspaceList, WorkspaceStatus
from ..runtimes import known_types
from .base import ToolContext, progress_of, spec_parameters, tool, workspaces

__all__ = ["register"]


def register(mcp: MCPServer) -> None:
    """Add this module's tools to ``mcp``."""

    # ``type`` offers the types the known runtimes realise (a runtime from another package adds its own).
    @tool(mcp, title="Create a workspace")
    @spec_parameters(CreateSpec, {"type": Literal[tuple(known_types())]})
    async def create_workspace(ctx: ToolContext, **spec: Any) -> Workspace:
        """Create a new isolated Linux workspace and (by default) start it.

        Use this when you need a clean, disposable machine to run untrusted or messy work (builds, tests,
        installs) without touching the host. Check list_workspaces first: an existing workspace can simply
        be reused. The first create on a host builds a root image (about a minute, with progress); later
        ones take about a second. Extra packages are baked into a cached image variant, so the first
        create with a new package set takes longer.

        Returns the workspace: its state ('running' when start=true), IP, user, workspace_dir (the
        persistent project directory inside, exec's default cwd) and host_workspace_dir (the same
        directory on the host), the pinned SSH host key fingerprint and phase timings, its isolation
        ('unprivileged-container': root inside is an unprivileged uid on the host; 'privileged-container';
        'microvm') and limits (cpus, memory_mib, tasks).

        Network: by default a workspace reaches nothing (the server still reaches it over SSH); pass
        egress='internet' when the work needs downloads, or a list of the domain names it needs
        (egress=['pypi.org', 'files.pythonhosted.org']) to reach only those; set_egress changes it later. Packages listed in `packages` are installed
        on the host side into a cached image and need no egress.

        A host repository: pass repo='/path/to/repo' (and ref) to start from a clone of it on branch
        'sandbox/<name>' (result field repo: path, base, branch). Commit there, check with workspace_diff,
        and bring the work back with fetch_workspace (it appears in the host repository as that branch).

        Errors: a taken name -> pick another or reuse it; an IP conflict -> omit ip; egress='internet'
        refused -> the host has NAT off, work without it or ask the user; a boot failure includes the
        last log lines (see also workspace_logs); repo not readable or not a repository -> ask the user
        for the right path. On a shared server each user has limits (workspaces, their total cpus and
        memory_mib, new package sets): the error names the limit; destroy what you no longer need, or ask
        for less.
        """
        return await workspaces(ctx).create(CreateSpec(**spec), progress=progress_of(ctx))

    @tool(mcp, title="Start a workspace", idempotent=True)
    async def start_workspace(ctx: ToolContext, name: Name) -> Workspace:
        """Start a stopped workspace and wait until SSH answers with its pinned host key.

        The root filesystem starts clean (anything installed at run time is gone); the workspace
        directory keeps its files. Starting a running workspace returns it unchanged.
        """
        return await workspaces(ctx).start(name, progress=progress_of(ctx))

    @tool(mcp, title="Stop a workspace", idempotent=True)
    async def stop_workspace(ctx: ToolContext, name: Name) -> Workspace:
        """Stop a workspace: its processes end and its root filesystem is discarded; the workspace directory
        (and the workspace itself) stay, ready for start_workspace. Stopping a stopped workspace is a no-op."""
        return await workspaces(ctx).stop(name)

    @tool(mcp, title="Destroy a workspace", destructive=True, idempotent=False)
    async def destroy_workspace(
        ctx: ToolContext,
        name: Name,
        keep_data: Annotated[
            bool,
            Field(description="Keep the host workspace directory (and host key) for a later create of the same name"),
        ] = False,
    ) -> DestroyResult:
        """Stop and delete a workspace for good: its processes, network, registry entry and, unless
        keep_data is true, its files on the host. Use stop_workspace instead to pause it."""
        return await workspaces(ctx).destroy(name, keep_data)

    @tool(mcp, title="List workspaces", read_only=True, idempotent=True)
    async def list_workspaces(
        ctx: ToolContext,
        offset: Annotated[int, Field(description="Index (in name order) of the first one to list", ge=0)] = 0,
        limit: Annotated[
            int | None, Field(description="Most to list; default: as many as fit one result", ge=1, le=1000)
        ] = None,
    ) -> WorkspaceList:
        """List every workspace with its state, IP and directories, in name order. Call this before creating
        a new one. total says how many there are; if truncated is true, call again with offset=next_offset."""
        return budget.page_workspaces(await workspaces(ctx).list(), offset, limit)

    @tool(mcp, title="Workspace status", read_only=True, idempotent=True)
    async def workspace_status(ctx: ToolContext, name: Name) -> WorkspaceStatus:
        """One workspace with live runtime detail (process or unit state, PID, uptime)."""
        return await workspaces(ctx).status(name)
