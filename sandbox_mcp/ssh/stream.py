"""A command inside a workspace whose stdin and stdout are byte streams (git's protocol over SSH).

``exec`` collects a command's output; git needs a conversation instead: ``git upload-pack``
inside answers the host's ``git fetch`` request by request, and ``git index-pack`` inside reads a
pack as the host produces it. :class:`RemoteStream` is that channel, with flow control both ways
(asyncssh's SSH window), stderr kept to a bounded tail, and the exit status at the end.

Everything it returns is what the workspace sent: callers bound and check it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import anyio
import asyncssh

from ..errors import SSHError
from .commands import PID_MARKER, SSHTarget, build_exec_command, resolve_path
from .errors import describe, lost_error
from .session import OPEN_TIMEOUT_S

if TYPE_CHECKING:
    from .pool import SSHPool

__all__ = ["STDERR_TAIL_BYTES", "RemoteStream", "StreamBlock", "pool_stream"]

STDERR_TAIL_BYTES = 16 * 1024  # what is kept of a streamed command's stderr (its last bytes)
_READ_CHUNK = 64 * 1024


class RemoteStream:
    """One remote command's stdin (:meth:`send`, :meth:`send_eof`), stdout (:meth:`receive`) and exit.

    Made by :meth:`SSHPool.stream <sandbox_mcp.ssh.SSHPool.stream>`, which drains stderr into
    :attr:`stderr_tail` and closes the channel when its block ends.
    """

    def __init__(self, process: asyncssh.SSHClientProcess[bytes]) -> None:
        self._process = process
        self._stderr = bytearray()

    async def send(self, data: bytes) -> None:
        """Write ``data`` to the command's stdin, waiting while the SSH window is full.

        Raises:
            BrokenPipeError: the command (or the channel) is gone.
        """
        try:
            self._process.stdin.write(data)
            await self._process.stdin.drain()
        except (asyncssh.Error, OSError) as exc:
            raise BrokenPipeError(f"the remote command's stdin closed: {exc}") from exc

    def send_eof(self) -> None:
        """Close the command's stdin (it reads EOF). Never raises."""
        with contextlib.suppress(asyncssh.Error, OSError):
            self._process.stdin.write_eof()

    async def receive(self, max_bytes: int = _READ_CHUNK) -> bytes:
        """Up to ``max_bytes`` of the command's stdout; ``b""`` at its end.

        Raises:
            ConnectionError: the channel broke.
        """
        try:
            return await self._process.stdout.read(max_bytes)
        except (asyncssh.Error, OSError) as exc:
            raise ConnectionError(f"the channel broke: {exc}") from exc

    async def drain_stderr(self) -> None:
        """Read stderr until it ends, keeping the last :data:`STDERR_TAIL_BYTES` (a pipe never fills)."""
        with contextlib.suppress(asyncssh.Error, OSError):
            while chunk := await self._process.stderr.read(_READ_CHUNK):
                self._stderr += chunk
                if len(self._stderr) > STDERR_TAIL_BYTES:
                    del self._stderr[: len(self._stderr) - STDERR_TAIL_BYTES]

    @property
    def stderr_tail(self) -> str:
        """The command's last stderr bytes as text, without the exec wrapper's PID line."""
        text = self._stderr.decode("utf-8", "replace")
        return "".join(line for line in text.splitlines(keepends=True) if not line.startswith(PID_MARKER + " "))

    async def wait(self) -> int | None:
        """The command's exit status once the channel closes; None when a signal ended it or it never said."""
        with contextlib.suppress(asyncssh.Error, OSError):
            await self._process.wait_closed()
        return self._process.exit_status if self._process.exit_status is not None and \
            self._process.exit_status >= 0 else None

    def close(self) -> None:
        """Close the channel: the command sees its pipes close (and ``timeout`` bounds it anyway)."""
        self._process.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RemoteStream]:
        """Drain stderr in the background while the block runs; close the channel when it ends, however."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.drain_stderr)
                try:
                    yield self
                finally:
                    self.close()
        finally:
            self.close()


async def open_stream(conn: asyncssh.SSHClientConnection, remote: str, open_timeout_s: float) -> RemoteStream:
    """Start ``remote`` on ``conn`` with binary pipes.

    Raises:
        asyncssh.Error, OSError, TimeoutError: the channel could not be opened in time.
    """
    with anyio.fail_after(open_timeout_s):
        process = await conn.create_process(remote, encoding=None)
    return RemoteStream(process)


StreamBlock = contextlib.AbstractAsyncContextManager[RemoteStream]  # `async with pool.stream(...) as remote:`


@contextlib.asynccontextmanager
async def pool_stream(
    pool: SSHPool, target: SSHTarget, command: str, *, cwd: str | None = None, timeout_s: float = 600
) -> AsyncIterator[RemoteStream]:
    """Run ``command`` (``sh -c``) in the workspace on ``pool``'s connection, its stdin and stdout as byte streams.

    For protocols spoken with a command inside (git's). stderr is drained in the background into a
    bounded tail; the command is bounded by ``timeout_s`` inside (``timeout``, then SIGKILL), and its
    channel is closed when the block ends, however it ends.

    Raises:
        InvalidSpec: a bad cwd or timeout.
        SSHError: the workspace cannot be reached or the channel cannot be opened.
    """
    wd = resolve_path(target.workspace_dir, cwd) if cwd is not None else target.workspace_dir
    remote = build_exec_command(command, cwd=wd, timeout_s=timeout_s)
    entry = await pool._entry(target)  # the pool's own connection and session slots (package-private)
    async with entry.sessions:
        try:
            opened = await open_stream(entry.conn, remote, OPEN_TIMEOUT_S)
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            if entry.alive():
                raise SSHError(f"cannot start a command on {target.where}: {describe(exc)}") from exc
            pool._discard(entry)
            raise lost_error(target, "opening a stream", exc) from exc
        async with opened.running():
            yield opened
