"""Where a placeholder may become its value: the pure rules the proxy applies to each request's head.

A request reaches the proxy as ``/<host>/<path>`` from one workspace (known by its address). It goes on
only when ``<host>`` is one of that workspace's secrets' hosts. Its headers are searched for the
workspace's placeholders (raw, and inside ``Authorization: Basic``): each one found must belong to a secret
allowed for ``<host>`` and sit where that secret is sent (its header, a bearer token, basic auth); then it
is replaced by the value. Anything else (a placeholder for another host, in another header, in the URL)
refuses the whole request: nothing is forwarded. Bodies are never searched or changed.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .settings import SecretSpec

__all__ = ["HOP_BY_HOP", "Refused", "WorkspaceSecret", "rewrite_headers"]

# Hop-by-hop headers (RFC 9110 7.6.1) and Host: the proxy frames and addresses the upstream request itself.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host",
})


class Refused(Exception):
    """The request must not go on; ``reason`` names secrets and hosts, never a value."""

    def __init__(self, reason: str, secret: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.secret = secret


@dataclass(frozen=True)
class WorkspaceSecret:
    """One secret a workspace was given: its name, its placeholder there, and its settings."""

    name: str
    placeholder: str
    spec: SecretSpec


def _basic(text: str) -> tuple[str, str] | None:
    """(user, password) of an ``Authorization: Basic`` value, or None."""
    scheme, _, token = text.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(token.strip(), validate=True).decode("latin-1").partition(":")
    except (binascii.Error, ValueError):
        return None
    return (user, password) if sep else None


def rewrite_headers(
    host: str,
    target: bytes,
    headers: Sequence[tuple[bytes, bytes]],
    secrets: Sequence[WorkspaceSecret],
    value_of: Callable[[WorkspaceSecret], str],
) -> list[tuple[bytes, bytes]]:
    """The headers to send to ``host`` (``name[:port]``) for a request to ``target`` (path and query).

    Hop-by-hop headers and Host are dropped (the caller frames the request). ``value_of`` reads a
    secret's value; it is called only for a placeholder that passed every check.

    Raises:
        Refused: a placeholder outside a place its secret may go (see the module docstring).
    """
    by_placeholder: Mapping[str, WorkspaceSecret] = {s.placeholder: s for s in secrets}
    target_text = target.decode("latin-1")
    for ph, s in by_placeholder.items():
        if ph in target_text:
            raise Refused(f"the placeholder of secret {s.name!r} is in the URL; placeholders are replaced in "
                          "headers only", s.name)

    def allowed(s: WorkspaceSecret, where: str) -> None:
        if host not in s.spec.hosts:
            raise Refused(f"the placeholder of secret {s.name!r} was sent to {host}, which is not one of its "
                          f"hosts ({', '.join(s.spec.hosts)})", s.name)
        if where != s.spec.header_name:
            raise Refused(f"the placeholder of secret {s.name!r} was sent in header {where!r}; it is sent only "
                          f"in {s.spec.header_name!r}", s.name)

    out: list[tuple[bytes, bytes]] = []
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name in HOP_BY_HOP:
            continue
        where = name.decode("latin-1")
        text = raw_value.decode("latin-1")
        found = [s for ph, s in by_placeholder.items() if ph in text]
        basic = _basic(text) if name == b"authorization" else None
        in_basic = [s for ph, s in by_placeholder.items() if basic is not None and ph in basic[0] + ":" + basic[1]]
        if not found and not in_basic:
            out.append((raw_name, raw_value))
            continue
        hits = found or in_basic
        if len(hits) > 1:
            raise Refused(f"header {where!r} carries the placeholders of several secrets "
                          f"({', '.join(s.name for s in hits)})")
        s = hits[0]
        allowed(s, where)
        if s.spec.send == "header" and text.strip() == s.placeholder:
            new = value_of(s)
        elif s.spec.send == "bearer" and text.strip().lower() == f"bearer {s.placeholder}".lower() \
                and text.strip()[7:] == s.placeholder:
            new = "Bearer " + value_of(s)
        elif s.spec.send == "basic" and basic is not None and basic[1] == s.placeholder and s.placeholder not in basic[0]:
            new = "Basic " + base64.b64encode(f"{basic[0]}:{value_of(s)}".encode("latin-1")).decode("ascii")
        else:
            how = {"header": "as the whole header value", "bearer": "as 'Bearer <placeholder>'",
                   "basic": "as the password of basic auth"}[s.spec.send]
            raise Refused(f"the placeholder of secret {s.name!r} is not sent {how} in {where!r}", s.name)
        out.append((raw_name, new.encode("latin-1")))
    return out
