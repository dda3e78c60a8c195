"""What the MCP tools and the CLI need of "the workspaces": one Protocol, three implementations.

:class:`~sandbox_mcp.owners.OwnedManager` (one user's view of the manager in this process) and
:class:`~sandbox_mcp.daemon_client.RemoteManager` (the same, carried out by the daemon) both
satisfy :class:`Workspaces`; :class:`~sandbox_mcp.manager.WorkspaceManager` has the same methods
with one more keyword, ``owner_uid``. ``tests/test_workspaces_protocol.py`` keeps the signatures
in step, so an argument added to one of them cannot be forgotten in the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .config import Settings
from .egress import Egress
from .models import (
    CreateSpec,
    DestroyResult,
    DirListing,
    ExecResult,
    FetchResult,
    FileContent,
    LogsResult,
    PortUnpublished,
    ProcessInfo,
    ProcessList,
    ProcessOutput,
    ProcessStarted,
    ProcessWait,
    PublishedPort,
    SnapshotDeleted,
    SnapshotInfo,
    SnapshotList,
    Workspace,
    WorkspaceDiff,
    WorkspaceList,
    WorkspaceStatus,
    WriteResult,
)
from .progress import Progress, no_progress

if TYPE_CHECKING:
    from .ssh import SSHTarget

__all__ = ["Workspaces"]


class Workspaces(Protocol):
    """The workspaces one caller may see and touch (see the module docstring)."""

    settings: Settings

    async def create(self, spec: CreateSpec, progress: Progress = no_progress) -> Workspace: ...

    async def start(self, name: str, progress: Progress = no_progress) -> Workspace: ...

    async def stop(self, name: str) -> Workspace: ...

    async def destroy(self, name: str, keep_data: bool = False) -> DestroyResult: ...

    async def list(self) -> WorkspaceList: ...

    async def status(self, name: str) -> WorkspaceStatus: ...

    async def logs(self, name: str, lines: int = 200) -> LogsResult: ...

    async def exec(
        self,
        name: str,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 120,
        stdin: str | None = None,
        progress: Progress | None = None,
    ) -> ExecResult: ...

    async def read_file(self, name: str, path: str, offset: int = 0, limit: int | None = None) -> FileContent: ...

    async def write_file(
        self,
        name: str,
        path: str,
        content: str,
        encoding: str = "utf-8",
        append: bool = False,
        mode: str | int | None = None,
    ) -> WriteResult: ...

    async def list_dir(self, name: str, path: str = ".", offset: int = 0, limit: int | None = None) -> DirListing: ...

    async def ssh_target(self, name: str) -> SSHTarget: ...

    async def start_process(
        self,
        name: str,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        process_id: str | None = None,
    ) -> ProcessStarted: ...

    async def process_output(
        self, name: str, process_id: str, cursor: int = 0, wait_s: float = 0, max_bytes: int = 65536
    ) -> ProcessOutput: ...

    async def wait_process(
        self, name: str, process_id: str, until: str = "exit", timeout_s: float = 60, cursor: int = 0
    ) -> ProcessWait: ...

    async def stop_process(self, name: str, process_id: str, signal: str = "TERM", grace_s: float = 5) -> ProcessInfo: ...

    async def list_processes(self, name: str) -> ProcessList: ...

    async def publish_port(self, name: str, port: int, host_port: int | None = None) -> PublishedPort: ...

    async def unpublish_port(self, name: str, port: int) -> PortUnpublished: ...

    async def set_egress(self, name: str, egress: Egress) -> Workspace: ...
    async def git_diff(self, name: str, stat_only: bool = False) -> WorkspaceDiff: ...

    async def git_fetch(self, name: str, include_uncommitted: bool = False) -> FetchResult: ...

    async def pause(self, name: str) -> Workspace: ...

    async def resume(self, name: str) -> Workspace: ...

    async def snapshot(
        self, name: str, snapshot: str, memory: bool = False, progress: Progress = no_progress
    ) -> SnapshotInfo: ...

    async def list_snapshots(self, name: str) -> SnapshotList: ...

    async def delete_snapshot(self, name: str, snapshot: str) -> SnapshotDeleted: ...

    async def restore(self, name: str, snapshot: str, progress: Progress = no_progress) -> Workspace: ...

    async def fork(
        self, name: str, new_name: str, snapshot: str | None = None, progress: Progress = no_progress
    ) -> Workspace: ...
