"""The secrets section of ``sandbox-mcp bench``: what the secrets proxy adds to a request, on loopback.

A stand-in HTTPS service (:mod:`.standin`) and the real proxy process (``python -m
sandbox_mcp.secrets.proxy``) both on 127.0.0.1, the client there too (the proxy knows it by a client file
for 127.0.0.1, as it knows a workspace by its address). The same requests go directly (HTTPS, TLS
verified, keep-alive) and through the proxy (HTTP to it, HTTPS on from it, a bearer placeholder
replaced), interleaved: the latency of a small request and the throughput of a large download, and the
ratios. :func:`loopback_proxy` is also what tests/test_secrets_proxy.py drives.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx

from ..secrets.files import ClientFile, ClientSecret, ProxyConfig, ProxyPaths
from ..secrets.settings import SecretSpec, SecretsProxySettings
from .standin import SERVER, certificates

__all__ = ["LoopbackProxy", "format_secrets", "loopback_proxy", "run_secrets_bench"]

NAME = "bench.test"
VALUE_ENV = "SANDBOX_MCP_BENCH_SECRET"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not start listening on 127.0.0.1:{port}")


@dataclass
class LoopbackProxy:
    """The running pair: where each is, the placeholder and the value, the files they write."""

    proxy_url: str  # http://127.0.0.1:P/bench.test:U
    direct_url: str  # https://127.0.0.1:U
    host: str  # bench.test:U, the secret's host
    ca: Path
    placeholder: str
    value: str
    proxy_log: Path
    requests_log: Path
    paths: ProxyPaths
    pid: int  # the supervisor's

    def requests(self) -> list[dict[str, Any]]:
        """What the stand-in received."""
        text = self.requests_log.read_text() if self.requests_log.exists() else ""
        return [json.loads(line) for line in text.splitlines()]


@contextlib.contextmanager
def loopback_proxy(work: Path, proxy: dict[str, Any] | None = None, spec: dict[str, Any] | None = None,
                   ca_bundle: Path | None = None, log_max_bytes: int = 16 << 20) -> Iterator[LoopbackProxy]:
    """Start the stand-in and the proxy (its settings updated with ``proxy``, the secret's with ``spec``;
    ``ca_bundle`` replaces the stand-in's CA as what upstreams are verified against); both end afterwards."""
    work.mkdir(parents=True, exist_ok=True)
    ca, cert, key = certificates(work, [NAME], ["127.0.0.1"])
    up, pp = _free_port(), _free_port()
    host = f"{NAME}:{up}"
    value, placeholder = f"bench-value-{os.urandom(12).hex()}", f"sandbox-placeholder-bench-{os.urandom(16).hex()}"
    requests_log = work / "requests.jsonl"
    paths = ProxyPaths(work / "proxy")
    paths.make()
    settings = SecretsProxySettings(port=pp, ca_bundle=ca_bundle or ca, resolve={NAME: "127.0.0.1"},
                                    **{"rate_per_s": 100000, "burst": 100000, **(proxy or {})})
    paths.config.write_text(ProxyConfig(listen="127.0.0.1", settings=settings,
                                        log_max_bytes=log_max_bytes).model_dump_json())
    secret = SecretSpec(source=f"env:{VALUE_ENV}", hosts=[host], **{"send": "bearer", **(spec or {})})
    paths.write_client("127.0.0.1", ClientFile(workspace="bench", secrets=[
        ClientSecret(name="bench", placeholder=placeholder, spec=secret)]))
    procs: list[subprocess.Popen[Any]] = []
    try:
        standin = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(cert), str(key), str(requests_log), str(work), "-",
             json.dumps({NAME: f"127.0.0.1:{up}"})],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        procs.append(standin)
        _wait_listening(up, standin, "the stand-in")
        with open(paths.log, "wb") as log:
            proxy_proc = subprocess.Popen([sys.executable, "-m", "sandbox_mcp.secrets.supervisor", str(paths.root)],
                                          stdout=log, stderr=subprocess.STDOUT, env={**os.environ, VALUE_ENV: value})
        procs.append(proxy_proc)
        _wait_listening(pp, proxy_proc, "the secrets proxy")
        yield LoopbackProxy(proxy_url=f"http://127.0.0.1:{pp}/{host}", direct_url=f"https://127.0.0.1:{up}",
                            host=host, ca=ca, placeholder=placeholder, value=value, proxy_log=paths.log,
                            requests_log=requests_log, paths=paths, pid=proxy_proc.pid)
    finally:
        for proc in reversed(procs):  # the proxy first: SIGTERM ends its worker with it
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _time_get(client: httpx.Client, url: str, headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    r = client.get(url, headers=headers)
    r.raise_for_status()
    return (time.perf_counter() - t0) * 1000


def _download_mib_s(client: httpx.Client, url: str, headers: dict[str, str], size: int) -> float:
    t0 = time.perf_counter()
    got = 0
    with client.stream("GET", url, headers=headers) as r:
        r.raise_for_status()
        for chunk in r.iter_raw():
            got += len(chunk)
    if got != size:
        raise RuntimeError(f"downloaded {got} of {size} bytes")
    return size / (1 << 20) / (time.perf_counter() - t0)


def run_secrets_bench(requests: int = 300, mib: int = 64) -> dict[str, dict[str, float]]:
    """The figures: small-request latency (ms) and download throughput (MiB/s), direct and through the proxy."""
    work = Path(tempfile.mkdtemp(prefix="sandbox-mcp-bench-secrets-"))
    try:
        with loopback_proxy(work) as lp:
            ctx = ssl.create_default_context(cafile=str(lp.ca))
            auth_direct = {"authorization": f"Bearer {lp.value}"}
            auth_proxy = {"authorization": f"Bearer {lp.placeholder}"}
            direct_ms, proxy_ms = [], []
            with httpx.Client(verify=ctx, timeout=60) as direct, httpx.Client(timeout=60) as via:
                for _ in range(20):  # warm both paths' connections
                    _time_get(direct, lp.direct_url + "/v1/models", auth_direct)
                    _time_get(via, lp.proxy_url + "/v1/models", auth_proxy)
                for _ in range(requests):
                    direct_ms.append(_time_get(direct, lp.direct_url + "/v1/models", auth_direct))
                    proxy_ms.append(_time_get(via, lp.proxy_url + "/v1/models", auth_proxy))
                size = mib << 20
                d_rates, p_rates = [], []
                for _ in range(3):
                    d_rates.append(_download_mib_s(direct, f"{lp.direct_url}/bytes/{size}", auth_direct, size))
                    p_rates.append(_download_mib_s(via, f"{lp.proxy_url}/bytes/{size}", auth_proxy, size))
        d50, p50 = statistics.median(direct_ms), statistics.median(proxy_ms)
        d_rate, p_rate = statistics.median(d_rates), statistics.median(p_rates)
        return {
            "secrets_proxy_request_ms": {
                "direct_p50": d50, "proxy_p50": p50, "added_p50": p50 - d50,
                "direct_p95": statistics.quantiles(direct_ms, n=20)[18],
                "proxy_p95": statistics.quantiles(proxy_ms, n=20)[18], "proxy_over_direct_p50": p50 / d50,
                "requests": float(requests),
            },
            "secrets_proxy_download_mib_s": {
                "direct": d_rate, "proxy": p_rate, "proxy_over_direct": p_rate / d_rate, "mib": float(mib),
            },
        }
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def format_secrets(results: dict[str, dict[str, float]]) -> str:
    """The figures as the bench prints them."""
    lat, thr = results["secrets_proxy_request_ms"], results["secrets_proxy_download_mib_s"]
    return "\n".join([
        "secrets proxy (loopback: a stand-in HTTPS service, the same requests direct and through the proxy)",
        f"  small GET, ms        direct p50 {lat['direct_p50']:.2f}  proxy p50 {lat['proxy_p50']:.2f}  "
        f"added {lat['added_p50']:.2f}  (p95 {lat['direct_p95']:.2f} / {lat['proxy_p95']:.2f}; "
        f"x{lat['proxy_over_direct_p50']:.2f}, {int(lat['requests'])} requests each)",
        f"  download {int(thr['mib'])} MiB     direct {thr['direct']:.0f} MiB/s  proxy {thr['proxy']:.0f} MiB/s  "
        f"(x{thr['proxy_over_direct']:.2f})",
    ])
