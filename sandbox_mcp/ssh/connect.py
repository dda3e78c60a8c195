"""Opening one authenticated SSH connection to a workspace, with its host key pinned."""

from __future__ import annotations

import asyncio
import socket

import anyio
import asyncssh

from .commands import SSHTarget
from .keys import load_private_key, load_public_key

__all__ = ["TCP_CONNECT_TIMEOUT_S", "open_connection"]

TCP_CONNECT_TIMEOUT_S = 1.0  # one SYN retransmit; a workspace on the local bridge answers at once


async def open_connection(
    target: SSHTarget, *, tcp_timeout_s: float, timeout_s: float, keepalive_interval_s: float
) -> asyncssh.SSHClientConnection:
    """Connect to ``target`` and log in with our client key, accepting only its pinned host key.

    Nothing else is offered or read: no SSH agent, no ``~/.ssh/config``, no passwords, no
    certificates. The TCP connect has its own short timeout so a caller polling a booting
    workspace retries quickly; the SSH handshake may take up to ``timeout_s``.

    Raises:
        SSHError: a key file cannot be read.
        asyncssh.Error, OSError, TimeoutError: untranslated, for the caller to judge (a refused
            port while booting is normal; see :mod:`.errors`).
    """
    host_key = load_public_key(target.host_key_path)
    client_key = load_private_key(target.client_key_path)
    aloop = asyncio.get_running_loop()  # asyncssh runs on asyncio only
    infos = await aloop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    family, socktype, proto, _, addr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setblocking(False)
        with anyio.fail_after(tcp_timeout_s):
            await aloop.sock_connect(sock, addr)
        return await asyncssh.connect(
            target.host,
            target.port,
            sock=sock,
            config=[],
            username=target.user,
            known_hosts=([host_key], [], []),
            x509_trusted_certs=None,
            client_keys=[client_key],
            agent_path=None,
            preferred_auth="publickey",
            gss_auth=False,
            keepalive_interval=keepalive_interval_s,
            keepalive_count_max=3,
            connect_timeout=timeout_s,
        )
    except BaseException:
        sock.close()
        raise
