"""Line framing with a bound, for byte streams a workspace controls.

A workspace may send anything on a channel we read (its root can replace any program in it).
:class:`LineBuffer` splits a stream into lines while holding at most ``limit`` bytes of a line
that has not ended yet; a longer line is an error, and the buffer never grows past the bound.
"""

from __future__ import annotations

from collections.abc import Iterator

__all__ = ["LineBuffer", "LineTooLong"]


class LineTooLong(ValueError):
    """A line grew past the buffer's limit without a newline."""

    def __init__(self, length: int, limit: int) -> None:
        self.length = length
        self.limit = limit
        super().__init__(f"a line of more than {limit} bytes without a newline ({length} so far)")


class LineBuffer:
    """Splits bytes into newline-terminated lines, holding at most ``limit`` bytes of an open line.

    ``high_water`` is the most the buffer ever held, for tests and diagnostics.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.high_water = 0
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of the line not yet ended."""
        return len(self._buf)

    def raise_limit(self, limit: int) -> None:
        """Allow lines up to ``limit`` bytes from now on (the limit never shrinks)."""
        self.limit = max(self.limit, limit)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Yield each line ``data`` completes (without its newline), in order.

        Raises:
            LineTooLong: the open line would exceed the limit. The lines before it were yielded;
                the buffer is emptied, and the stream should be abandoned.
        """
        start = 0
        while True:
            end = data.find(b"\n", start)
            stop = len(data) if end < 0 else end
            length = len(self._buf) + stop - start
            if length > self.limit:
                self._buf.clear()
                raise LineTooLong(length, self.limit)
            self._buf += data[start:stop]
            self.high_water = max(self.high_water, len(self._buf))
            if end < 0:
                return
            line = bytes(self._buf)
            self._buf.clear()
            start = end + 1
            yield line
