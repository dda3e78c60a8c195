"""The workspace network policy, in nftables tables of our own: a workspace reaches nothing it was not given.

Two tables per bridge, both named ``sandbox_mcp_<bridge>`` (nothing else on the host's firewall
is touched, and deleting them removes everything we added):

``bridge`` family, frames on the bridge itself (no br_netfilter needed):
  * ``forward``: a workspace port never talks to another workspace port (not even ARP);
  * ``prerouting``: each workspace port jumps to its own chain, which drops any frame whose
    source MAC, IPv4 source or ARP sender is not the workspace's own (anti-spoofing), and
    anything that is neither IPv4 nor ARP. Ports are added and removed one by one
    (:func:`admit_script`, :func:`revoke_script`) as workspaces start and stop.

``inet`` family, what is routed or delivered to the host:
  * ``input``: from the bridge only replies to connections the host opened (the server's SSH)
    pass, and (where the host serves DNS on the bridge, as the NixOS module's dnsmasq does) DNS
    from workspaces with egress; a workspace reaches no other service on any host address;
  * ``forward``: a workspace whose port chain marked its packets (egress ``internet``) may go
    out, except to private ranges, link-local (169.254.169.254 above all), loopback, CGNAT,
    multicast and reserved space; DNS to the host's own resolvers is let through for those
    workspaces. Everything else from the bridge is dropped. (The mark is set on our side of the
    bridge; a packet's mark is cleared whenever it crosses network namespaces, so a workspace
    cannot forge it.) A marked workspace may keep at most ``max_connections`` connections open
    at once (``ct count`` per source address, which anti-spoofing ties to its port), so one
    workspace cannot fill the host's connection tracking table;
  * ``output`` (direct mode; the NixOS rendering has none, its server runs as a user): the host's
    own connections into the bridge come only from root (the server, its proxies) and from the
    workspace's owner: each admitted address jumps to a chain of its port
    that accepts its owner's uid (``meta skuid``); any other local user's packets are dropped,
    so nobody else reaches a workspace's dev server, database or notebook;
  * ``postrouting``: masquerade what leaves the subnet, present only where settings allow NAT.

Direct mode loads the tables and admits ports one by one; the NixOS module renders the same policy
for every workspace it declares at once (:func:`ruleset`, through ``nix/modules/firewall-template.json``,
which :mod:`sandbox_mcp.hostnet.nixtemplate` generates from these functions).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..errors import BackendError, InvalidSpec
from . import nft

__all__ = [
    "CLOSED_RANGES",
    "EGRESS_MARK",
    "EGRESS_MAX_CONNECTIONS",
    "Policy",
    "PolicyPort",
    "admit_script",
    "admitted_ports",
    "base_script",
    "claimed_addresses",
    "claims_of_others",
    "host_nameservers",
    "remove_tables",
    "revoke_script",
    "ruleset",
    "run_script",
    "enable_forwarding",
    "missing_guards",
    "table_exists",
    "table_exists_sync",
    "table_name",
    "upgrade_script",
]

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
EGRESS_MARK = 0x5B0E  # set by a workspace's port chain when it may go out
EGRESS_MAX_CONNECTIONS = 512  # open connections one egress workspace may have at once (settings override)

# Never reachable from a workspace, even one with egress "internet".
CLOSED_RANGES = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)


def table_name(bridge: str) -> str:
    """Our nftables tables for ``bridge`` (nft identifiers: letters, digits, '_')."""
    return "sandbox_mcp_" + re.sub(r"[^A-Za-z0-9_]", "_", _ifname(bridge))


def _ifname(name: str) -> str:
    if not _IFNAME_RE.fullmatch(name):
        raise InvalidSpec(f"{name!r} is not a plain interface name")
    return name


def _port_chain(port: str) -> str:
    return "port_" + re.sub(r"[^A-Za-z0-9_]", "_", _ifname(port))


def _host_chain(port: str) -> str:
    return "host_" + re.sub(r"[^A-Za-z0-9_]", "_", _ifname(port))


def base_script(
    bridge: str,
    subnet: ipaddress.IPv4Network,
    *,
    nat: bool,
    nameservers: Sequence[ipaddress.IPv4Address] = (),
    local_dns: ipaddress.IPv4Address | None = None,
    max_connections: int = EGRESS_MAX_CONNECTIONS,
    host_access: bool = True,
) -> str:
    """The nft script that (re)creates both tables empty of workspaces.

    ``local_dns`` is a host address on the bridge serving DNS, which workspaces with egress may ask.
    ``host_access`` adds the ``output`` chain: only root and each workspace's owner (admitted with
    ``owner``) may connect to workspaces from the host. The NixOS rendering goes without it: there
    the MCP server itself runs as a user, and workspaces have no per-user owners.

    Replacing a table drops its workspace ports, so callers load this only when the tables are
    missing (see :class:`~sandbox_mcp.hostnet.HostNetwork`) and then admit each running workspace.

    Raises:
        InvalidSpec: a bridge name nft could misread, or a connection limit below 1.
    """
    t, br = table_name(bridge), _ifname(bridge)
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise InvalidSpec(f"the egress connection limit must be a whole number ≥ 1, got {max_connections!r}")
    dns = ", ".join(str(ipaddress.IPv4Address(a)) for a in nameservers)
    owners_map = "    map owners {\n        type ipv4_addr : verdict\n    }\n" if host_access else ""
    output = (
        f"""    chain output {{
        type filter hook output priority filter; policy accept;
        oifname "{br}" ct state established,related accept
        oifname "{br}" meta skuid 0 accept
        oifname "{br}" ip daddr vmap @owners
        oifname "{br}" drop
    }}
