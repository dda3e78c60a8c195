"""Optional outbound access for direct-mode workspaces: masquerading the bridge's subnet with nftables.

Off by default (``SANDBOX_MCP_NAT=true`` turns it on): it changes host-wide state, IP forwarding
and a firewall table. The table is ours alone (``sandbox_mcp_<bridge>``), replaced atomically
as a whole, so applying it again is harmless and removing it removes everything we added.
"""

from __future__ import annotations

import ipaddress
import re
import tempfile
from pathlib import Path

from .. import hostcmd
from ..errors import BackendError, InvalidSpec

__all__ = ["apply_nat", "nat_ruleset", "remove_nat", "table_name"]

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def table_name(bridge: str) -> str:
    """Our nftables table for ``bridge`` (nft identifiers: letters, digits, '_')."""
    return "sandbox_mcp_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


def nat_ruleset(bridge: str, subnet: ipaddress.IPv4Network) -> str:
    """The nft script that (re)creates our table: masquerade what leaves the subnet, forward it.

    Raises:
        InvalidSpec: a bridge name nft could misread.
    """
    if not _IFNAME_RE.match(bridge):
        raise InvalidSpec(f"bridge name {bridge!r} is not a plain interface name")
    table = table_name(bridge)
    # "add table" + "delete table" first makes the whole file an idempotent replacement.
    return f"""\
add table ip {table}
delete table ip {table}
table ip {table} {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} ip daddr != {subnet} masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{bridge}" accept
        oifname "{bridge}" ct state established,related accept
    }}
}}
"""


async def apply_nat(bridge: str, subnet: ipaddress.IPv4Network, proc_sys: Path = Path("/proc/sys")) -> None:
    """Turn on IPv4 forwarding and load our table.

    Raises:
        BackendError: nft is missing or refused the ruleset (the message says why).
    """
    script = nat_ruleset(bridge, subnet)
    with tempfile.NamedTemporaryFile("w", prefix="sandbox-mcp-nat-", suffix=".nft") as f:
        f.write(script)
        f.flush()
        await hostcmd.run(["nft", "-f", f.name], timeout_s=30)
    try:
        (proc_sys / "net/ipv4/ip_forward").write_text("1\n")
    except OSError as exc:
        raise BackendError(f"cannot enable IPv4 forwarding for NAT: {exc}") from exc


async def remove_nat(bridge: str) -> None:
    """Delete our table (IP forwarding is left as it is: other software may rely on it)."""
    await hostcmd.run(["nft", "delete", "table", "ip", table_name(bridge)], timeout_s=30, check=False)
