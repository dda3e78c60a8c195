"""``sandbox-mcp daemon``: the one root process that owns the host; users reach it over a unix socket.

The daemon speaks MCP itself on every socket connection: the same newline-delimited JSON-RPC
framing as stdio, one MCP session per connection, served by the same :func:`build_server` tools.
So ``serve`` over stdio only has to pass lines between its stdin/stdout and the socket
(:mod:`bridge`), progress notifications and cancellations travel unchanged, and the CLI and the
HTTP server are ordinary MCP clients of it (:mod:`daemon_client`). Nothing but the daemon runs
as root or reads the registry, the client key or the images.

Who may connect: the socket is 0660 root:<daemon_group>, and every connection's peer is checked
again by its kernel credentials (SO_PEERCRED: uid, gid, and the supplementary groups of its
process), so a loosened socket mode still lets nobody else in. The peer's uid is bound to its
session: the tools get an :class:`OwnedManager` for it (root sees every workspace, others only
their own). When a connection ends, whatever it still runs is cancelled; a cancelled create
undoes itself, so a client that goes away mid-create leaves nothing behind.

Fair sharing (:mod:`fairshare`): connections and running calls are counted per uid, every
message is read with a bound (a small one unless the connection holds one of the few
large-message slots), and the manager bounds each user's workspaces, CPUs and memory; root is
held to the message bounds only.
"""

from __future__ import annotations

import contextlib
import contextvars
import grp
import json
import logging
import os
import signal
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream  # _refuse's few small lines
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server

from .config import Settings
from .errors import AccessDenied, InvalidSpec, InvalidState, LimitExceeded, SandboxError
from .fairshare import LineTooLong, MessageReader, UserShares
from .manager import WorkspaceManager
from .owners import OwnedManager
from .server import build_server, lowlevel_server
from .userkeys import UserKeys

__all__ = [
    "Peer",
    "authorize",
    "bind_socket",
    "peer_credentials",
    "run_daemon",
    "serve_connection",
]

log = logging.getLogger(__name__)

_PEER_UID: contextvars.ContextVar[int] = contextvars.ContextVar("sandbox_mcp_peer_uid")


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket, as the kernel reports it."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_credentials(sock: socket.socket) -> Peer:
    """The connecting process's pid, uid, gid (SO_PEERCRED) and supplementary groups (its /proc status).

    Raises:
        AccessDenied: the credentials cannot be read (the peer is gone).
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except OSError as exc:
        raise AccessDenied(f"cannot read the peer's credentials ({exc}); connect again") from exc
    groups: set[int] = set()
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                groups = {int(g) for g in line.split()[1:]}
                break
    return Peer(pid, uid, gid, frozenset(groups))


def authorize(peer: Peer, group_gid: int | None, group_name: str) -> None:
    """Let root and members of the daemon's group in.

    Raises:
        AccessDenied: anyone else; the message says how to get access.
    """
    if peer.uid == 0:
        return
    if group_gid is not None and (peer.gid == group_gid or group_gid in peer.groups):
        return
    raise AccessDenied(
        f"uid {peer.uid} may not use the sandbox-mcp daemon: only root and members of group "
        f"{group_name!r} may. Ask an administrator to run `usermod -aG {group_name} <your user>`, "
        "then log in again (or run `newgrp " + group_name + "`)"
    )


# --- line framing over the socket, shaped like the text files stdio_server reads and writes ---


class _SocketLines:
    """Async iterator of the lines a peer sends, each bounded (:class:`~sandbox_mcp.fairshare.MessageReader`);
    at EOF, or a line past the bounds, it calls ``on_eof`` (the connection is over)."""

    def __init__(self, reader: MessageReader, on_eof: Callable[[], None]) -> None:
        self._reader = reader
        self._on_eof = on_eof

    def __aiter__(self) -> _SocketLines:
        return self

    async def __anext__(self) -> str:
        try:
            line = await self._reader.receive_line()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._on_eof()
            raise StopAsyncIteration from None
        except LineTooLong as exc:
            log.warning("closing a connection: %s", exc)
            self._on_eof()
            raise StopAsyncIteration from None
        return line.decode("utf-8", errors="replace")


class _SocketWriter:
    """``write``/``flush`` onto the socket, as stdio_server expects of stdout."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream

    async def write(self, text: str) -> None:
        try:
            await self._stream.send(text.encode())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # the peer left; its session is being torn down

    async def flush(self) -> None:
        return None


async def _refuse(stream: anyio.abc.ByteStream, error: SandboxError) -> None:
    """Answer the peer's requests with the refusal (so its client shows why), then hang up.

    Every request gets it, not only the first: a client that opens with one request and falls back
    to another (server/discover, then initialize) must read the refusal, not a closed connection.
    A peer that sends nothing, or too much, is simply dropped.
    """
    with anyio.move_on_after(5):
        buffered = BufferedByteReceiveStream(stream)
        with contextlib.suppress(Exception):
            for _ in range(8):
                message = json.loads(await buffered.receive_until(b"\n", 1 << 20))
                if isinstance(message, dict) and "id" in message and "method" in message:
                    reply = {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32001, "message": str(error)}}
                    await stream.send(json.dumps(reply).encode() + b"\n")
    await stream.aclose()


