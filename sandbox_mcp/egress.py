"""Egress policies: what a workspace may reach outside, and the domain names of a domain list.

A workspace's ``egress`` is ``"none"``, ``"internet"`` or a list of domain names it may reach. A name
is exact (``pypi.org``: that name only) or a wildcard (``*.githubusercontent.com``: any name below it,
at any depth, but not the name itself). Names are checked strictly here, before anything changes:
lowercase letters, digits and ``-`` in labels of 1-63 characters, at least two labels, at most 253
characters, a last label that is not all digits (so no IP address passes for a name). Upper case and
a trailing dot are normalised away.

Pure: the resolver (:mod:`sandbox_mcp.hostnet.resolver`) matches names with :func:`allows`, the
firewall (:mod:`sandbox_mcp.hostnet.egress_sets`) and the runtimes ask :func:`domains_of`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from .errors import InvalidSpec

__all__ = [
    "MAX_DOMAINS",
    "DomainList",
    "DomainPattern",
    "Egress",
    "allows",
    "check_nat",
    "describe",
    "domains_of",
    "needs_outside",
    "normalise_name",
    "parse",
]

MAX_DOMAINS = 64  # entries in one workspace's list: a policy, not a hosts file

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_PATTERN = rf"^(?:\*\.)?(?:{_LABEL}\.)+{_LABEL}$"
_PATTERN_RE = re.compile(_PATTERN)


def normalise_name(value: Any) -> Any:
    """A domain name as the policy compares it: lower case, no trailing dot (anything else unchanged)."""
    if isinstance(value, str):
        value = value.strip().lower()
        if value.endswith(".") and not value.endswith(".."):
            value = value[:-1]
    return value


def _check_pattern(value: Any) -> str:
    """One list entry, normalised; ValueError with the reason otherwise."""
    value = normalise_name(value)
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a domain name: give names as strings, e.g. 'pypi.org'")
    bare = value[2:] if value.startswith("*.") else value
    if len(bare) > 253:
        raise ValueError(f"{value[:40]!r}... is longer than a domain name may be (253 characters)")
    if not _PATTERN_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a domain name: use lowercase letters, digits and '-' in dot-separated labels, at "
            "least two labels ('pypi.org'), or '*.' before one for every name below it ('*.github.com')"
        )
    if bare.rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"{value!r} is an address, not a domain name: list names such as 'pypi.org'")
    return value


def _check_egress(value: Any) -> Any:
    """The whole egress value checked at once, so a mistake gives one message that says what to send."""
    if isinstance(value, str):
        if value in ("none", "internet"):
            return value
        raise ValueError(
            f"egress {value[:40]!r} is not 'none', 'internet' or a list of domain names such as ['pypi.org']"
        )
    if not isinstance(value, list | tuple):
        raise ValueError("egress must be 'none', 'internet' or a list of domain names such as ['pypi.org']")
    if not value:
        raise ValueError("egress is an empty list: use 'none' to reach nothing, or list domain names")
    if len(value) > MAX_DOMAINS:
        raise ValueError(f"egress lists {len(value)} names, more than the {MAX_DOMAINS} allowed; use wildcards "
                         "('*.example.com') or 'internet'")
    names = [_check_pattern(v) for v in value]
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"egress lists {n!r} twice")
        seen.add(n)
    return names


DomainPattern = Annotated[
    str,
    Field(
        pattern=_PATTERN,
        max_length=255,
        description="A domain name ('pypi.org': that name only) or a wildcard ('*.github.com': any name below it, "
        "not github.com itself)",
    ),
]

DomainList = Annotated[list[DomainPattern], Field(min_length=1, max_length=MAX_DOMAINS)]

# The check runs before the union, so a bad value gets one clear message, not one per branch.
Egress = Annotated[Literal["none", "internet"] | DomainList, BeforeValidator(_check_egress)]


_ADAPTER: TypeAdapter[Any] | None = None


def parse(value: Any) -> Egress:
    """``value`` as a checked, normalised policy.

    Raises:
        InvalidSpec: what is wrong with it and what to send instead.
    """
    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(Egress)
    try:
        return _ADAPTER.validate_python(value)
    except ValidationError as exc:
        raise InvalidSpec("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None


def domains_of(egress: Egress | bool) -> list[str] | None:
    """The domain list of an egress policy, or None when it is ``none``/``internet`` (or a bool: the old form)."""
    return list(egress) if isinstance(egress, list) else None


def needs_outside(egress: Egress | bool) -> bool:
    """True when the policy reaches anything outside (``internet`` or a domain list): it needs the host's NAT."""
    return egress is True or egress == "internet" or isinstance(egress, list)


def allows(patterns: list[str] | tuple[str, ...] | frozenset[str], name: str) -> bool:
    """True when ``name`` (any case, trailing dot or not) is on the list ``patterns``.

    ``example.com`` matches itself only; ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com``
    but not ``example.com``.
    """
    name = normalise_name(name)
    if not isinstance(name, str) or not _PATTERN_RE.fullmatch(name) or name.startswith("*."):
        return False
    for p in patterns:
        if p.startswith("*."):
            if name.endswith(p[1:]):
                return True
        elif name == p:
            return True
    return False


def check_nat(egress: Egress, nat: bool) -> None:
    """Refuse a policy that reaches outside where the host has NAT off.

    Raises:
        InvalidSpec: the message says who turns it on and what to do meanwhile.
    """
    if needs_outside(egress) and not nat:
        what = "egress='internet'" if egress == "internet" else "egress by domain list"
        raise InvalidSpec(
            f"{what} needs outbound NAT, which is off on this host; the host's owner turns it on "
            "with SANDBOX_MCP_NAT=true (IP forwarding plus an nftables masquerade). Use egress='none', or "
            "list the packages you need in create_workspace's packages"
        )


def describe(egress: Egress) -> str:
    """One line for people: ``none``, ``internet`` or ``a.com, *.b.org``."""
    return ", ".join(egress) if isinstance(egress, list) else egress
