"""The secrets proxy's worker: an ASGI application between a workspace's request and the real service.

A workspace calls ``http://<host ip>:<port>/<host>/<path>`` (its ``ANTHROPIC_BASE_URL``, git's rewritten
URLs); :class:`ProxyApp` sends ``https://<host>/<path>`` on with the placeholders in its headers replaced
(:mod:`.rewrite`), over TLS verified against the system's store (or ``ca_bundle``). The HTTP parts are
libraries': uvicorn (h11) parses what workspaces send, httpcore (httpx's transport) speaks to the
upstreams. Per workspace (by source address, which the firewall ties to its port) it keeps a token
bucket (``rate_per_s``, ``burst``) and a slot count (``max_requests``); the firewall bounds its
connections. Bodies are bounded both ways.

It runs in the unprivileged worker :mod:`.supervisor` forks, and asks the supervisor (:class:`Keeper`)
for a workspace's client file and a secret's value. Its log says what was forwarded or refused; never a
value (error texts are scrubbed of every value read, in case a library quotes a header).
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpcore2 as httpcore

from ..errors import BackendError
from .files import ClientFile
from .rewrite import HOP_BY_HOP, Refused, WorkspaceSecret, rewrite_headers
from .settings import SecretsProxySettings, split_host

__all__ = ["MAX_REPLY", "Keeper", "ProxyApp", "log_event"]

MAX_REPLY = 1 << 20  # the longest answer the supervisor gives (a client file)

def log_event(event: str, **fields: Any) -> None:
    print(json.dumps({"t": round(time.time(), 3), "event": event, **fields}), flush=True)


class _Resolving(httpcore.AsyncNetworkBackend):
    """The default backend, connecting to ``table[host]`` where the settings name one (tests). TLS still
    checks the name: httpcore takes the server name from the request's URL, not from this address."""

    def __init__(self, table: dict[str, str]) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._table = table

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,  # noqa: ASYNC109 - the interface
                          local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        return await self._inner.connect_tcp(self._table.get(host, host), port, timeout, local_address, socket_options)

    async def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("no unix sockets here")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


