"""Published ports: a TCP forwarder from the host's loopback to a port inside a workspace.

It runs in the server (or daemon) process, on anyio. Each published port is a listener on
127.0.0.1; an accepted connection is let through only when the local user that opened it is the
workspace's owner or root (the peer's uid comes from the kernel: a sock_diag lookup of the socket whose
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
import socket
import struct
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
    """The uid owning the TCP socket whose local end is ``local`` and remote end ``remote``, or None.

    Used on an accepted connection with its ends swapped: the client's own socket. Asked of the
    kernel by an exact sock_diag lookup (microseconds); where netlink is not available, from
    ``table`` (which the kernel builds by walking every hash bucket: milliseconds). Both see this
    process's network namespace, the listener's, where the client's socket is too.
    """
    try:
        return _diag_uid(local, remote)
    except OSError:
        return _table_uid(local, remote, table)


def _table_uid(local: tuple[str, int], remote: tuple[str, int], table: Path) -> int | None:
    """The socket's uid from ``table`` (/proc/net/tcp), or None."""
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


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 1
_NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_DIAG_REQ = struct.Struct("=BBBxI")  # family, protocol, ext, pad, states
_SOCKID = struct.Struct("!HH16s16s")  # sport, dport (big endian), src, dst; then if and cookie (host order)
_SOCKID_TAIL = struct.Struct("=III")
_DIAG_MSG_UID_AT = 4 + _SOCKID.size + _SOCKID_TAIL.size + 12  # family..retrans, id, expires, rqueue, wqueue
_NO_COOKIE = 0xFFFFFFFF


def _diag_uid(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """sock_diag's answer for one IPv4 TCP socket (an exact lookup, not a dump); None if there is none.

    Raises:
        OSError: netlink sock_diag cannot be used here.
    """
    sockid = _SOCKID.pack(local[1], remote[1], socket.inet_aton(local[0]).ljust(16, b"\0"),
                          socket.inet_aton(remote[0]).ljust(16, b"\0")) + _SOCKID_TAIL.pack(0, _NO_COOKIE, _NO_COOKIE)
    body = _DIAG_REQ.pack(socket.AF_INET, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    request = _NLMSG.pack(_NLMSG.size + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2)
        nl.sendto(request, (0, 0))
        reply = nl.recv(8192)
    length, kind, _, _, _ = _NLMSG.unpack_from(reply)
    if kind == _NLMSG_ERROR:
        errno_ = -struct.unpack_from("=i", reply, _NLMSG.size)[0]
        if errno_ == errno.ENOENT:
            return None
        raise OSError(errno_, "sock_diag refused the lookup")
    if kind != _SOCK_DIAG_BY_FAMILY or length < _NLMSG.size + _DIAG_MSG_UID_AT + 4:
        raise OSError(errno.EPROTO, "an unexpected sock_diag reply")
    return int(struct.unpack_from("=I", reply, _NLMSG.size + _DIAG_MSG_UID_AT)[0])


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
                uid = peer_uid(remote, local)  # an exact netlink lookup: microseconds, not worth a thread
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
