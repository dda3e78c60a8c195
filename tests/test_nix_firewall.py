"""The NixOS module's network policy: the same as direct mode's, and it holds when loaded for real.

The module renders its nftables ruleset from ``nix/modules/firewall-template.json``, which
:mod:`sandbox_mcp.hostnet.nixtemplate` generates from direct mode's ``hostnet/firewall.py``. These
tests check that the committed template is what firewall.py makes now, that the module's rendering
equals :func:`firewall.ruleset` for the same workspaces, that ``nft -c`` accepts it, and then load
what the evaluation produced into network namespaces this test makes (a "host" with the bridge, two
workspace-like namespaces on it, an "upstream" behind the host) and try what direct mode's policy
tests try (tests/test_network_policy.py): A cannot reach B, cannot spoof, cannot reach the host's
services; egress "none" reaches nothing outside, not even the host's DNS; egress "internet" reaches
the outside but not private ranges or the metadata address behind it; the host's own SSH to a
workspace works. Nothing NixOS is booted: the ruleset is the module's, the kernel is this one.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandbox_mcp.hostnet import firewall, nixtemplate
from sandbox_mcp.naming import mac_for

from .test_nix import EVAL_MISSING, REPO, _ws, evaluate, needs_eval, settings

TEMPLATE = REPO / "nix" / "modules" / "firewall-template.json"
INCUS_HOST = {"virtualisation": {"incus": {"enable": True}}}
WORKSPACES = {
    "a": _ws("container", "192.168.83.10", egress="internet"),
    "b": _ws("vm", "192.168.83.11"),
    "inc": _ws("incus", "192.168.83.12"),
}
PORTS = {"a": "vb-sbx-a", "b": "vm-b", "inc": "vi-inc"}  # how each backend names the host side


def test_the_committed_template_is_what_firewall_py_renders() -> None:
    assert TEMPLATE.read_text() == nixtemplate.template_json(), (
        "nix/modules/firewall-template.json is stale: python -m sandbox_mcp.hostnet.nixtemplate "
        "> nix/modules/firewall-template.json"
    )


def test_placeholders_occur_nowhere_else() -> None:
    # The module replaces them as plain strings: none may be part of the policy's own text.
    plain = firewall.ruleset(firewall.Policy(bridge="br0", subnet=ipaddress.IPv4Network("10.9.0.0/24")))
    for value in nixtemplate.PLACEHOLDERS.values():
        assert value not in plain


def _policy(out: dict[str, Any], dns: bool) -> firewall.Policy:
    ports = tuple(
        firewall.PolicyPort(port=PORTS[name], mac=mac_for(name), ip=ws["ip"], egress=ws.get("egress") == "internet")
        for name, ws in sorted(WORKSPACES.items())
    )
    return firewall.Policy(
        bridge="sandbox-br",
        subnet=ipaddress.IPv4Network("192.168.83.0/24"),
        nameservers=() if dns else (ipaddress.IPv4Address("9.9.9.9"), ipaddress.IPv4Address("149.112.112.112")),
        local_dns=ipaddress.IPv4Address("192.168.83.1") if dns else None,
        ports=ports,
    )


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, dict[str, Any]]:
    if EVAL_MISSING:
        pytest.skip(EVAL_MISSING)
    tmp = tmp_path_factory.mktemp("nix-firewall")
    no_dns = {"dns": False, "nameservers": ["9.9.9.9", "149.112.112.112"]}
    return {
        True: evaluate(tmp, {"settings": settings(WORKSPACES), "host": INCUS_HOST}),
        False: evaluate(tmp, {"settings": settings(WORKSPACES, network=no_dns), "host": INCUS_HOST}),
    }


@needs_eval
@pytest.mark.parametrize("dns", [True, False], ids=["host-dns", "nameservers"])
def test_the_modules_ruleset_is_direct_modes(evaluated: dict[bool, dict[str, Any]], dns: bool) -> None:
    out = evaluated[dns]
    assert out["failedAssertions"] == []
    assert out["network"]["ruleset"] == firewall.ruleset(_policy(out, dns))


@needs_eval
def test_the_firewall_unit_loads_it_before_any_workspace(evaluated: dict[bool, dict[str, Any]]) -> None:
    out = evaluated[True]
    unit = out["services"]["sandboxed-workspace-firewall"]
    start = unit["serviceConfig"]["ExecStart"]
    nft, _, file = start.partition(" -f ")
    assert nft.endswith("-nftables/bin/nft")
    assert file.split("#", 1)[1] == out["network"]["ruleset"]  # the stub store path carries the text
    assert unit["serviceConfig"]["ExecReload"] == start
    assert unit["wantedBy"] == ["multi-user.target"]
    # A changed policy is reloaded, never restarted: a restart would restart every workspace (Requires=).
    assert unit["reloadIfChanged"] is True and unit["restartTriggers"] == []
    for unit_name in ("container@sbx-a", "microvm@sbx-b", "microvm-virtiofsd@sbx-b", "incus-workspace-inc"):
        assert "sandboxed-workspace-firewall.service" in out["services"][unit_name]["requires"], unit_name
        assert "sandboxed-workspace-firewall.service" in out["services"][unit_name]["after"], unit_name


@needs_eval
def test_a_host_with_nftables_gets_it_back_after_a_flush(tmp_path: Path) -> None:
    # NixOS's nftables.service replaces the whole ruleset when it starts or reloads.
    out = evaluate(tmp_path, {"settings": settings({"a": WORKSPACES["a"]}),
                              "host": {"networking": {"nftables": {"enable": True}}}})
    unit = out["services"]["sandboxed-workspace-firewall"]
    assert unit["after"] == ["nftables.service"]
    assert unit["unitConfig"]["ReloadPropagatedFrom"] == ["nftables.service"]
    assert out["services"]["nftables"]["postStart"] == unit["serviceConfig"]["ExecStart"]


@needs_eval
def test_egress_internet_needs_nat(tmp_path: Path) -> None:
    out = evaluate(tmp_path, {"settings": settings({"a": WORKSPACES["a"]}, network={"nat": False})})
    assert any('egress\n"internet", which goes out through NAT' in m for m in out["failedAssertions"])
    out = evaluate(tmp_path, {"settings": settings({"a": _ws("container", "192.168.83.10")}, network={"nat": False})})
    assert out["failedAssertions"] == []


@needs_eval
@pytest.mark.skipif(shutil.which("nft") is None, reason="nft is not installed (apt-get install nftables)")
@pytest.mark.parametrize("dns", [True, False], ids=["host-dns", "nameservers"])
def test_nft_accepts_the_ruleset(evaluated: dict[bool, dict[str, Any]], tmp_path: Path, dns: bool) -> None:
    path = tmp_path / "ruleset.nft"
    path.write_text(evaluated[dns]["network"]["ruleset"])
    check = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr


# ---- loaded for real -------------------------------------------------------------------------

SUFFIX = str(os.getpid())  # /run/netns is shared with other test runs on this machine
HOST, WS_A, WS_B, UP = (f"sbxn{x}{SUFFIX}" for x in ("h", "a", "b", "u"))

# A TCP service answering "hi from <peer>", and a UDP one printing what arrives (then a line per datagram).
SERVE = """
import socket, sys, threading
host, tcp_port, udp_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind((host, tcp_port)); t.listen(16)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((host, udp_port))
def tcp():
    while True:
        c, (peer, _) = t.accept(); c.sendall(b"hi from " + peer.encode()); c.close()
