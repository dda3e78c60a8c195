"""Egress by domain without root: the list's rules, the nft scripts exactly, the resolver's decisions.

The resolver is driven through its real wire path (dnspython messages in, bytes out) with a stand-in
upstream on loopback; what needs nftables (an address entering a set) is in test_egress_domains.py.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from sandbox_mcp import egress
from sandbox_mcp.config import Settings, upstream_addresses
from sandbox_mcp.errors import InvalidSpec
from sandbox_mcp.hostnet import egress_sets
from sandbox_mcp.hostnet.resolver import Resolver

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(("patterns", "name", "allowed"), [
    (["pypi.org"], "pypi.org", True),
    (["pypi.org"], "PyPI.org.", True),
    (["pypi.org"], "www.pypi.org", False),
    (["pypi.org"], "evilpypi.org", False),
    (["*.github.com"], "api.github.com", True),
    (["*.github.com"], "a.b.github.com", True),
    (["*.github.com"], "github.com", False),
    (["*.github.com"], "evilgithub.com", False),
    (["*.github.com"], "*.github.com", False),
    (["pypi.org"], "pypi.org\x00.evil.com", False),
])
def test_allows(patterns: list[str], name: str, allowed: bool) -> None:
    assert egress.allows(patterns, name) is allowed


@pytest.mark.parametrize(("value", "message"), [
    ([], "empty list"),
    (["10.0.0.1"], "is an address"),
    (["localhost"], "not a domain name"),
    (["a..b.com"], "not a domain name"),
    (["*.*.b.com"], "not a domain name"),
    (["x_y.com"], "not a domain name"),
    (["a.com", "A.com"], "twice"),
    ([f"n{i}.example.com" for i in range(65)], "more than the 64"),
    ("everything", "is not 'none', 'internet'"),
    ([7], "give names as strings"),
])
def test_bad_lists_are_refused_with_one_clear_message(value: object, message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        egress.parse(value)


def test_lists_are_normalised() -> None:
    assert egress.parse(["PyPI.org.", "*.Example.COM"]) == ["pypi.org", "*.example.com"]
    assert egress.parse("internet") == "internet"


def test_check_nat_names_the_fix() -> None:
    egress.check_nat("none", False)
    egress.check_nat(["a.org"], True)
    with pytest.raises(InvalidSpec, match="SANDBOX_MCP_NAT=true"):
        egress.check_nat(["a.org"], False)


def test_upstreams_from_settings_never_the_resolver_itself() -> None:
    s = Settings(egress_dns_upstreams="192.0.2.53, 192.168.83.1, 198.51.100.5:5353")
    assert upstream_addresses(s) == [(ipaddress.IPv4Address("192.0.2.53"), 53),
                                     (ipaddress.IPv4Address("198.51.100.5"), 5353)]
    with pytest.raises(ValueError, match="egress_ttl_min_s"):
        Settings(egress_ttl_min_s=100, egress_ttl_max_s=10)


def test_domain_scripts_exactly() -> None:
    host = ipaddress.IPv4Address("192.168.83.1")
    assert egress_sets.domain_base_script("sbx-br", host, 5353, "") == (
        "add map inet sandbox_mcp_sbx_br domain_ports { type ipv4_addr : verdict; }\n"
        "add chain inet sandbox_mcp_sbx_br dns_redirect { type nat hook prerouting priority dstnat; policy accept; }\n"
        'add rule inet sandbox_mcp_sbx_br dns_redirect iifname "sbx-br" meta mark 0x5b0d udp dport 53 '
        "dnat ip to 192.168.83.1:5353\n"
        'add rule inet sandbox_mcp_sbx_br dns_redirect iifname "sbx-br" meta mark 0x5b0d tcp dport 53 '
        "dnat ip to 192.168.83.1:5353\n"
        'insert rule inet sandbox_mcp_sbx_br input iifname "sbx-br" meta mark 0x5b0d ip daddr 192.168.83.1 '
        "udp dport 5353 accept\n"
        'insert rule inet sandbox_mcp_sbx_br input iifname "sbx-br" meta mark 0x5b0d ip daddr 192.168.83.1 '
        "tcp dport 5353 accept\n"
        'insert rule inet sandbox_mcp_sbx_br forward iifname "sbx-br" meta mark 0x5b0d ip saddr vmap @domain_ports\n'
    )
    assert egress_sets.domain_base_script("sbx-br", host, 53, "map domain_ports {") == ""
    script = egress_sets.admit_domains_script("sbx-br", "sb-ws1", ipaddress.IPv4Address("192.168.83.7"),
                                              epoch=0x1234, keep_addresses=False, max_connections=9)
    assert script.splitlines() == [
        "add set inet sandbox_mcp_sbx_br allow_sb_ws1 { type ipv4_addr; flags timeout; size 4096; }",
        "flush set inet sandbox_mcp_sbx_br allow_sb_ws1",
        "add chain inet sandbox_mcp_sbx_br dom_sb_ws1",
        "flush chain inet sandbox_mcp_sbx_br dom_sb_ws1",
        "add rule inet sandbox_mcp_sbx_br dom_sb_ws1 ct state established,related ct mark 0x1234 accept",
        "add rule inet sandbox_mcp_sbx_br dom_sb_ws1 ip daddr @closed return",
        "add rule inet sandbox_mcp_sbx_br dom_sb_ws1 ct state new add @egress_conns { ip saddr ct count over 9 } drop",
        "add rule inet sandbox_mcp_sbx_br dom_sb_ws1 ct state new ip daddr @allow_sb_ws1 ct mark set 0x1234 accept",
        "add element inet sandbox_mcp_sbx_br domain_ports { 192.168.83.7 : jump dom_sb_ws1 }",
    ]
    listed = "\tchain dom_sb_ws1 {\n\t\tct state established,related ct mark 0x00001234 accept\n\t}"
    assert egress_sets.current_epoch("sb-ws1", listed) == 0x1234
    with pytest.raises(InvalidSpec):
        egress_sets.admit_domains_script("sbx-br", "sb ws1", ipaddress.IPv4Address("192.168.83.7"), epoch=1,
                                         keep_addresses=True)
    assert egress_sets.add_addresses_script("t", "allow_x", {ipaddress.IPv4Address("203.0.113.9"): 30}) == (
        "add element inet t allow_x { 203.0.113.9 }\n"
        "delete element inet t allow_x { 203.0.113.9 }\n"
        "add element inet t allow_x { 203.0.113.9 timeout 30s }\n"
    )


# -- the resolver's decisions --------------------------------------------------------------------

ZONE = {"api.ok.test.": ("A", "203.0.113.10"), "out.ok.test.": ("CNAME", "web.else.test."),
        "web.else.test.": ("A", "203.0.113.11")}


@pytest.fixture
def upstream() -> Iterator[tuple[int, list[str]]]:
    """A stand-in authoritative server on loopback; the list of names it was asked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    asked: list[str] = []

    def serve() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(4096)
            except OSError:
                return
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            name = q.question[0].name.to_text()
            asked.append(name)
            while name in ZONE:
                kind, value = ZONE[name]
                r.answer.append(dns.rrset.from_text(name, 60, "IN", kind, value))
                name = value if kind == "CNAME" else ""
            sock.sendto(r.to_wire(), peer)

    threading.Thread(target=serve, daemon=True).start()
    yield sock.getsockname()[1], asked
    sock.close()


