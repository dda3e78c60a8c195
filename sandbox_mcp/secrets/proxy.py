"""The secrets proxy: a host process that sends requests on to the real services with the real values.

Run as ``python -m sandbox_mcp.secrets.proxy STATE`` (``STATE`` = ``<state>/.server/secrets-proxy``) by
:mod:`sandbox_mcp.secrets.service`. It listens on the bridge's host address; a workspace calls
``http://<host ip>:<port>/<host>/<path>`` (its ``ANTHROPIC_BASE_URL``, git's rewritten URLs), and the
proxy sends ``https://<host>/<path>`` on with the placeholders in its headers replaced
(:mod:`.rewrite`), over TLS verified against the system's store (or ``ca_bundle``).

The HTTP parts are libraries': uvicorn (h11) parses what workspaces send, httpcore (httpx's transport)
speaks to the upstreams; this module is the ASGI application between them. Per workspace (by source
address, which the firewall ties to its port) it keeps a token bucket (``rate_per_s``, ``burst``) and a
slot count (``max_requests``); the firewall bounds its connections. Bodies are bounded both ways.

The process started is a small supervisor that forks the worker and starts it again when it dies (the
worker dies with it: PR_SET_PDEATHSIG). Its log says what was forwarded or refused; never a value (error
texts are scrubbed of every value read, in case a library quotes a header).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpcore2 as httpcore

from ..errors import BackendError
from .files import ClientFile, ProxyConfig, ProxyPaths
from .rewrite import HOP_BY_HOP, Refused, WorkspaceSecret, rewrite_headers
from .settings import SecretsProxySettings, read_value, split_host

__all__ = ["ProxyApp", "main"]

_PR_SET_PDEATHSIG = 1


def _log(event: str, **fields: Any) -> None:
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

    def __init__(self, paths: ProxyPaths, settings: SecretsProxySettings) -> None:
        self.paths = paths
        self.s = settings
        ctx = ssl.create_default_context(cafile=str(settings.ca_bundle) if settings.ca_bundle else None)
        self.pool = httpcore.AsyncConnectionPool(
            ssl_context=ctx, network_backend=_Resolving(settings.resolve), max_connections=512,
            max_keepalive_connections=64, keepalive_expiry=30,
        )
        self._clients: dict[str, tuple[tuple[int, int], ClientFile]] = {}
        self._shares: dict[str, _Share] = {}
        self._values: set[str] = set()  # every value read, to scrub from error texts

    # The workspace ---------------------------------------------------------------------------------

    def _client(self, ip: str) -> ClientFile | None:
        path = self.paths.client(ip)
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            self._clients.pop(ip, None)
            return None
        key = (st.st_mtime_ns, st.st_size)
        cached = self._clients.get(ip)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            client = ClientFile.model_validate_json(path.read_bytes())
        except (OSError, ValueError):
            return None
        self._clients[ip] = (key, client)
        return client

    def _share(self, ip: str) -> _Share:
        share = self._shares.get(ip)
        if share is None:
            share = self._shares[ip] = _Share(tokens=float(self.s.burst), slots=anyio.Semaphore(self.s.max_requests))
        return share

    def _value(self, s: WorkspaceSecret) -> str:
        value = read_value(s.name, s.spec)
        self._values.add(value)
        return value

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
        client = self._client(peer) if peer != "?" else None
        if client is None:
            _log("refused", peer=peer, reason="not a workspace with secrets")
            await _reply(send, 403, "this address is not a workspace with secrets\n")
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        host, _, rest = raw.lstrip(b"/").partition(b"/")
        host_text = host.decode("latin-1").lower()
        target = b"/" + rest + (b"?" + scope["query_string"] if scope.get("query_string") else b"")
        fields = {"ws": client.workspace, "method": scope["method"], "host": host_text}
        if host_text not in client.hosts:
            _log("refused", **fields, reason="no endpoint for this host")
            await _reply(send, 403, f"no secret of this workspace goes to {host_text!r}; endpoints: "
                                    f"{', '.join(sorted(client.hosts))}\n")
            return
        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) + len(raw) > self.s.max_header_bytes:
            # h11 bounds a head that arrives in pieces; one that came whole is measured here.
            _log("refused", **fields, reason="request head too large")
            await _reply(send, 431, f"request head larger than {self.s.max_header_bytes} bytes\n")
            return
        share = self._share(peer)
        if not share.take(self.s.rate_per_s, self.s.burst):
            _log("limited", **fields, reason="rate")
            await _reply(send, 429, "too many requests from this workspace; slow down\n", [(b"retry-after", b"1")])
            return
        secrets = [WorkspaceSecret(s.name, s.placeholder, s.spec) for s in client.secrets]
        async with share.slots:
            try:
                headers = rewrite_headers(host_text, target, scope["headers"], secrets, self._value)
            except Refused as exc:
                _log("refused", **fields, secret=exc.secret, reason=exc.reason)
                await _reply(send, 403, f"refused by the sandbox secrets proxy: {exc.reason}\n")
                return
            except BackendError as exc:
                _log("error", **fields, reason=str(exc))
                await _reply(send, 502, f"{exc}\n")
                return
            status, sent = await self._forward(scope, receive, send, host_text, target, headers)
        _log("forwarded", **fields, status=status, response_bytes=sent, ms=round((time.monotonic() - started) * 1000))

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
            _log("upstream-error", host=host, reason=reason)
            await _reply(send, 502, f"cannot reach https://{host}/: {reason}\n")
            return 502, 0
        sent = 0
        try:
            await send({"type": "http.response.start", "status": response.status,
                        "headers": [(k, v) for k, v in response.headers if k.lower() not in HOP_BY_HOP]})
            async for chunk in response.aiter_stream():
                sent += len(chunk)
                if sent > self.s.max_response_bytes:
                    _log("cut", host=host, reason=f"response past {self.s.max_response_bytes} bytes")
                    raise _TooLarge  # uvicorn closes the connection: the client sees a cut response
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            _log("upstream-error", host=host, reason=self._scrub(f"{type(exc).__name__}: {exc}"))
            raise
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


def _serve(paths: ProxyPaths, config: ProxyConfig) -> None:
    import uvicorn

    s = config.settings
    server = uvicorn.Server(uvicorn.Config(
        ProxyApp(paths, s), host=config.listen, port=s.port, http="h11", loop="asyncio", lifespan="on",
        access_log=False, server_header=False, date_header=False, proxy_headers=False, log_level="warning",
        h11_max_incomplete_event_size=s.max_header_bytes, limit_concurrency=max(64, 4 * s.max_connections),
        timeout_keep_alive=30, timeout_graceful_shutdown=3,
    ))
    server.run()


def main(argv: list[str] | None = None) -> int:
    """Supervise the worker: fork it, and fork it again when it dies, until SIGTERM or SIGINT."""
    argv = sys.argv[1:] if argv is None else argv
    paths = ProxyPaths(Path(argv[0]))
    config = ProxyConfig.model_validate_json(paths.config.read_bytes())
    stopping = False
    child = 0

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    parent = os.getpid()
    backoff = 0.2
    while not stopping:
        started = time.monotonic()
        child = os.fork()
        if child == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:
                os._exit(1)
            try:
                _serve(paths, config)
            finally:
                os._exit(0)
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        child = 0
        if stopping:
            break
        _log("worker-exited", status=status, restart_in_s=backoff)
        time.sleep(backoff)
        backoff = 0.2 if time.monotonic() - started > 10 else min(backoff * 2, 5.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
