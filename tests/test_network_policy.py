"""The workspace network policy, for real: nftables on the test bridge, real containers, an 'upstream'.

The upstream is a network namespace this test makes (inside the private namespace of
./scripts/test): 198.51.100.2 stands for the internet, 10.199.0.2 and 169.254.169.254 for a
private network and a cloud metadata service behind it. It has no route back to the workspace
subnet, so a reply arrives only if the host masqueraded the request.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import anyio
import pytest

from sandbox_mcp import doctor
from sandbox_mcp.config import Settings
from sandbox_mcp.errors import Conflict
from sandbox_mcp.hostnet import HostNetwork, firewall
from sandbox_mcp.manager import WorkspaceManager, watchdog
from sandbox_mcp.models import Check, CreateSpec
from sandbox_mcp.naming import FIRST_HOST_OFFSET
from sandbox_mcp.runtimes.nspawn import NspawnState

from .conftest import destroy_all
from .points import HUNG_S

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

UPSTREAM_SERVER = """
import socket, sys, threading
def tcp():
    while True:
        c, (peer, _) = s.accept()
        c.recv(1024)
        c.sendall(b"HTTP/1.0 200 OK\\r\\n\\r\\nseen-from " + peer.encode())
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080))
s.listen(16)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 9999))
threading.Thread(target=tcp, daemon=True).start()
print("listening", flush=True)
while True:  # every datagram that arrives, by its payload: what got through
    data, _ = u.recvfrom(256)
    print(data.decode(), flush=True)
"""
NS = f"sbxt-up{os.getpid()}"  # /run/netns is shared with other test runs on this machine
IP = ["ip"]


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def upstream() -> Iterator[subprocess.Popen[str]]:
    if not shutil.which("nft"):
        pytest.skip("nft is not installed (apt-get install nftables)")
    _run(*IP, "netns", "add", NS)
    server = None
    try:
        _run(*IP, "link", "add", "sbxt-uh", "type", "veth", "peer", "name", "sbxt-uu", "netns", NS)
        _run(*IP, "addr", "add", "198.51.100.1/24", "dev", "sbxt-uh")
        _run(*IP, "link", "set", "sbxt-uh", "up")
        for net in ("10.199.0.0/24", "169.254.169.254/32"):
            _run(*IP, "route", "add", net, "via", "198.51.100.2")
        for cmd in (["addr", "add", "198.51.100.2/24", "dev", "sbxt-uu"], ["link", "set", "sbxt-uu", "up"],
                    ["link", "set", "lo", "up"], ["addr", "add", "10.199.0.2/32", "dev", "lo"],
                    ["addr", "add", "169.254.169.254/32", "dev", "lo"]):
            _run(*IP, "-n", NS, *cmd)
        server = subprocess.Popen([*IP, "netns", "exec", NS, sys.executable, "-c", UPSTREAM_SERVER],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None and server.stdout.readline().strip() == "listening"
        yield server
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run([*IP, "netns", "del", NS], check=False)
        subprocess.run([*IP, "link", "del", "sbxt-uh"], check=False, capture_output=True)


class _HostService:
    """A TCP service of the host's, on the bridge address: no workspace may reach it."""

    def __init__(self, address: str, port: int = 8081) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        self.sock.listen(8)
        self.accepted: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                c, (peer, _) = self.sock.accept()
            except OSError:
                return
            self.accepted.append(peer)
            c.close()


_DATAGRAM = """
import socket, sys
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((sys.argv[1], 0))
u.sendto(sys.argv[2].encode(), ("198.51.100.2", 9999))
"""


def _send(netns: list[str], source: str, payload: str) -> None:
    subprocess.run([*netns, sys.executable, "-c", _DATAGRAM, source, payload], check=True)


def _arrived_before(upstream: subprocess.Popen[str], control: str) -> list[str]:
    """The payloads the upstream got up to ``control``: sent last on the same path, it arrives after the rest."""
    assert upstream.stdout is not None
    seen = []
    while (line := upstream.stdout.readline().strip()) != control:
        assert line, "the upstream stopped before the control datagram arrived"
        seen.append(line)
    return seen


