"""Pause, snapshots and forks: pause_workspace, resume_workspace, snapshot_workspace, list_snapshots,
restore_workspace, delete_snapshot, fork_workspace (the logic: the manager and :mod:`sandbox_mcp.snapshots`)."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from ..models import Name, SnapshotDeleted, SnapshotInfo, SnapshotList, Workspace
from .base import ToolContext, progress_of, tool, workspaces

__all__ = ["SnapshotName", "register"]

SnapshotName = Annotated[
    str,
    Field(
        description="Snapshot name: lowercase letters, digits, '.', '_' and '-', starting with a letter or "
        "digit, at most 40 chars",
        pattern=r"^[a-z0-9][a-z0-9._-]{0,39}$",
        examples=["before-migration", "green-tests"],
    ),
]


def register(mcp: MCPServer) -> None:
    """Add this module's tools to ``mcp``."""

    @tool(mcp, title="Pause a workspace", idempotent=True)
    async def pause_workspace(ctx: ToolContext, name: Name) -> Workspace:
        """Freeze a running workspace: every process in it stops where it is, keeping its memory, open files
        and connections; it uses no CPU until resume_workspace. state becomes 'paused'. exec and the file
        tools refuse a paused workspace (call resume_workspace first). Pausing a paused one is a no-op.
        Use it to hold a workspace still (e.g. while you inspect its files on the host) or to free CPU."""
        return await workspaces(ctx).pause(name)

    @tool(mcp, title="Resume a paused workspace", idempotent=True)
    async def resume_workspace(ctx: ToolContext, name: Name) -> Workspace:
        """Thaw a paused workspace: its processes carry on where they stopped; state becomes 'running'.
        Resuming a running one is a no-op; a stopped one needs start_workspace instead."""
        return await workspaces(ctx).resume(name)

    @tool(mcp, title="Snapshot a workspace")
    async def snapshot_workspace(
        ctx: ToolContext,
        name: Name,
        snapshot: SnapshotName,
        memory: Annotated[
            bool,
            Field(description="VMs (type 'vm') only: also keep the running processes, which carry on after "
                  "restore_workspace (no boot). Refused while a process holds a file in the workspace dir "
                  "(the VM unmounts its shares for the save; the error names the processes)"),
        ] = False,
    ) -> SnapshotInfo:
        """Save the whole workspace under a name: the workspace directory, the Claude config and the writable
        root filesystem (packages installed with apt, files outside the workspace dir). Take one before
        something risky (a migration, a destructive test); restore_workspace goes back to it, fork_workspace
        branches from it. A running workspace is paused for the copy (about as long as copying its files
        takes) and resumed. A stopped one can be snapshotted too: its root is the one it would start with.

        Returns name, snapshot, created_at, size_bytes (host disk it takes) and method ('reflink': a
        copy-on-write clone, near-instant; 'copy': a full copy, on filesystems without reflinks).
        Snapshots count against the owner's disk (list_snapshots shows totals and the limit).
        Errors: the name is taken -> pick another or delete_snapshot it; past the owner's snapshot limit
        (uid_max_snapshot_mib) -> delete_snapshot old ones; memory=true with processes in the workspace dir
        -> end them (or cd /tmp before starting them) or take memory=false; a privileged container or a
        remote Incus server -> not supported, say so to the user."""
        return await workspaces(ctx).snapshot(name, snapshot, memory, progress=progress_of(ctx))

    @tool(mcp, title="List a workspace's snapshots", read_only=True, idempotent=True)
    async def list_snapshots(ctx: ToolContext, name: Name) -> SnapshotList:
        """The workspace's snapshots, oldest first, with when they were taken, their size on the host, whether
        they hold memory and the state the workspace was in; total_bytes (this workspace's), owner_bytes
        (all your workspaces' snapshots) and owner_limit_bytes (past it a snapshot is refused)."""
        return await workspaces(ctx).list_snapshots(name)

    @tool(mcp, title="Restore a workspace from a snapshot", destructive=True)
    async def restore_workspace(ctx: ToolContext, name: Name, snapshot: SnapshotName) -> Workspace:
        """Put a workspace back exactly as it was at a snapshot: its workspace directory (files written since
        are gone), Claude config and root filesystem (packages installed before the snapshot are there,
        ones installed after are not). The workspace restarts to do it: running processes end, SSH
        reconnects (a VM memory snapshot's processes carry on instead). It is running afterwards if it was running, or the snapshot was of a running one.
        The snapshot itself stays, for another restore. Errors: unknown snapshot -> list_snapshots."""
        return await workspaces(ctx).restore(name, snapshot, progress=progress_of(ctx))

    @tool(mcp, title="Delete a snapshot", destructive=True)
    async def delete_snapshot(ctx: ToolContext, name: Name, snapshot: SnapshotName) -> SnapshotDeleted:
        """Delete one snapshot of a workspace and free its disk space. The workspace is untouched.
        (destroy_workspace removes all its snapshots, unless keep_data.)"""
        return await workspaces(ctx).delete_snapshot(name, snapshot)

    @tool(mcp, title="Fork a workspace")
    async def fork_workspace(
        ctx: ToolContext,
        name: Name,
        new_name: Annotated[
            str,
            Field(description="The new workspace's name (same rules as name)", pattern=r"^[a-z][a-z0-9-]{0,11}$"),
        ],
        snapshot: Annotated[
            str | None,
            Field(description="Fork from this snapshot of the workspace; omit to fork its current state",
                  pattern=r"^[a-z0-9][a-z0-9._-]{0,39}$"),
        ] = None,
    ) -> Workspace:
        """Make a new running workspace that starts as a copy of another: its workspace directory, Claude
        config and root filesystem (installed packages), now or at a snapshot. The fork has its own name,
        IP, MAC, SSH host key and uid range; from then on the two diverge (a write in one is not seen in
        the other). Use it to try two approaches side by side. A running source is paused while its
        files are copied. Returns the new workspace, as create_workspace does.
        Errors: the new name is taken -> pick another; unknown snapshot -> list_snapshots."""
        return await workspaces(ctx).fork(name, new_name, snapshot, progress=progress_of(ctx))
