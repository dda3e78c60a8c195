"""The two ways a connection gets its exec agent: met where the image started it at boot, or started in a session.

An agent started in a session costs a session, a Python start and the agent's imports (~25 ms here,
seconds in an emulated VM). The image therefore starts one at boot (``sandbox-mcp-agent.service``,
``exec_agent.listen``) that waits on a Unix socket for a connection; :func:`open_agent` meets
it over sshd's direct-streamlocal forwarding (ready 5-7 ms after the login, 12-17 ms right after a
boot) and starts one in a session where there is none: a connection while another holds it, pool slots,
images without it. Once its connection is gone the agent waits again (``exec_agent.RELISTEN_WAIT_S``), so a
server started again, or a connection made again, meets one ready.
"""

from __future__ import annotations

import base64
import contextlib
import json
import weakref

import anyio
import asyncssh

from ..paths import AGENT_LISTEN_PATH
from .agent import AGENT_START_TIMEOUT_S, AgentSession
from .commands import agent_command

__all__ = ["ENVIRON_COMMAND", "open_agent", "start_agent", "start_listening_agent"]


# Connections that looked for the agent started at boot: it serves a connection's first agent only.
_looked: weakref.WeakSet[asyncssh.SSHClientConnection] = weakref.WeakSet()


async def open_agent(conn: asyncssh.SSHClientConnection, command: str, max_execs: int | None) -> AgentSession | None:
    """``conn``'s agent: on its first call, the one the image started at boot if it waits (and ``command``
    is the default agent's), else one started in a session with ``command``.

    Returns None where no agent can run (see :func:`start_agent`).

    Raises:
        asyncssh.Error, OSError, TimeoutError: as :func:`start_agent`.
    """
    if conn not in _looked and command == agent_command():
        _looked.add(conn)
        # Whatever goes wrong meeting it, a session may still start one (a dead connection fails there).
        with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
            agent = await start_listening_agent(conn, AGENT_LISTEN_PATH, max_execs)
            if agent is not None:
                return agent
    return await start_agent(conn, command, max_execs)


async def start_agent(
    conn: asyncssh.SSHClientConnection, command: str, max_execs: int | None = None
) -> AgentSession | None:
    """Start the agent with ``command`` on ``conn`` and wait for its ready line; it runs at most
    ``max_execs`` (default DEFAULT_MAX_EXECS) commands at once (:func:`.agent.run_agent_command` waits for a place).

    Returns None where it cannot run: the channel closed before it said it was ready (no python3,
    or no agent installed: a nixos-mode guest or a hand-made image).

    Raises:
        asyncssh.Error, OSError, TimeoutError: opening the channel failed or the agent did not get
            ready within AGENT_START_TIMEOUT_S; the caller tells a dead connection from a refusal.
    """
    chan: asyncssh.SSHClientChannel[bytes] | None = None
    try:
        with anyio.CancelScope(shield=True), anyio.fail_after(AGENT_START_TIMEOUT_S):
            chan, agent = await conn.create_session(AgentSession, command, encoding=None)
            agent.chan = chan
            if max_execs is not None:
                agent.max_execs, agent.slots = max_execs, anyio.Semaphore(max_execs)
            await agent.ready.wait()
    except BaseException:
        if chan is not None:
            chan.close()
        raise
    if agent.closed.is_set():  # e.g. "python3: command not found", "can't open file"
        return None
    return agent


# A session's environment as sshd makes it, for the agent started at boot (start_listening_agent).
ENVIRON_COMMAND = "exec /usr/bin/env -0"
_ENVIRON_MAX = 256 * 1024


class _Environ(asyncssh.SSHClientSession[bytes]):
    """``env -0``'s output, up to ``_ENVIRON_MAX`` bytes (past it the channel is closed and it is void)."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.data = bytearray()
        self.over = False
        self.done = anyio.Event()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype is not None or self.over:
            return
        self.data += data
        if len(self.data) > _ENVIRON_MAX:
            self.over = True
            self.data.clear()
            if self.chan is not None:
                self.chan.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.done.set()


async def _read_environ(conn: asyncssh.SSHClientConnection, env: _Environ) -> None:
    """Run :data:`ENVIRON_COMMAND` into ``env``; a failure leaves it void (``over``)."""
    try:
        env.chan, _ = await conn.create_session(lambda: env, ENVIRON_COMMAND, encoding=None)
    except (asyncssh.Error, OSError):
        env.over = True
        return
    await env.done.wait()


async def start_listening_agent(
    conn: asyncssh.SSHClientConnection, path: str, max_execs: int | None = None
) -> AgentSession | None:
    """The agent the workspace started at boot and that waits at the socket ``path`` for a connection
    (``exec_agent.listen``), reached over a direct-streamlocal channel, and given the environment of a
    session of this connection (read with :data:`ENVIRON_COMMAND`): it then serves as :func:`start_agent`'s.

    It saves the agent's Python start (two thirds of :func:`start_agent`'s time). Returns None where
    nothing listens at ``path`` (the image has no such agent, it serves another connection, or it was
    left unused and ended) or the environment could not be read: the caller starts the agent the usual way.

    Raises:
        asyncssh.Error, OSError, TimeoutError: as :func:`start_agent`; the caller tells a dead connection.
    """
    chan: asyncssh.SSHUnixChannel[bytes] | None = None
    env = _Environ()
    try:
        with anyio.CancelScope(shield=True), anyio.fail_after(AGENT_START_TIMEOUT_S):
            failed: Exception | None = None  # raised past the task group, which would wrap it in a group
            async with anyio.create_task_group() as tg:
                tg.start_soon(_read_environ, conn, env)  # at the same time: two round trips become one
                try:
                    chan, agent = await conn.create_unix_connection(AgentSession, path, encoding=None)
                except asyncssh.ChannelOpenError:
                    pass  # nothing listens there (or sshd forwards no sockets)
                except (asyncssh.Error, OSError) as exc:
                    failed = exc
            if failed is not None:
                raise failed
            if chan is None:
                return None
            agent.chan = chan
            if max_execs is not None:
                agent.max_execs, agent.slots = max_execs, anyio.Semaphore(max_execs)
            if env.over or env.chan is None or env.chan.get_exit_status() != 0:
                chan.close()
                return None
            chan.write(json.dumps({"environ": base64.b64encode(env.data).decode()}).encode() + b"\n")
            await agent.ready.wait()
    except BaseException:
        if chan is not None:
            chan.close()
        raise
    finally:
        if env.chan is not None:
            env.chan.close()
    if agent.closed.is_set():
        return None
    return agent
