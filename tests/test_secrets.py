"""Secrets, the pure parts: settings validation, where a placeholder may become its value, the scripts."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest

from sandbox_mcp.config import Settings, load_settings
from sandbox_mcp.errors import AccessDenied, BackendError, InvalidSpec
from sandbox_mcp.secrets.firewall import close_script, open_script
from sandbox_mcp.secrets.rewrite import Refused, WorkspaceSecret, rewrite_headers
from sandbox_mcp.secrets.service import SecretsService
from sandbox_mcp.secrets.settings import SecretSpec, read_value

KEY = SecretSpec(source="env:K", hosts=["api.anthropic.com"], send="header", header="x-api-key",
                 env=["ANTHROPIC_API_KEY"], base_url_env=["ANTHROPIC_BASE_URL"])
BEARER = SecretSpec(source="env:B", hosts=["api.anthropic.com"], send="bearer")
GIT = SecretSpec(source="env:G", hosts=["github.com"], send="basic", git=True)
SECRETS = [WorkspaceSecret("key", "PH-key", KEY), WorkspaceSecret("oauth", "PH-oauth", BEARER),
           WorkspaceSecret("git", "PH-git", GIT)]
VALUES = {"key": "v-key", "oauth": "v-oauth", "git": "v-git"}


def _rewrite(host: str, headers: list[tuple[str, str]], target: str = "/v1/messages") -> list[tuple[str, str]]:
    read: list[str] = []

    def value_of(s: WorkspaceSecret) -> str:
        read.append(s.name)
        return VALUES[s.name]

    out = rewrite_headers(host, target.encode(), [(k.encode(), v.encode()) for k, v in headers], SECRETS, value_of)
    return [(k.decode(), v.decode()) for k, v in out]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(("host", "sent", "received"), [
    ("api.anthropic.com", ("x-api-key", "PH-key"), ("x-api-key", "v-key")),
    ("api.anthropic.com", ("X-Api-Key", "PH-key"), ("X-Api-Key", "v-key")),
    ("api.anthropic.com", ("authorization", "Bearer PH-oauth"), ("authorization", "Bearer v-oauth")),
    ("github.com", ("authorization", _basic("x-access-token", "PH-git")), ("authorization", _basic("x-access-token", "v-git"))),
    ("github.com", ("accept", "*/*"), ("accept", "*/*")),
])
def test_a_placeholder_becomes_its_value_where_it_may_go(host: str, sent: tuple[str, str], received: tuple[str, str]):
    assert _rewrite(host, [sent, ("user-agent", "t")]) == [received, ("user-agent", "t")]


@pytest.mark.parametrize(("host", "headers", "target", "why"), [
    ("github.com", [("x-api-key", "PH-key")], "/", "sent to github.com, which is not one of its hosts"),
    ("github.com", [("authorization", "Bearer PH-oauth")], "/", "not one of its hosts"),
    ("api.anthropic.com", [("authorization", _basic("u", "PH-git"))], "/", "not one of its hosts"),
    ("api.anthropic.com", [("x-debug", "PH-key")], "/", "sent in header 'x-debug'"),
    ("api.anthropic.com", [("authorization", "PH-key")], "/", "sent in header 'authorization'"),
    ("api.anthropic.com", [("x-api-key", "prefix PH-key")], "/", "as the whole header value"),
    ("api.anthropic.com", [("authorization", "Token PH-oauth")], "/", "as 'Bearer <placeholder>'"),
    ("github.com", [("authorization", _basic("PH-git", "x"))], "/", "as the password of basic auth"),
    ("api.anthropic.com", [("x-api-key", "PH-key PH-oauth")], "/", "several secrets"),
    ("api.anthropic.com", [], "/v1/x?key=PH-key", "in the URL"),
    ("api.anthropic.com", [], "/PH-git/", "in the URL"),
])
def test_a_placeholder_anywhere_else_refuses_the_request(host, headers, target, why):
    with pytest.raises(Refused) as caught:
        _rewrite(host, headers, target)
    assert why in caught.value.reason
    assert all(v not in caught.value.reason for v in VALUES.values())


def test_hop_by_hop_headers_and_host_are_dropped():
    headers = [("Host", "x"), ("Connection", "keep-alive"), ("Transfer-Encoding", "chunked"),
               ("Proxy-Authorization", "Basic eA=="), ("content-type", "application/json")]
    assert _rewrite("api.anthropic.com", headers) == [("content-type", "application/json")]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("source", "ANTHROPIC_API_KEY", "source must be"),
    ("source", "file:relative", "source must be"),
    ("hosts", ["https://api.anthropic.com"], "not a host name"),
    ("hosts", ["*.github.com"], "not a host name"),
    ("hosts", ["192.0.2.1"], "not an address"),
    ("hosts", [], "at least 1"),
    ("header", "host", "cannot carry a secret"),
    ("header", "x api key", "cannot carry a secret"),
    ("env", ["1BAD"], "not an environment variable name"),
])
def test_bad_secret_settings_are_refused(field, value, message):
    base = {"source": "env:K", "hosts": ["api.anthropic.com"]}
    with pytest.raises(ValueError, match=message):
        SecretSpec.model_validate({**base, field: value})


def test_git_needs_basic():
    with pytest.raises(ValueError, match="git = true needs send = 'basic'"):
        SecretSpec(source="env:G", hosts=["github.com"], git=True)


def test_secrets_come_from_the_toml_file_and_the_environment(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text('[secrets.anthropic]\nsource = "env:ANTHROPIC_API_KEY"\nhosts = ["API.Anthropic.com"]\n'
                      'send = "header"\nheader = "X-Api-Key"\n[secrets_proxy]\nport = 4000\n')
    s = load_settings({"SANDBOX_MCP_SECRETS_PROXY_RATE_PER_S": "7"}, config)
    assert s.secrets["anthropic"].hosts == ["api.anthropic.com"] and s.secrets["anthropic"].header == "x-api-key"
    assert (s.secrets_proxy.port, s.secrets_proxy.rate_per_s) == (4000, 7)
    s = load_settings({"SANDBOX_MCP_SECRETS": '{"gh": {"source": "file:/t", "hosts": ["github.com"]}}'}, tmp_path / "no")
    assert s.secrets["gh"].send == "bearer"
    with pytest.raises(InvalidSpec, match="secret names must match"):
        load_settings({"SANDBOX_MCP_SECRETS": '{"Bad Name": {"source": "env:X", "hosts": ["a.b"]}}'}, tmp_path / "no")


def test_values_are_read_at_use_and_never_named_in_errors(tmp_path: Path):
    f = tmp_path / "token"
    f.write_text("first\nsecond line ignored\n")
    spec = SecretSpec(source=f"file:{f}", hosts=["a.example"])
    assert read_value("t", spec) == "first"
    f.write_text("rotated\n")
    assert read_value("t", spec) == "rotated"  # no cache: the next request sends the new value
    f.write_text("bad\x01value\n")
    with pytest.raises(BackendError) as caught:
        read_value("t", spec)
    assert "bad" not in str(caught.value)
    with pytest.raises(BackendError, match=r"\$K is not set"):
        read_value("k", SecretSpec(source="env:K", hosts=["a.example"]), env={})
    assert read_value("k", SecretSpec(source="env:K", hosts=["a.example"]), env={"K": "v"}) == "v"


def _service(tmp_path: Path) -> SecretsService:
    return SecretsService(Settings(state_dir=tmp_path, secrets={"anthropic": KEY, "gh": GIT.model_copy(
        update={"uids": [1001]})}))


def test_placeholders_are_fresh_and_names_are_checked(tmp_path: Path):
    svc = _service(tmp_path)
    a, b = svc.placeholders(["anthropic"], None, True), svc.placeholders(["anthropic"], None, True)
    assert a["anthropic"] != b["anthropic"] and a["anthropic"].startswith("sandbox-placeholder-anthropic-")
    with pytest.raises(InvalidSpec, match=r"unknown secret\(s\) 'nope'; the secrets this server offers: anthropic, gh"):
        svc.placeholders(["nope"], None, True)
    with pytest.raises(InvalidSpec, match="twice"):
        svc.placeholders(["anthropic", "anthropic"], None, True)
    with pytest.raises(InvalidSpec, match="this host's bridge"):
        svc.placeholders(["anthropic"], None, False)
    with pytest.raises(AccessDenied, match="not offered to uid 1002"):
        svc.placeholders(["gh"], 1002, True)
    assert set(svc.placeholders(["gh"], 1001, True)) == {"gh"}
    assert svc.placeholders([], 1002, False) == {}


def test_the_workspace_gets_placeholders_base_urls_and_git_config(tmp_path: Path):
    svc = _service(tmp_path)
    ph = {"anthropic": "sandbox-placeholder-anthropic-x", "gh": "sandbox-placeholder-gh-y"}
    assert svc.environment(ph) == {"ANTHROPIC_API_KEY": ph["anthropic"],
                                   "ANTHROPIC_BASE_URL": "http://192.168.83.1:3129/api.anthropic.com"}
    script = svc.inside_script(ph)
    assert script is not None and "systemctl reload ssh.service" in script
    blobs = [base64.b64decode(w).decode() for w in script.split() if len(w) > 40 and "/" not in w]
    git = next(b for b in blobs if "insteadOf" in b)
    assert 'insteadOf = https://github.com/' in git and '[url "http://192.168.83.1:3129/github.com/"]' in git
    assert base64.b64encode(b"x-access-token:sandbox-placeholder-gh-y").decode() in git
    setenv = next(b for b in blobs if b.startswith("SetEnv "))
    assert "CLAUDE_CONFIG_DIR=/home/agent/claude-config" in setenv and f"ANTHROPIC_API_KEY={ph['anthropic']}" in setenv
    assert svc.inside_script({}) is None


def test_firewall_scripts():
    ip, host = ipaddress.IPv4Address("192.168.83.10"), ipaddress.IPv4Address("192.168.83.1")
    script = open_script("sbx-br", host, 3129, ip, 8, "")
    assert "insert rule inet sandbox_mcp_sbx_br input jump secrets_proxy" in script
    assert "ct count over 8 } reject with tcp reset" in script
    assert script.endswith("add element inet sandbox_mcp_sbx_br secrets_clients { 192.168.83.10 }\n")
    assert "insert rule" not in open_script("sbx-br", host, 3129, ip, 8, "jump secrets_proxy")
    present = "set secrets_clients {\n type ipv4_addr\n elements = { 192.168.83.10, 192.168.83.11 }\n }"
    assert close_script("sbx-br", ip, present) == "delete element inet sandbox_mcp_sbx_br secrets_clients { 192.168.83.10 }\n"
    assert close_script("sbx-br", ipaddress.IPv4Address("192.168.83.12"), present) == ""


def test_the_cli_takes_secrets_one_flag_each():
    import argparse

    from sandbox_mcp.cli import add_create_flags, create_spec

    p = argparse.ArgumentParser()
    add_create_flags(p)
    assert create_spec(p.parse_args(["ws", "--secret", "anthropic", "--secret", "gh"])).secrets == ["anthropic", "gh"]
    assert create_spec(p.parse_args(["ws"])).secrets == []
    with pytest.raises(InvalidSpec, match="secrets"):
        create_spec(p.parse_args(["ws", "--secret", "Not A Name"]))
