"""Egress by domain, for real: a container whose list is enforced by our resolver and nftables sets.

The "internet" is a network namespace this test makes (inside ./scripts/test's private one) on
203.0.113.0/24 (TEST-NET-3): an authoritative DNS server (tests/dns_world.py, dnspython) at .53 and
HTTP servers at .10 (api.allowed.test), .11 (web.other.test) and .13 (short.allowed.test, TTL 2 s).
The server's resolver asks .53 (``egress_dns_upstreams``); nothing is sent anywhere else.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client

from sandbox_mcp import supervise
from sandbox_mcp.config import Settings
from sandbox_mcp.doctor import host_services_check
from sandbox_mcp.errors import BackendError, InvalidSpec
from sandbox_mcp.hostnet import HostNetwork, egress_sets, firewall, resolver_service
from sandbox_mcp.manager import WorkspaceManager, watchdog
from sandbox_mcp.models import CreateSpec
from sandbox_mcp.server import build_server

from .conftest import destroy_all
from .points import HUNG_S, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

NS = f"sbxt-dn{os.getpid()}"
ZONE = {
    "api.allowed.test": ["A", "203.0.113.10", 300],
    "www.allowed.test": ["CNAME", "api.allowed.test", 300],  # an alias into the list
    "out.allowed.test": ["CNAME", "web.other.test", 300],  # an alias out of it
    "short.allowed.test": ["A", "203.0.113.13", 2],
    "web.other.test": ["A", "203.0.113.11", 300],
}


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def world() -> Iterator[subprocess.Popen[str]]:
    """The stand-in internet; its stdout lists every DNS query it got."""
    if not shutil.which("nft"):
        pytest.skip("nft is not installed (apt-get install nftables)")
    _run("ip", "netns", "add", NS)
    server = None
    try:
        _run("ip", "link", "add", "sbxt-dh", "type", "veth", "peer", "name", "sbxt-dd", "netns", NS)
        _run("ip", "addr", "add", "203.0.113.1/24", "dev", "sbxt-dh")
        _run("ip", "link", "set", "sbxt-dh", "up")
        for cmd in (["addr", "add", "203.0.113.2/24", "dev", "sbxt-dd"], ["link", "set", "sbxt-dd", "up"],
                    ["link", "set", "lo", "up"]):
            _run("ip", "-n", NS, *cmd)
        for last in (10, 11, 13, 53):
            _run("ip", "-n", NS, "addr", "add", f"203.0.113.{last}/32", "dev", "lo")
        script = Path(__file__).with_name("dns_world.py")
        server = subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, str(script), json.dumps(ZONE), "--dns", "203.0.113.53",
             *(f"--http=203.0.113.{last}" for last in (10, 11, 13))],
            stdout=subprocess.PIPE, text=True,
        )
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        yield server
    finally:
        if server is not None:
            server.kill()
            server.wait()
        subprocess.run(["ip", "netns", "del", NS], check=False)
        subprocess.run(["ip", "link", "del", "sbxt-dh"], check=False, capture_output=True)


# A DNS query sent by hand to the stand-in's own address (not the resolv.conf one): the firewall must
# send it to our resolver all the same. Prints the rcode and the answer count.
_RAW_QUERY = """
import socket, struct, sys
name = sys.argv[1]
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(4)
s.sendto(q, ("203.0.113.53", 53))
r = s.recv(4096)
print(r[3] & 0xF, struct.unpack(">H", r[6:8])[0])
"""


async def _sh(m: WorkspaceManager, name: str, command: str) -> tuple[int | None, str]:
    r = await m.exec(name, command, timeout_s=30)
    return r.exit_code, r.stdout.strip()


async def _resolves(m: WorkspaceManager, name: str, host: str) -> str:
    return (await _sh(m, name, f"getent ahostsv4 {host} | awk 'NR==1{{print $1}}'"))[1]


async def _get(m: WorkspaceManager, name: str, url: str, max_time_s: float = 30) -> str:
    """The body of ``url`` fetched inside, or 'failed'. An allowed fetch gets 30 s (a loaded CI machine);
    one meant to be dropped is asked with a short ``max_time_s`` (a dropped SYN waits it out)."""
    code, out = await _sh(m, name, f"curl -s --max-time {max_time_s:g} {url} || echo failed")
    return out


def _set_elements(settings: Settings, port: str) -> str:
    listed = subprocess.run(["nft", "list", "set", "inet", firewall.table_name(settings.bridge),
                             egress_sets.domain_set(port)], capture_output=True, text=True)
    return listed.stdout


def _queries(world: subprocess.Popen[str]) -> list[str]:
    """The DNS queries the stand-in has got so far (non-blocking: what is in the pipe)."""
    assert world.stdout is not None
    os.set_blocking(world.stdout.fileno(), False)
    try:
        return [line.strip() for line in world.stdout.readlines()]
    finally:
        os.set_blocking(world.stdout.fileno(), True)


async def test_egress_by_domain(settings: Settings, world: subprocess.Popen[str]) -> None:
    s = settings.model_copy(update={"nat": True, "egress_dns_upstreams": ["203.0.113.53"], "egress_ttl_min_s": 1})
    async with WorkspaceManager(s) as m:
        try:
            ws = await m.create(CreateSpec(name="dom", egress=["*.allowed.test"]))
            assert ws.egress == ["*.allowed.test"]
            port = "sb-dom"
            assert (await _sh(m, "dom", "cat /etc/resolv.conf"))[1].endswith(f"nameserver {s.host_ip}")

            # An allowed name resolves and connects.
            assert await _resolves(m, "dom", "api.allowed.test") == "203.0.113.10"
            assert await _get(m, "dom", "http://api.allowed.test/") == "hello from 203.0.113.10"
            # A name off the list does not resolve, and never reaches a DNS server outside; its address,
            # tried directly, does not connect.
            _queries(world)
            assert await _resolves(m, "dom", "web.other.test") == ""
            assert not any("other.test" in q for q in _queries(world))
            assert await _get(m, "dom", "http://203.0.113.11/", max_time_s=3) == "failed"
            # DNS to any address goes to our resolver: asked directly, the stand-in's own server "answers"
            # NXDOMAIN (3) for the name it knows.
            assert (await _sh(m, "dom", f"python3 -c '{_RAW_QUERY}' web.other.test"))[1] == "3 0"
            assert (await _sh(m, "dom", f"python3 -c '{_RAW_QUERY}' api.allowed.test"))[1] == "0 1"
            # A CNAME into an allowed name works; one out of the list does not (not even its target's address).
            assert await _resolves(m, "dom", "www.allowed.test") == "203.0.113.10"
            assert await _resolves(m, "dom", "out.allowed.test") == ""
            assert await _get(m, "dom", "http://203.0.113.11/", max_time_s=3) == "failed"
            # Private ranges and the host stay closed whatever resolves.
            assert await _get(m, "dom", f"http://{s.host_ip}:22/", max_time_s=3) == "failed"

            # After the TTL (2 s) the address leaves the set, and a connection to it no longer opens.
            assert await _get(m, "dom", "http://short.allowed.test/") == "hello from 203.0.113.13"
            assert "203.0.113.13" in _set_elements(s, port)
            for _ in range(20):  # the kernel drops it at expiry; polled, as nothing signals it
                if "203.0.113.13" not in _set_elements(s, port):
                    break
                await anyio.sleep(0.5)
            assert "203.0.113.13" not in _set_elements(s, port)
            assert await _get(m, "dom", "http://203.0.113.13/", max_time_s=3) == "failed"

            # set_egress on the running workspace: no restart (a file on its ephemeral root stays).
            await _sh(m, "dom", "echo kept > /tmp/marker")
            before = (await m.registry.get("dom")).started_at
            widened = await m.set_egress("dom", ["*.allowed.test", "web.other.test"])
            assert widened.egress == ["*.allowed.test", "web.other.test"] and widened.started_at == before
            assert await _resolves(m, "dom", "web.other.test") == "203.0.113.11"
            assert await _get(m, "dom", "http://web.other.test/") == "hello from 203.0.113.11"
            assert "203.0.113.10" in _set_elements(s, port)  # it only grew: what was allowed stays
            narrowed = await m.set_egress("dom", ["api.allowed.test"])
            assert narrowed.egress == ["api.allowed.test"]
            assert await _get(m, "dom", "http://203.0.113.11/", max_time_s=3) == "failed"  # emptied: resolve again
            assert await _resolves(m, "dom", "web.other.test") == ""
            assert await _resolves(m, "dom", "www.allowed.test") == ""
            assert await _get(m, "dom", "http://api.allowed.test/") == "hello from 203.0.113.10"
            # 'none' through the MCP tool (a server of its own on the same state), then 'internet' (NAT), then
            # a list again.
            async with Client(build_server(s)) as client:
                r = await client.call_tool("set_egress", {"name": "dom", "egress": "none"})
                assert not r.is_error and r.structured_content["egress"] == "none", r.content
            assert await _get(m, "dom", "http://203.0.113.10/", max_time_s=3) == "failed"
            await m.set_egress("dom", "internet")
            assert await _get(m, "dom", "http://203.0.113.11/") == "hello from 203.0.113.11"
            assert (await _sh(m, "dom", "cat /etc/resolv.conf"))[1] != f"nameserver {s.host_ip}"
            await m.set_egress("dom", ["api.allowed.test"])
            assert await _get(m, "dom", "http://203.0.113.11/", max_time_s=3) == "failed"
            assert await _get(m, "dom", "http://api.allowed.test/") == "hello from 203.0.113.10"
            assert (await _sh(m, "dom", "cat /tmp/marker"))[1] == "kept"
            assert (await m.registry.get("dom")).started_at == before

            # Bad input changes nothing.
            with pytest.raises(InvalidSpec, match="not a domain name"):
                await m.set_egress("dom", ["api.allowed.test", "bad_name.test"])
            assert (await m.registry.get("dom")).egress == ["api.allowed.test"]

            # The resolver is supervised: its worker killed, it answers again.
            service = m.runtimes["nspawn"].ctx.network.resolver
            ref = service.process()
            assert ref is not None
            workers = supervise.children(ref.pid)
            assert len(workers) == 1
            # What parses the workspaces' DNS is not root: nobody, with CAP_NET_ADMIN alone (the sets), no way back.
            status = dict(line.split(":", 1) for line in Path(f"/proc/{workers[0]}/status").read_text().splitlines())
            assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
            assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 1 << 12
            assert status["NoNewPrivs"].strip() == "1"
            os.kill(workers[0], 9)
            for _ in range(60):
                if await _resolves(m, "dom", "api.allowed.test") == "203.0.113.10":
                    break
                await anyio.sleep(0.25)
            assert await _resolves(m, "dom", "api.allowed.test") == "203.0.113.10"
            assert service.process() == ref
            # Its supervisor killed too, the manager's watchdog starts it again: no start or admit needed.
            os.kill(ref.pid, 9)
            await wait_until(lambda: service.process() not in (None, ref), "the resolver started again",
                             limit_s=HUNG_S + watchdog.CHECK_INTERVAL_S)
            for _ in range(60):  # recorded before it listens: asked until it answers
                if await _resolves(m, "dom", "api.allowed.test") == "203.0.113.10":
                    break
                await anyio.sleep(0.25)
            assert await _resolves(m, "dom", "api.allowed.test") == "203.0.113.10"
            check = host_services_check(s)  # what doctor says
            assert check.ok and f"egress resolver running (pid {service.process().pid}) for 1 workspace" in check.detail
        finally:
            await destroy_all(m)
        # Gone with the last workspace: no resolver process (by its tag), no files, no tables.
        service = m.runtimes["nspawn"].ctx.network.resolver
        assert supervise.tagged(service.tag) == []
        assert not service.config_path.exists() and not service.pid_path.exists()
        assert firewall.table_name(s.bridge) not in subprocess.run(["nft", "list", "tables"], capture_output=True,
                                                                   text=True).stdout


async def test_a_domain_list_needs_nat(settings: Settings) -> None:
    async with WorkspaceManager(settings) as m:  # nat off
        with pytest.raises(InvalidSpec, match="egress by domain list needs outbound NAT"):
            await m.create(CreateSpec(name="nonat", egress=["pypi.org"]))
        assert (await m.registry.read()).workspaces == {}


async def test_a_resolver_that_cannot_start_keeps_the_lists(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # Its port taken (a UDP socket of this test's on the bridge address): the start fails, says why, and
    # the workspaces' lists stay recorded, so the watchdog's next look (revive) starts it once the port is free.
    monkeypatch.setattr(resolver_service, "_READY_TIMEOUT_S", 2.0)  # only how long a failing start waits
    network = HostNetwork(settings)
    await network.ensure()
    resolver = network.resolver
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        taken.bind((str(settings.host_ip), settings.egress_dns_port))
        with pytest.raises(BackendError, match="egress resolver did not start"):
            await resolver.set_policy("sb-kept", "10.99.0.2", ["pypi.org"])
        assert resolver.process() is None and supervise.tagged(resolver.tag) == []
        assert resolver.workspaces()["10.99.0.2"]["domains"] == ["pypi.org"]
        with pytest.raises(BackendError, match="egress resolver did not start"):
            await network.revive()  # the watchdog's look, the port still taken: the same, the list still kept
        assert resolver.workspaces()["10.99.0.2"]["domains"] == ["pypi.org"]
        # A second list, then its workspace gone: that removal does not fail on the resolver being down.
        with pytest.raises(BackendError, match="egress resolver did not start"):
            await resolver.set_policy("sb-gone", "10.99.0.3", ["example.org"])
        await resolver.set_policy("sb-gone", "", None)
        assert list(resolver.workspaces()) == ["10.99.0.2"] and resolver.process() is None
        taken.close()
        assert await network.revive()
        assert resolver.process() is not None and not await network.revive()  # running: nothing to do
    finally:
        taken.close()
        await resolver.set_policy("sb-kept", "10.99.0.2", None)  # the last list gone: stopped, files removed
        await network.retire()
    assert resolver.process() is None and not resolver.config_path.exists()
