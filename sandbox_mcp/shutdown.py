"""Ending a stdio server the same way whatever ends it: SIGINT, SIGTERM or the client closing stdin.

MCP clients stop a stdio server by closing its stdin, then signalling it (Claude Code sends SIGINT,
then SIGTERM 100 ms later). Each of the three cancels whatever the server still runs, so a create in
flight undoes itself (as when a client hangs up on the daemon), and the process exits.

The SDK's own stdio transport reads stdin on a worker thread that a cancellation cannot interrupt,
so it sits out SIGINT until the next line. Here stdin and stdout are pipes on the event loop
(:func:`stdio_pipes`), shaped like the text files the SDK's ``stdio_server`` takes, and
:func:`cancel_on_signals` turns the signals into a cancellation. No MCP import: the server module
puts the pieces together (``server.serve_stdio``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio

from .coalesce import Coalescer

__all__ = [
    "MAX_LINE_BYTES",
    "PipeLines",
    "PipeWriter",
    "cancel_on_signals",
    "claim_stdio",
    "exit_now",
    "stdio_pipes",
]

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 128 << 20  # one JSON-RPC message per line; write_file's base64 payload fits
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_HOLD_MAX = 1 << 20  # bytes of responses held for a shared write at most (a big read_file goes at once)


async def cancel_on_signals(scope: anyio.CancelScope, what: str, signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """Cancel ``scope`` at the first of ``signals`` (SIGINT, SIGTERM), saying so on the log."""
    with anyio.open_signal_receiver(*signals) as received:
        async for signum in received:
            log.debug("%s: %s, stopping", what, signal.Signals(signum).name)
            scope.cancel()
            return


def exit_now(code: int = 0) -> None:
    """End the process once the server is done: logs and stdio flushed, no interpreter teardown.

    Tearing down the interpreter's ~100,000 objects takes most of a second on a busy machine, and a
    client that sent SIGINT waits for the exit (Claude Code sends SIGTERM 100 ms later). Everything
    that matters is closed by then: the server's lifespan closed the manager and its connections.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


@contextlib.contextmanager
def claim_stdio() -> Iterator[tuple[int, int]]:
    """The process's stdin and stdout as private descriptors, for the protocol alone.

    While held, fd 0 reads /dev/null and fd 1 writes to stderr, so a library or a child that
    prints cannot corrupt the protocol stream (as the SDK's stdio transport does). Restored after.
    """
    wire_in = os.dup(0)
    wire_out = os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        sys.stdout.flush()
        os.dup2(null, 0)
        os.dup2(2, 1)
        yield wire_in, wire_out
    finally:
        os.close(null)
        os.dup2(wire_in, 0)
        os.dup2(wire_out, 1)
        os.close(wire_in)
        os.close(wire_out)


class PipeLines:
    """The lines on a pipe, as text; at EOF (or a line over the bound) ``on_eof`` runs and iteration ends."""

    def __init__(self, reader: asyncio.StreamReader, on_eof: Callable[[], None]) -> None:
        self._reader = reader
        self._on_eof = on_eof

    def __aiter__(self) -> PipeLines:
        return self

    async def __anext__(self) -> str:
        try:
            line = await self._reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            log.warning("the client sent a line over %d bytes; stopping", MAX_LINE_BYTES)
            line = b""
        if not line.endswith(b"\n"):  # EOF (a last line without its newline was cut short: dropped)
            self._on_eof()
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


class PipeWriter:
    """``write``/``flush`` onto a pipe, as the SDK's ``stdio_server`` expects of stdout.

    Messages close together share one write (:class:`~sandbox_mcp.coalesce.Coalescer`): the SDK
    writes each response on its own, and under 200 calls at once every write woke the client.
    """

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._out = Coalescer(self._send)

    def _send(self, data: bytes) -> None:
        if not self._writer.is_closing():  # else the client is gone; the session is being torn down
            with contextlib.suppress(ConnectionError, OSError):
                self._writer.write(data)

    async def write(self, text: str) -> None:
        if self._writer.is_closing():
            return
        self._out.write(text.encode())
        if self._out.pending_bytes > _HOLD_MAX:
            self._out.flush()
        try:
            await self._writer.drain()  # waits only while the pipe's own buffer is full
        except (ConnectionError, OSError):
            pass

    async def flush(self) -> None:
        """Nothing to do per message (a burst is sent together); :meth:`close` sends what is left."""
        return None

    def close(self) -> None:
        """Send what is held; the caller closes the pipe after."""
        self._out.flush()


@contextlib.asynccontextmanager
async def stdio_pipes(on_eof: Callable[[], None]) -> AsyncIterator[tuple[Any, PipeWriter]]:
    """stdin's lines and a writer to stdout, both on the event loop (so a cancellation never waits
    for a line), with fd 0 and 1 claimed (:func:`claim_stdio`). ``on_eof`` runs when stdin ends.

    A stdin the event loop cannot watch (a regular file) is read on a thread instead.
    """
    loop = asyncio.get_running_loop()
    with claim_stdio() as (wire_in, wire_out):
        fin = os.fdopen(wire_in, "rb", buffering=0, closefd=False)
        fout = os.fdopen(wire_out, "wb", buffering=0, closefd=False)
        reader = asyncio.StreamReader(limit=MAX_LINE_BYTES)
        read_transport: asyncio.BaseTransport | None = None
        try:
            read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), fin)
            lines: Any = PipeLines(reader, on_eof)
        except ValueError:  # a regular file: no pipe to watch
            lines = _file_lines(fin, on_eof)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, fout)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        pipe_writer = PipeWriter(writer)
        try:
            yield lines, pipe_writer
        finally:
            pipe_writer.close()
            transport.close()
            if read_transport is not None:
                read_transport.close()


async def _file_lines(f: Any, on_eof: Callable[[], None]) -> AsyncIterator[str]:
    while True:
        line = await anyio.to_thread.run_sync(f.readline, MAX_LINE_BYTES)
        if not line.endswith(b"\n"):
            on_eof()
            return
        yield line.decode("utf-8", errors="replace")
