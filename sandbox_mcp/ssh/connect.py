"""Opening one authenticated SSH connection to a workspace, with its host key pinned, and polling
for one while the workspace boots."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncssh

from ..errors import CommandTimeout, SSHError
from ..progress import Progress
from .commands import SSHTarget
from .errors import describe, host_key_mismatch
from .keys import load_private_key, load_public_key
from .login import direct_login_client

__all__ = ["ENCRYPTION_ALGS", "TCP_CONNECT_TIMEOUT_S", "open_connection", "poll_until_connected"]

# AES-GCM first: asyncssh does ChaCha20-Poly1305 in several Python-level cipher calls per packet
# (about 13 us against 2 us for AES-GCM, which OpenSSL does in one), and a burst of execs is a
# few packets each way per call. Both are AEAD ciphers OpenSSH offers by default.
ENCRYPTION_ALGS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com")
TCP_CONNECT_TIMEOUT_S = 1.0  # one SYN retransmit; a workspace on the local bridge answers at once
_FAST_POLL_S = 0.01  # a refused connect on the local bridge costs a SYN and a RST
_FAST_POLL_FOR_S = 2.0


async def open_connection(
    target: SSHTarget,
    *,
    tcp_timeout_s: float,
    timeout_s: float,
    keepalive_interval_s: float,
    sock: socket.socket | None = None,
) -> asyncssh.SSHClientConnection:
    """Connect to ``target`` (or go on on ``sock``, a TCP connection to it already made, which is then
    ours to close) and log in with our client key, accepting only its pinned host key.

    Nothing else is offered or read: no SSH agent, no ``~/.ssh/config``, no passwords, no
    certificates; the key's signature is the login's first request (:mod:`.login`). The TCP connect
    has its own short timeout so a caller polling a booting workspace retries quickly; the SSH
    handshake may take up to ``timeout_s``.

    Raises:
        SSHError: a key file cannot be read.
        asyncssh.Error, OSError, TimeoutError: untranslated, for the caller to judge (a refused
            port while booting is normal; see :mod:`.errors`).
    """
    try:
        host_key = load_public_key(target.host_key_path)
        if target.host_key_fingerprint and host_key.get_fingerprint("sha256") != target.host_key_fingerprint:
            raise SSHError(
                f"workspace {target.key!r} was replaced (its host key changed) since this call looked it up; "
                "call list_workspaces, then call again"
            )
        client_key = load_private_key(target.client_key_path)
        if sock is None:
            sock = await _connected(target, tcp_timeout_s)
        return await asyncssh.connect(
            target.host,
            target.port,
            sock=sock,
            config=[],
            client_factory=direct_login_client(),  # one userauth request per login, see .login
            username=target.user,
            known_hosts=([host_key], [], []),
            # Only the pinned key's own algorithm (ed25519): nothing else, DSA least of all, is offered.
            server_host_key_algs=[host_key.get_algorithm()],
            encryption_algs=list(ENCRYPTION_ALGS),
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
        if sock is not None:
            sock.close()
        raise


async def _connected(target: SSHTarget, timeout_s: float) -> socket.socket:
    """A TCP connection to ``target``, made within ``timeout_s`` (an address is not looked up: asyncio's
    getaddrinfo is a worker thread's turn).

    Raises:
        OSError, TimeoutError: refused, unreachable, or no answer in time.
    """
    aloop = asyncio.get_running_loop()  # asyncssh runs on asyncio only
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(target.host).version == 6 else socket.AF_INET
        addr: tuple[Any, ...] = (target.host, target.port)
    except ValueError:
        infos = await aloop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        with anyio.fail_after(timeout_s):
            await aloop.sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def poll_until_connected(
    target: SSHTarget,
    timeout_s: float,
    attempt: Callable[[float, socket.socket | None], Awaitable[None]],
    progress: Progress | None = None,
    sock: socket.socket | None = None,
) -> None:
    """Call ``attempt(remaining_s, sock)`` until it connects, for at most ``timeout_s`` (a workspace booting).

    ``sock``, a TCP connection to ``target`` made already (a boot's poll found sshd listening on it,
    ``hostnet.listening``), goes to the first attempt, which logs in on it (it is closed if that fails);
    later attempts get None and connect afresh. Attempts are 10 ms apart for the first two seconds (a
    container's sshd listens ~0.3 s after its start; backing off from the first attempt left up to 100 ms
    between sshd listening and the login), then back off to 100 ms; ``progress`` hears about it once a second.

    Raises:
        SSHError: the host key does not match the pinned one (at once, without retrying).
        CommandTimeout: no attempt succeeded within ``timeout_s``; the message has the last error.
    """
    given = [sock]  # until the first attempt takes it
    try:
        await _poll(target, timeout_s, attempt, progress, given)
    finally:
        if given[0] is not None:
            given[0].close()  # a cancel came before the first attempt


async def _poll(
    target: SSHTarget,
    timeout_s: float,
    attempt: Callable[[float, socket.socket | None], Awaitable[None]],
    progress: Progress | None,
    given: list[socket.socket | None],
) -> None:
    start = time.monotonic()
    deadline = start + timeout_s
    delay = _FAST_POLL_S
    attempts = 0
    last = "no attempt made"
    next_report = start + 1.0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CommandTimeout(
                f"SSH on {target.where} (workspace {target.key!r}) did not answer within {timeout_s:g} s "
                f"({attempts} attempts); last error: {last}. Look at workspace_logs for boot problems"
            )
        attempts += 1
        try:
            sock, given[0] = given[0], None
            try:
                await attempt(remaining, sock)
            except BaseException:
                if sock is not None:
                    sock.close()  # whatever stopped that attempt (a cancel too), it has no use any more
                raise
            return
        except asyncssh.HostKeyNotVerifiable as exc:
            raise host_key_mismatch(target, exc) from exc
        except (asyncssh.Error, OSError, TimeoutError) as exc:
            last = describe(exc)
        now = time.monotonic()
        if progress is not None and now >= next_report:
            next_report = now + 1.0
            await progress(
                f"waiting for SSH on {target.host}:{target.port} ({attempts} attempts, last: {last})",
                min(1.0, (now - start) / timeout_s),
            )
        await anyio.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        if time.monotonic() - start > _FAST_POLL_FOR_S:
            delay = min(delay * 1.5, 0.1)
