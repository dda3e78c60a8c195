"""The HTTP transport's lock: which bearer token it requires, and which binds and headers it accepts.

The token comes from ``SANDBOX_MCP_HTTP_TOKEN`` (settings ``http_token``) or, failing that, from
``<state>/.server/http-token``, generated on first start (0600 in a 0700 directory). A generated
token is only good enough behind loopback: serving on another address needs a token set on
purpose, so that nobody puts an unlocked or unknown door on the LAN by accident. No mcp import
here; ``server.py`` plugs these into the SDK.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from .config import Settings
from .errors import InvalidSpec

__all__ = [
    "HttpToken",
    "allowed_hosts",
    "allowed_origins",
    "check_bind",
    "ensure_server_dir",
    "is_loopback",
    "load_token",
    "token_path",
]

_LOOPBACK_NAMES = ("localhost",)
_TOKEN_BYTES = 32


@dataclass(frozen=True)
class HttpToken:
    """The token the HTTP transport requires, and where it came from."""

    value: str
    explicit: bool  # set by the person (setting/variable), not generated
    path: Path | None  # the file it was read from or written to; None when explicit

    def __repr__(self) -> str:  # never print the secret by accident
        return f"HttpToken(explicit={self.explicit}, path={self.path})"


def token_path(settings: Settings) -> Path:
    """``<state>/.server/http-token``."""
    return settings.state_dir / ".server" / "http-token"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); ``0.0.0.0`` is not."""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: HttpToken) -> None:
    """Refuse to serve on a non-loopback address unless the token was configured explicitly.

    Raises:
        InvalidSpec: ``host`` is not loopback and the token was generated.
    """
    if not is_loopback(host) and not token.explicit:
        raise InvalidSpec(
            f"refusing to serve HTTP on {host}: a non-loopback address needs a bearer token you set "
            "yourself; export SANDBOX_MCP_HTTP_TOKEN=<a long random string> (e.g. from `openssl rand -hex 32`) "
            "and give it to the clients, or serve on 127.0.0.1"
        )


def ensure_server_dir(settings: Settings) -> Path:
    """``<state>/.server``, created 0700 (and tightened if it exists), never through a symlink.

    Raises:
        InvalidSpec: it exists but is a symlink or not a directory.
    """
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    d = settings.state_dir / ".server"
    try:
        d.mkdir(mode=0o700)
    except FileExistsError:
        pass
    if d.is_symlink() or not d.is_dir():
        raise InvalidSpec(f"{d} is not a directory (or is a symlink); remove it and start again")
    os.chmod(d, 0o700)
    return d


def load_token(settings: Settings) -> HttpToken:
    """The token the HTTP transport requires: the configured one, else the one in the token file
    (generated there, 0600, on first use).

    Raises:
        InvalidSpec: the token file is not a regular file, is readable by others, or holds no token.
    """
    if settings.http_token is not None:
        return HttpToken(settings.http_token.get_secret_value(), explicit=True, path=None)
    ensure_server_dir(settings)
    path = token_path(settings)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return HttpToken(_read_token_file(path), explicit=False, path=path)
    value = secrets.token_urlsafe(_TOKEN_BYTES)
    with os.fdopen(fd, "w") as fh:
        fh.write(value + "\n")
    return HttpToken(value, explicit=False, path=path)


def _read_token_file(path: Path) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise InvalidSpec(f"cannot read the HTTP token file {path} ({exc}); remove it to get a new one") from exc
    with os.fdopen(fd) as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
            raise InvalidSpec(
                f"{path} must be a regular file only its owner can read (mode 0600); remove it to get a new one"
            )
        value = fh.read(4096).strip()
    if len(value) < 16:
        raise InvalidSpec(f"{path} holds no usable token; remove it to get a new one")
    return value


def allowed_hosts(host: str) -> list[str]:
    """Host header values accepted (DNS rebinding protection): loopback names, plus ``host`` itself."""
    names = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
    if not is_loopback(host) and host not in ("0.0.0.0", "::"):
        names.append(f"[{host}]:*" if ":" in host else f"{host}:*")
    return names


def allowed_origins(host: str) -> list[str]:
    """Origin header values accepted from browsers: the same hosts over http and https."""
    return [f"{scheme}://{h}" for h in allowed_hosts(host) for scheme in ("http", "https")]
