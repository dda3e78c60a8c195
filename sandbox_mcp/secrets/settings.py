"""What the person running the server configures: the secrets, and the proxy that sends them.

A secret is named in the settings file (``[secrets.NAME]``) or in ``SANDBOX_MCP_SECRETS`` (JSON), never
by an agent: where its value comes from (``env:VAR`` or ``file:/path``, read each time it is used and
never logged), the hosts it may be sent to, how it is sent (a header, a bearer token, HTTP basic auth as
git uses it), and what the workspace gets in its place (environment variables holding a placeholder, a
base URL pointing at the proxy, git configuration).
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import BackendError
from ..naming import SECRETS_PROXY_UID

__all__ = [
    "SECRET_NAME_PATTERN",
    "SecretName",
    "SecretSpec",
    "SecretsProxySettings",
    "read_value",
    "split_host",
]

SECRET_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,31}$"
SecretName = Annotated[str, Field(pattern=SECRET_NAME_PATTERN, description="A secret configured on the host")]

# A DNS name (lowercase, no trailing dot) with an optional :port. No wildcards: the proxy's endpoint for a
# host is a fixed upstream, so the workspace never chooses where a value goes.
_HOST_RE = re.compile(r"^(?=.{1,253}(:|$))[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*(:[0-9]{1,5})?$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_HEADER_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # an HTTP token
_MAX_VALUE_BYTES = 64 << 10
# Headers the proxy manages itself: a secret sent in one of them would be lost or misrouted.
_RESERVED_HEADERS = {"host", "connection", "content-length", "transfer-encoding", "keep-alive", "upgrade",
                     "te", "trailer", "proxy-authorization", "proxy-connection"}


def split_host(host: str) -> tuple[str, int]:
    """``name[:port]`` as (name, port); 443 when no port is given."""
    name, _, port = host.partition(":")
    return name, int(port) if port else 443


class SecretSpec(BaseModel):
    """One secret as the server's settings define it (``[secrets.NAME]``)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        description="Where the value comes from, read each time it is used: 'env:VAR' (the server's environment) "
        "or 'file:/absolute/path' (its first line; trailing newline dropped)",
        examples=["env:ANTHROPIC_API_KEY", "file:/etc/sandbox-mcp/github-token"],
    )
    hosts: list[str] = Field(
        min_length=1, max_length=16,
        description="The hosts the value may be sent to, over HTTPS: DNS names, optionally with :port "
        "(e.g. 'api.anthropic.com', 'git.example.com:8443'). Each gets an endpoint on the proxy",
    )
    send: Literal["header", "bearer", "basic"] = Field(
        default="bearer",
        description="How the value is sent: 'bearer' (Authorization: Bearer VALUE), 'header' (the header named "
        "in `header`, e.g. x-api-key), 'basic' (Authorization: Basic with `username` and the value as password: "
        "git over HTTPS)",
    )
    header: str = Field(default="x-api-key", description="With send='header': the header carrying the value")
    username: str = Field(
        default="x-access-token", pattern=r"^[A-Za-z0-9._@+-]{1,64}$",
        description="With send='basic': the user name sent with the value (GitHub takes any; x-access-token is usual)",
    )
    env: list[str] = Field(
        default_factory=list, max_length=8,
        description="Environment variables that hold the placeholder inside the workspace, e.g. ['ANTHROPIC_API_KEY']",
    )
    base_url_env: list[str] = Field(
        default_factory=list, max_length=8,
        description="Environment variables set to the proxy's endpoint for the first host, e.g. ['ANTHROPIC_BASE_URL']",
    )
    uids: list[int] | None = Field(
        default=None,
        description="Host uids whose workspaces may have it, through the daemon (root's always may); default: "
        "everyone the server serves",
    )
    git: bool = Field(
        default=False,
        description="Configure git inside (system gitconfig): https://HOST/ goes through the proxy with the "
        "placeholder as credentials (needs send='basic')",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        kind, _, rest = v.partition(":")
        if kind == "env" and _ENV_RE.fullmatch(rest):
            return v
        if kind == "file" and rest.startswith("/") and "\0" not in rest:
            return v
        raise ValueError(f"source must be 'env:VAR' or 'file:/absolute/path', got {v!r}")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        out = []
        for h in v:
            h = h.strip().lower()
            if not _HOST_RE.fullmatch(h):
                raise ValueError(f"{h!r} is not a host name (a DNS name, optionally :port; no scheme, path or '*')")
            name, port = split_host(h)
            if not 1 <= port <= 65535:
                raise ValueError(f"{h!r}: port out of range")
            with_ip = True
            try:
                ipaddress.ip_address(name)
            except ValueError:
                with_ip = False
            if with_ip:
                raise ValueError(f"{h!r}: give a host name, not an address (TLS is verified against the name)")
            out.append(h)
        return out

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        if not _HEADER_RE.fullmatch(v) or v.lower() in _RESERVED_HEADERS:
            raise ValueError(f"{v!r} cannot carry a secret (not an HTTP header name, or one the proxy manages)")
        return v.lower()

    @field_validator("env", "base_url_env")
    @classmethod
    def _env_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not _ENV_RE.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        return v

    @model_validator(mode="after")
    def _git_needs_basic(self) -> SecretSpec:
        if self.git and self.send != "basic":
            raise ValueError("git = true needs send = 'basic' (git sends HTTP basic auth)")
        return self

    @property
    def header_name(self) -> str:
        """The request header the value travels in."""
        return self.header if self.send == "header" else "authorization"


class SecretsProxySettings(BaseModel):
    """The host-side proxy that puts secrets into requests (``[secrets_proxy]``)."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(default=3129, ge=1, le=65535, description="Its port on the bridge's host address")
    uid: int | None = Field(
        default=SECRETS_PROXY_UID, ge=1, lt=2**31,
        description="The uid (and gid) the proxy's worker, which parses what workspaces send, runs as: a uid of "
        "its own, no files of its own; null keeps it root (for hosts where that uid cannot be used)",
    )
    max_connections: int = Field(
        default=64, ge=1, le=4096,
        description="Connections one workspace may have open to the proxy at once (more are reset by the firewall)",
    )
    max_requests: int = Field(
        default=16, ge=1, le=1024,
        description="Requests of one workspace the proxy forwards at once; more wait for a slot (fair between "
        "workspaces: each has its own)",
    )
    rate_per_s: float = Field(
        default=50, gt=0, le=100000, description="Requests per second one workspace may start (429 past it)"
    )
    burst: int = Field(default=100, ge=1, le=100000, description="Requests one workspace may start at once")
    max_request_bytes: int = Field(
        default=32 << 20, ge=1024, description="Largest request body the proxy forwards (413 past it)"
    )
    max_response_bytes: int = Field(
        default=512 << 20, ge=1024, description="Largest response body the proxy relays (the rest is cut)"
    )
    max_header_bytes: int = Field(default=64 << 10, ge=4096, le=1 << 20, description="Largest request head")
    connect_timeout_s: float = Field(default=15, gt=0, description="Connecting to an upstream, seconds")
    read_timeout_s: float = Field(
        default=600, gt=0, description="Silence from an upstream before the request fails, seconds (streams wait)"
    )
    ca_bundle: Path | None = Field(
        default=None, description="CA certificates upstreams are verified against; default: the system's store"
    )
    resolve: dict[str, str] = Field(
        default_factory=dict,
        description="For tests: connect to this IPv4 address for a host name instead of asking DNS (like curl "
        "--resolve; TLS is still verified against the name). A TOML table; in the environment, JSON",
    )

    @field_validator("resolve", mode="before")
    @classmethod
    def _json_table(cls, v: object) -> object:
        if isinstance(v, str):
            import json

            return json.loads(v) if v.strip() else {}
        return v

    @field_validator("resolve")
    @classmethod
    def _addresses(cls, v: dict[str, str]) -> dict[str, str]:
        return {h.lower(): str(ipaddress.IPv4Address(a)) for h, a in v.items()}


def read_value(name: str, spec: SecretSpec, env: dict[str, str] | None = None) -> str:
    """The secret's value, read now from where ``spec.source`` says. Never logged, never put in a message.

    Raises:
        BackendError: the variable is unset, the file cannot be read, or the value is empty or not fit for
            an HTTP header (the message names the secret and its source, never the value).
    """
    kind, _, where = spec.source.partition(":")
    if kind == "env":
        value = (os.environ if env is None else env).get(where)
        if value is None:
            raise BackendError(f"secret {name!r}: ${where} is not set in the server's environment")
    else:
        try:
            fd = os.open(where, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                raw = fh.read(_MAX_VALUE_BYTES + 1)
        except OSError as exc:
            raise BackendError(f"secret {name!r}: cannot read {where}: {exc.strerror}") from None
        if len(raw) > _MAX_VALUE_BYTES:
            raise BackendError(f"secret {name!r}: {where} is larger than {_MAX_VALUE_BYTES} bytes")
        value = raw.decode("utf-8", "replace").split("\n", 1)[0].rstrip("\r")
    if not value or any(not 32 <= ord(c) < 127 for c in value):
        raise BackendError(f"secret {name!r}: the value from {spec.source} is empty or not printable ASCII")
    return value
