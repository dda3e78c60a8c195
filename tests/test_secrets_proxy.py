"""The secrets proxy process for real, on loopback: a stand-in HTTPS service, the client on 127.0.0.1.

The proxy knows a client by its address (a client file for 127.0.0.1 here, as for a workspace's address
in the e2e test), so its rules and bounds are checked without a container: the value reaches the
upstream, a placeholder elsewhere is refused, rate, body and head bounds hold, an upstream whose
certificate does not verify is not sent anything, and nothing it logs holds a value.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import httpx2 as httpx

from sandbox_mcp import supervise
from sandbox_mcp.bench.secrets import LoopbackProxy, loopback_proxy
from sandbox_mcp.bench.standin import certificates
from sandbox_mcp.naming import SECRETS_PROXY_UID
from sandbox_mcp.secrets.files import ClientFile


def _get(lp: LoopbackProxy, path: str = "/v1/models", **headers: str) -> httpx.Response:
    return httpx.get(lp.proxy_url + path, headers={"authorization": f"Bearer {lp.placeholder}", **headers}, timeout=30)


def test_values_bodies_and_refusals(tmp_path: Path):
    bounds = {"max_request_bytes": 2048, "max_response_bytes": 1 << 20, "max_header_bytes": 4096}
    with loopback_proxy(tmp_path, bounds) as lp:
        r = _get(lp)
        assert r.status_code == 200 and "hello from the stand-in" in r.text
        if os.geteuid() == 0:  # the worker, which parses what clients send, is not root and not dumpable
            worker = supervise.children(lp.pid)[0]
            uids = next(line for line in Path(f"/proc/{worker}/status").read_text().splitlines()
                        if line.startswith("Uid:")).split()[1:]
            assert uids == [str(SECRETS_PROXY_UID)] * 4 and os.stat(f"/proc/{worker}/mem").st_uid == 0
        seen = lp.requests()
        assert seen[-1]["headers"]["authorization"] == f"Bearer {lp.value}"
        assert seen[-1]["headers"]["host"] == lp.host and seen[-1]["path"] == "/v1/models"

        # A stream (server-sent events, as the Messages API answers Claude Code) is relayed as it comes: the
        # first event arrives while the upstream still holds the second back.
        with httpx.stream("GET", lp.proxy_url + "/stream", timeout=30,
                          headers={"authorization": f"Bearer {lp.placeholder}"}) as resp:
            events = resp.iter_raw()
            first = next(events)
            assert first.startswith(b"event: one") and b"event: two" not in first
            Path(str(lp.requests_log) + ".release").touch()
            assert b"event: two" in first + b"".join(events)

        # A body goes through as it is (never searched or changed), up to the bound.
        body = b'{"placeholder-in-a-body": "' + lp.placeholder.encode() + b'"}'
        r = httpx.post(lp.proxy_url + "/v1/messages", content=body, headers={"authorization": f"Bearer {lp.placeholder}"})
        assert r.status_code == 200 and lp.requests()[-1]["body"] == body.decode()
        n = len(lp.requests())
        r = httpx.post(lp.proxy_url + "/v1/messages", content=b"x" * 4096, headers={"authorization": f"Bearer {lp.placeholder}"})
        assert r.status_code == 413

        def chunks():
            for _ in range(8):
                yield b"y" * 1024

        with _Status(413, 502) as status:  # chunked: stopped on the way
            status.response = httpx.post(lp.proxy_url + "/v1/messages", content=chunks(),
                                         headers={"authorization": f"Bearer {lp.placeholder}"})
        assert all(len(x["body"]) < 4096 for x in lp.requests()[n:])

        # A response past the bound is cut: the client never gets it whole.
        got = 0
        with contextlib.suppress(httpx.TransportError), httpx.stream(
                "GET", lp.proxy_url + f"/bytes/{4 << 20}", timeout=30,
                headers={"authorization": f"Bearer {lp.placeholder}"}) as resp:
            for chunk in resp.iter_raw():
                got += len(chunk)
        assert 0 < got < 4 << 20
        assert _get(lp).status_code == 200  # the proxy serves on

        # A head past the bound is refused by uvicorn (h11) before the application sees it.
        assert _get(lp, **{"x-big": "z" * 8000}).status_code in (400, 431)

        # Refused: a placeholder in the URL, in another header, or to a host without an endpoint.
        n = len(lp.requests())
        assert _get(lp, f"/v1/x?k={lp.placeholder}").status_code == 403
        assert _get(lp, **{"x-other": lp.placeholder}).status_code == 403
        other = lp.proxy_url.replace(lp.host, "evil.test")
        r = httpx.get(other + "/", headers={"authorization": f"Bearer {lp.placeholder}"})
        assert r.status_code == 403 and "no secret of this workspace goes to 'evil.test'" in r.text
        assert len(lp.requests()) == n

        # Another workspace (another address) with the same secret has its own placeholder: this one's is
        # nothing to it, and goes on unchanged, never as the value.
        other_ph = "sandbox-placeholder-bench-" + "0" * 32
        mine = ClientFile.model_validate_json(lp.paths.client("127.0.0.1").read_bytes())
        lp.paths.write_client("127.0.0.2", ClientFile(workspace="other", secrets=[
            mine.secrets[0].model_copy(update={"placeholder": other_ph})]))
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other_ws:
            r = other_ws.get(lp.proxy_url + "/v1/models", headers={"authorization": f"Bearer {lp.placeholder}"})
            assert r.status_code == 200 and lp.requests()[-1]["headers"]["authorization"] == f"Bearer {lp.placeholder}"
            r = other_ws.get(lp.proxy_url + "/v1/models", headers={"authorization": f"Bearer {other_ph}"})
            assert r.status_code == 200 and lp.requests()[-1]["headers"]["authorization"] == f"Bearer {lp.value}"

        # An address that is no workspace with secrets gets nothing.
        lp.paths.remove_client("127.0.0.1")
        assert _get(lp).status_code == 403
        log = lp.proxy_log.read_text()
    assert '"event": "refused"' in log and '"secret": "bench"' in log and "in the URL" in log
    assert lp.value not in log and "Traceback" not in log  # every failure is one scrubbed line


class _Status:
    """A context whose ``response`` must have one of ``codes`` (or the connection was cut: also a refusal)."""

    def __init__(self, *codes: int) -> None:
        self.codes = codes
        self.response: httpx.Response | None = None

    def __enter__(self) -> _Status:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> bool:
        if exc is not None:
            return isinstance(exc, httpx.TransportError)
        assert self.response is not None and self.response.status_code in self.codes, self.response
        return False


def test_rate_limit_per_workspace_and_a_bounded_log(tmp_path: Path):
    with loopback_proxy(tmp_path, {"rate_per_s": 0.01, "burst": 3}, log_max_bytes=400) as lp:
        codes = [_get(lp).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert len(lp.requests()) == 3
        logs = [lp.proxy_log, lp.proxy_log.with_name("proxy.log.1")]
        # Moved aside past 400 bytes: the two files hold the last lines, neither grows past the bound
        # by more than one write.
        assert all(p.stat().st_size < 400 + 4096 for p in logs)
        assert '"event": "limited"' in "".join(p.read_text() for p in logs)


def test_upstream_tls_is_verified(tmp_path: Path):
    other_ca, _, _ = certificates(tmp_path / "other", ["someone.else"])
    with loopback_proxy(tmp_path / "run", ca_bundle=other_ca) as lp:
        r = _get(lp)
        assert r.status_code == 502 and "CERTIFICATE_VERIFY_FAILED" in r.text
        assert lp.requests() == []
        assert lp.value not in lp.proxy_log.read_text() and lp.value not in r.text
