"""Wait until a workspace's port accepts connections: a plain TCP connect, polled.

A booting workspace refuses its SSH port for a few hundred milliseconds (seconds with 30 booting at
once). Each SSH login attempt in that time is a whole client set up and torn down in this process
(about a millisecond of CPU, and 100 of them per create when 30 boot at once: most of this server's
CPU in such a burst). A refused connect on the bridge costs a SYN and a RST. So the server waits for the
port to listen this way first and logs in once it does.
"""

from __future__ import annotations

import contextlib
import time

import anyio

__all__ = ["wait_listening"]

_POLL_S = 0.01  # the same pace as the login attempts (sshd listens ~0.1 s after the container starts)
_CONNECT_TIMEOUT_S = 1.0  # one SYN retransmit: a workspace on the local bridge answers at once


async def wait_listening(host: str, port: int, timeout_s: float) -> bool:
    """Poll ``host``:``port`` until a TCP connect succeeds (then closed at once); False when ``timeout_s``
    passes first. Never raises for the network: the caller's own attempt reports what is wrong."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        with contextlib.suppress(OSError), anyio.move_on_after(min(_CONNECT_TIMEOUT_S, remaining)):
            stream = await anyio.connect_tcp(host, port)
            with contextlib.suppress(OSError):
                await stream.aclose()
            return True
        await anyio.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
