"""A small client of the Incus REST API: the local unix socket, or a remote server over pinned TLS.

Why httpx2 (httpx's maintained successor, imported as ``httpx``) and not pylxd: it is already
installed (the MCP SDK 2.x depends on it, so it adds nothing to install), speaks HTTP over a unix
socket and HTTPS with a client certificate, and is async, so a slow Incus operation never blocks
the event loop. pylxd is synchronous, targets LXD (its Incus support lags), and pulls in
requests, requests-unixsocket and ws4py for what is here ~250 lines. This is the only module
importing it.

Remote servers are trusted by pinning: the server's certificate (``server_cert``) is the only
trust anchor of the TLS context, and the DER SHA-256 of the certificate the peer actually
presents is compared with it on every response, before its body is read, so every connection
the client opens is checked, not only the first (and by ``doctor``). Host names are not
checked: the pin is stronger than a name, and cluster members are often reached by address.

Every response body is read with a bound (``RESPONSE_MAX``): a JSON answer past it is an
error, and a raw one (the console log) keeps its last ``RESPONSE_MAX`` bytes, so a remote
server, or an instance filling its console, cannot make the server run out of memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import httpx2 as httpx

from ...errors import BackendError, InvalidSpec
from .settings import IncusSettings

__all__ = [
    "RESPONSE_MAX",
    "IncusAPIError",
    "IncusClient",
    "ServerInfo",
    "call_sync",
    "cert_fingerprint",
    "probe",
]

_LOCAL_BASE = "http://incus"
_REQUEST_TIMEOUT_S = 60.0
_UPLOAD_CHUNK = 1 << 20
RESPONSE_MAX = 32 << 20  # bytes of one response body kept (a JSON answer past it is refused)


class IncusAPIError(BackendError):
    """Incus answered with an error; ``status`` is its HTTP status (404: no such object)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServerInfo:
    """What ``GET /1.0`` says about the server, and the certificate it presented (remote)."""

    api_version: str
    server_version: str
    auth: str
    idmapped_mounts: bool
    peer_cert_sha256: str | None

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], peer_cert_sha256: str | None) -> ServerInfo:
        """Read ``GET /1.0``'s metadata (fields the server leaves out read as empty/false)."""
        env = meta.get("environment") or {}
        return cls(
            api_version=str(meta.get("api_version", "")),
            server_version=str(env.get("server_version", "")),
            auth=str(meta.get("auth", "")),
            idmapped_mounts=(env.get("kernel_features") or {}).get("idmapped_mounts") == "true",
            peer_cert_sha256=peer_cert_sha256,
        )