async def serve_connection(server: MCPServer, stream: anyio.abc.SocketStream, group_gid: int | None,
                           group_name: str, shares: UserShares | None = None) -> None:  # fmt: skip
    """One MCP session over one accepted connection, bound to its peer's uid; ends (cancelling
    whatever still runs) when the peer hangs up. ``shares`` bounds the peer's connections and
    messages (the daemon's; a fresh one with the default settings if not given)."""
    shares = shares or UserShares(Settings())
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    try:
        peer = peer_credentials(sock)
        authorize(peer, group_gid, group_name)
    except AccessDenied as exc:
        log.warning("refused a connection: %s", exc)
        await _refuse(stream, exc)
        return
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(shares.connection(peer.uid))
        except LimitExceeded as exc:
            log.warning("refused a connection: %s", exc)
            await _refuse(stream, exc)
            return
        await _serve_peer(server, stream, peer, shares)


async def _serve_peer(server: MCPServer, stream: anyio.abc.SocketStream, peer: Peer, shares: UserShares) -> None:
    _PEER_UID.set(peer.uid)  # read by the session's lifespan, entered in this task
    lowlevel = lowlevel_server(server)
    async with stream, anyio.create_task_group() as tg:

        def hang_up() -> None:
            tg.cancel_scope.cancel()
            log.info("uid %d (pid %d) hung up; cancelled what its session still ran", peer.uid, peer.pid)

        lines = _SocketLines(MessageReader(stream, shares, peer.uid), on_eof=hang_up)
        async with stdio_server(lines, _SocketWriter(stream)) as (read, write):  # type: ignore[arg-type]
            await lowlevel.run(read, write, lowlevel.create_initialization_options())


def _connection_lifespan(manager: WorkspaceManager, keys: UserKeys, shares: UserShares) -> Callable[[MCPServer], Any]:
    @asynccontextmanager
    async def lifespan(server: MCPServer) -> AsyncIterator[OwnedManager]:
        uid = _PEER_UID.get()
        if uid != 0:
            try:  # the user's key copy lives under /run: gone after a reboot or a unit restart
                await anyio.to_thread.run_sync(keys.ensure_published, uid)
            except (SandboxError, OSError) as exc:
                log.warning("could not publish uid %d's SSH key: %s", uid, exc)
        yield OwnedManager(manager, uid, shares)

    return lifespan


def _group_gid(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise InvalidSpec(
            f"group {name!r} does not exist; create it (`groupadd --system {name}`, scripts/setup does) "
            "and add the users who may use the daemon, or set SANDBOX_MCP_DAEMON_GROUP"
        ) from None


def bind_socket(path: Path, gid: int) -> socket.socket:
    """A listening unix socket at ``path``, mode 0660, owned by root:``gid``, in a 0755 directory.

    It is made under a temporary name and renamed into place, so it never exists with a
    wider mode. A stale socket (nobody answers) is replaced; a live one is not.

    Raises:
        InvalidState: another daemon answers at ``path``.
        InvalidSpec: ``path``'s directory is a symlink, or ``path`` is something else than a socket.
    """
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    if path.parent.is_symlink():
        raise InvalidSpec(f"{path.parent} is a symlink; point SANDBOX_MCP_DAEMON_SOCKET at a real directory")
    with contextlib.suppress(FileNotFoundError):
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise InvalidSpec(f"{path} exists and is not a socket; remove it or choose another SANDBOX_MCP_DAEMON_SOCKET")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        else:
            raise InvalidState(f"a sandbox-mcp daemon already listens on {path}; stop it first")
        finally:
            probe.close()
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: nobody else in before the chown/chmod below
    try:
        sock.bind(str(tmp))
    finally:
        os.umask(old_umask)
    os.chown(tmp, 0, gid)
    os.chmod(tmp, 0o660)
    sock.listen(64)
    os.replace(tmp, path)
    return sock


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    """SIGTERM/SIGINT end the daemon cleanly: connections are cancelled (their creates undone) and the
    socket removed. Workspaces keep running; the next daemon finds them in the registry."""
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.warning("sandbox-mcp daemon: %s, stopping", signal.Signals(signum).name)
            scope.cancel()
            return


async def run_daemon(settings: Settings, *, ready: Callable[[], None] | None = None) -> None:
    """Own the manager and serve MCP on the daemon socket until cancelled.

    Raises:
        InvalidState: not root, or another daemon runs.
        InvalidSpec: the group does not exist, or the socket path is unusable.
    """

    if os.geteuid() != 0:
        raise InvalidState("the daemon runs as root: `sudo sandbox-mcp daemon` (or its systemd unit)")
    if settings.copy_claude_credentials:
        raise InvalidSpec(
            "copy_claude_credentials would copy root's Claude credentials into every user's workspaces; the "
            "daemon refuses it. Unset SANDBOX_MCP_COPY_CLAUDE_CREDENTIALS (users log in inside their workspace, "
            "or write their own credentials file into it)"
        )
    gid = _group_gid(settings.daemon_group)
    path = settings.daemon_socket
    async with WorkspaceManager(settings) as manager:
        keys = UserKeys(settings)
        manager.owner_keys = keys.public_key  # users ssh into their own workspaces (userkeys.py)
        shares = UserShares(settings)
        server = build_server(settings, lifespan=_connection_lifespan(manager, keys, shares))
        sock = bind_socket(path, gid)
        ours = path.stat().st_ino
        try:
            listener = await anyio.abc.SocketListener.from_socket(sock)
            log.warning("sandbox-mcp daemon: listening on %s (group %s)", path, settings.daemon_group)
            if ready is not None:
                ready()
            async with listener, anyio.create_task_group() as tg:
                tg.start_soon(_stop_on_signal, tg.cancel_scope)
                await listener.serve(
                    lambda stream: serve_connection(server, stream, gid, settings.daemon_group, shares)
                )
        finally:
            # Only remove the socket if it is still ours (a new daemon may have replaced it).
            with contextlib.suppress(OSError):
                if path.stat().st_ino == ours:
                    path.unlink()
            sock.close()
