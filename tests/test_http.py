"""The HTTP transport's lock, against a real `sandbox-mcp serve --http` on 127.0.0.1 and a real HTTP client.

No container is needed: the calls made through the session fail validation or list an empty
registry, so these run anywhere (the server itself only opens its state dir and client key).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from sandbox_mcp import http_auth
from sandbox_mcp.config import Settings
from sandbox_mcp.errors import InvalidSpec

pytestmark = pytest.mark.anyio

_READY = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
_INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}
_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_MCP_")}
    env.update(SANDBOX_MCP_STATE_DIR=str(tmp_path / "state"), SANDBOX_MCP_MODE="direct",
               SANDBOX_MCP_BRIDGE="sbxh-br", SANDBOX_MCP_CONFIG="/nonexistent", SANDBOX_MCP_HOSTS_FILE="",
               SANDBOX_MCP_DAEMON_SOCKET=str(tmp_path / "no-daemon.sock"), **extra)  # fmt: skip
    return env


@dataclass
class HttpServer:
    proc: subprocess.Popen[str]
    url: str
    banner: str


def _start(tmp_path: Path, *args: str, **env: str) -> HttpServer:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandbox_mcp", "serve", "--http", "--port", "0", *args],
        env=_env(tmp_path, **env), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    banner = []
    assert proc.stderr is not None
    for line in proc.stderr:  # wait for the readiness line, however long start-up takes
        banner.append(line)
        if m := _READY.search(line):
            return HttpServer(proc, f"http://127.0.0.1:{m.group(1)}/mcp", "".join(banner))
    proc.wait()
    raise AssertionError(f"server exited with {proc.returncode} before listening:\n{''.join(banner)}")


def _stop(server: HttpServer) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGINT)
        try:
            server.proc.wait(20)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture
def generated(tmp_path: Path) -> Iterator[HttpServer]:
    """A server that generated its own token into the state dir."""
    s = _start(tmp_path)
    try:
        yield s
    finally:
        _stop(s)


async def _post(url: str, headers: dict[str, str]) -> httpx2.Response:
    async with httpx2.AsyncClient() as http:
        return await http.post(url, json=_INIT, headers={**_HEADERS, **headers})


async def test_generated_token_file_and_401s(generated: HttpServer, tmp_path: Path) -> None:
    token_file = tmp_path / "state" / ".server" / "http-token"
    assert str(token_file) in generated.banner  # its path is printed at start
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in generated.banner

    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": f"Basic {token}"},
                    {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Bearer {token[:-1]}"}):
        r = await _post(generated.url, headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = await _post(generated.url, {"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text


async def test_an_mcp_session_with_the_token(generated: HttpServer, tmp_path: Path) -> None:
    token = (tmp_path / "state" / ".server" / "http-token").read_text().strip()
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(generated.url, http_client=http)) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert {"create_workspace", "exec", "destroy_workspace"} <= tools
        r = await client.call_tool("list_workspaces", {})
        assert r.structured_content["workspaces"] == []  # type: ignore[index]
        r = await client.call_tool("workspace_status", {"name": "ghost"})
        assert r.is_error and "list_workspaces" in r.content[0].text  # type: ignore[union-attr]


async def test_sigint_ends_the_server_with_a_session_open(generated: HttpServer, tmp_path: Path) -> None:
    """An open session (its event stream too) does not hold the server up: SIGINT, as Ctrl-C or a client
    sends it, runs the lifespan's shutdown (the manager closes) and the process ends."""
    token = (tmp_path / "state" / ".server" / "http-token").read_text().strip()
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
    async with http, Client(streamable_http_client(generated.url, http_client=http)) as client:
        await client.list_tools()
        generated.proc.send_signal(signal.SIGINT)
        # A hang detector, not a timing: uvicorn's default waits for open requests for ever.
        generated.proc.wait(60)
    assert generated.proc.stderr is not None
    log = generated.proc.stderr.read()
    assert "Application shutdown complete" in log, log


async def test_host_and_origin_are_checked(generated: HttpServer, tmp_path: Path) -> None:
    token = (tmp_path / "state" / ".server" / "http-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    r = await _post(generated.url, {**auth, "Host": "evil.example:80"})
    assert r.status_code == 421
    r = await _post(generated.url, {**auth, "Origin": "http://evil.example"})
    assert r.status_code == 403
    r = await _post(generated.url, {**auth, "Origin": generated.url.rsplit("/", 1)[0]})
    assert r.status_code == 200


async def test_explicit_token_from_the_environment(tmp_path: Path) -> None:
    token = "an-explicit-token-0123456789"
    s = _start(tmp_path, SANDBOX_MCP_HTTP_TOKEN=token)
    try:
        assert "SANDBOX_MCP_HTTP_TOKEN" in s.banner and token not in s.banner
        assert not (tmp_path / "state" / ".server" / "http-token").exists()
        assert (await _post(s.url, {})).status_code == 401
        assert (await _post(s.url, {"Authorization": f"Bearer {token}"})).status_code == 200
    finally:
        _stop(s)


def test_non_loopback_without_explicit_token_refuses_to_start(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "192.0.2.7", "::"):
        r = subprocess.run(
            [sys.executable, "-m", "sandbox_mcp", "serve", "--http", "--host", host, "--port", "0"],
            env=_env(tmp_path), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert f"refusing to serve HTTP on {host}" in r.stderr and "SANDBOX_MCP_HTTP_TOKEN" in r.stderr
        assert "Uvicorn running" not in r.stderr


def test_token_rules(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "s")
    first = http_auth.load_token(settings)
    assert not first.explicit and first.path == tmp_path / "s" / ".server" / "http-token"
    assert http_auth.load_token(settings).value == first.value  # reused, not regenerated
    assert first.value not in repr(first)
    os.chmod(first.path, 0o644)  # type: ignore[arg-type]
    with pytest.raises(InvalidSpec, match="0600"):
        http_auth.load_token(settings)
    first.path.unlink()  # type: ignore[union-attr]
    first.path.symlink_to(tmp_path / "elsewhere")  # type: ignore[union-attr]
    with pytest.raises(InvalidSpec, match="remove it"):
        http_auth.load_token(settings)
    for host, loopback in (("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
                           ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("example.org", False)):
        assert http_auth.is_loopback(host) is loopback, host
    explicit = http_auth.HttpToken("x" * 20, explicit=True, path=None)
    http_auth.check_bind("0.0.0.0", explicit)
    http_auth.check_bind("127.0.0.1", first)
    with pytest.raises(InvalidSpec, match="SANDBOX_MCP_HTTP_TOKEN"):
        http_auth.check_bind("10.0.0.1", first)
    with pytest.raises(Exception, match="at least 16"):
        Settings(http_token="short")
