"""Talking to the root daemon as an MCP client over its unix socket (the CLI and the HTTP server use this).

:func:`socket_transport` is an MCP client transport over the socket (newline-delimited JSON-RPC,
as stdio). :class:`RemoteManager` has the manager's methods and calls the daemon's tools, so the
CLI and ``build_server`` use it in place of a local manager: progress comes back through the
callback, errors come back with the daemon's message. A connection lost mid-call (the daemon
restarted) is reported as such and the next call connects again; nothing is retried on its own,
since a create or exec must not run twice.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.abc
import mcp_types as types
from anyio.streams.buffered import BufferedByteReceiveStream
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from pydantic import BaseModel

from .config import Settings
from .daemon_use import connect_error, daemon_socket_present
from .egress import Egress
from .errors import AccessDenied, BackendError, InvalidState, SandboxError
from .fsutil import atomic_write
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
from .naming import validate_name
from .progress import Progress, no_progress

if TYPE_CHECKING:
    from .ssh import SSHTarget

__all__ = ["DaemonLost", "RemoteManager", "connect_error", "daemon_available", "socket_transport"]

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)
_MAX_LINE_BYTES = 256 << 20


def _unwrap(exc: BaseException) -> BaseException:
    """The one error inside (nested) single-member exception groups, as task groups wrap them."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


_SDK_PREFIX = re.compile(r"^Error executing tool [\w-]+: ")


class DaemonLost(BackendError):
    """The connection to the daemon ended under a call (it restarted or stopped)."""


daemon_available = daemon_socket_present  # where the daemon's socket is (see daemon_use)


@asynccontextmanager
async def socket_transport(path: Path, group: str = "sandbox-mcp") -> AsyncIterator[tuple[Any, Any]]:
    """MCP client streams over a connection to the daemon socket at ``path``.

    Raises:
        AccessDenied: the socket refuses this user.
        BackendError: nothing listens there.
    """
    try:
        stream = await anyio.connect_unix(path)
    except OSError as exc:
        raise connect_error(path, exc, group) from exc
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    async def reader() -> None:
        buffered = BufferedByteReceiveStream(stream)
        async with read_writer:
            while True:
                try:
                    line = await buffered.receive_until(b"\n", _MAX_LINE_BYTES)
                except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                        anyio.ClosedResourceError, anyio.DelimiterNotFound):  # fmt: skip
                    return  # closing the read stream tells the session the connection ended
                try:
                    item: SessionMessage | Exception = SessionMessage(
                        types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                    )
                except ValueError as exc:
                    item = exc
                try:
                    await read_writer.send(item)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return

    async def writer() -> None:
        async with write_reader:
            async for message in write_reader:
                data = message.message.model_dump_json(by_alias=True, exclude_unset=True).encode() + b"\n"
                try:
                    await stream.send(data)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    await read_writer.aclose()
                    return

    async with stream, anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer)
        try:
            yield read_stream, write_stream
        finally:
            tg.cancel_scope.cancel()