def udp():
    while True:
        data, peer = u.recvfrom(256); u.sendto(b"dns", peer); print(data.decode(), flush=True)
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
udp()
"""
REACH = """
import socket, sys
s = socket.socket(); s.settimeout(2)
if sys.argv[3] != "-": s.bind((sys.argv[3], 0))
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); print(s.recv(64).decode() or "no")
except OSError:
    print("no")
"""
ASK = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(2)
if sys.argv[4] != "-": u.bind((sys.argv[4], 0))
u.sendto(sys.argv[3].encode(), (sys.argv[1], int(sys.argv[2])))
try:
    print(u.recv(64).decode())
except OSError:
    print("no")
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _in(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def _reach(ns: str, addr: str, port: int, source: str = "-") -> str:
    return subprocess.run([*_in(ns), sys.executable, "-c", REACH, addr, str(port), source],
                          capture_output=True, text=True, check=True).stdout.strip()


def _ask(ns: str, addr: str, port: int, payload: str, source: str = "-") -> str:
    return subprocess.run([*_in(ns), sys.executable, "-c", ASK, addr, str(port), payload, source],
                          capture_output=True, text=True, check=True).stdout.strip()


class Net:
    """The namespaces, and the services this test runs in them (stopped by PID at the end)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def serve(self, ns: str, addr: str, tcp_port: int, udp_port: int) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*_in(ns), sys.executable, "-c", SERVE, addr, str(tcp_port), str(udp_port)],
                                stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc


