"""Who may see and touch which workspace: one host user's view of the shared manager.

The daemon serves many local users from one :class:`WorkspaceManager`. Each connection gets an
:class:`OwnedManager` for its peer's uid: root sees everything; anyone else sees only the
workspaces their uid created, and another user's workspace looks exactly like a missing one
(so names are not probed through error messages, beyond "that name is taken" on create).
The methods mirror the manager's, so the MCP tools and the CLI call either one. The rules
themselves (whose record, whose kept directory) are in :mod:`sandbox_mcp.ownership`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

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
    from .fairshare import UserShares
    from .manager import WorkspaceManager
    from .ssh import SSHTarget

__all__ = ["OwnedManager"]


class OwnedManager:
    """The workspaces of host user ``uid`` (all of them for root): a :class:`~sandbox_mcp.workspaces.Workspaces`."""

    def __init__(self, manager: WorkspaceManager, uid: int, shares: UserShares | None = None) -> None:
        self.manager = manager
        self.uid = uid
        self.shares = shares  # the daemon's per-uid counters: each call holds one of the uid's call slots

    def _call(self) -> contextlib.AbstractContextManager[None]:
        """One of this user's running calls (see :meth:`fairshare.UserShares.call`); LimitExceeded past the limit."""
        return self.shares.call(self.uid) if self.shares is not None else contextlib.nullcontext()

    @property
    def settings(self) -> Settings:
        return self.manager.settings

    @property
    def _owner(self) -> int | None:
        """The owner every call requires: None (anyone's) for root."""
        return None if self.uid == 0 else self.uid

    # The manager checks the owner itself, on the record it acts on and under the workspace's lock
    # where the operation takes it: checked here first, a workspace destroyed and re-created by
    # another user between the check and the action would be acted on.

    async def create(self, spec: CreateSpec, progress: Progress = no_progress) -> Workspace:
        """Create a workspace owned by this user. Raises what :meth:`WorkspaceManager.create` raises."""
        with self._call():
            return await self.manager.create(spec, progress, owner_uid=self.uid)

    async def start(self, name: str, progress: Progress = no_progress) -> Workspace:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.start(name, progress=progress, owner_uid=self._owner)

    async def stop(self, name: str) -> Workspace:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.stop(name, owner_uid=self._owner)

    async def destroy(self, name: str, keep_data: bool = False) -> DestroyResult:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.destroy(name, keep_data, owner_uid=self._owner)

    async def list(self) -> WorkspaceList:
        """This user's workspaces (every workspace for root)."""
        with self._call():
            return await self.manager.list(owner_uid=self._owner)

    async def status(self, name: str) -> WorkspaceStatus:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.status(name, owner_uid=self._owner)

    async def logs(self, name: str, lines: int = 200) -> LogsResult:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.logs(name, lines, owner_uid=self._owner)

    async def exec(
        self,
        name: str,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 120,
        stdin: str | None = None,
        progress: Progress | None = None,
    ) -> ExecResult:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.exec(name, command, cwd, env, timeout_s, stdin, progress, owner_uid=self._owner)

    async def read_file(self, name: str, path: str, offset: int = 0, limit: int | None = None) -> FileContent:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.read_file(name, path, offset, limit, owner_uid=self._owner)

    async def write_file(
        self,
        name: str,
        path: str,
        content: str,
        encoding: str = "utf-8",
        append: bool = False,
        mode: str | int | None = None,
    ) -> WriteResult:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.write_file(name, path, content, encoding, append, mode, owner_uid=self._owner)

    async def list_dir(self, name: str, path: str = ".", offset: int = 0, limit: int | None = None) -> DirListing:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.list_dir(name, path, offset, limit, owner_uid=self._owner)

    async def ssh_target(self, name: str) -> SSHTarget:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.ssh_target(name, owner_uid=self._owner)

    async def start_process(
        self,
        name: str,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        process_id: str | None = None,
    ) -> ProcessStarted:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        return await self.manager.start_process(name, command, cwd, env, process_id, owner_uid=self._owner)

    async def process_output(
        self, name: str, process_id: str, cursor: int = 0, wait_s: float = 0, max_bytes: int = 65536
    ) -> ProcessOutput:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        return await self.manager.process_output(name, process_id, cursor, wait_s, max_bytes, owner_uid=self._owner)

    async def wait_process(
        self, name: str, process_id: str, until: str = "exit", timeout_s: float = 60, cursor: int = 0
    ) -> ProcessWait:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        return await self.manager.wait_process(name, process_id, until, timeout_s, cursor, owner_uid=self._owner)

    async def stop_process(self, name: str, process_id: str, signal: str = "TERM", grace_s: float = 5) -> ProcessInfo:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        return await self.manager.stop_process(name, process_id, signal, grace_s, owner_uid=self._owner)

    async def list_processes(self, name: str) -> ProcessList:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        return await self.manager.list_processes(name, owner_uid=self._owner)

    async def publish_port(self, name: str, port: int, host_port: int | None = None) -> PublishedPort:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        return await self.manager.publish_port(name, port, host_port, owner_uid=self._owner)

    async def set_egress(self, name: str, egress: Egress) -> Workspace:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        return await self.manager.set_egress(name, egress, owner_uid=self._owner)

    async def unpublish_port(self, name: str, port: int) -> PortUnpublished:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        return await self.manager.unpublish_port(name, port, owner_uid=self._owner)
    async def git_diff(self, name: str, stat_only: bool = False) -> WorkspaceDiff:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.git_diff(name, stat_only, owner_uid=self._owner)

    async def git_fetch(self, name: str, include_uncommitted: bool = False) -> FetchResult:
        """Fetch as this user (root: as the repository's owner). Raises WorkspaceNotFound for another user's
        workspace, else what the manager raises."""
        with self._call():
            return await self.manager.git_fetch(name, include_uncommitted, owner_uid=self._owner)

    async def pause(self, name: str) -> Workspace:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.pause(name, owner_uid=self._owner)

    async def resume(self, name: str) -> Workspace:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.resume(name, owner_uid=self._owner)

    async def snapshot(
        self, name: str, snapshot: str, memory: bool = False, progress: Progress = no_progress
    ) -> SnapshotInfo:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.snapshot(name, snapshot, memory, progress, owner_uid=self._owner)

    async def list_snapshots(self, name: str) -> SnapshotList:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.list_snapshots(name, owner_uid=self._owner)

    async def delete_snapshot(self, name: str, snapshot: str) -> SnapshotDeleted:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.delete_snapshot(name, snapshot, owner_uid=self._owner)

    async def restore(self, name: str, snapshot: str, progress: Progress = no_progress) -> Workspace:
        """Raises WorkspaceNotFound for another user's workspace, else what the manager raises."""
        with self._call():
            return await self.manager.restore(name, snapshot, progress, owner_uid=self._owner)

    async def fork(
        self, name: str, new_name: str, snapshot: str | None = None, progress: Progress = no_progress
    ) -> Workspace:
        """The fork is this user's. Raises WorkspaceNotFound for another user's workspace, else what the
        manager raises."""
        with self._call():
            if self._owner is None:  # root forks in the source owner's name (as the manager does)
                return await self.manager.fork(name, new_name, snapshot, progress)
            return await self.manager.fork(name, new_name, snapshot, progress, owner_uid=self._owner)