@dataclass
class _Share:
    """One workspace's share of the proxy: a token bucket and its request slots."""

    tokens: float
    slots: anyio.Semaphore
    stamp: float = field(default_factory=time.monotonic)

    def take(self, rate: float, burst: int) -> bool:
        now = time.monotonic()
        self.tokens = min(float(burst), self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _TooLarge(Exception):
    pass


class ProxyApp:
    """The ASGI application: one request from a workspace in, one to its upstream out."""

    def __init__(self, keeper: Keeper, settings: SecretsProxySettings) -> None:
        self.keeper = keeper
        self.s = settings
        ctx = ssl.create_default_context(cafile=str(settings.ca_bundle) if settings.ca_bundle else None)
        self.pool = httpcore.AsyncConnectionPool(
            ssl_context=ctx, network_backend=_Resolving(settings.resolve), max_connections=512,
            max_keepalive_connections=64, keepalive_expiry=30,
        )
        self._shares: dict[str, _Share] = {}
        self._values: set[str] = set()  # every value read, to scrub from error texts

    # The workspace ---------------------------------------------------------------------------------

    def _share(self, ip: str) -> _Share:
        share = self._shares.get(ip)
        if share is None:
            share = self._shares[ip] = _Share(tokens=float(self.s.burst), slots=anyio.Semaphore(self.s.max_requests))
        return share

    async def _values_for(self, peer: str, host: str, target: bytes, headers: list[tuple[bytes, bytes]],
                          secrets: list[WorkspaceSecret]) -> dict[str, str]:
        """The values the rewrite will put in, read now (from the supervisor): a first pass names them."""
        wanted: list[str] = []

        def note(s: WorkspaceSecret) -> str:
            wanted.append(s.name)
            return "x"

        rewrite_headers(host, target, headers, secrets, note)  # raises Refused before anything is read
        values = {}
        for name in dict.fromkeys(wanted):
            values[name] = await self.keeper.value(peer, name)
            self._values.add(values[name])
        return values

    def _scrub(self, text: str) -> str:
        for v in self._values:
            text = text.replace(v, "[secret]")
        return text[:500]

    # ASGI ----------------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
            await self.pool.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        started = time.monotonic()
        peer = (scope.get("client") or ("?", 0))[0]
        client = await self.keeper.client(peer) if peer != "?" else None
        if client is None:
            log_event("refused", peer=peer, reason="not a workspace with secrets")
            await _reply(send, 403, "this address is not a workspace with secrets\n")
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        host, _, rest = raw.lstrip(b"/").partition(b"/")
        host_text = host.decode("latin-1").lower()
        target = b"/" + rest + (b"?" + scope["query_string"] if scope.get("query_string") else b"")
        fields = {"ws": client.workspace, "method": scope["method"], "host": host_text}
        if host_text not in client.hosts:
            log_event("refused", **fields, reason="no endpoint for this host")
            await _reply(send, 403, f"no secret of this workspace goes to {host_text!r}; endpoints: "
                                    f"{', '.join(sorted(client.hosts))}\n")
            return
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + len(raw) > self.s.max_header_bytes:
            # h11 bounds a head that arrives in pieces; one that came whole is measured here.
            log_event("refused", **fields, reason="request head too large")
            await _reply(send, 431, f"request head larger than {self.s.max_header_bytes} bytes\n")
            return
        share = self._share(peer)
        if not share.take(self.s.rate_per_s, self.s.burst):
            log_event("limited", **fields, reason="rate")
            await _reply(send, 429, "too many requests from this workspace; slow down\n", [(b"retry-after", b"1")])
            return
        secrets = [WorkspaceSecret(s.name, s.placeholder, s.spec) for s in client.secrets]
        async with share.slots:
            try:
                values = await self._values_for(peer, host_text, target, scope["headers"], secrets)
                headers = rewrite_headers(host_text, target, scope["headers"], secrets, lambda s: values[s.name])
            except Refused as exc:
                log_event("refused", **fields, secret=exc.secret, reason=exc.reason)
                await _reply(send, 403, f"refused by the sandbox secrets proxy: {exc.reason}\n")
                return
            except BackendError as exc:
                log_event("error", **fields, reason=str(exc))
                await _reply(send, 502, f"{exc}\n")
                return
            began = False

            async def tracked(message: dict[str, Any]) -> None:
                nonlocal began
                began = True
                await send(message)

            try:
                status, sent = await self._forward(scope, receive, tracked, host_text, target, headers)
            except Exception as exc:  # noqa: BLE001 - never let a library's text (a header?) reach uvicorn's log
                if not isinstance(exc, _TooLarge):
                    log_event("error", **fields, reason=self._scrub(f"{type(exc).__name__}: {exc}"))
                if not began:
                    await _reply(send, 502, "the secrets proxy could not relay this request\n")
                return  # a response begun and not finished: uvicorn closes the connection
        log_event("forwarded", **fields, status=status, response_bytes=sent, ms=round((time.monotonic() - started) * 1000))

    async def _forward(self, scope: dict[str, Any], receive: Any, send: Any, host: str, target: bytes,
                       headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        name, port = split_host(host)
        request_headers = [(b"host", host.encode() if port != 443 else name.encode()), *headers]
        framing = {k.lower(): v for k, v in scope["headers"] if k.lower() in (b"content-length", b"transfer-encoding")}
        length = framing.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.s.max_request_bytes):
            await _reply(send, 413, f"request body larger than {self.s.max_request_bytes} bytes\n")
            return 413, 0
        if length is None and b"transfer-encoding" in framing:
            request_headers.append((b"transfer-encoding", b"chunked"))
        request = httpcore.Request(
            scope["method"], httpcore.URL(scheme=b"https", host=name.encode(), port=port, target=target),
            headers=request_headers, content=self._body(receive),
            extensions={"timeout": {"connect": self.s.connect_timeout_s, "read": self.s.read_timeout_s,
                                    "write": self.s.read_timeout_s, "pool": self.s.connect_timeout_s}},
        )
        try:
            response = await self.pool.handle_async_request(request)
        except _TooLarge:
            await _reply(send, 413, f"request body larger than {self.s.max_request_bytes} bytes\n")
            return 413, 0
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, ssl.SSLError,
                OSError) as exc:
            reason = self._scrub(f"{type(exc).__name__}: {exc}")
            log_event("upstream-error", host=host, reason=reason)
            await _reply(send, 502, f"cannot reach https://{host}/: {reason}\n")
            return 502, 0
        sent = 0
        try:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_stream():
                sent += len(chunk)
                if sent > self.s.max_response_bytes:
                    log_event("cut", host=host, reason=f"response past {self.s.max_response_bytes} bytes")
                    raise _TooLarge  # the connection is closed: the client sees a cut response
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()
        return response.status, sent

    async def _body(self, receive: Any) -> AsyncIterator[bytes]:
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise httpcore.ReadError("the workspace closed the connection")
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.s.max_request_bytes:
                raise _TooLarge
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


async def _reply(send: Any, status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class Keeper:
    """The worker's side of the socket pair: one JSON line out, one back, a request at a time."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock: asyncio.Lock | None = None
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._streams is None:
                self._streams = await asyncio.open_unix_connection(sock=self._sock, limit=MAX_REPLY)
            reader, writer = self._streams
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await reader.readline()
        if not line:
            raise BackendError("the secrets proxy's supervisor is gone")
        return json.loads(line)

    async def client(self, ip: str) -> ClientFile | None:
        reply = await self._ask({"op": "client", "ip": ip})
        return ClientFile.model_validate(reply["client"]) if reply.get("client") else None

    async def value(self, ip: str, secret: str) -> str:
        reply = await self._ask({"op": "value", "ip": ip, "secret": secret})
        if "value" not in reply:
            raise BackendError(str(reply.get("error", "the secret could not be read")))
        return str(reply["value"])

