"""Wait until a workspace's port accepts connections: a plain TCP connect, polled.

A booting workspace refuses its SSH port for a few hundred milliseconds (seconds with 30 booting at
once). Each SSH login attempt in that time is a whole client set up and torn down in this process
(about a millisecond of CPU, and 100 of them per create when 30 boot at once: most of this server's
CPU in such a burst). A refused connect on the bridge costs a SYN and a RST. So the server waits for the
port to listen this way first and logs in once it does, on that same connection
(:func:`connect_when_listening`): one closed at once would still cost sshd a child (and the workspace's
log a "Connection closed ... [preauth]" line) on every start.

The polls are CPU of this process too, in a burst hundreds per create: each is a bare non-blocking
socket (~50 us here, where ``anyio.connect_tcp``, which resolves the address first, took ~140), and
after the first :data:`_FAST_FOR_S` they come less often, since a boot that takes that long is one of
many sharing the CPU and a few more milliseconds to notice it do not matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time

import anyio

__all__ = ["connect_when_listening", "wait_listening"]

_POLL_S = 0.01  # the same pace as the login attempts (sshd listens ~0.1 s after the container starts)
_FAST_FOR_S = 0.3  # an idle host's boot is over by then; later, each wait grows by half up to _POLL_MAX_S
_POLL_MAX_S = 0.04
_CONNECT_TIMEOUT_S = 1.0  # one SYN retransmit: a workspace on the local bridge answers at once


async def _connects(host: str, port: int, timeout_s: float) -> socket.socket | None:
    """One TCP connect to ``host``:``port`` within ``timeout_s`` (to each address of a name, in turn): the
    connected socket, or None."""
    try:
        addresses = [(socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET, host)]
    except ValueError:  # a name: resolved first (an address never is: resolving made a poll ~140 us, not ~50)
        try:
            with anyio.fail_after(timeout_s):
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            return None
        addresses = [(family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos]
    with anyio.move_on_after(timeout_s):
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setblocking(False)
                with contextlib.suppress(OSError):
                    await asyncio.get_running_loop().sock_connect(sock, (address, port))
                    connected, sock = sock, None
                    return connected
            finally:
                if sock is not None:
                    sock.close()
    return None


async def connect_when_listening(host: str, port: int, timeout_s: float) -> socket.socket | None:
    """Poll ``host``:``port`` until a TCP connect succeeds and return that connection's socket (non-blocking;
    the caller's to use, as the SSH login that follows does, or to close); None when ``timeout_s`` passes
    first. Never raises for the network: the caller's own attempt reports what is wrong."""
    start = time.monotonic()
    deadline = start + timeout_s
    pause = _POLL_S
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock = await _connects(host, port, min(_CONNECT_TIMEOUT_S, remaining))
        if sock is not None:
            return sock
        if time.monotonic() - start > _FAST_FOR_S:
            pause = min(pause * 1.5, _POLL_MAX_S)
        await anyio.sleep(min(pause, max(0.0, deadline - time.monotonic())))


async def wait_listening(host: str, port: int, timeout_s: float) -> bool:
    """:func:`connect_when_listening`, the connection closed at once: True once the port listens, False when
    ``timeout_s`` passes first."""
    sock = await connect_when_listening(host, port, timeout_s)
    if sock is None:
        return False
    sock.close()
    return True
