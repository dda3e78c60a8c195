"""Published ports: a TCP forwarder from the host's loopback to a port inside a workspace.

It runs in the server (or daemon) process, on anyio. Each published port is a listener on
127.0.0.1; an accepted connection is let through only when the local user that opened it is the
workspace's owner or root (the peer's uid comes from the kernel's socket table, the row whose
ends are the accepted connection's ends swapped), and then joined to a new connection from the
host to the workspace's address on the bridge, which the host may always open. The workspace
only ever answers on a connection the host opened: its egress policy is unchanged.

Bounded: at most ``max_connections`` at a time per published port (more are closed at once), a
fixed buffer per direction (one read's worth; a slow reader holds the writer back), a connect timeout.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc

from .errors import BackendError, Conflict

__all__ = ["PortForwarder", "peer_uid", "proc_net_address"]

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
BUFFER_BYTES = 64 << 10
CONNECT_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"


def proc_net_address(host: str, port: int) -> str:
    """An IPv4 address and port as /proc/net/tcp writes them: the address's bytes as a little-endian hex word."""
    packed = ipaddress.IPv4Address(host).packed
    return f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"


def peer_uid(local: tuple[str, int], remote: tuple[str, int], table: Path = Path("/proc/net/tcp")) -> int | None:
    """The uid owning the socket whose local end is ``local`` and remote end ``remote``, or None.

    Used on an accepted connection with its ends swapped: the row of the client's own socket. The
    table is this process's network namespace's (the listener's), where the client's socket is too.
    """
    want_local, want_remote = proc_net_address(*local), proc_net_address(*remote)
    try:
        with table.open() as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
                    return int(fields[7])
    except (OSError, ValueError):
        return None
    return None


@dataclass(eq=False)
class _Published:
    workspace: str
    port: int
    host_port: int
    target: str
    allowed_uids: frozenset[int]
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    closed: anyio.Event = field(default_factory=anyio.Event)
    active: int = 0


class PortForwarder:
    """The listeners of every published port in this process. Use as ``async with PortForwarder() as f:``."""

    def __init__(self, max_connections: int = MAX_CONNECTIONS, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.max_connections = max_connections
        self.buffer_bytes = buffer_bytes
        self._tg: anyio.abc.TaskGroup | None = None
        self._published: dict[tuple[str, int], _Published] = {}

    async def __aenter__(self) -> PortForwarder:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        self._tg = None
        self._published.clear()

    @property
    def serving(self) -> bool:
        return self._tg is not None

    def host_port(self, workspace: str, port: int) -> int | None:
        """Where ``workspace``'s ``port`` is published by this process, if it is."""
        pub = self._published.get((workspace, port))
        return pub.host_port if pub is not None else None

    async def publish(
        self, workspace: str, port: int, host_port: int, target: str, allowed_uids: Iterable[int]
    ) -> int:
        """Listen on 127.0.0.1:``host_port`` (0: a free port) and forward to ``target``:``port``; returns the host port.

        Raises:
            Conflict: ``host_port`` is in use on the host.
            BackendError: this process does not serve ports, or the listener cannot be made.
        """
        if self._tg is None:
            raise BackendError("this sandbox-mcp process does not forward ports (use the MCP server or the daemon)")
        try:
            multi = await anyio.create_tcp_listener(local_host=LOOPBACK, local_port=host_port, reuse_port=False)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Conflict(
                    f"host port {host_port} is in use on the host; pick another host_port or omit it to get a free one"
                ) from exc
            raise BackendError(f"cannot listen on {LOOPBACK}:{host_port}: {exc.strerror or exc}") from exc
        listener = multi.listeners[0]  # one address: 127.0.0.1
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        pub = _Published(workspace, port, bound, target, frozenset(allowed_uids))
        self._published[(workspace, port)] = pub
        self._tg.start_soon(self._serve, pub, listener)
        return bound

    async def unpublish(self, workspace: str, port: int) -> bool:
        """Close the listener of ``workspace``'s ``port`` and its connections; False if it was not published."""
        pub = self._published.pop((workspace, port), None)
        if pub is None:
            return False
        pub.scope.cancel()
        await pub.closed.wait()  # the listener is closed when this returns
        return True

    async def unpublish_all(self, workspace: str) -> None:
        """Close every listener of ``workspace`` (it stopped or went away)."""
        for ws, port in [k for k in self._published if k[0] == workspace]:
            await self.unpublish(ws, port)

    async def _serve(self, pub: _Published, listener: anyio.abc.SocketListener) -> None:
        try:
            with pub.scope:
                async with listener, anyio.create_task_group() as conns:
                    while True:
                        client = await listener.accept()
                        if pub.active >= self.max_connections:
                            await client.aclose()
                            continue
                        pub.active += 1
                        conns.start_soon(self._connection, pub, client)
        finally:
            pub.closed.set()

    async def _connection(self, pub: _Published, client: anyio.abc.SocketStream) -> None:
        try:
            async with client:
                remote = client.extra(anyio.abc.SocketAttribute.remote_address)
                local = client.extra(anyio.abc.SocketAttribute.local_address)
                uid = await anyio.to_thread.run_sync(peer_uid, remote, local)
                if uid is None or uid not in pub.allowed_uids:
                    log.warning("refused a connection to %s:%d from uid %s", pub.workspace, pub.port, uid)
                    return
                try:
                    with anyio.fail_after(CONNECT_TIMEOUT_S):
                        upstream = await anyio.connect_tcp(pub.target, pub.port)
                except (OSError, TimeoutError):
                    return  # nothing listens there (yet): the client sees the connection close
                async with upstream, anyio.create_task_group() as tg:
                    tg.start_soon(self._pump, client, upstream)
                    tg.start_soon(self._pump, upstream, client)
        finally:
            pub.active -= 1

    async def _pump(self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream) -> None:
        try:
            while True:
                data = await src.receive(self.buffer_bytes)
                await dst.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        # Half-close: the other direction may still carry a reply (a client that shut down writing).
        with contextlib.suppress(OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            await dst.send_eof()
