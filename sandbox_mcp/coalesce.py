"""Writes close together in time go out as one: fewer packets, syscalls and wake-ups under a burst.

Each write to a pipe, a socket or an SSH channel wakes whoever reads the other end, and asyncio
sends every write at once (TCP_NODELAY). 200 calls at once through one stdio server or one SSH
connection were 200 writes each way, and on a busy host every one was a context switch. A
:class:`Coalescer` sends the first write after a quiet spell on the next loop turn (a lone call
waits for nothing) and holds the writes that follow within ``interval_s`` of the last send for
the rest of that interval, then sends them together, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["DEFAULT_INTERVAL_S", "Coalescer"]

DEFAULT_INTERVAL_S = 0.001


class Coalescer:
    """Buffers writes for ``send`` (a synchronous writer of bytes), see the module doc.

    ``send`` runs on the event loop; what it raises is passed to ``on_error`` (the data is then
    lost, as it would be on a write to a closed end). Call :meth:`flush` before closing the end.
    """

    def __init__(
        self,
        send: Callable[[bytes], None],
        on_error: Callable[[Exception], None] = lambda exc: None,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        self._send = send
        self._on_error = on_error
        self._interval_s = interval_s
        self._pending: list[bytes] = []
        self._last = float("-inf")
        self._handle: asyncio.Handle | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes written and not sent yet."""
        return sum(map(len, self._pending))

    def write(self, data: bytes) -> None:
        """Queue ``data``; it goes out on the next loop turn, or with the rest of a burst."""
        if not self._pending:
            loop = asyncio.get_running_loop()
            wait = self._last + self._interval_s - loop.time()
            self._handle = loop.call_later(wait, self.flush) if wait > 0 else loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Send what is queued now (also before the end is closed)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if not self._pending:
            return
        data, self._pending = b"".join(self._pending), []
        try:
            self._send(data)
        except Exception as exc:  # the caller's writer decides what a failed write means
            self._on_error(exc)
        # From the end of the send: on a busy host the write itself can take longer than the
        # interval (the reader it wakes runs first), and a window counted from its start would
        # then have closed before the next write came.
        self._last = asyncio.get_running_loop().time()
