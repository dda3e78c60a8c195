"""``sandbox-mcp serve`` (stdio) as a user: pass MCP lines between stdin/stdout and the daemon socket.

The lines go through unchanged, so progress notifications and cancellations reach the daemon and
the client as they would in process. The bridge reads just enough of each message to survive a
daemon restart: it remembers the client's ``initialize`` (and ``notifications/initialized``) to
replay them on a new connection, and which requests are still unanswered, to answer them with
an error that says what happened. The next request then connects again. When the client goes
away (stdin closes), the bridge hangs up and the daemon cancels what that session still ran.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from . import shutdown
from .daemon_use import connect_error  # not daemon_client: this path loads no MCP client

__all__ = ["LOST_CODE", "Bridge", "bridge_stdio"]

log = logging.getLogger(__name__)
LOST_CODE = -32002  # a server error code (JSON-RPC reserves -32000..-32099 for them)
_MAX_LINE_BYTES = 256 << 20


def _key(message_id: Any) -> str:
    return json.dumps(message_id)


# The SDK writes a response as {"jsonrpc":"2.0","id":<id>,"result"|"error":...}: read the id
# without parsing a possibly large result; anything else is parsed in full.
_RESPONSE_HEAD = re.compile(rb'^\{"jsonrpc":"2\.0","id":(-?\d+|"(?:[^"\\]|\\.)*"),"(?:result|error)":')


def _response_key(line: bytes) -> str | None:
    """The key of the request a daemon line answers; None for notifications and requests."""
    m = _RESPONSE_HEAD.match(line)
    if m:
        return _key(json.loads(m.group(1)))
    try:
        msg = json.loads(line)
    except ValueError:
        return None
    if isinstance(msg, dict) and "id" in msg and "method" not in msg:
        return _key(msg["id"])
    return None


class Bridge:
    """One client (``send_to_client``) over successive daemon connections at ``path``."""

    def __init__(self, path: Path, group: str, send_to_client: Any) -> None:
        self.path = path
        self.group = group
        self._to_client = send_to_client
        self._initialize: bytes | None = None
        self._initialized: bytes | None = None
        self._pending: dict[str, Any] = {}  # request key -> id, unanswered by the daemon
        self._swallow: set[str] = set()  # replies to replayed requests the client already has
        self._conn: anyio.abc.ByteStream | None = None
        self._lock = anyio.Lock()
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self, client_lines: Any) -> None:
        """Forward ``client_lines`` (an async iterator of bytes lines) until it ends."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                async for line in client_lines:
                    await self._from_client(line)
                tg.cancel_scope.cancel()
        finally:
            # Hanging up is what makes the daemon cancel this session's calls (and undo a create).
            if self._conn is not None:
                with anyio.CancelScope(shield=True):
                    await self._conn.aclose()

    async def _from_client(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        request_id = method = None
        if isinstance(msg, dict):
            method = msg.get("method")
            if method is not None and "id" in msg:
                request_id = msg["id"]
                self._pending[_key(request_id)] = request_id
        try:
            conn = await self._connection()
            await conn.send(line)
            # Remembered after sending, so the first connection does not replay it to itself.
            if method == "initialize":
                self._initialize = line
            elif method == "notifications/initialized":
                self._initialized = line
        except OSError as exc:  # includes the connect errors
            self._pending.pop(_key(request_id), None)
            if request_id is not None:
                await self._error(request_id, str(connect_error(self.path, exc, self.group)))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._lost()
            if request_id is not None and self._pending.pop(_key(request_id), None) is not None:
                await self._error(request_id, "the sandbox-mcp daemon went away; call again")

    async def _connection(self) -> anyio.abc.ByteStream:
        async with self._lock:
            if self._conn is None:
                conn = await anyio.connect_unix(self.path)
                # A new session: replay the handshake, hiding its reply from the client (it has one).
                if self._initialize is not None:
                    self._swallow.add(_key(json.loads(self._initialize)["id"]))
                    await conn.send(self._initialize)
                    if self._initialized is not None:
                        await conn.send(self._initialized)
                self._conn = conn
                assert self._tg is not None
                self._tg.start_soon(self._from_daemon, conn)
            return self._conn

    async def _from_daemon(self, conn: anyio.abc.ByteStream) -> None:
        buffered = BufferedByteReceiveStream(conn)
        while True:
            try:
                line = await buffered.receive_until(b"\n", _MAX_LINE_BYTES)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
                    anyio.ClosedResourceError, anyio.DelimiterNotFound):  # fmt: skip
                break
            key = _response_key(line)
            if key is not None:
                if key in self._swallow:
                    self._swallow.discard(key)
                    continue
                self._pending.pop(key, None)
            await self._to_client(line + b"\n")
        if self._conn is conn:
            await self._lost()

    async def _lost(self) -> None:
        """The daemon connection ended: answer every unanswered request, connect again on the next one."""
        conn, self._conn = self._conn, None
        self._swallow.clear()
        if conn is not None:
            await conn.aclose()
        pending, self._pending = self._pending, {}
        for request_id in pending.values():
            await self._error(
                request_id,
                "the sandbox-mcp daemon restarted (or stopped) while this call ran, so its outcome is unknown: "
                "check with list_workspaces, then call again (the next call reconnects)",
            )

    async def _error(self, request_id: Any, message: str) -> None:
        reply = {"jsonrpc": "2.0", "id": request_id, "error": {"code": LOST_CODE, "message": message}}
        await self._to_client(json.dumps(reply).encode() + b"\n")


async def bridge_stdio(path: Path, group: str, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> None:
    """Bridge this process's stdin/stdout to the daemon at ``path`` until stdin closes or SIGINT or
    SIGTERM arrives; any of them hangs up on the daemon, which cancels what the session still runs."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout.buffer
    try:
        # Pipes (what MCP clients give us) are read and written on the event loop: no thread hop per line.
        lines, to_client = await _pipe_io(stdin, stdout)
    except (ValueError, OSError):  # a regular file or a terminal: threads then
        lines, to_client = _thread_io(stdin, stdout)
    async with anyio.create_task_group() as tg:
        tg.start_soon(shutdown.cancel_on_signals, tg.cancel_scope, "sandbox-mcp serve")
        await Bridge(path, group, to_client).run(lines)
        tg.cancel_scope.cancel()


async def _pipe_io(stdin: BinaryIO, stdout: BinaryIO) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_MAX_LINE_BYTES)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, stdout)
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def lines() -> Any:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, asyncio.LimitOverrunError):
                log.warning("the client sent a line over %d bytes; stopping", _MAX_LINE_BYTES)
                return
            if not line.endswith(b"\n"):
                return  # EOF (a last line without its newline was cut short: dropped)
            yield line

    async def to_client(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    return lines(), to_client


def _thread_io(stdin: BinaryIO, stdout: BinaryIO) -> tuple[Any, Any]:
    out_lock = anyio.Lock()

    async def lines() -> Any:
        while True:
            line = await anyio.to_thread.run_sync(stdin.readline, _MAX_LINE_BYTES)
            if not line.endswith(b"\n"):
                return
            yield line

    async def to_client(data: bytes) -> None:
        async with out_lock:
            await anyio.to_thread.run_sync(_write_all, stdout, data)

    return lines(), to_client


def _write_all(out: BinaryIO, data: bytes) -> None:
    out.write(data)
    out.flush()