def _resolver(tmp_path: Path, port: int, rate: float = 50.0) -> Resolver:
    config = {"listen": "127.0.0.1", "port": 53, "upstreams": [["127.0.0.1", port]], "table": "t",
              "rate": rate, "workspaces": {"192.168.83.7": {"port": "sb-a", "set": "allow_sb_a",
                                                            "domains": ["*.ok.test"]}}}
    path = tmp_path / "resolver.json"
    path.write_text(json.dumps(config))
    return Resolver(path)


async def _ask(r: Resolver, name: str, source: str = "192.168.83.7", rdtype: str = "A") -> dns.message.Message:
    wire = await r.answer(dns.message.make_query(name, rdtype).to_wire(), source, tcp=False)
    assert wire is not None
    return dns.message.from_wire(wire)


async def test_resolver_decisions(tmp_path: Path, upstream: tuple[int, list[str]]) -> None:
    port, asked = upstream
    r = _resolver(tmp_path, port)
    # Off the list: NXDOMAIN, and the name never goes upstream.
    assert (await _ask(r, "web.else.test")).rcode() == dns.rcode.NXDOMAIN
    # An alias out of the list: NXDOMAIN, no address given.
    reply = await _ask(r, "out.ok.test")
    assert reply.rcode() == dns.rcode.NXDOMAIN and not reply.answer
    assert asked == ["out.ok.test."]
    # A source with no policy: REFUSED. AAAA: empty at once. ANY: refused.
    assert (await _ask(r, "api.ok.test", source="192.168.83.99")).rcode() == dns.rcode.REFUSED
    aaaa = await _ask(r, "api.ok.test", rdtype="AAAA")
    assert aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer
    assert (await _ask(r, "api.ok.test", rdtype="ANY")).rcode() == dns.rcode.REFUSED
    assert asked == ["out.ok.test."]
    # Garbage gets no reply.
    assert await r.answer(b"\x00\x01garbage", "192.168.83.7", tcp=False) is None


async def test_resolver_rate_limit(tmp_path: Path, upstream: tuple[int, list[str]]) -> None:
    r = _resolver(tmp_path, upstream[0], rate=5.0)
    codes = [(await _ask(r, "x.else.test")).rcode() for _ in range(30)]
    assert codes[:10] == [dns.rcode.NXDOMAIN] * 10  # a burst of twice the rate
    assert dns.rcode.REFUSED in codes[10:]


async def test_resolver_reads_a_changed_policy(tmp_path: Path, upstream: tuple[int, list[str]]) -> None:
    r = _resolver(tmp_path, upstream[0])
    assert (await _ask(r, "web.else.test")).rcode() == dns.rcode.NXDOMAIN
    config = json.loads(r.config_path.read_text())
    config["workspaces"] = {}
    tmp = r.config_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config))
    tmp.replace(r.config_path)
    assert (await _ask(r, "web.else.test")).rcode() == dns.rcode.REFUSED
