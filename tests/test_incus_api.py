"""The Incus client against real servers on loopback: every response bounded, the pin checked on every connection.

A unix-socket HTTP server stands for a local incusd that answers with too much; a TLS server on
127.0.0.1 stands for a remote one whose second connection presents another certificate, signed
by the pinned one (so it passes the TLS chain check, and only the pin can refuse it).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from sandbox_mcp.errors import BackendError
from sandbox_mcp.runtimes.incus.api import RESPONSE_MAX, IncusClient
from sandbox_mcp.runtimes.incus.settings import IncusSettings

pytestmark = pytest.mark.anyio

_JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"


def _serve(listener: socket.socket, answer: list[bytes], wrap: list[ssl.SSLContext] | None = None) -> None:
    """Answer each connection (its request read up to the blank line) with the next of ``answer``."""
    for i, body in enumerate(answer):
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            if wrap is not None:
                conn = wrap[i].wrap_socket(conn, server_side=True)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            conn.sendall(_JSON_HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode())
            view = memoryview(body)
            for off in range(0, len(body), 1 << 20):
                conn.sendall(view[off : off + (1 << 20)])
        except OSError:
            pass  # the client hung up first (it refused the answer)
        finally:
            conn.close()


async def test_a_response_past_the_bound_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "incus.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    huge = b'{"type": "sync", "metadata": "' + b"x" * (RESPONSE_MAX + (1 << 20)) + b'"}'
    small = b'{"type": "sync", "metadata": {"ok": true}}'
    thread = threading.Thread(target=_serve, args=(listener, [huge, huge, small]), daemon=True)
    thread.start()
    try:
        async with IncusClient(IncusSettings(socket=path)) as client:
            with pytest.raises(BackendError, match=f"more than {RESPONSE_MAX} bytes"):
                await client.request("GET", "/1.0")
            tail = await client.request("GET", "/1.0/instances/x/console", raw=True)  # a log: its tail is kept
            assert len(tail) == RESPONSE_MAX and tail.endswith(b'x"}')
            assert await client.request("GET", "/1.0") == {"ok": True}  # the client is still usable
    finally:
        listener.close()
        thread.join(30)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _certs(d: Path) -> dict[str, Path]:
    """A CA (also served as the server's own certificate), a leaf it signed, and a client certificate."""
    p = {n: d / n for n in ("ca.crt", "ca.key", "leaf.csr", "leaf.crt", "leaf.key", "client.crt", "client.key")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", str(p["ca.key"]), "-out", str(p["ca.crt"]), "-days", "2",
             "-subj", "/CN=pinned", "-addext", "basicConstraints=critical,CA:TRUE")  # fmt: skip
    _openssl("req", "-new", *ec, "-keyout", str(p["leaf.key"]), "-out", str(p["leaf.csr"]), "-subj", "/CN=other")
    _openssl("x509", "-req", "-in", str(p["leaf.csr"]), "-CA", str(p["ca.crt"]), "-CAkey", str(p["ca.key"]),
             "-CAcreateserial", "-out", str(p["leaf.crt"]), "-days", "2")  # fmt: skip
    _openssl("req", "-x509", *ec, "-keyout", str(p["client.key"]), "-out", str(p["client.crt"]), "-days", "2",
             "-subj", "/CN=client")  # fmt: skip
    return p


async def test_the_pin_is_checked_on_every_connection(tmp_path: Path) -> None:
    certs = _certs(tmp_path)
    contexts = []
    for name in ("ca", "leaf"):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(certs[f"{name}.crt"]), str(certs[f"{name}.key"]))
        contexts.append(ctx)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]
    ok = b'{"type": "sync", "metadata": {"api_version": "1.0", "auth": "trusted"}}'
    thread = threading.Thread(target=_serve, args=(listener, [ok, ok], contexts), daemon=True)
    thread.start()
    settings = IncusSettings(url=f"https://127.0.0.1:{port}", client_cert=certs["client.crt"],
                             client_key=certs["client.key"], server_cert=certs["ca.crt"])  # fmt: skip
    try:
        async with IncusClient(settings) as client:
            assert (await client.server()).auth == "trusted"  # the first connection presents the pinned certificate
            # The server closed that connection; the next one presents the leaf, which the pinned
            # CA signed: TLS accepts it, the pin must not.
            with pytest.raises(BackendError, match="refusing to talk to it"):
                await client.request("GET", "/1.0")
    finally:
        listener.close()
        thread.join(30)
