"""Egress by domain in nftables: a set of allowed addresses per workspace, filled by our resolver.

Added in place to the ``inet`` table of :mod:`.firewall` (the NixOS rendering has none of it: the
module refuses domain lists), so a workspace with a domain list has:

* a bridge port chain that marks its packets :data:`DOMAIN_MARK` (as ``internet`` marks
  :data:`~.firewall.EGRESS_MARK`; marks are cleared across network namespaces, so never forged);
* ``dns_redirect``: its DNS (UDP and TCP port 53, to any address) is sent to our resolver on the
  bridge's host address, whatever its resolv.conf says (a VM's or an Incus instance's too);
* ``input``: that resolver is the one host service it reaches;
* ``forward``: its packets jump (by source address, which anti-spoofing ties to its port) to its own
  chain ``dom_PORT``, which lets a *new* connection out only to an address in its set ``allow_PORT``
  (never a closed range: private, link-local, the host's) and marks the connection with the
  policy's *epoch*; later packets pass while the connection's mark is the current epoch. An open
  connection outlives the TTL of the answer that allowed it, as it would behind any DNS-aware
  firewall; a policy change that takes something away picks a new epoch and empties the set, which
  cuts every connection at once and makes the workspace resolve again.

The resolver (:mod:`.resolver`) adds each address it hands out with a timeout equal to the record's
TTL (bounded by settings). Pure builders; :class:`~.netlink.HostNetwork` runs them.
"""

from __future__ import annotations

import ipaddress
import re
import secrets

from ..errors import InvalidSpec
from .firewall import EGRESS_MAX_CONNECTIONS, table_name

__all__ = [
    "DOMAIN_MARK",
    "SET_SIZE",
    "add_addresses_script",
    "admit_domains_script",
    "current_epoch",
    "domain_base_script",
    "domain_chain",
    "domain_set",
    "new_epoch",
    "revoke_domains_script",
]

DOMAIN_MARK = 0x5B0D  # set by the port chain of a workspace with a domain list
SET_SIZE = 4096  # addresses one workspace's set may hold at once (the resolver stops adding past it)

_PORT_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _suffix(port: str) -> str:
    if not _PORT_RE.fullmatch(port):
        raise InvalidSpec(f"{port!r} is not a plain interface name")
    return re.sub(r"[^A-Za-z0-9_]", "_", port)


def domain_chain(port: str) -> str:
    """The forward chain of the workspace behind ``port``."""
    return "dom_" + _suffix(port)


def domain_set(port: str) -> str:
    """The set of addresses the workspace behind ``port`` may open connections to."""
    return "allow_" + _suffix(port)


def new_epoch() -> int:
    """A fresh policy epoch: a random non-zero connection mark (0 is every unmarked connection's)."""
    return secrets.randbits(31) | 1


def current_epoch(port: str, present: str) -> int | None:
    """The epoch ``port``'s chain carries in ``present`` (``nft list`` text), or None."""
    chain = domain_chain(port)
    body = re.search(rf"chain {chain} \{{(.*?)\n\t\}}", present, re.S)
    if body is None:
        return None
    mark = re.search(r"ct mark (0x[0-9a-f]+|\d+) accept", body.group(1))
    return None if mark is None else int(mark.group(1), 0)


def domain_base_script(bridge: str, host_ip: ipaddress.IPv4Address, resolver_port: int, present: str) -> str:
    """What ``present`` (our tables as ``nft list`` prints them, "" when loaded in the same script) lacks for
    domain egress: the map from source address to chain, the DNS redirect, the resolver's input rule and
    the forward jump. Nothing when they are there.

    Raises:
        InvalidSpec: a bridge name nft could misread, or a port out of range.
    """
    if "map domain_ports" in present:
        return ""
    if isinstance(resolver_port, bool) or not isinstance(resolver_port, int) or not 1 <= resolver_port <= 65535:
        raise InvalidSpec(f"the resolver port must be 1-65535, got {resolver_port!r}")
    t, host = table_name(bridge), ipaddress.IPv4Address(host_ip)
    br = bridge  # table_name validated it
    m = f"meta mark {DOMAIN_MARK:#x}"
    return (
        f"add map inet {t} domain_ports {{ type ipv4_addr : verdict; }}\n"
        f"add chain inet {t} dns_redirect {{ type nat hook prerouting priority dstnat; policy accept; }}\n"
        f'add rule inet {t} dns_redirect iifname "{br}" {m} udp dport 53 dnat ip to {host}:{resolver_port}\n'
        f'add rule inet {t} dns_redirect iifname "{br}" {m} tcp dport 53 dnat ip to {host}:{resolver_port}\n'
        f'insert rule inet {t} input iifname "{br}" {m} ip daddr {host} udp dport {resolver_port} accept\n'
        f'insert rule inet {t} input iifname "{br}" {m} ip daddr {host} tcp dport {resolver_port} accept\n'
        f'insert rule inet {t} forward iifname "{br}" {m} ip saddr vmap @domain_ports\n'
    )