class RemoteManager:
    """The manager's methods (a :class:`~sandbox_mcp.workspaces.Workspaces`), carried out by the daemon.

    Use as ``async with RemoteManager(settings) as m:``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: Client | None = None
        self._closed: anyio.Event | None = None
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> RemoteManager:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)

    async def _hold(self, *, task_status: anyio.abc.TaskStatus[Client]) -> None:
        """Own one connection (its task group lives here, not in whichever request made it)."""
        path, group = self.settings.daemon_socket, self.settings.daemon_group
        closed = anyio.Event()
        started = False
        try:
            async with Client(socket_transport(path, group), mode="legacy") as client:
                self._closed = closed
                started = True
                task_status.started(client)
                await closed.wait()
        except Exception as exc:
            if started:  # the caller already got DaemonLost
                log.debug("daemon connection ended: %s", exc)
                return
            inner = _unwrap(exc)
            if isinstance(inner, MCPError):  # the daemon refused this session (e.g. not in the group)
                raise AccessDenied(inner.error.message) from exc
            raise inner from None

    async def _connect(self) -> Client:
        async with self._lock:
            if self._client is None:
                assert self._tg is not None, "use RemoteManager as an async context manager"
                self._client = await self._tg.start(self._hold)
            return self._client

    def _drop(self) -> None:
        self._client = None
        if self._closed is not None:
            self._closed.set()
            self._closed = None

    async def _call(self, tool: str, args: dict[str, Any], model: type[M], progress: Progress | None = None) -> M:
        if "name" in args:  # the tool's schema would refuse a bad one too, but in pydantic's words
            validate_name(args["name"])
        client = await self._connect()

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            assert progress is not None
            await progress(message or "", done / total if total else None)

        try:
            result = await client.call_tool(tool, args, progress_callback=on_progress if progress else None)
        except MCPError as exc:
            self._drop()
            raise DaemonLost(
                f"lost the connection to the sandbox-mcp daemon during {tool} ({exc.error.message}); it restarted "
                "or stopped. The call's outcome is unknown: check with list_workspaces, then call again"
            ) from exc
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError) as exc:
            self._drop()
            raise DaemonLost(
                f"lost the connection to the sandbox-mcp daemon during {tool}; it restarted or stopped. "
                "The call's outcome is unknown: check with list_workspaces, then call again"
            ) from exc
        if result.is_error:
            text = " ".join(getattr(c, "text", "") for c in result.content)
            raise SandboxError(_SDK_PREFIX.sub("", text) or f"{tool} failed in the daemon")
        return model.model_validate(result.structured_content)

    # The manager's methods --------------------------------------------------------------------

    async def create(self, spec: CreateSpec, progress: Progress = no_progress) -> Workspace:
        """See :meth:`WorkspaceManager.create`; errors come back with the daemon's message.

        The spec goes as the tool's flat arguments, one per field (unset optional ones left out)."""
        args = spec.model_dump(mode="json", exclude_none=True)
        return await self._call("create_workspace", args, Workspace, progress)

    async def start(self, name: str, progress: Progress = no_progress) -> Workspace:
        """See :meth:`WorkspaceManager.start`."""
        return await self._call("start_workspace", {"name": name}, Workspace, progress)

    async def stop(self, name: str) -> Workspace:
        """See :meth:`WorkspaceManager.stop`."""
        return await self._call("stop_workspace", {"name": name}, Workspace)

    async def destroy(self, name: str, keep_data: bool = False) -> DestroyResult:
        """See :meth:`WorkspaceManager.destroy`."""
        return await self._call("destroy_workspace", {"name": name, "keep_data": keep_data}, DestroyResult)

    async def list(self) -> WorkspaceList:
        """See :meth:`WorkspaceManager.list`: every page of it."""
        listing = await self._call("list_workspaces", {}, WorkspaceList)
        found = list(listing.workspaces)
        while listing.next_offset is not None:
            listing = await self._call("list_workspaces", {"offset": listing.next_offset}, WorkspaceList)
            found += listing.workspaces
        return WorkspaceList(workspaces=found, total=len(found))

    async def status(self, name: str) -> WorkspaceStatus:
        """See :meth:`WorkspaceManager.status`."""
        return await self._call("workspace_status", {"name": name}, WorkspaceStatus)

    async def logs(self, name: str, lines: int = 200) -> LogsResult:
        """See :meth:`WorkspaceManager.logs`."""
        return await self._call("workspace_logs", {"name": name, "lines": lines}, LogsResult)

    async def exec(self, name: str, command: str, cwd: str | None = None, env: dict[str, str] | None = None,
                   timeout_s: float = 120, stdin: str | None = None,
                   progress: Progress | None = None) -> ExecResult:  # fmt: skip
        """See :meth:`WorkspaceManager.exec`; with ``progress``, the daemon streams the output as progress."""
        args = {"name": name, "command": command, "cwd": cwd, "env": env, "timeout_s": timeout_s, "stdin": stdin}
        return await self._call("exec", args, ExecResult, progress)

    async def read_file(self, name: str, path: str, offset: int = 0, limit: int | None = None) -> FileContent:
        """See :meth:`WorkspaceManager.read_file`."""
        args = {"name": name, "path": path, "offset": offset, "limit": limit}
        return await self._call("read_file", args, FileContent)

    async def write_file(self, name: str, path: str, content: str, encoding: str = "utf-8", append: bool = False,
                         mode: str | int | None = None) -> WriteResult:  # fmt: skip
        """See :meth:`WorkspaceManager.write_file`."""
        if isinstance(mode, int):
            mode = f"{mode:o}"
        args = {"name": name, "path": path, "content": content, "encoding": encoding, "append": append, "mode": mode}
        return await self._call("write_file", args, WriteResult)

    async def list_dir(self, name: str, path: str = ".", offset: int = 0, limit: int | None = None) -> DirListing:
        """See :meth:`WorkspaceManager.list_dir`."""
        return await self._call("list_dir", {"name": name, "path": path, "offset": offset, "limit": limit}, DirListing)

    async def git_diff(self, name: str, stat_only: bool = False) -> WorkspaceDiff:
        """See :meth:`WorkspaceManager.git_diff`."""
        return await self._call("workspace_diff", {"name": name, "stat_only": stat_only}, WorkspaceDiff)

    async def git_fetch(self, name: str, include_uncommitted: bool = False) -> FetchResult:
        """See :meth:`WorkspaceManager.git_fetch` (the daemon's git runs as this user)."""
        args = {"name": name, "include_uncommitted": include_uncommitted}
        return await self._call("fetch_workspace", args, FetchResult)

    async def pause(self, name: str) -> Workspace:
        """See :meth:`WorkspaceManager.pause`."""
        return await self._call("pause_workspace", {"name": name}, Workspace)

    async def resume(self, name: str) -> Workspace:
        """See :meth:`WorkspaceManager.resume`."""
        return await self._call("resume_workspace", {"name": name}, Workspace)

    async def snapshot(
        self, name: str, snapshot: str, memory: bool = False, progress: Progress = no_progress
    ) -> SnapshotInfo:
        """See :meth:`WorkspaceManager.snapshot`."""
        return await self._call("snapshot_workspace", {"name": name, "snapshot": snapshot, "memory": memory},
                                SnapshotInfo, progress)

    async def list_snapshots(self, name: str) -> SnapshotList:
        """See :meth:`WorkspaceManager.list_snapshots`."""
        return await self._call("list_snapshots", {"name": name}, SnapshotList)

    async def delete_snapshot(self, name: str, snapshot: str) -> SnapshotDeleted:
        """See :meth:`WorkspaceManager.delete_snapshot`."""
        return await self._call("delete_snapshot", {"name": name, "snapshot": snapshot}, SnapshotDeleted)

    async def restore(self, name: str, snapshot: str, progress: Progress = no_progress) -> Workspace:
        """See :meth:`WorkspaceManager.restore`."""
        return await self._call("restore_workspace", {"name": name, "snapshot": snapshot}, Workspace, progress)

    async def fork(
        self, name: str, new_name: str, snapshot: str | None = None, progress: Progress = no_progress
    ) -> Workspace:
        """See :meth:`WorkspaceManager.fork`."""
        validate_name(new_name)
        args = {"name": name, "new_name": new_name, "snapshot": snapshot}
        return await self._call("fork_workspace", args, Workspace, progress)

    async def ssh_target(self, name: str) -> SSHTarget:
        """How this user reaches their running workspace ``name`` with their own key (see :mod:`userkeys`).

        The daemon answers where (host, port, user) and which host key to pin (read over the
        socket, so it is the daemon's word, not a file someone could swap); the key is this user's
        copy, which only they can read. The pinned key is written beside it for OpenSSH.

        Raises:
            WorkspaceNotFound: no such workspace of this user's.
            InvalidState: it is not running, or this user has no key yet.
        """
        from .ssh import SSHTarget
        from .userkeys import user_key_path

        ws = await self.status(name)
        if ws.state != "running" or not ws.ssh.known_hosts:
            raise InvalidState(f"workspace {name!r} is {ws.state}; call start_workspace first")
        key = user_key_path(self.settings, os.geteuid())
        if not os.access(key, os.R_OK):
            raise InvalidState(
                f"no SSH key of yours at {key}: the daemon publishes it as you connect, but did not this time; "
                "its log says why (`journalctl -u sandbox-mcp`)"
            )
        host_key = key.with_name(f"host-{name}.pub")  # name: validated by the daemon's answer above
        atomic_write(host_key, " ".join(ws.ssh.known_hosts.split()[1:3]) + "\n", mode=0o600)
        return SSHTarget(key=name, host=ws.ssh.host, port=ws.ssh.port, user=ws.ssh.user, host_key_path=host_key,
                         client_key_path=key, workspace_dir=ws.workspace_dir)  # fmt: skip

    async def start_process(self, name: str, command: str, cwd: str | None = None, env: dict[str, str] | None = None,
                            process_id: str | None = None) -> ProcessStarted:  # fmt: skip
        """See :meth:`WorkspaceManager.start_process`."""
        args = {"name": name, "command": command, "cwd": cwd, "env": env, "process_id": process_id}
        return await self._call("start_process", args, ProcessStarted)

    async def process_output(self, name: str, process_id: str, cursor: int = 0, wait_s: float = 0,
                             max_bytes: int = 65536) -> ProcessOutput:  # fmt: skip
        """See :meth:`WorkspaceManager.process_output`."""
        args = {"name": name, "process_id": process_id, "cursor": cursor, "wait_s": wait_s, "max_bytes": max_bytes}
        return await self._call("process_output", args, ProcessOutput)

    async def wait_process(self, name: str, process_id: str, until: str = "exit", timeout_s: float = 60,
                           cursor: int = 0) -> ProcessWait:  # fmt: skip
        """See :meth:`WorkspaceManager.wait_process`."""
        args = {"name": name, "process_id": process_id, "until": until, "timeout_s": timeout_s, "cursor": cursor}
        return await self._call("wait_process", args, ProcessWait)

    async def stop_process(self, name: str, process_id: str, signal: str = "TERM", grace_s: float = 5) -> ProcessInfo:
        """See :meth:`WorkspaceManager.stop_process`."""
        args = {"name": name, "process_id": process_id, "signal": signal, "grace_s": grace_s}
        return await self._call("stop_process", args, ProcessInfo)

    async def list_processes(self, name: str) -> ProcessList:
        """See :meth:`WorkspaceManager.list_processes`."""
        return await self._call("list_processes", {"name": name}, ProcessList)

    async def publish_port(self, name: str, port: int, host_port: int | None = None) -> PublishedPort:
        """See :meth:`WorkspaceManager.publish_port`: the daemon listens (and checks who connects)."""
        return await self._call("publish_port", {"name": name, "port": port, "host_port": host_port}, PublishedPort)

    async def set_egress(self, name: str, egress: Egress) -> Workspace:
        """See :meth:`WorkspaceManager.set_egress`."""
        return await self._call("set_egress", {"name": name, "egress": egress}, Workspace)

    async def unpublish_port(self, name: str, port: int) -> PortUnpublished:
        """See :meth:`WorkspaceManager.unpublish_port`."""
        return await self._call("unpublish_port", {"name": name, "port": port}, PortUnpublished)
