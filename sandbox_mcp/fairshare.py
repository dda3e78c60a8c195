"""Sharing the daemon fairly between users: connections, concurrent calls and message memory per uid.

The daemon serves every member of its group from one process. Without bounds one member could
open connections without end, run calls without end, or make the daemon buffer a huge message on
each connection until it runs out of memory. What is bounded here (settings, with defaults):

* connections per uid (``uid_max_connections``) and tool calls running per uid (``uid_max_calls``),
  counted across all of that user's connections; root is not limited (the administrator);
* the bytes of one message: a line up to ``daemon_line_kib`` is buffered as it comes, and a
  longer one (a big ``write_file``) needs a large-message slot first: ``daemon_large_messages``
  in the whole daemon, one per uid at a time, each up to the largest ``write_file`` payload. A
  connection waiting for a slot reads nothing more (its sender blocks on a full socket), and a
  slot's holder that stops sending for ``LARGE_STALL_S`` loses its connection. So the daemon
  holds at most ``connections x daemon_line_kib + slots x the largest message``, whatever its
  clients send.

Workspaces, CPUs and memory per uid are the manager's (checked in the registry transaction that
registers a workspace, see ``WorkspaceManager._check_share``).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import anyio
import anyio.abc

from .config import Settings
from .errors import LimitExceeded

__all__ = ["LARGE_STALL_S", "LineTooLong", "MessageReader", "UserShares", "large_message_bytes"]

LARGE_STALL_S = 30.0  # a large message whose sender sends nothing for this long is dropped
SLOT_WAIT_S = 120.0  # how long a large message waits for a slot before its connection is dropped
_CHUNK = 1 << 16


def large_message_bytes(settings: Settings) -> int:
    """The longest message the daemon accepts: a ``write_file`` of ``write_max`` bytes, with room for its JSON
    encoding (base64 is 4/3 of it; text with many escaped characters can take twice as much)."""
    return settings.write_max * 2 + (1 << 20)


class LineTooLong(Exception):
    """A peer's message is longer than allowed, stalled, or waited too long for a slot (the reason is the text)."""


class UserShares:
    """Per-uid counters shared by every connection of one daemon."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._connections: Counter[int] = Counter()
        self._calls: Counter[int] = Counter()
        self._slots = anyio.Semaphore(settings.daemon_large_messages)
        self._user_slots: dict[int, anyio.Lock] = {}

    @contextlib.contextmanager
    def connection(self, uid: int) -> Iterator[None]:
        """Hold one of ``uid``'s connections for the block.

        Raises:
            LimitExceeded: ``uid`` holds ``uid_max_connections`` already.
        """
        limit = self.settings.uid_max_connections
        if uid != 0 and self._connections[uid] >= limit:
            raise LimitExceeded(
                f"uid {uid} already has {limit} connections open to the sandbox-mcp daemon, the most one user "
                "may have (uid_max_connections); close an MCP client or session you no longer use and retry"
            )
        self._connections[uid] += 1
        try:
            yield
        finally:
            self._connections[uid] -= 1

    @contextlib.contextmanager
    def call(self, uid: int) -> Iterator[None]:
        """Hold one of ``uid``'s running calls for the block.

        Raises:
            LimitExceeded: ``uid`` runs ``uid_max_calls`` calls already.
        """
        limit = self.settings.uid_max_calls
        if uid != 0 and self._calls[uid] >= limit:
            raise LimitExceeded(
                f"uid {uid} already has {limit} calls running in the sandbox-mcp daemon, the most one user may "
                "have at once (uid_max_calls); wait for some to finish (or stop long ones) and call again"
            )
        self._calls[uid] += 1
        try:
            yield
        finally:
            self._calls[uid] -= 1

    @contextlib.asynccontextmanager
    async def large_slot(self, uid: int) -> AsyncIterator[None]:
        """One large-message slot for ``uid`` (one per uid, ``daemon_large_messages`` in all).

        Raises:
            LineTooLong: no slot came free within ``SLOT_WAIT_S``.
        """
        mine = self._user_slots.setdefault(uid, anyio.Lock())
        got_mine = got_slot = False
        try:
            with anyio.move_on_after(SLOT_WAIT_S):
                await mine.acquire()
                got_mine = True
                await self._slots.acquire()
                got_slot = True
            if not got_slot:
                raise LineTooLong(f"waited {SLOT_WAIT_S:g} s for a large-message slot")
            yield
        finally:
            if got_slot:
                self._slots.release()
            if got_mine:
                mine.release()


class MessageReader:
    """The newline-delimited messages of one connection, each bounded as :mod:`fairshare` says."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, shares: UserShares, uid: int) -> None:
        self._stream = stream
        self._shares = shares
        self._uid = uid
        self._small = shares.settings.daemon_line_kib << 10
        self._large = large_message_bytes(shares.settings)
        self._buf = bytearray()

    async def receive_line(self) -> bytes:
        """The next message, without its newline.

        Raises:
            LineTooLong: it is too long, stalled, or waited too long for a slot.
            anyio.EndOfStream: the peer closed (with or without a partial message).
        """
        start = self._take(0)
        if start is not None:
            return start
        async with contextlib.AsyncExitStack() as stack:
            slot = False
            scanned = len(self._buf)
            while True:
                if not slot and len(self._buf) > self._small:
                    await stack.enter_async_context(self._shares.large_slot(self._uid))
                    slot = True
                if len(self._buf) > self._large:
                    raise LineTooLong(f"a message longer than {self._large} bytes")
                if slot:  # a slot is shared: its holder must keep sending
                    with anyio.move_on_after(LARGE_STALL_S) as scope:
                        chunk = await self._stream.receive(_CHUNK)
                    if scope.cancelled_caught:
                        raise LineTooLong(f"a large message stalled for {LARGE_STALL_S:g} s")
                else:
                    chunk = await self._stream.receive(_CHUNK)
                self._buf += chunk
                line = self._take(scanned)
                if line is not None:
                    return line
                scanned = len(self._buf)

    def _take(self, start: int) -> bytes | None:
        i = self._buf.find(b"\n", start)
        if i < 0:
            return None
        line = bytes(self._buf[:i])
        del self._buf[: i + 1]
        return line
