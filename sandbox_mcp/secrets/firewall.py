"""The firewall's part in secrets: a workspace with secrets may open connections to the proxy, nothing else.

The network policy (:mod:`sandbox_mcp.hostnet.firewall`) drops everything a workspace sends to the host.
These scripts add, inside our own ``inet`` table, a chain the input hook jumps to first: addresses in
the set ``secrets_clients`` may connect to the proxy's port on the bridge's host address, at most
``max_connections`` at once each (``ct count``, as the egress limit does; past it, a reset); nobody
reaches that port from any other interface than the bridge and loopback.
"""

from __future__ import annotations

import ipaddress
import re

from ..hostnet.firewall import table_name

__all__ = ["close_script", "open_script"]

_CHAIN = "secrets_proxy"
_SET = "secrets_clients"


def open_script(bridge: str, host_ip: ipaddress.IPv4Address, port: int, ip: ipaddress.IPv4Address,
                max_connections: int, present: str) -> str:
    """Let ``ip`` reach the proxy at ``host_ip:port``; the chain is (re)written, the jump added once.

    ``present`` is ``nft list`` text of our tables (the jump is inserted only where it is missing).
    """
    t, br = table_name(bridge), bridge
    host_ip, ip = ipaddress.IPv4Address(host_ip), ipaddress.IPv4Address(ip)
    if isinstance(port, bool) or not 1 <= int(port) <= 65535 or not 1 <= int(max_connections):
        raise ValueError("port or connection limit out of range")
    to_proxy = f"ip daddr {host_ip} tcp dport {int(port)}"
    lines = [
        f"add set inet {t} {_SET} {{ type ipv4_addr; }}",
        f"add set inet {t} secrets_conns {{ type ipv4_addr; size 65535; flags dynamic; }}",
        f"add chain inet {t} {_CHAIN}",
        f"flush chain inet {t} {_CHAIN}",
        f'add rule inet {t} {_CHAIN} {to_proxy} iifname != {{ "{br}", "lo" }} drop',
        f'add rule inet {t} {_CHAIN} iifname "{br}" ip saddr @{_SET} {to_proxy} ct state new '
        f"add @secrets_conns {{ ip saddr ct count over {int(max_connections)} }} reject with tcp reset",
        f'add rule inet {t} {_CHAIN} iifname "{br}" ip saddr @{_SET} {to_proxy} accept',
    ]
    if f"jump {_CHAIN}" not in present:
        lines.append(f"insert rule inet {t} input jump {_CHAIN}")
    lines.append(f"add element inet {t} {_SET} {{ {ip} }}")
    return "\n".join(lines) + "\n"


def close_script(bridge: str, ip: ipaddress.IPv4Address, present: str) -> str:
    """Take ``ip`` out of the proxy's clients, as far as ``present`` has it."""
    t = table_name(bridge)
    ip = ipaddress.IPv4Address(ip)
    m = re.search(rf"set {_SET} \{{[^}}]*?elements = \{{([^}}]*)\}}", present)
    members = {e.strip() for e in m.group(1).split(",")} if m else set()
    return f"delete element inet {t} {_SET} {{ {ip} }}\n" if str(ip) in members else ""