""" if host_access else ""
    )
    dns_rules = (
        f"        iifname \"{br}\" meta mark {EGRESS_MARK:#x} ip daddr {{ {dns} }} udp dport 53 accept\n"
        f"        iifname \"{br}\" meta mark {EGRESS_MARK:#x} ip daddr {{ {dns} }} tcp dport 53 accept\n"
        if dns else ""
    )
    local_dns_rules = (
        f"        iifname \"{br}\" meta mark {EGRESS_MARK:#x} ip daddr {ipaddress.IPv4Address(local_dns)} udp dport 53 accept\n"
        f"        iifname \"{br}\" meta mark {EGRESS_MARK:#x} ip daddr {ipaddress.IPv4Address(local_dns)} tcp dport 53 accept\n"
        if local_dns is not None else ""
    )
    masquerade = (
        f"""    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {subnet} ip daddr != {subnet} masquerade
    }}
""" if nat else ""
    )
    # "add table" + "delete table" first makes each definition an atomic, idempotent replacement.
    return f"""\
add table bridge {t}
delete table bridge {t}
table bridge {t} {{
    map ports {{
        type ifname : verdict
    }}
    chain prerouting {{
        type filter hook prerouting priority -200; policy accept;
        iifname vmap @ports
    }}
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname @ports oifname @ports drop
    }}
}}
add table inet {t}
delete table inet {t}
table inet {t} {{
    set closed {{
        type ipv4_addr; flags interval
        elements = {{ {", ".join(CLOSED_RANGES)} }}
    }}
    set egress_conns {{
        type ipv4_addr; size 65535; flags dynamic
    }}
{owners_map}    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{br}" ct state established,related accept
{local_dns_rules}        iifname "{br}" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        oifname "{br}" ct state established,related accept
        iifname "{br}" meta mark {EGRESS_MARK:#x} ct state new add @egress_conns {{ ip saddr ct count over {max_connections} }} drop
{dns_rules}        iifname "{br}" meta mark {EGRESS_MARK:#x} ip daddr != @closed accept
        iifname "{br}" drop
        oifname "{br}" drop
    }}
{output}{masquerade}}}
"""


def upgrade_script(bridge: str, present: str, *, max_connections: int = EGRESS_MAX_CONNECTIONS) -> str:
    """What tables loaded by an older version lack (the owners' output chain, the egress connection limit),
    added in place so the running workspaces' ports stay; nothing when ``present`` has them.

    Raises:
        InvalidSpec: as :func:`base_script`.
    """
    if "chain output {" in present:
        return ""
    t, br = table_name(bridge), _ifname(bridge)
    full = base_script(bridge, ipaddress.IPv4Network("192.0.2.0/24"), nat=False, max_connections=max_connections)
    limit_rule = next(line.strip() for line in full.splitlines() if "ct count over" in line)
    return (
        f"add set inet {t} egress_conns {{ type ipv4_addr; size 65535; flags dynamic; }}\n"
        f"add map inet {t} owners {{ type ipv4_addr : verdict; }}\n"
        f"insert rule inet {t} forward {limit_rule}\n"
        f"add chain inet {t} output {{ type filter hook output priority filter; policy accept; }}\n"
        f'add rule inet {t} output oifname "{br}" ct state established,related accept\n'
        f'add rule inet {t} output oifname "{br}" meta skuid 0 accept\n'
        f'add rule inet {t} output oifname "{br}" ip daddr vmap @owners\n'
        f'add rule inet {t} output oifname "{br}" drop\n'
    )


def admit_script(bridge: str, port: str, mac: str, ip: ipaddress.IPv4Address, *, egress: bool,
                 owner: int | None = None, mark: int | None = None) -> str:
    """Let workspace port ``port`` send as ``mac``/``ip`` only, and (with ``egress``) out to the internet;
    let host uid ``owner`` (besides root) connect to ``ip`` (tables with host access, see :func:`base_script`;
    None: nobody but root there, and nothing to add where the tables have no host access). ``mark`` marks the
    port's packets with another value than egress's (a domain list: :mod:`.egress_sets`).

    Idempotent: the port's chains are flushed and refilled.

    Raises:
        InvalidSpec: a malformed port name, MAC or owner uid.
    """
    t, chain, host = table_name(bridge), _port_chain(port), _host_chain(port)
    if not _MAC_RE.fullmatch(mac):
        raise InvalidSpec(f"{mac!r} is not a lowercase MAC address")
    if owner is not None and (isinstance(owner, bool) or not isinstance(owner, int) or not 0 <= owner < 2**32 - 1):
        raise InvalidSpec(f"{owner!r} is not a host uid")
    ip = ipaddress.IPv4Address(ip)
    lines = [
        f"add chain bridge {t} {chain}",
        f"flush chain bridge {t} {chain}",
        f"add rule bridge {t} {chain} ether saddr != {mac} drop",
        f"add rule bridge {t} {chain} ether type ip ip saddr != {ip} drop",
        f"add rule bridge {t} {chain} ether type arp arp saddr ether != {mac} drop",
        f"add rule bridge {t} {chain} ether type arp arp saddr ip != {ip} drop",
        f"add rule bridge {t} {chain} ether type != {{ ip, arp }} drop",
    ]
    if egress or mark is not None:
        lines.append(f"add rule bridge {t} {chain} meta mark set {EGRESS_MARK if mark is None else mark:#x}")
    lines.append(f'add element bridge {t} ports {{ "{port}" : jump {chain} }}')
    if owner is not None:
        # Who on the host may connect to it: the chain accepts the owner; whatever returns is dropped.
        lines += [f"add chain inet {t} {host}", f"flush chain inet {t} {host}",
                  f"add rule inet {t} {host} meta skuid {owner} accept",
                  f"add element inet {t} owners {{ {ip} : jump {host} }}"]  # fmt: skip
    return "\n".join(lines) + "\n"


class PolicyPort(BaseModel):
    """One workspace's port on the bridge, as :func:`admit_script` admits it."""

    model_config = ConfigDict(frozen=True)
    port: str
    mac: str
    ip: ipaddress.IPv4Address
    egress: bool = False


class Policy(BaseModel):
    """The whole network policy of one bridge: what :func:`ruleset` renders."""

    model_config = ConfigDict(frozen=True)
    bridge: str
    subnet: ipaddress.IPv4Network
    nat: bool = False
    nameservers: tuple[ipaddress.IPv4Address, ...] = ()
    local_dns: ipaddress.IPv4Address | None = None
    ports: tuple[PolicyPort, ...] = ()


def ruleset(policy: Policy) -> str:
    """The complete nft script for ``policy``: both tables with every port admitted. Pure.

    Raises:
        InvalidSpec: a bridge or port name nft could misread, or a malformed MAC.
    """
    base = base_script(policy.bridge, policy.subnet, nat=policy.nat, nameservers=policy.nameservers,
                       local_dns=policy.local_dns, host_access=False)
    return base + "".join(admit_script(policy.bridge, p.port, p.mac, p.ip, egress=p.egress) for p in policy.ports)


def revoke_script(bridge: str, port: str, present: str) -> str:
    """Remove what :func:`admit_script` added for ``port``, as far as it is ``present`` (``nft list`` text)."""
    t, chain, host = table_name(bridge), _port_chain(port), _host_chain(port)
    lines = []
    if f'"{port}" : jump {chain}' in present:
        lines.append(f'delete element bridge {t} ports {{ "{port}" }}')
    if f"chain {chain} {{" in present:
        lines.append(f"delete chain bridge {t} {chain}")
    for ip in re.findall(rf"([0-9.]+) : jump {host}\b", present):
        lines.append(f"delete element inet {t} owners {{ {ipaddress.IPv4Address(ip)} }}")
    if f"chain {host} {{" in present:
        lines.append(f"delete chain inet {t} {host}")
    return "\n".join(lines) + ("\n" if lines else "")


def claimed_addresses(present: str) -> set[ipaddress.IPv4Address]:
    """Every workspace address ``present`` (``nft list`` text) holds rules for: a port's anti-spoofing rule
    and the maps from addresses (owners, domain lists). Rules outlive a workspace whose server was killed,
    so the allocator skips these addresses as it skips live ones."""
    found = re.findall(r"ip saddr != ([0-9.]+) drop", present)
    found += re.findall(r"(?<![0-9.])([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+) : jump ", present)
    return {ipaddress.IPv4Address(a) for a in found}


def claims_of_others(port: str, ip: ipaddress.IPv4Address, present: str) -> list[str]:
    """The chains of other ports that ``present`` (``nft list`` text) maps ``ip`` to: the address is taken.

    The registry gives an address to one workspace at a time, so such a claim is another server's
    workspace on the same bridge (two state dirs sharing a bridge and subnet) or one left behind by a
    server killed before it revoked its port. Either way admitting ``port`` must not overwrite it.
    """
    suffix = _port_chain(port).removeprefix("port_")
    own = {f"{prefix}_{suffix}" for prefix in ("port", "host", "dom")}  # ours and egress_sets' chains
    address = re.escape(str(ip))
    # Maps from the address (the owner's host chain, a domain list's chain) and the anti-spoofing rule of
    # every port's own chain (the one claim a root-owned workspace without a domain list has).
    found = set(re.findall(rf"(?<![0-9.]){address} : jump ([A-Za-z0-9_]+)", present))
    for chain, body in re.findall(r"chain (port_[A-Za-z0-9_]+) \{(.*?)\n\s*\}", present, re.S):
        if re.search(rf"ip saddr != {address} drop", body):
            found.add(chain)
    return sorted(found - own)


def missing_guards(bridge: str, present: str) -> list[str]:
    """The rules that hold the policy which ``present`` (both tables as ``nft list`` prints them) lacks; none
    when intact. They are each base chain's closing drop, the bridge's jump to each port's chain, and each
    admitted port's own filter. A table emptied with ``nft flush table`` (or a chain flushed) keeps its
    chains, all ``policy accept``: without these rules it lets every workspace reach the host and the others.
    """
    br = _ifname(bridge)
    chains = _chains(present)
    guards = [("bridge", "prerouting", "iifname vmap @ports"), ("bridge", "forward", "iifname @ports oifname @ports drop"),
              ("inet", "input", f'iifname "{br}" drop'), ("inet", "forward", f'iifname "{br}" drop'),
              ("inet", "forward", f'oifname "{br}" drop')]  # fmt: skip
    if ("inet", "output") in chains:  # tables an older version loaded may lack it: upgrade_script adds it whole
        guards.append(("inet", "output", f'oifname "{br}" drop'))
    missing = [f"{family} {chain}: {rule}" for family, chain, rule in guards if rule not in chains.get((family, chain), [])]
    for port in admitted_ports(present):
        if not any(r.startswith("ether saddr != ") for r in chains.get(("bridge", _port_chain(port)), [])):
            missing.append(f"bridge {_port_chain(port)}: its source filter")
    return missing


def _chains(present: str) -> dict[tuple[str, str], list[str]]:
    """Each chain's rules in ``nft list`` text, by (family, chain name)."""
    chains: dict[tuple[str, str], list[str]] = {}
    family, rules = "", None
    for line in present.splitlines():
        words = line.split()
        if line.startswith("table ") and len(words) >= 2:
            family, rules = words[1], None
        elif len(words) == 3 and words[0] == "chain" and words[2] == "{":
            rules = chains.setdefault((family, words[1]), [])
        elif rules is not None and words == ["}"]:
            rules = None
        elif rules is not None and words and words[0] != "type":
            rules.append(" ".join(words))
    return chains


def admitted_ports(present: str) -> list[str]:
    """The workspace ports admitted in ``present`` (``nft list`` text of our tables)."""
    return re.findall(r'"([A-Za-z0-9_.-]{1,15})" : jump port_', present)


def host_nameservers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[ipaddress.IPv4Address]:
    """The host's IPv4 resolvers that a workspace could reach through NAT (not loopback)."""
    out = []
    try:
        text = resolv_conf.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            try:
                addr = ipaddress.IPv4Address(parts[1])
            except ValueError:
                continue
            if not addr.is_loopback:
                out.append(addr)
    return out


async def run_script(script: str) -> None:
    """Load an nft script as one transaction (in process where libnftables is there, :mod:`.nft`).

    Raises:
        BackendError: nft is missing or refused the script (the message says why).
    """
    await nft.run(script)


async def table_exists(bridge: str) -> str | None:
    """Both tables as ``nft list`` prints them, or None when either is missing (or nft is not installed:
    then no table of ours can exist, and stop/destroy need not fail for it)."""
    return _both(await nft.list_tables(_tables(bridge)))


def table_exists_sync(bridge: str) -> str | None:
    """:func:`table_exists`, blocking (for ``doctor``)."""
    return _both(nft.list_tables_sync(_tables(bridge)))


def _tables(bridge: str) -> list[tuple[str, str]]:
    t = table_name(bridge)
    return [("bridge", t), ("inet", t)]


def _both(out: list[str | None]) -> str | None:
    if any(text is None for text in out):
        return None
    return "\n".join(text for text in out if text is not None)


async def remove_tables(bridge: str) -> None:
    """Delete both tables (IP forwarding is left as it is: other software may rely on it)."""
    t = table_name(bridge)
    for family in ("bridge", "inet"):
        with contextlib.suppress(BackendError):
            await nft.run(f"delete table {family} {t}")


async def enable_forwarding(proc_sys: Path = Path("/proc/sys")) -> None:
    """Turn on IPv4 forwarding (NAT needs it).

    Raises:
        BackendError: it cannot be written.
    """
    try:
        (proc_sys / "net/ipv4/ip_forward").write_text("1\n")
    except OSError as exc:
        raise BackendError(f"cannot enable IPv4 forwarding for NAT: {exc}") from exc
