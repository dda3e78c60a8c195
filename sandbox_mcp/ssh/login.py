"""A login in one userauth request: the signed public key request first, nothing before it.

asyncssh opens every login with a ``none`` request (to learn the server's methods), then asks whether
the server takes our key (a query without signature), and only then sends the signed request. OpenSSH
9.2, the sshd of our images, holds each request that does not log in for its failed-auth delay (5 ms
and more, against telling users apart by timing) before it reads the next. So two of a login's three
round trips were mostly waiting: a login took ~33 ms, ~17 ms without them (measured on a cold create).
We know the method (keys only, see the image's sshd_config) and the one key, so we send its signature
at once; RFC 4252 §7 lets a client do that. Nothing changes in what is proven: the host key is
verified in the key exchange before any of this, and the signature covers this session's id.

asyncssh has no option for either step, so this reaches into two of its internals (the client auth
class registered for ``publickey``, and the connection's list of methods still to try), as asyncssh
2.24 has them (pinned in the lock). Where they are not as expected, :func:`direct_login_client`
returns None and the stock three-request login runs; ``tests/test_ssh_login.py`` then fails, so a
version bump that loses this is noticed.
"""

from __future__ import annotations

import weakref
from typing import Any

import asyncssh
from asyncssh import auth as _auth

__all__ = ["DirectLoginClient", "direct_login_client", "in_use"]

_PUBLICKEY = b"publickey"
_stock = _auth._client_auth_handlers.get(_PUBLICKEY)  # noqa: SLF001 - see the module docstring
# Our connections: only their logins change; any other asyncssh client in this process keeps the stock one.
_direct: weakref.WeakSet[asyncssh.SSHClientConnection] = weakref.WeakSet()


def _fits() -> bool:
    """Whether asyncssh's internals are the ones this module was written against."""
    return (
        isinstance(_stock, type)
        and _stock.__name__ == "_ClientPublicKeyAuth"
        and callable(getattr(_stock, "_send_signed_request", None))
        and callable(getattr(asyncssh.SSHClientConnection, "public_key_auth_requested", None))
    )


_FITS = _fits()

if _FITS:
    assert _stock is not None

    class _SignedFirstAuth(_stock):  # type: ignore[misc,valid-type]
        """asyncssh's public key auth, minus the query for our connections."""

        async def _start(self) -> None:
            if self._conn not in _direct:
                await super()._start()
                return
            self._keypair = await self._conn.public_key_auth_requested()
            if self._keypair is None:  # no key (left) to try: the next method, or a clear failure
                self._conn.try_next_auth(next_method=True)
                return
            # A refused signature comes back as a userauth failure, and asyncssh goes on as after a refused query.
            await self._send_signed_request()

    _auth._client_auth_handlers[_PUBLICKEY] = _SignedFirstAuth  # noqa: SLF001


class DirectLoginClient(asyncssh.SSHClient):
    """The client side of one of our connections: starts the login with the signed public key request."""

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        methods: Any = getattr(conn, "_auth_methods", None)
        if methods == [b"none"]:  # not yet started: the login will begin with publickey instead
            conn._auth_methods = [_PUBLICKEY]  # noqa: SLF001
            _direct.add(conn)


def direct_login_client() -> type[asyncssh.SSHClient] | None:
    """The ``client_factory`` for :func:`asyncssh.connect` that logs in with one request; None (use asyncssh's
    own) where this asyncssh's internals are not the expected ones."""
    return DirectLoginClient if _FITS else None


def in_use(conn: asyncssh.SSHClientConnection) -> bool:
    """Whether ``conn`` logged in (or is logging in) the direct way (for tests)."""
    return conn in _direct
