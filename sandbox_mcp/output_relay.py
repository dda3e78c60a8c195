"""A running exec's output as progress messages: whole lines where possible, rate-limited, bounded.

The SSH pool hands output chunks to :meth:`OutputRelay.feed` (synchronously, from the channel's
callback) as the exec agent streams them; :meth:`OutputRelay.run` sends what has come at most
every ``interval_s`` as one progress message. Output held while waiting is bounded: what does
not fit is left out of the messages (they say how much), never out of the exec's result.
"""

from __future__ import annotations

import anyio

from .progress import Progress

__all__ = ["OutputRelay"]

INTERVAL_S = 0.1  # at most ten messages a second
MESSAGE_MAX = 8 << 10  # bytes of output per message
PENDING_MAX = 64 << 10  # bytes held between messages


class OutputRelay:
    """Collects output chunks and sends them through ``progress`` (message, fraction=None)."""

    def __init__(
        self, progress: Progress, *, interval_s: float = INTERVAL_S, message_max: int = MESSAGE_MAX,
        pending_max: int = PENDING_MAX,
    ) -> None:  # fmt: skip
        self.progress = progress
        self.interval_s = interval_s
        self.message_max = message_max
        self.pending_max = pending_max
        self.sent = 0  # messages sent
        self._buf = bytearray()
        self._skipped = 0
        self._wake = anyio.Event()
        self._done = False

    def feed(self, fd: int, data: bytes, skipped: int = 0) -> None:
        """Take a chunk of output (either stream); ``skipped``: bytes the agent already left out before it."""
        self._skipped += skipped
        room = self.pending_max - len(self._buf)
        if len(data) > room:
            self._skipped += len(data) - max(room, 0)
            data = data[: max(room, 0)]
        self._buf += data
        self._wake.set()

    def _take(self, final: bool) -> str | None:
        """The next message: up to the last newline within message_max, unless final or the line is too long."""
        if not self._buf and not self._skipped:
            return None
        head = bytes(self._buf[: self.message_max])
        cut = head.rfind(b"\n") + 1
        if cut == 0 and (final or len(self._buf) >= self.message_max):
            cut = len(head)
        if cut == 0 and not self._skipped:
            return None  # a line still being written: wait for its end (or the next interval's)
        text = head[:cut].decode("utf-8", errors="replace")
        del self._buf[:cut]
        if self._skipped:
            text = f"[sandbox-mcp: {self._skipped} bytes of output not shown here; the result has them]\n" + text
            self._skipped = 0
        return text

    async def run(self) -> None:
        """Send messages until :meth:`close`; each waits for output and for the interval since the last."""
        partial_since: float | None = None
        while not self._done:
            await self._wake.wait()
            self._wake = anyio.Event()
            text = self._take(final=False)
            if text is None and self._buf:
                # Output without a newline: sent as it is once it has waited a few intervals.
                now = anyio.current_time()
                partial_since = partial_since or now
                if now - partial_since >= 5 * self.interval_s:
                    text = self._take(final=True)
                else:
                    self._wake.set()
            if text is not None:
                partial_since = None
                await self.progress(text)
                self.sent += 1
            await anyio.sleep(self.interval_s)

    async def close(self) -> None:
        """Send what is left (the run loop ends)."""
        self._done = True
        self._wake.set()
        while (text := self._take(final=True)) is not None:
            await self.progress(text)
            self.sent += 1