def cert_fingerprint(pem_path: Path) -> str:
    """SHA-256 of a PEM certificate's DER form, as hex (what ``incus config trust list`` shows).

    Raises:
        InvalidSpec: the file cannot be read or holds no certificate.
    """
    try:
        der = ssl.PEM_cert_to_DER_cert(Path(pem_path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidSpec(
            f"cannot read the certificate {pem_path}: {exc}; set server_cert in [runtimes.incus] to a PEM file"
        ) from exc
    return hashlib.sha256(der).hexdigest()


def _ssl_context(settings: IncusSettings) -> ssl.SSLContext:
    assert settings.server_cert and settings.client_cert and settings.client_key
    try:
        ctx = ssl.create_default_context(cafile=str(settings.server_cert))
        ctx.check_hostname = False  # the certificate is pinned; see the module docstring
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(str(settings.client_cert), str(settings.client_key))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidSpec(
            f"cannot load the Incus TLS files ({settings.client_cert}, {settings.client_key}, "
            f"{settings.server_cert}): {exc}; check client_cert, client_key and server_cert in [runtimes.incus]"
        ) from exc
    return ctx


def _client_args(settings: IncusSettings) -> dict[str, Any]:
    if settings.url:
        return {"base_url": settings.url.rstrip("/"), "verify": _ssl_context(settings)}
    return {"base_url": _LOCAL_BASE, "transport": httpx.AsyncHTTPTransport(uds=str(settings.socket))}


def _where(settings: IncusSettings) -> str:
    return settings.url or f"the local Incus daemon ({settings.socket})"


def _unwrap(method: str, path: str, response: httpx.Response, body_bytes: bytes | None = None) -> dict[str, Any]:
    """The JSON envelope of ``response`` (its body as read with a bound: ``body_bytes``); IncusAPIError for an error."""
    raw = response.content if body_bytes is None else body_bytes
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if response.status_code >= 400 or body.get("type") == "error":
        status = int(body.get("error_code") or response.status_code)
        text = raw[:300].decode("utf-8", "replace")
        raise IncusAPIError(f"Incus {method} {path} failed ({status}): {body.get('error') or text}", status)
    return body


def _peer_sha256(response: httpx.Response) -> str | None:
    stream = response.extensions.get("network_stream")
    ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
    der = ssl_object.getpeercert(True) if ssl_object is not None else None
    return hashlib.sha256(der).hexdigest() if der else None


class IncusClient:
    """An async Incus API client for one server and project. Use ``async with`` or call :meth:`aclose`."""

    def __init__(self, settings: IncusSettings) -> None:
        self.settings = settings
        self.remote = bool(settings.url)
        self._pin = cert_fingerprint(settings.server_cert) if settings.url and settings.server_cert else None
        self._pinned = False
        self._http = httpx.AsyncClient(timeout=_REQUEST_TIMEOUT_S, **_client_args(settings))

    async def __aenter__(self) -> IncusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def _send(self, method: str, path: str, *, params: dict[str, str] | None = None,
                    timeout_s: float | None = None, raw: bool = False, **kwargs: Any) -> tuple[httpx.Response, bytes]:
        """The response and its body, read with a bound (``raw``: the last RESPONSE_MAX bytes are kept).

        Raises:
            BackendError: the server cannot be reached, presented another certificate than the pin, or sent a
                JSON body over RESPONSE_MAX.
        """
        query = {"project": self.settings.project, **(params or {})}
        try:
            request = self._http.build_request(
                method, path, params=query, timeout=timeout_s or _REQUEST_TIMEOUT_S, **kwargs
            )
            response = await self._http.send(request, stream=True)
            try:
                self._check_pin(response)  # before a byte of the body is read, on every connection's answers
                body = await _read_bounded(response, method, path, keep_tail=raw)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise BackendError(
                f"cannot reach {_where(self.settings)} ({method} {path}): {exc!r}; is incusd running, "
                "and are the incus settings right? run 'sandbox-mcp doctor'"
            ) from exc
        return response, body

    def _check_pin(self, response: httpx.Response) -> None:
        if not self._pin:
            return
        seen = _peer_sha256(response)
        if seen != self._pin:
            raise BackendError(
                f"{self.settings.url} presented certificate {seen} but {self.settings.server_cert} pins "
                f"{self._pin}; refusing to talk to it. If the server's certificate changed on purpose, "
                "replace server_cert in [runtimes.incus]"
            )
        self._pinned = True

    async def request(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        """One API call in the configured project; the envelope's ``metadata`` (or, with ``raw``, the body:
        its last RESPONSE_MAX bytes).

        Keyword arguments: ``json``, ``content``, ``headers``, ``params``, ``timeout_s``.

        Raises:
            IncusAPIError: Incus refused (``status`` says why; 404 for a missing object).
            BackendError: the server cannot be reached, presented another certificate than the pin, or
                answered with more than RESPONSE_MAX bytes of JSON.
        """
        response, body = await self._send(method, path, raw=raw, **kwargs)
        if raw and response.status_code < 400:
            return body
        return _unwrap(method, path, response, body).get("metadata")

    async def call(self, method: str, path: str, *, op_timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Like :meth:`request`, and when Incus answers with an operation, wait for it; its metadata.

        Raises:
            IncusAPIError, BackendError: as :meth:`request`, or the operation failed or timed out.
        """
        response, raw = await self._send(method, path, **kwargs)
        body = _unwrap(method, path, response, raw)
        if body.get("type") == "async":
            return await self.wait(body["operation"], op_timeout_s or self.settings.operation_timeout_s)
        return body.get("metadata")

    async def wait(self, operation: str, timeout_s: float) -> dict[str, Any]:
        """Wait for an operation (``/1.0/operations/ID``) to finish; its metadata.

        Raises:
            IncusAPIError: the operation failed (its error), or did not finish within ``timeout_s``.
        """
        op_id = operation.rstrip("/").rsplit("/", 1)[-1]
        path = f"/1.0/operations/{quote(op_id, safe='')}/wait"
        meta = await self.request(
            "GET", path, params={"timeout": str(max(1, int(timeout_s)))}, timeout_s=timeout_s + 30
        )
        status = (meta or {}).get("status")
        if status == "Success":
            return meta.get("metadata") or {}
        if status in ("Running", "Pending"):
            raise IncusAPIError(f"Incus operation {meta.get('description')!r} did not finish within {timeout_s:g} s")
        raise IncusAPIError(f"Incus operation {meta.get('description')!r} failed: {meta.get('err') or status}")

    # -- the calls the runtime makes -----------------------------------------------------------

    async def server(self) -> ServerInfo:
        """``GET /1.0``: versions, whether we are trusted, what the kernel offers.

        Raises:
            BackendError: the server cannot be reached or the pin does not match.
        """
        meta = await self.request("GET", "/1.0")
        return ServerInfo.from_metadata(meta, self._pin if self._pinned else None)

    async def exists(self, path: str) -> bool:
        """True when ``GET path`` finds the object.

        Raises:
            IncusAPIError: any error other than 404. BackendError: the server cannot be reached.
        """
        try:
            await self.request("GET", path)
        except IncusAPIError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def import_image(self, tarball: Path, progress: Any = None) -> str:
        """Upload a unified image tarball; the fingerprint Incus gives it.

        ``progress(message, fraction)`` hears about the upload as it goes.

        Raises:
            IncusAPIError: Incus refused the image. BackendError: the server cannot be reached.
        """
        size = os.path.getsize(tarball)

        async def chunks() -> AsyncIterator[bytes]:
            sent, reported = 0, -1
            async with await anyio.open_file(tarball, "rb") as f:
                while chunk := await f.read(_UPLOAD_CHUNK):
                    sent += len(chunk)
                    tenth = sent * 10 // max(size, 1)
                    if progress is not None and tenth != reported:
                        reported = tenth
                        await progress(f"uploading the image to Incus ({sent >> 20} of {size >> 20} MiB)",
                                       0.9 * sent / max(size, 1))
                    yield chunk

        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        meta = await self.call("POST", "/1.0/images", content=chunks(), headers=headers)
        return str(meta.get("fingerprint", ""))

    async def push_file(self, instance: str, path: str, data: bytes, *, uid: int = 0, gid: int = 0,
                        mode: int = 0o644) -> None:
        """Write a file into an instance (stopped or running), creating or replacing it.

        Raises:
            IncusAPIError: Incus refused (e.g. the parent directory is missing).
        """
        headers = {
            "X-Incus-uid": str(uid), "X-Incus-gid": str(gid), "X-Incus-mode": f"{mode:04o}",
            "X-Incus-type": "file", "X-Incus-write": "overwrite", "Content-Type": "application/octet-stream",
        }  # fmt: skip
        await self.request("POST", f"/1.0/instances/{quote(instance, safe='')}/files",
                           params={"path": path}, content=data, headers=headers)

    async def make_dir(self, instance: str, path: str, *, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
        """Create a directory in an instance (its parent must exist); an existing one is left as it is.

        Raises:
            IncusAPIError: Incus refused.
        """
        headers = {"X-Incus-uid": str(uid), "X-Incus-gid": str(gid), "X-Incus-mode": f"{mode:04o}",
                   "X-Incus-type": "directory"}
        await self.request("POST", f"/1.0/instances/{quote(instance, safe='')}/files",
                           params={"path": path}, content=b"", headers=headers)


async def _read_bounded(response: httpx.Response, method: str, path: str, *, keep_tail: bool) -> bytes:
    """``response``'s body, at most RESPONSE_MAX bytes of it.

    Raises:
        BackendError: the body is longer and not ``keep_tail`` (then its last RESPONSE_MAX bytes are returned).
    """
    buf = bytearray()
    async for chunk in response.aiter_bytes():
        buf += chunk
        if len(buf) > RESPONSE_MAX:
            if not keep_tail:
                raise BackendError(f"Incus answered {method} {path} with more than {RESPONSE_MAX} bytes; refusing "
                                   "to read it (is this an Incus server?)")
            del buf[: len(buf) - RESPONSE_MAX]
    return bytes(buf)


def probe(settings: IncusSettings, timeout_s: float = 10.0) -> ServerInfo:
    """``GET /1.0`` synchronously, for ``doctor`` (checks are plain functions, maybe inside an event loop).

    Raises:
        BackendError: the server cannot be reached, refused, or presented another certificate than the pin.
        InvalidSpec: the TLS files cannot be loaded.
    """
    if settings.url:
        args: dict[str, Any] = {"base_url": settings.url.rstrip("/"), "verify": _ssl_context(settings)}
    else:
        args = {"base_url": _LOCAL_BASE, "transport": httpx.HTTPTransport(uds=str(settings.socket))}
    try:
        with httpx.Client(timeout=timeout_s, **args) as http:
            with http.stream("GET", "/1.0", params={"project": settings.project}) as response:
                seen = _peer_sha256(response)
                if settings.url and settings.server_cert and seen != cert_fingerprint(settings.server_cert):
                    raise BackendError(f"{settings.url} presented certificate {seen}, but [runtimes.incus] server_cert pins "
                                       f"{cert_fingerprint(settings.server_cert)}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > RESPONSE_MAX:
                        raise BackendError(f"{_where(settings)} answered GET /1.0 with more than {RESPONSE_MAX} bytes")
            meta = _unwrap("GET", "/1.0", response, bytes(body)).get("metadata") or {}
    except httpx.HTTPError as exc:
        raise BackendError(f"cannot reach {_where(settings)}: {exc!r}; is incusd running?") from exc
    if settings.url and settings.server_cert:
        pin = cert_fingerprint(settings.server_cert)
        if seen != pin:
            raise BackendError(f"{settings.url} presented certificate {seen}, but [runtimes.incus] server_cert pins "
                               f"{pin}")
    return ServerInfo.from_metadata(meta, seen)


def call_sync(settings: IncusSettings, method: str, path: str, body: Any = None, timeout_s: float = 120) -> Any:
    """One blocking API call on the local socket, waiting for its operation; its metadata.

    For set-up code outside an event loop (the private test/bench daemon), not for the server.

    Raises:
        IncusAPIError: Incus refused, or the operation failed. BackendError: the daemon cannot be reached.
    """
    transport = httpx.HTTPTransport(uds=str(settings.socket))
    try:
        with httpx.Client(transport=transport, base_url=_LOCAL_BASE, timeout=timeout_s) as http:
            body_out = _unwrap(method, path, http.request(method, path, json=body))
            if body_out.get("type") != "async":
                return body_out.get("metadata")
            op = str(body_out["operation"])
            meta = _unwrap("GET", op, http.get(f"{op}/wait", params={"timeout": str(int(timeout_s))}))
    except httpx.HTTPError as exc:
        raise BackendError(f"cannot reach {_where(settings)}: {exc!r}") from exc
    meta = meta.get("metadata") or {}
    if meta.get("status") != "Success":
        raise IncusAPIError(f"Incus operation {meta.get('description')!r} failed: {meta.get('err')}")
    return meta.get("metadata")