def admit_domains_script(
    bridge: str,
    port: str,
    ip: ipaddress.IPv4Address,
    *,
    epoch: int,
    keep_addresses: bool,
    max_connections: int = EGRESS_MAX_CONNECTIONS,
) -> str:
    """Give the workspace behind ``port`` (address ``ip``) its set and chain at policy ``epoch``.

    ``keep_addresses`` keeps what the set holds (the policy only grew); otherwise it is emptied.
    The bridge side (the mark) is :func:`~.firewall.admit_script`'s. Idempotent.

    Raises:
        InvalidSpec: a malformed port name or epoch.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 < epoch < 2**32:
        raise InvalidSpec(f"{epoch!r} is not a policy epoch")
    t, chain, allow, ip = table_name(bridge), domain_chain(port), domain_set(port), ipaddress.IPv4Address(ip)
    lines = [
        f"add set inet {t} {allow} {{ type ipv4_addr; flags timeout; size {SET_SIZE}; }}",
        *([] if keep_addresses else [f"flush set inet {t} {allow}"]),
        f"add chain inet {t} {chain}",
        f"flush chain inet {t} {chain}",
        f"add rule inet {t} {chain} ct state established,related ct mark {epoch:#x} accept",
        f"add rule inet {t} {chain} ip daddr @closed return",
        f"add rule inet {t} {chain} ct state new add @egress_conns {{ ip saddr ct count over {max_connections} }} drop",
        f"add rule inet {t} {chain} ct state new ip daddr @{allow} ct mark set {epoch:#x} accept",
        f"add element inet {t} domain_ports {{ {ip} : jump {chain} }}",
    ]
    return "\n".join(lines) + "\n"


def revoke_domains_script(bridge: str, port: str, present: str) -> str:
    """Remove what :func:`admit_domains_script` added for ``port``, as far as ``present`` has it."""
    t, chain, allow = table_name(bridge), domain_chain(port), domain_set(port)
    lines = [f"delete element inet {t} domain_ports {{ {ipaddress.IPv4Address(ip)} }}"
             for ip in re.findall(rf"([0-9.]+) : jump {chain}\b", present)]
    if f"chain {chain} {{" in present:
        lines.append(f"delete chain inet {t} {chain}")
    if f"set {allow} {{" in present:
        lines.append(f"delete set inet {t} {allow}")
    return "\n".join(lines) + ("\n" if lines else "")


def add_addresses_script(table: str, set_name: str, entries: dict[ipaddress.IPv4Address, int]) -> str:
    """Put each address into ``set_name`` with its timeout (seconds), replacing an older timeout.

    An element that exists keeps its old timeout on ``add``: so each is added (in case it is missing),
    deleted and added again with the new one, all in the one transaction the script is.
    """
    if not entries:
        return ""
    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", table) or not re.fullmatch(r"allow_[A-Za-z0-9_]{1,15}", set_name):
        raise InvalidSpec(f"bad set {table}/{set_name}")
    plain = ", ".join(str(ipaddress.IPv4Address(a)) for a in entries)
    timed = ", ".join(f"{ipaddress.IPv4Address(a)} timeout {max(1, int(s))}s" for a, s in entries.items())
    return (
        f"add element inet {table} {set_name} {{ {plain} }}\n"
        f"delete element inet {table} {set_name} {{ {plain} }}\n"
        f"add element inet {table} {set_name} {{ {timed} }}\n"
    )