def _arrived_before(server: subprocess.Popen[str], control: str) -> list[str]:
    """What a UDP service got up to ``control`` (sent last on the same path, it arrives after the rest)."""
    assert server.stdout is not None
    seen = []
    while (line := server.stdout.readline().strip()) != control:
        assert line, "the service stopped before the control datagram arrived"
        seen.append(line)
    return seen


@pytest.fixture
def net(evaluated: dict[bool, dict[str, Any]], tmp_path: Path) -> Iterator[Net]:
    if os.geteuid() != 0 or shutil.which("nft") is None:
        pytest.skip("needs root and nft (network namespaces, nftables)")
    ruleset = tmp_path / "ruleset.nft"
    ruleset.write_text(evaluated[True]["network"]["ruleset"])
    n = Net()
    for ns in (HOST, WS_A, WS_B, UP):
        _ip("netns", "add", ns)
    try:
        # The host: the bridge with its address, as network.nix declares it.
        _ip("-n", HOST, "link", "add", "sandbox-br", "type", "bridge")
        _ip("-n", HOST, "addr", "add", "192.168.83.1/24", "dev", "sandbox-br")
        _ip("-n", HOST, "link", "set", "sandbox-br", "up")
        _ip("-n", HOST, "link", "set", "lo", "up")
        # Each workspace: its port on the bridge named as the backend names it, its MAC and address.
        for ns, name in ((WS_A, "a"), (WS_B, "b")):
            port, ws = PORTS[name], WORKSPACES[name]
            _ip("-n", HOST, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", HOST, "link", "set", port, "master", "sandbox-br", "up")
            _ip("-n", ns, "link", "set", "eth0", "address", mac_for(name))
            _ip("-n", ns, "addr", "add", f"{ws['ip']}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "default", "via", "192.168.83.1")
        # The upstream: "the internet" (198.51.100.2), and a private network and a metadata service
        # behind it. It has no route back to the workspaces: replies need the host's NAT.
        _ip("-n", HOST, "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns", UP)
        _ip("-n", HOST, "addr", "add", "198.51.100.1/24", "dev", "up0")
        _ip("-n", HOST, "link", "set", "up0", "up")
        for net_ in ("10.199.0.0/24", "169.254.169.254/32"):
            _ip("-n", HOST, "route", "add", net_, "via", "198.51.100.2")
        _ip("-n", UP, "addr", "add", "198.51.100.2/24", "dev", "up1")
        for cmd in (["link", "set", "up1", "up"], ["link", "set", "lo", "up"],
                    ["addr", "add", "10.199.0.2/32", "dev", "lo"], ["addr", "add", "169.254.169.254/32", "dev", "lo"]):
            _ip("-n", UP, *cmd)
        subprocess.run([*_in(HOST), "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
        # networking.nat's part (the module's NAT): masquerade what leaves the subnet.
        subprocess.run([*_in(HOST), "nft", "-f", "-"], check=True, input=(
            "table ip nixos_nat_standin {\n chain post {\n  type nat hook postrouting priority srcnat;\n"
            "  ip saddr 192.168.83.0/24 ip daddr != 192.168.83.0/24 masquerade\n }\n}\n"), text=True)
        # The module's ruleset, exactly as evaluated.
        subprocess.run([*_in(HOST), "nft", "-f", str(ruleset)], check=True)
        yield n
    finally:
        for proc in n.procs:
            proc.kill()
            proc.wait()
        for ns in (HOST, WS_A, WS_B, UP):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@needs_eval
def test_the_modules_policy_holds_when_loaded(net: Net) -> None:
    a, b = WORKSPACES["a"]["ip"], WORKSPACES["b"]["ip"]
    upstream = net.serve(UP, "0.0.0.0", 8080, 9999)
    host_services = net.serve(HOST, "192.168.83.1", 8081, 53)  # a host service and the host's DNS
    net.serve(WS_B, b, 22, 2222)  # stand-ins for the workspaces' sshd
    net.serve(WS_A, a, 22, 2222)

    # egress "internet" (A): the outside, masqueraded behind the host; never what lies behind it.
    assert _reach(WS_A, "198.51.100.2", 8080) == "hi from 198.51.100.1"
    assert _reach(WS_A, "10.199.0.2", 8080) == "no"
    assert _reach(WS_A, "169.254.169.254", 8080) == "no"
    # egress "none" (B): nothing outside.
    assert _reach(WS_B, "198.51.100.2", 8080) == "no"
    # DNS on the host only for a workspace with egress.
    assert _ask(WS_A, "192.168.83.1", 53, "a-asks") == "dns"
    assert _ask(WS_B, "192.168.83.1", 53, "b-asks") == "no"
    # No other host service, and no workspace reaches the other.
    for ns in (WS_A, WS_B):
        assert _reach(ns, "192.168.83.1", 8081) == "no"
    assert _reach(WS_A, b, 22) == "no" and _reach(WS_B, a, 22) == "no"
    assert _ask(WS_A, b, 2222, "a-to-b") == "no"
    # The host's own SSH to the workspaces works.
    assert _reach(HOST, a, 22) == "hi from 192.168.83.1" and _reach(HOST, b, 22) == "hi from 192.168.83.1"

    # Anti-spoofing: A, with root in its own network namespace, takes B's address, then another MAC.
    _ip("-n", WS_A, "addr", "add", f"{b}/32", "dev", "eth0")
    try:
        assert _ask(WS_A, "198.51.100.2", 9999, "spoofed-ip", source=b) == "no"
        assert _ask(WS_A, "192.168.83.1", 53, "spoofed-dns", source=b) == "no"
    finally:
        _ip("-n", WS_A, "addr", "del", f"{b}/32", "dev", "eth0")
    _ip("-n", WS_A, "link", "set", "eth0", "address", "02:de:ad:be:ef:01")
    try:
        assert _ask(WS_A, "198.51.100.2", 9999, "spoofed-mac") == "no"
    finally:
        _ip("-n", WS_A, "link", "set", "eth0", "address", mac_for("a"))
    _ip("-n", WS_A, "neigh", "flush", "all")
    assert _ask(WS_A, "198.51.100.2", 9999, "control") == "dns"  # its own identity still works
    assert _arrived_before(upstream, "control") == []
    assert _ask(WS_A, "192.168.83.1", 53, "dns-control") == "dns"
    assert _arrived_before(host_services, "dns-control") == ["a-asks"]  # B's and the spoofed one never came