_REACH = """
import socket, sys
s = socket.socket()
s.settimeout(4)
s.bind((sys.argv[1], 0))
try:
    s.connect(("198.51.100.2", 8080))
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    print("ok" if b"seen-from" in s.recv(1024) else "no")
except OSError:
    print("no")
"""


def _reach(netns: list[str], source: str) -> str:
    """From inside a workspace's network namespace, as ``source``: does the upstream answer?"""
    return subprocess.run([*netns, sys.executable, "-c", _REACH, source], capture_output=True, text=True,
                          check=True).stdout.strip()


def _default_dev(netns: list[str]) -> str:
    out = subprocess.run([*netns, "ip", "-o", "route", "show", "default"], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[out.index("dev") + 1]


async def _curl(m: WorkspaceManager, name: str, url: str, *extra: str) -> tuple[int | None, str]:
    r = await m.exec(name, f"curl -s --max-time 4 {' '.join(extra)} {url}")
    return r.exit_code, r.stdout


async def _kept_apart(m: WorkspaceManager, others: dict[str, str | None], host_url: str) -> None:
    """Each workspace named reaches neither ``host_url`` (a host service) nor its other's sshd."""
    for name, other in others.items():
        assert (await _curl(m, name, host_url))[0] != 0, name
        r = await m.exec(name, f"timeout 4 bash -c '</dev/tcp/{other}/22' && echo open || echo closed")
        assert r.stdout.strip() == "closed", (name, r)


async def test_default_policy_egress_and_anti_spoofing(settings: Settings, upstream: subprocess.Popen[str]) -> None:
    nat_settings = settings.model_copy(update={"nat": True})
    table = firewall.table_name(settings.bridge)
    async with WorkspaceManager(nat_settings) as m:
        try:
            out = await m.create(CreateSpec(name="out", egress="internet"))
            shut = await m.create(CreateSpec(name="shut"))
            assert (out.egress, shut.egress) == ("internet", "none")
            service = _HostService(str(settings.host_ip))

            # egress 'internet': the outside, masqueraded behind the host.
            assert await _curl(m, "out", "http://198.51.100.2:8080/") == (0, "seen-from 198.51.100.1")
            # ...but never private ranges or the metadata address behind it.
            assert (await _curl(m, "out", "http://10.199.0.2:8080/"))[0] != 0
            assert (await _curl(m, "out", "http://169.254.169.254:8080/"))[0] != 0
            # egress 'none': nothing outside.
            assert (await _curl(m, "shut", "http://198.51.100.2:8080/"))[0] != 0
            # Neither reaches a host service nor the other workspace's sshd.
            await _kept_apart(m, {"out": shut.ip, "shut": out.ip}, f"http://{settings.host_ip}:8081/")
            assert service.accepted == []

            # Anti-spoofing. Root in a container has no CAP_NET_ADMIN, but root in a VM (or a container
            # granted it) can re-address its interface; the filter must hold then. So this plays that
            # root from the host side, inside the workspace's network namespace: sending as 'shut'
            # (its IP) or with another MAC gets nothing through, while its own identity works.
            leader = NspawnState.model_validate((await m.registry.get("out")).runtime_state).leader
            assert leader is not None
            netns = ["nsenter", f"--net=/proc/{leader.pid}/ns/net"]
            dev = _default_dev(netns)
            assert _reach(netns, out.ip) == "ok"
            _run(*netns, "ip", "addr", "add", f"{shut.ip}/32", "dev", dev)
            try:
                _send(netns, shut.ip, "spoofed-ip")
                _send(netns, out.ip, "control-1")
                assert _arrived_before(upstream, "control-1") == []
            finally:
                _run(*netns, "ip", "addr", "del", f"{shut.ip}/32", "dev", dev)
            mac = json.loads(subprocess.run([*netns, "ip", "-j", "link", "show", "dev", dev], capture_output=True,
                                            text=True, check=True).stdout)[0]["address"]
            _run(*netns, "ip", "link", "set", "dev", dev, "address", "02:de:ad:be:ef:01")
            try:
                _send(netns, out.ip, "spoofed-mac")
            finally:
                _run(*netns, "ip", "link", "set", "dev", dev, "address", mac)
            _send(netns, out.ip, "control-2")
            assert _arrived_before(upstream, "control-2") == []
            assert _reach(netns, out.ip) == "ok"
            assert (await m.exec("out", "true")).exit_code == 0  # the server still reaches it afterwards
        finally:
            await destroy_all(m)
    # The tables went with the last workspace; nothing else on the host's firewall was touched.
    for family in ("bridge", "inet"):
        listed = subprocess.run(["nft", "list", "table", family, table], capture_output=True)
        assert listed.returncode != 0


async def test_egress_internet_needs_nat_on_the_host(settings: Settings) -> None:
    async with WorkspaceManager(settings) as m:  # nat off
        from sandbox_mcp.errors import InvalidSpec

        with pytest.raises(InvalidSpec, match="SANDBOX_MCP_NAT=true"):
            await m.create(CreateSpec(name="nonat", egress="internet"))
        assert (await m.registry.read()).workspaces == {}


_HOLD = """
import socket
held, refused = [], 0
for _ in range(6):
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect(("198.51.100.2", 8080))
        held.append(s)  # kept open: it counts against the limit
    except OSError:
        refused += 1
print(len(held), refused)
"""


async def test_an_egress_workspace_keeps_at_most_its_connection_limit_open(
    settings: Settings, upstream: subprocess.Popen[str]
) -> None:
    """One workspace cannot fill the host's connection tracking table: past ``egress_max_connections``
    open connections its new ones are dropped (and once it closes them, it connects again)."""
    limited = settings.model_copy(update={"nat": True, "egress_max_connections": 3})
    async with WorkspaceManager(limited) as m:
        try:
            await m.create(CreateSpec(name="conns", egress="internet"))
            r = await m.exec("conns", f"python3 -c '{_HOLD}'", timeout_s=60)
            assert r.stdout.split() == ["3", "3"], r
            assert await _curl(m, "conns", "http://198.51.100.2:8080/") == (0, "seen-from 198.51.100.1")
        finally:
            await destroy_all(m)


async def test_an_address_left_in_the_rules_by_a_killed_server_is_not_handed_out(settings: Settings) -> None:
    """A server killed before it revoked a workspace's port leaves its rules (and the address they hold)
    behind; a new workspace gets another address and works, and asking for that one is refused clearly."""
    network = HostNetwork(settings)
    left = str(settings.subnet.network_address + FIRST_HOST_OFFSET)  # what the allocator hands out first
    await network.ensure()
    await network.admit("sb-ghost", left, "02:00:00:00:00:0a", egress="none", owner=1000)
    try:
        async with WorkspaceManager(settings) as m:
            try:
                ws = await m.create(CreateSpec(name="next"))
                assert ws.ip != left
                assert (await m.exec("next", "true")).exit_code == 0
                with pytest.raises(Conflict, match=rf"IP {left} is already in use"):
                    await m.create(CreateSpec(name="asks", ip=left))
                assert set((await m.registry.read()).workspaces) == {"next"}
            finally:
                await destroy_all(m)
    finally:
        await network.revoke("sb-ghost")


async def _admitted_within(settings: Settings, count: int) -> list[str]:
    """The admitted ports once ``count`` are (a watchdog's look is due within 5 s; only a hang waits longer)."""
    ports: list[str] = []
    for _ in range(int((HUNG_S + watchdog.CHECK_INTERVAL_S) / 0.1)):
        present = await firewall.table_exists(settings.bridge)
        ports = firewall.admitted_ports(present) if present is not None else []
        if len(ports) == count:
            break
        await anyio.sleep(0.1)
    return ports


async def _doctor_firewall(settings: Settings, m: WorkspaceManager) -> Check:
    """What ``sandbox-mcp doctor`` says of the firewall now."""
    check = await anyio.to_thread.run_sync(doctor.firewall_check, settings, m.runtimes)
    assert check is not None
    return check


async def test_a_flushed_ruleset_under_running_workspaces_is_put_back(
    settings: Settings, upstream: subprocess.Popen[str]
) -> None:
    """`nft flush ruleset` (Debian's nftables.service runs it on every restart) takes our tables, and with them
    every workspace's isolation; `nft flush table` empties them, to the same effect. A long-running server's
    watchdog loads them again and admits the running workspaces anew: the policy holds again, and what was
    allowed works again, with no start or stop. `doctor` says which it is at each step."""
    nat_settings = settings.model_copy(update={"nat": True})
    async with WorkspaceManager(nat_settings, serve_ports=False) as m:  # short-lived, as the CLI's: no watchdog
        try:
            out = await m.create(CreateSpec(name="fout", egress="internet"))
            shut = await m.create(CreateSpec(name="fshut"))
            service = _HostService(str(settings.host_ip), 8082)  # on the bridge's address, there now
            subprocess.run(["nft", "flush", "ruleset"], check=True)  # this test namespace's ruleset only
            assert await firewall.table_exists(settings.bridge) is None
            check = await _doctor_firewall(settings, m)
            assert not check.ok and check.required and "MISSING while 2 workspace(s) run" in check.detail, check
            # A start loads the tables again and admits itself only: the others are cut off (closed, not open).
            await m.create(CreateSpec(name="fthird"))
            assert len(firewall.admitted_ports(await firewall.table_exists(settings.bridge) or "")) == 1
            assert (await _curl(m, "fout", "http://198.51.100.2:8080/"))[0] != 0
            check = await _doctor_firewall(settings, m)
            assert not check.ok and "admit 1 port(s) for 3 running" in check.detail, check

            async with WorkspaceManager(nat_settings):  # a server: its watchdog looks every 5 s
                ports = await _admitted_within(settings, 3)
                assert len(ports) == len(set(ports)) == 3, ports
                subprocess.run(["nft", "flush", "ruleset"], check=True)  # and again, under the running server
                ports = await _admitted_within(settings, 3)
                assert len(ports) == len(set(ports)) == 3, ports
            check = await _doctor_firewall(settings, m)
            assert check.ok and "3 port(s) admitted, 3 workspace(s) running" in check.detail, check

            # Emptied rather than removed (nft flush table): the chains stay, all `policy accept`, and let
            # everything through. Tried for real; doctor says so; a server loads them whole and admits anew.
            for family in ("bridge", "inet"):
                subprocess.run(["nft", "flush", "table", family, firewall.table_name(settings.bridge)], check=True)
            leak = _HostService(str(settings.host_ip), 8083)
            await _curl(m, "fshut", f"http://{settings.host_ip}:8083/")
            assert leak.accepted == [shut.ip]
            r = await m.exec("fshut", f"timeout 4 bash -c '</dev/tcp/{out.ip}/22' && echo open || echo closed")
            assert r.stdout.strip() == "open", r
            check = await _doctor_firewall(settings, m)
            assert not check.ok and "lack 9 of the rules that hold the policy" in check.detail, check
            async with WorkspaceManager(nat_settings):
                for _ in range(int((HUNG_S + watchdog.CHECK_INTERVAL_S) / 0.1)):
                    present = await firewall.table_exists(settings.bridge) or ""
                    if not firewall.missing_guards(settings.bridge, present) and len(firewall.admitted_ports(present)) == 3:
                        break
                    await anyio.sleep(0.1)
            check = await _doctor_firewall(settings, m)
            assert check.ok and "3 port(s) admitted, 3 workspace(s) running" in check.detail, check
            await _curl(m, "fshut", f"http://{settings.host_ip}:8083/")
            assert leak.accepted == [shut.ip]  # no second time

            assert await _curl(m, "fout", "http://198.51.100.2:8080/") == (0, "seen-from 198.51.100.1")
            assert (await _curl(m, "fshut", "http://198.51.100.2:8080/"))[0] != 0
            await _kept_apart(m, {"fout": shut.ip, "fshut": out.ip}, f"http://{settings.host_ip}:8082/")
            assert service.accepted == []
        finally:
            await destroy_all(m)
