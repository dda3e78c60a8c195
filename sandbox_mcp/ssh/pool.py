"""The connection pool: one SSH connection per workspace, and exec and file calls over it.

Connections are opened lazily, reused, and replaced when they drop; a call that finds its
connection dead retries once where that cannot run anything twice. Each connection runs one exec
agent where the workspace has it (:mod:`.agent`), else a session per command (:mod:`.session`),
and one SFTP channel for the file tools (:mod:`.files`), replaced when a call on it times out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import asyncssh

from ..errors import InvalidSpec, SSHError
from ..models import DirListing, ExecResult, FileContent, WriteResult
from ..progress import Progress
from . import files
from .agent import AgentFault, AgentGone, AgentSession, NotStarted, run_agent_command
from .agent_start import open_agent
from .commands import (
    EXEC_AGENT_PATH,
    SSHTarget,
    agent_command,
    agent_request,
    build_exec_command,
    resolve_path,
    save_request,
)
from .connect import TCP_CONNECT_TIMEOUT_S, open_connection, poll_until_connected
from .errors import (
    agent_error,
    connect_error,
    describe,
    is_conn_error,
    lost_error,
    sftp_timeout_error,
)
from .session import OPEN_TIMEOUT_S, SessionLost, open_session, run_session
from .stream import StreamBlock, pool_stream

__all__ = ["DEFAULT_MAX_SESSIONS", "SFTP_TIMEOUT_S", "SSHPool"]

T = TypeVar("T")

# sshd's default MaxSessions is 10 per connection; keep one for SFTP and room for kill channels.
DEFAULT_MAX_SESSIONS = 7
# One SFTP request (a read of up to 4 MiB, a write of up to the write limit) on a live workspace
# takes well under a second; this only catches an sftp-server that blocks (a FIFO swapped in after
# the type check, a hung mount).
SFTP_TIMEOUT_S = 60.0
# ...plus this much per byte moved, so a large transfer to a slow guest (a VM under emulation)
# is not cut off: a floor of 1 MiB/s.
_SFTP_SECONDS_PER_BYTE = 1 / (1 << 20)


@dataclass(eq=False)
class _Entry:
    target: SSHTarget
    conn: asyncssh.SSHClientConnection
    sessions: anyio.Semaphore
    sftp: asyncssh.SFTPClient | None = None
    sftp_lock: anyio.Lock = field(default_factory=anyio.Lock)
    agent: AgentSession | None = None
    agent_unavailable: bool = False  # no agent there: a session per command
    agent_lock: anyio.Lock = field(default_factory=anyio.Lock)

    def alive(self) -> bool:
        return not self.conn.is_closed()


class SSHPool:
    """One pooled SSH connection per workspace key: lazy, reused, replaced when it dropped.

    ``agent_path`` is where the exec agent is installed inside workspaces (image recipes put it
    at :data:`~sandbox_mcp.ssh.EXEC_AGENT_PATH`); ``exec_agent=False`` always uses a session per
    command; a workspace's agent runs ``max_execs`` at once (default 64). Coroutines on asyncio (asyncssh).
    Raises InvalidSpec if ``agent_path`` is not a plain absolute path.
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float = 15.0,
        keepalive_interval_s: float = 15.0,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_execs: int | None = None,
        exec_agent: bool = True,
        agent_path: str = EXEC_AGENT_PATH,
        sftp_timeout_s: float = SFTP_TIMEOUT_S,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._use_agent = exec_agent
        self._agent_command = agent_command(agent_path)
        self._keepalive_interval_s = keepalive_interval_s
        self._max_sessions = max_sessions
        self._max_execs = max_execs
        self._sftp_timeout_s = sftp_timeout_s
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._starting: set[asyncio.Task[None]] = set()  # agents started ahead of their first command

    # connections

    def _lock(self, key: str) -> anyio.Lock:
        return self._locks.setdefault(key, anyio.Lock())

    async def _connect(
        self, target: SSHTarget, *, tcp_timeout_s: float, timeout_s: float, sock: socket.socket | None = None
    ) -> _Entry:
        """Open one authenticated connection (on ``sock`` if given); raises what asyncssh/socket raise (untranslated)."""
        keepalive_interval_s = self._keepalive_interval_s
        conn = await open_connection(target, tcp_timeout_s=tcp_timeout_s, timeout_s=timeout_s, sock=sock,
                                     keepalive_interval_s=keepalive_interval_s)  # fmt: skip
        return _Entry(target, conn, anyio.Semaphore(self._max_sessions))

    def _install(self, entry: _Entry) -> None:
        old = self._entries.get(entry.target.key)
        self._entries[entry.target.key] = entry
        if old is not None and old is not entry:
            old.conn.close()

    def _current(self, target: SSHTarget) -> _Entry | None:
        entry = self._entries.get(target.key)
        return entry if entry is not None and entry.alive() and entry.target == target else None

    async def _entry(self, target: SSHTarget) -> _Entry:
        if (entry := self._current(target)) is not None:
            return entry
        async with self._lock(target.key):
            if (entry := self._current(target)) is not None:
                return entry
            try:
                entry = await self._connect(
                    target, tcp_timeout_s=min(3.0, self._connect_timeout_s), timeout_s=self._connect_timeout_s
                )
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                raise connect_error(target, exc) from exc
            self._install(entry)
            return entry

    def _discard(self, entry: _Entry) -> None:
        """Forget a connection found dead (or misbehaving) so the next call makes a new one."""
        if self._entries.get(entry.target.key) is entry:
            del self._entries[entry.target.key]
        entry.conn.close()

    async def wait_ready(
        self, target: SSHTarget, timeout_s: float, progress: Progress | None = None, *, sock: socket.socket | None = None
    ) -> None:
        """Poll until sshd answers with the pinned key and our login works (the first time on ``sock``, a TCP
        connection to ``target`` made already, if given: closed in any case); keep that connection.

        Attempts are 10 ms apart for two seconds, then back off to 100 ms, each with a short TCP connect timeout.

        Raises:
            SSHError: the host key does not match the pinned one (at once, no retry), or a key file is unreadable.
            CommandTimeout: no successful login within ``timeout_s``; the message has the last error.
        """

        async def attempt(remaining: float, given: socket.socket | None) -> None:
            async with self._lock(target.key):
                tcp_timeout_s = min(TCP_CONNECT_TIMEOUT_S, remaining)
                self._install(await self._connect(target, tcp_timeout_s=tcp_timeout_s, timeout_s=remaining, sock=given))

        if self._current(target) is None:
            await poll_until_connected(target, timeout_s, attempt, progress, sock)
        elif sock is not None:
            sock.close()

    def rekey(self, old_key: str, target: SSHTarget) -> bool:
        """Keep ``old_key``'s connection for ``target`` if :meth:`SSHTarget.same_sshd` (a claimed pool slot)."""
        entry = self._entries.pop(old_key, None)
        if entry is not None and entry.alive() and entry.target.same_sshd(target):
            entry.target = target
            self._install(entry)
            return True
        if entry is not None:
            entry.conn.close()
        return False

    async def drop(self, key: str) -> None:
        """Close and forget the pooled connection of ``key`` (when its workspace stops). Never raises."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.conn.close()
            with anyio.move_on_after(2, shield=True):
                await entry.conn.wait_closed()

    async def close(self) -> None:
        """Close every pooled connection. Never raises."""
        for task in self._starting:
            task.cancel()
        for key in list(self._entries):
            await self.drop(key)

    # exec

    async def exec(
        self,
        target: SSHTarget,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | bytes | None = None,
        timeout_s: float = 120,
        output_cap: int = 1 << 20,
        save_max: int = 0,
        save_over: int | None = None,
        on_output: Callable[[int, bytes, int], None] | None = None,
    ) -> ExecResult:
        """Run ``command`` with ``sh -c`` in the workspace and collect its result.

        ``cwd`` defaults to the workspace directory; a relative one resolves against it. stdout and stderr
        are kept apart, each its head and tail, ``output_cap`` bytes together (the middle is drained;
        ``truncated``, a marker line). With ``save_max`` the exec agent saves a stream past ``save_over``
        (default ``output_cap``) whole, up to ``save_max`` bytes (:func:`.commands.save_request`; no agent,
        no saving). stdin gets EOF after ``stdin``. A command killed by a signal has ``exit_code=None`` and
        a note naming it on stderr. After ``timeout_s`` its process group is killed (``timed_out=True``,
        ``exit_code=None``); so it is when the awaiting task is cancelled, and the cancellation propagates.
        ``on_output(fd, data, skipped)``: live output (the agent streams it).

        Raises:
            InvalidSpec: a bad env name, NUL bytes, a non-positive timeout, an empty cwd.
            LimitExceeded: the workspace ran ``max_execs`` commands for all of ``timeout_s`` (agent only).
            SSHError: the workspace cannot be reached, the connection broke while the command ran (whether
                it completed is then unknown), or its exec agent broke the protocol (the connection is dropped).
        """
        wd = resolve_path(target.workspace_dir, cwd) if cwd is not None else target.workspace_dir
        remote = build_exec_command(command, cwd=wd, env=env, timeout_s=timeout_s)  # validates all inputs
        data = stdin.encode() if isinstance(stdin, str) else stdin
        for attempt in (1, 2):
            entry = await self._entry(target)
            agent = await self._agent(entry)
            if agent is not None:
                save = save_request(target.workspace_dir, save_max, save_over) if save_max > 0 else None
                request = agent_request(command, wd, env, timeout_s, data, output_cap, save)
                try:
                    return await run_agent_command(agent, request, timeout_s, on_output)
                except NotStarted as exc:
                    # The connection died before the command started (the agent kills what it
                    # started when its channel closes, so nothing runs twice). Replace it, once.
                    self._discard(entry)
                    if attempt == 2:
                        raise lost_error(target, "exec", exc) from exc
                    continue
                except AgentFault as exc:
                    self._discard(entry)  # a workspace that breaks the protocol gets a fresh start
                    raise agent_error(target, exc) from exc
                except AgentGone as exc:
                    if not entry.alive():
                        self._discard(entry)
                        raise lost_error(target, "exec (the command's outcome is unknown)", exc) from exc
                    entry.agent = None
                    raise agent_error(target, exc) from exc
            async with entry.sessions:
                start = time.monotonic()
                try:
                    chan, sess = await open_session(entry.conn, remote, output_cap)
                except (asyncssh.Error, OSError, TimeoutError) as exc:
                    if entry.alive() and not is_conn_error(exc):
                        raise SSHError(f"cannot start a command on {target.where}: {describe(exc)}") from exc
                    # The pooled connection died under us; nothing ran. Replace it, once.
                    self._discard(entry)
                    if attempt == 2:
                        raise lost_error(target, "exec", exc) from exc
                    continue
                try:
                    return await run_session(entry.conn, chan, sess, data, timeout_s, start)
                except SessionLost as exc:
                    self._discard(entry)
                    raise lost_error(target, "exec (the command's outcome is unknown)", exc) from exc
        raise AssertionError("unreachable")

    def stream(self, target: SSHTarget, command: str, **kw: Any) -> StreamBlock:
        """``command`` with byte-stream stdin/stdout (git's protocol): see :func:`.stream.pool_stream`."""
        return pool_stream(self, target, command, **kw)

    def start_agent_soon(self, target: SSHTarget) -> None:
        """Start the exec agent of ``target``'s connection in the background (a Python start: tens of ms, seconds
        in an emulated VM), so the first command finds it running; a failure is left to that command."""
        entry = self._current(target)
        if entry is not None and self._use_agent and entry.agent is None and not entry.agent_unavailable:
            task = asyncio.get_running_loop().create_task(self._agent_ahead(entry))
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def _agent_ahead(self, entry: _Entry) -> None:
        with contextlib.suppress(Exception):  # what failed here, the first command meets again and reports
            await self._agent(entry)

    async def _agent(self, entry: _Entry) -> AgentSession | None:
        """The connection's exec agent, started on first use; None where it cannot run."""
        if not self._use_agent or entry.agent_unavailable:
            return None
        if entry.agent is not None and not entry.agent.closed.is_set():
            return entry.agent
        async with entry.agent_lock:
            if entry.agent is not None and not entry.agent.closed.is_set():
                return entry.agent
            try:
                agent = await open_agent(entry.conn, self._agent_command, self._max_execs)
            except (asyncssh.Error, OSError, TimeoutError):
                if not entry.alive():
                    raise
                agent = None
            entry.agent, entry.agent_unavailable = agent, agent is None  # None: a session per command from now on
            return agent

    # SFTP

    async def _sftp_client(self, entry: _Entry) -> asyncssh.SFTPClient:
        if entry.sftp is None:
            async with entry.sftp_lock:
                if entry.sftp is None:
                    with anyio.fail_after(OPEN_TIMEOUT_S):
                        entry.sftp = await entry.conn.start_sftp_client()
        return entry.sftp

    @staticmethod
    def _drop_sftp(entry: _Entry, sftp: asyncssh.SFTPClient) -> None:
        """Close one SFTP channel (and so the sftp-server behind it); the next call opens a new one."""
        if entry.sftp is sftp:
            entry.sftp = None
        with contextlib.suppress(asyncssh.Error, OSError):
            sftp.exit()

    async def _with_sftp(
        self,
        target: SSHTarget,
        what: str,
        path: str,
        op: Callable[[asyncssh.SFTPClient], Awaitable[T]],
        *,
        idempotent: bool = True,
        size: int = 0,
    ) -> T:
        """Run ``op`` with the pooled SFTP client, bounded by the SFTP timeout (longer by ``size`` bytes moved).

        A dead connection is replaced and ``op`` retried once (unless it may have had an effect and is not
        idempotent); a lost SFTP channel on a live connection is replaced likewise. On a timeout the SFTP
        channel is closed, so one blocked request cannot wedge later calls. ``op`` translates file errors.
        """
        timeout_s = self._sftp_timeout_s + size * _SFTP_SECONDS_PER_BYTE
        for attempt in (1, 2):
            entry = await self._entry(target)
            sftp: asyncssh.SFTPClient | None = None
            try:
                sftp = await self._sftp_client(entry)
                with anyio.move_on_after(timeout_s) as scope:
                    try:
                        return await op(sftp)
                    except anyio.get_cancelled_exc_class():
                        # The request may still hold the sftp-server (it serves one at a time);
                        # a fresh channel for the next call costs a few milliseconds.
                        self._drop_sftp(entry, sftp)
                        raise
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                if not is_conn_error(exc) and entry.alive():
                    raise SSHError(f"SFTP {what} on {target.where} failed: {describe(exc)}") from exc
                if sftp is not None and entry.alive():
                    self._drop_sftp(entry, sftp)  # the channel broke, not the connection
                else:
                    self._discard(entry)
                if attempt == 2 or (sftp is not None and not idempotent):
                    raise lost_error(target, f"SFTP {what}", exc) from exc
                continue
            assert scope.cancelled_caught
            self._drop_sftp(entry, sftp)
            raise sftp_timeout_error(target, what, path, timeout_s)
        raise AssertionError("unreachable")

    async def read_file(
        self, target: SSHTarget, path: str, offset: int = 0, limit: int = 256 * 1024
    ) -> FileContent:
        """Read up to ``limit`` bytes of a regular workspace file from ``offset``.

        Content is UTF-8 text when the chunk decodes as UTF-8 (a multibyte character cut at the end is
        left for the next chunk), else base64. ``truncated``/``next_offset`` say whether and where to go on.

        Raises:
            InvalidSpec: a bad path/offset/limit, no such file, a directory, a FIFO, socket or
                device, permission denied.
            CommandTimeout: the SFTP call did not finish within the SFTP timeout.
            SSHError: the workspace cannot be reached or the connection broke.
        """
        files.check_page(offset, limit)
        abspath = resolve_path(target.workspace_dir, path)
        return await self._with_sftp(
            target, "read", abspath, lambda sftp: files.read_chunk(sftp, target, abspath, offset, limit), size=limit
        )

    async def write_file(
        self,
        target: SSHTarget,
        path: str,
        data: bytes,
        *,
        append: bool = False,
        mode: int | None = None,
        make_parents: bool = True,
    ) -> WriteResult:
        """Write (or append) ``data`` to a regular workspace file.

        Without ``append`` the file is replaced atomically (written under a temporary name in the same
        directory, then renamed over it); an existing file keeps its permission bits unless ``mode`` is
        given. Missing parent directories are created with ``make_parents``.

        Raises:
            InvalidSpec: a bad path or mode, a missing parent without ``make_parents``, the path is
                a directory, a FIFO, socket or device, permission denied, disk full.
            CommandTimeout: the SFTP call did not finish within the SFTP timeout.
            SSHError: the workspace cannot be reached or the connection broke.
        """
        if mode is not None and not 0 <= mode <= 0o7777:
            raise InvalidSpec(f"mode must be between 0 and 0o7777, got {mode!r}")
        abspath = resolve_path(target.workspace_dir, path)
        if abspath == "/":
            raise InvalidSpec("cannot write to /; give a file path")
        write = lambda sftp: files.write_data(  # noqa: E731
            sftp, target, abspath, data, append=append, mode=mode, make_parents=make_parents
        )
        return await self._with_sftp(target, "write", abspath, write, idempotent=not append, size=len(data))

    async def list_dir(
        self, target: SSHTarget, path: str = ".", offset: int = 0, limit: int = files.DEFAULT_PAGE
    ) -> DirListing:
        """``limit`` entries of a directory from index ``offset`` in name order (:func:`.files.list_directory`).

        Raises:
            InvalidSpec: a bad path, offset or limit, no such directory, not a directory, permission denied.
            CommandTimeout: the SFTP call did not finish within the SFTP timeout.
            SSHError: the workspace cannot be reached or the connection broke.
        """
        files.check_page(offset, limit)
        abspath = resolve_path(target.workspace_dir, path)
        return await self._with_sftp(
            target, "list_dir", abspath, lambda sftp: files.list_directory(sftp, target, abspath, offset, limit)
        )
