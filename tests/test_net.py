"""sandbox_mcp.net against the real kernel, each test inside network and mount namespaces of its own.

Every scenario runs in a forked child that first unshares its network and mount namespaces, makes
all mounts private and puts a fresh tmpfs on /run: the bridge, the veths, the named namespaces in
/run/netns and all traffic exist only there, and vanish when the child exits. The parent checks
the results and that nothing leaked into the host's link table or /run/netns.
"""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import json
import os
import pickle
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.errors import SandboxError
from sandbox_mcp.hostnet import NETNS_DIR, HostNetwork
from sandbox_mcp.naming import mac_for

from .points import cancel_after_points

BRIDGE = "sbxn-br"
SUBNET = ipaddress.IPv4Network("10.77.0.0/24")
TEST_MARKERS = ("sbxn", "tnet")  # every link and namespace these tests make contains one of these

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates bridges, veths and network namespaces"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2's `ip` to inspect the results"),
]


# -- running a scenario in private namespaces ---------------------------------------------------------


def _enter_private_namespaces() -> None:
    if _libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET | CLONE_NEWNS)")
    if _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "making / private")
    if _libc.mount(b"tmpfs", b"/run", b"tmpfs", 0, b"mode=0755") != 0:
        raise OSError(ctypes.get_errno(), "mounting a tmpfs on /run")


def isolated(fn: Callable[..., Any], *args: Any, timeout: float = 60) -> Any:
    """Run ``fn(*args)`` in a forked child inside fresh network and mount namespaces; return its result.

    An exception in the child fails the test with the child's traceback.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(r)
            try:
                _enter_private_namespaces()
                outcome: tuple[str, Any] = ("ok", fn(*args))
            except BaseException:
                outcome = ("error", traceback.format_exc())
            with os.fdopen(w, "wb") as out:
                out.write(pickle.dumps(outcome))
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        with os.fdopen(r, "rb") as pipe:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([pipe], [], [], left)[0]:
                    pytest.fail(f"scenario {fn.__name__} did not finish within {timeout} s")
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)  # no-op unless it hangs; its namespaces die with it
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    if not chunks:
        pytest.fail(f"scenario {fn.__name__} died without a result")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "error":
        pytest.fail(f"scenario {fn.__name__} raised in its namespace:\n{value}", pytrace=False)
    return value


def _host_traces() -> set[str]:
    names = {name for _, name in socket.if_nameindex()}
    if NETNS_DIR.is_dir():
        names |= {f"netns:{entry}" for entry in os.listdir(NETNS_DIR)}
    return {n for n in names if any(marker in n for marker in TEST_MARKERS)}


@pytest.fixture(autouse=True)
def host_untouched():
    """Fail if a test leaves (or finds) one of its links or namespaces in the host's namespaces."""
    assert _host_traces() == set(), "leftovers of an earlier run on the host; remove them first"
    yield
    assert _host_traces() == set()


# -- helpers used inside the child --------------------------------------------------------------------


def _net() -> HostNetwork:
    return HostNetwork(Settings(bridge=BRIDGE, subnet=SUBNET))


def ip_json(*args: str) -> Any:
    out = subprocess.run(["ip", "-j", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out) if out.strip() else []


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def add_foreign_link(name: str) -> None:
    """A link that is neither a veth nor a bridge: a dummy, or an ifb where the kernel lacks dummy."""
    for kind in ("dummy", "ifb"):
        if subprocess.run(["ip", "link", "add", name, "type", kind], capture_output=True).returncode == 0:
            return
    raise RuntimeError(f"this kernel makes neither dummy nor ifb links; cannot add {name}")


def link_names() -> set[str]:
    return {name for _, name in socket.if_nameindex()}


async def outcome(aw: Any) -> tuple[str, str]:
    """What an awaitable raised, as (class name, message); ("ok", "") if nothing."""
    try:
        await aw
    except SandboxError as exc:
        return type(exc).__name__, str(exc)
    return "ok", ""


def socket_in_netns(path: Path, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket inside the network namespace bound at ``path`` (made by a thread that enters it)."""
    made: list[socket.socket] = []

    def enter_and_make() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if _libc.setns(fd, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {path}")
        finally:
            os.close(fd)
        made.append(socket.socket(socket.AF_INET, kind))

    thread = threading.Thread(target=enter_and_make)
    thread.start()
    thread.join()
    assert made, f"could not make a socket in {path}"
    return made[0]


def echo_once(listener: socket.socket, peer: tuple[str, int] | None = None) -> threading.Thread:
    """Accept one connection on ``listener`` and send back what it reads, in a thread."""

    def serve() -> None:
        conn, addr = listener.accept()
        with conn:
            conn.sendall(f"{addr[0]}:".encode() + conn.recv(100))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def round_trip(client: socket.socket, dst: tuple[str, int]) -> str:
    with client:
        client.settimeout(5)
        client.connect(dst)
        client.sendall(b"hello")
        return client.recv(100).decode()


# -- scenarios (run in the child) and tests (check in the parent) -------------------------------------


def scenario_bridge_idempotent() -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        net = _net()
        await net.ensure_bridge()
        first = ip_json("-d", "addr", "show", BRIDGE)[0]
        await net.ensure_bridge()
        second = ip_json("-d", "addr", "show", BRIDGE)[0]
        routes = ip_json("-d", "route", "show", "dev", BRIDGE)
        # a port with any MAC must not change the bridge's MAC (it would stale other workspaces' ARP)
        await net.attach_veth("tnet1", "10.77.0.10", mac_for("tnet1"))
        with_port = ip_json("link", "show", BRIDGE)[0]
        await net.detach("tnet1")
        await net.remove_bridge()
        gone = BRIDGE not in link_names()
        await net.remove_bridge()  # idempotent
        # a bridge someone made by hand, down and without an address, is completed
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        await net.ensure_bridge()
        completed = ip_json("addr", "show", BRIDGE)[0]
        completed_routes = ip_json("-d", "route", "show", "dev", BRIDGE)
        await net.remove_bridge()
        return {"first": first, "second": second, "with_port": with_port, "gone": gone, "completed": completed,
                "routes": routes, "completed_routes": completed_routes}  # fmt: skip

    return asyncio.run(main())


def test_ensure_bridge_creates_bridge_with_address_and_is_idempotent():
    r = isolated(scenario_bridge_idempotent)
    first, second = r["first"], r["second"]
    assert first["linkinfo"]["info_kind"] == "bridge"
    assert "UP" in first["flags"]
    inet = [(a["local"], a["prefixlen"]) for a in first["addr_info"] if a["family"] == "inet"]
    assert inet == [("10.77.0.1", 24)]
    assert second["ifindex"] == first["ifindex"]
    assert second["addr_info"] == first["addr_info"]
    assert second["address"] == first["address"] == r["with_port"]["address"]
    assert r["gone"]
    completed = r["completed"]
    assert "UP" in completed["flags"]
    assert [(a["local"], a["prefixlen"]) for a in completed["addr_info"] if a["family"] == "inet"] == [
        ("10.77.0.1", 24)
    ]
    # One route to the subnet (the kernel's, replaced in place after two ensures), and it ACKs at once:
    # no reply of a workspace's sshd waits for a delayed ACK of ours.
    for routes in (r["routes"], r["completed_routes"]):
        assert [(x["dst"], x.get("prefsrc"), x.get("metrics")) for x in routes] == [
            ("10.77.0.0/24", "10.77.0.1", [{"quickack": 1}])
        ], routes


def scenario_bridge_checked_once_per_burst() -> dict[str, Any]:
    from sandbox_mcp.hostnet import netlink

    netlink.BRIDGE_RECHECK_S = 60.0  # however slow the machine, the burst below falls in the window

    async def main() -> dict[str, Any]:
        net, dumps = _net(), []
        real = netlink._ipv4_addresses

        async def counted(ipr: Any) -> Any:
            dumps.append(1)
            return await real(ipr)

        netlink._ipv4_addresses = counted
        try:
            await net.ensure_bridge()
            first = len(dumps)
            await net.ensure_bridge()
            await net.attach_veth("tnet3", "10.77.0.13", mac_for("tnet3"))  # a start: checks the bridge too
            burst = len(dumps) - first
            await net.detach("tnet3")
            # Deleted by hand: another link (index) under the name, so the next ensure checks and rebuilds it.
            sh("ip", "link", "del", BRIDGE)
            await net.ensure_bridge()
            rebuilt = ip_json("addr", "show", BRIDGE)[0]
            # Past the window a change by hand (the address removed) is seen and mended.
            netlink.BRIDGE_RECHECK_S = 0.0
            sh("ip", "addr", "flush", "dev", BRIDGE)
            await net.ensure_bridge()
            mended = ip_json("addr", "show", BRIDGE)[0]
            await net.remove_bridge()
        finally:
            netlink._ipv4_addresses = real
        return {"first": first, "burst": burst, "rebuilt": rebuilt, "mended": mended}

    return asyncio.run(main())


def test_the_bridge_is_checked_once_per_burst_of_starts() -> None:
    r = isolated(scenario_bridge_checked_once_per_burst)
    assert r["first"] == 1 and r["burst"] == 0  # the second ensure and the start took the first's word
    for link in (r["rebuilt"], r["mended"]):
        assert [(a["local"], a["prefixlen"]) for a in link["addr_info"] if a["family"] == "inet"] == [("10.77.0.1", 24)]


def scenario_conflicts() -> dict[str, tuple[str, str]]:
    async def main() -> dict[str, tuple[str, str]]:
        net, out = _net(), {}
        # another interface holds an address whose network overlaps the subnet
        add_foreign_link("tnet-foreign")
        sh("ip", "addr", "add", "10.77.5.5/16", "dev", "tnet-foreign")
        out["overlap"] = await outcome(net.ensure_bridge())
        out["bridge_made_anyway"] = ("yes" if BRIDGE in link_names() else "no", "")
        out["setup"] = await outcome(net.attach_veth("tnet2", "10.77.0.12", mac_for("tnet2")))
        out["netns_made_anyway"] = ("yes" if net.netns_path("tnet2").exists() else "no", "")
        sh("ip", "link", "del", "tnet-foreign")
        # the bridge exists with another address in the subnet
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", "10.77.0.2/24", "dev", BRIDGE)
        out["bridge_other_address"] = await outcome(net.ensure_bridge())
        sh("ip", "link", "del", BRIDGE)
        # a link of the bridge's name that is no bridge
        add_foreign_link(BRIDGE)
        out["not_a_bridge"] = await outcome(net.ensure_bridge())
        out["remove_not_a_bridge"] = await outcome(net.remove_bridge())
        out["foreign_survives"] = ("yes" if BRIDGE in link_names() else "no", "")
        return out

    return asyncio.run(main())


def test_ensure_bridge_refuses_conflicts():
    r = isolated(scenario_conflicts)
    kind, msg = r["overlap"]
    assert kind == "Conflict"
    assert "tnet-foreign" in msg and "10.77.5.5/16" in msg and "SANDBOX_MCP_SUBNET" in msg
    assert r["bridge_made_anyway"][0] == "no"
    assert r["setup"][0] == "Conflict"
    assert r["netns_made_anyway"][0] == "no"
    kind, msg = r["bridge_other_address"]
    assert kind == "Conflict"
    assert BRIDGE in msg and "10.77.0.2/24" in msg and "SANDBOX_MCP_BRIDGE" in msg
    kind, msg = r["not_a_bridge"]
    assert kind == "Conflict" and "not a bridge" in msg and "SANDBOX_MCP_BRIDGE" in msg
    assert r["remove_not_a_bridge"][0] == "Conflict"
    assert r["foreign_survives"][0] == "yes"


def scenario_workspace_network() -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        net = _net()
        name, ip = "tnet1", "10.77.0.10"
        path = await net.attach_veth(name, ip, mac_for(name))
        r: dict[str, Any] = {"path": str(path), "mac": mac_for(name)}
        r["fstype"] = sh("stat", "-f", "-c", "%T", str(path)).strip()
        r["ns_links"] = ip_json("-n", "sbx-tnet1", "addr")
        r["ns_routes"] = ip_json("-n", "sbx-tnet1", "route")
        r["host_veth"] = ip_json("-d", "link", "show", "sb-tnet1")[0]
        r["live_before"] = sorted(await net.live_addresses())

        # host -> workspace over the bridge (ARP included)
        listener = socket_in_netns(path)
        listener.bind((ip, 0))
        listener.listen(1)
        server = echo_once(listener)
        r["to_workspace"] = round_trip(socket.socket(), (ip, listener.getsockname()[1]))
        server.join(5)
        listener.close()
        # an address nobody answers for: its ARP entry stays incomplete, so it does not count
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"anyone?", ("10.77.0.99", 9))
        r["unanswered_neighbour"] = [n["dst"] for n in ip_json("neigh", "show", "dev", BRIDGE)]
        r["live_after"] = sorted(await net.live_addresses())

        # workspace -> an address of the host outside the subnet: needs the default route
        add_foreign_link("tnet-far")
        sh("ip", "addr", "add", "10.99.0.1/32", "dev", "tnet-far")
        sh("ip", "link", "set", "tnet-far", "up")
        far = socket.socket()
        far.bind(("10.99.0.1", 0))
        far.listen(1)
        server = echo_once(far)
        r["from_workspace"] = round_trip(socket_in_netns(path), ("10.99.0.1", far.getsockname()[1]))
        server.join(5)
        far.close()
        await net.detach(name)
        await net.remove_bridge()
        return r

    return asyncio.run(main())


def test_setup_workspace_builds_a_working_namespace():
    r = isolated(scenario_workspace_network)
    assert r["path"] == "/run/netns/sbx-tnet1"
    assert r["fstype"] == "nsfs"
    links = {link["ifname"]: link for link in r["ns_links"]}
    assert set(links) == {"lo", "sc-tnet1"}
    assert "UP" in links["lo"]["flags"]
    ws = links["sc-tnet1"]
    assert ws["address"] == r["mac"]
    assert "UP" in ws["flags"]
    assert [(a["local"], a["prefixlen"]) for a in ws["addr_info"] if a["family"] == "inet"] == [("10.77.0.10", 24)]
    default = [rt for rt in r["ns_routes"] if rt["dst"] == "default"]
    assert default == [{**default[0], "gateway": "10.77.0.1", "dev": "sc-tnet1"}]
    veth = r["host_veth"]
    assert veth["linkinfo"]["info_kind"] == "veth"
    assert veth["master"] == BRIDGE
    assert "UP" in veth["flags"]
    assert r["live_before"] == ["10.77.0.1"]
    assert r["to_workspace"] == "10.77.0.1:hello"  # the workspace saw the host's bridge address
    assert "10.77.0.99" in r["unanswered_neighbour"]
    assert r["live_after"] == ["10.77.0.1", "10.77.0.10"]  # the workspace via ARP on the bridge, not .99
    assert r["from_workspace"] == "10.77.0.10:hello"


def scenario_teardown_and_leftovers() -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        net, r = _net(), {}
        await net.attach_veth("tnet1", "10.77.0.10", mac_for("tnet1"))
        await net.attach_veth("tnet2", "10.77.0.11", mac_for("tnet2"))
        old_index = socket.if_nametoindex("sb-tnet1")
        # a second setup of the same name replaces what the first one left
        await net.attach_veth("tnet1", "10.77.0.10", mac_for("tnet1"))
        r["replaced"] = socket.if_nametoindex("sb-tnet1") != old_index
        r["netns_after_replace"] = sorted(os.listdir(NETNS_DIR))
        # stale states: a namespace whose host veth is gone; a bare mount point from an interrupted setup
        sh("ip", "link", "del", "sb-tnet2")
        (NETNS_DIR / "sbx-tnet3").touch()
        # things that are not ours: other namespaces, a non-veth with our prefix, malformed names
        (NETNS_DIR / "tnet-other").touch()
        (NETNS_DIR / "sbx-TNET").touch()
        add_foreign_link("sb-tnet4")
        r["leftovers"] = await net.leftovers()
        for name in r["leftovers"]:
            await net.detach(name)
        await net.detach("tnet1")  # again: nothing there
        await net.detach("tnet9")  # never existed
        r["leftovers_after"] = await net.leftovers()
        r["netns_after"] = sorted(os.listdir(NETNS_DIR))
        r["links_after"] = sorted(n for n in link_names() if n.startswith(("sb-", "sc-")))
        return r

    return asyncio.run(main())


def test_teardown_is_idempotent_and_leftovers_are_found():
    r = isolated(scenario_teardown_and_leftovers)
    assert r["replaced"]
    assert r["netns_after_replace"] == ["sbx-tnet1", "sbx-tnet2"]
    assert r["leftovers"] == ["tnet1", "tnet2", "tnet3"]
    assert r["leftovers_after"] == []
    assert r["netns_after"] == ["sbx-TNET", "tnet-other"]
    assert r["links_after"] == ["sb-tnet4"]  # the foreign link was not ours to delete


def scenario_failure_half_way() -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        net, r = _net(), {}
        await net.ensure_bridge()
        # a foreign link (not a veth, so teardown leaves it alone) holds the host-side veth name:
        # setup fails after it has made the namespace
        add_foreign_link("sb-tnet5")
        r["clash"] = await outcome(net.attach_veth("tnet5", "10.77.0.15", mac_for("tnet5")))
        r["netns"] = sorted(os.listdir(NETNS_DIR))
        r["links"] = sorted(n for n in link_names() if n.startswith(("sb-", "sc-")))
        r["kind"] = ip_json("-d", "link", "show", "sb-tnet5")[0]["linkinfo"]["info_kind"]
        r["leftovers"] = await net.leftovers()
        # bad input is refused before anything changes
        r["bad_ip"] = await outcome(net.attach_veth("tnet6", "10.78.0.5", mac_for("tnet6")))
        r["host_ip"] = await outcome(net.attach_veth("tnet6", "10.77.0.1", mac_for("tnet6")))
        r["bad_mac"] = await outcome(net.attach_veth("tnet6", "10.77.0.16", "01:00:5e:00:00:01"))
        r["bad_name"] = await outcome(net.attach_veth("Tnet6", "10.77.0.16", mac_for("tnet6")))
        r["netns_after_bad"] = sorted(os.listdir(NETNS_DIR))
        return r

    return asyncio.run(main())


def test_failed_setup_leaves_nothing_behind():
    r = isolated(scenario_failure_half_way)
    kind, msg = r["clash"]
    assert kind == "Conflict" and "sb-tnet5" in msg
    assert r["netns"] == []
    assert r["links"] == ["sb-tnet5"]
    assert r["kind"] in ("dummy", "ifb")
    assert r["leftovers"] == []
    for key in ("bad_ip", "host_ip", "bad_mac", "bad_name"):
        assert r[key][0] == "InvalidSpec", key
    assert r["netns_after_bad"] == []


def scenario_cancelled_setup() -> list[str]:
    async def main() -> list[str]:
        net = _net()
        await net.ensure_bridge()
        # Cancel at successive points of the setup (after 0, 1, 2, 4, ... scheduler passes, until
        # it finishes first), the way the MCP server's task groups do (an anyio cancel scope
        # cancels every later await in it, cleanup's included, unless shielded). Whatever was
        # made must be gone again.
        seen = []
        points = 0
        while "done" not in seen and points <= 1 << 20:
            if await cancel_after_points(points, lambda: net.attach_veth("tnet7", "10.77.0.17", mac_for("tnet7"))):
                seen.append("cancelled")
            else:
                seen.append("done")
                await net.detach("tnet7")
            seen.extend(await net.leftovers())
            points = points * 2 or 1
        return seen

    return anyio.run(main)


def test_cancelled_setup_leaves_nothing_behind():
    seen = isolated(scenario_cancelled_setup)
    assert set(seen) <= {"done", "cancelled"}, seen  # a workspace name here is a leftover
    assert "cancelled" in seen and seen[-1] == "done", seen


# -- nftables in process, and the firewall lock ----------------------------------------------------


def scenario_nft_in_process(state: str) -> dict[str, Any]:
    """Our tables loaded and listed through libnftables in this (forked, unshared) process, against what
    the nft program lists; a refused script; the lock ensure() leaves alone when the tables are whole."""
    import fcntl

    from sandbox_mcp.hostnet import firewall, netlink, nft

    netlink.BRIDGE_RECHECK_S = 0.0  # every ensure looks at the tables (the window: see the end)

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {"library": nft.shared().available}
        net = HostNetwork(Settings(bridge=BRIDGE, subnet=SUBNET, state_dir=Path(state)))
        await net.ensure()  # loads the tables (they were missing)
        await net.admit("sb-tnet1", "10.77.0.9", mac_for("tnet1"), egress="none", owner=1234)
        table = firewall.table_name(BRIDGE)
        out["ours"] = await firewall.table_exists(BRIDGE)
        out["program"] = "\n".join(sh("nft", "list", "table", family, table) for family in ("bridge", "inet"))
        out["refused"] = await outcome(firewall.run_script(f"add rule inet {table} nosuchchain drop\n"))
        out["after_refusal"] = await firewall.table_exists(BRIDGE)
        # Another process holds the firewall lock: a start with the tables in place does not wait for it ...
        lock_path = Path(state) / ".server" / f"firewall-{BRIDGE}.lock"
        holder = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(holder, fcntl.LOCK_EX)
        with anyio.move_on_after(5) as waited:
            await net.ensure()
        out["ensure_waited_with_tables"] = waited.cancelled_caught
        # ... and one that must load them does (loading replaces the tables: one at a time).
        await firewall.remove_tables(BRIDGE)
        with anyio.move_on_after(1) as waited:
            await net.ensure()
        out["ensure_waited_without_tables"] = waited.cancelled_caught
        fcntl.flock(holder, fcntl.LOCK_UN)
        os.close(holder)
        await net.ensure()
        out["reloaded"] = await firewall.table_exists(BRIDGE) is not None
        # Within the window a burst of starts lists the tables once; a retire that removes them ends it.
        netlink.BRIDGE_RECHECK_S, listed, real = 60.0, [], firewall.table_exists

        async def counted(bridge: str) -> str | None:
            listed.append(bridge)
            return await real(bridge)

        firewall.table_exists = counted
        try:
            for _ in range(3):
                await net.ensure()
            await net.revoke("sb-tnet1")
            out["retired"] = await net.retire()
            await net.ensure()
            out["listed"] = len(listed)
            # Five starts at once find the tables missing: all queue for the lock, the first loads them, and
            # the rest, handed the lock after it, see that it just did and list nothing more.
            await firewall.remove_tables(BRIDGE)
            net._tables_checked, listed[:] = None, []
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(net.ensure)
            out["burst_listed"] = len(listed)
            out["burst_loaded"] = await real(BRIDGE) is not None
        finally:
            firewall.table_exists = real
        await firewall.remove_tables(BRIDGE)
        out["removed"] = await firewall.table_exists(BRIDGE)
        await net.remove_bridge()
        return out

    return asyncio.run(main())


@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables")
def test_nft_in_process_is_what_the_program_does_and_ensure_skips_the_lock(tmp_path: Path) -> None:
    (tmp_path / ".server").mkdir()
    r = isolated(scenario_nft_in_process, str(tmp_path))
    assert r["ours"] == r["program"]  # the library's listing is the program's, byte for byte
    assert 'ether saddr != 02:' in r["ours"] and "meta skuid 1234 accept" in r["ours"]
    kind, message = r["refused"]
    assert kind in ("BackendError", "CommandFailed") and "nosuchchain" in message
    assert r["after_refusal"] == r["ours"]  # a refused script changes nothing
    assert not r["ensure_waited_with_tables"]
    assert r["ensure_waited_without_tables"]
    assert r["reloaded"] and r["removed"] is None
    # The three ensures in the window: no listing (the one before them looked). Then revoke and retire list
    # (under the lock), and the ensure after the retire looks again, and once more under the lock, where it
    # loads them: 4 (7 had the three looked).
    assert r["retired"] and r["listed"] == 4
    assert r["burst_loaded"] and r["burst_listed"] == 5 + 1  # each looked once, one under the lock (10 before)


@pytest.mark.anyio
async def test_wait_listening_on_loopback() -> None:
    """True once a port accepts connections (the listener only ever sees a connect and a close); False for a
    port nobody listens on, once the time is up."""
    from sandbox_mcp.hostnet.listening import wait_listening

    listener = socket.create_server(("127.0.0.1", 0))
    try:
        port = listener.getsockname()[1]
        assert await wait_listening("127.0.0.1", port, 5)
        conn, _ = listener.accept()
        assert conn.recv(1) == b""  # closed at once, nothing sent
        conn.close()
    finally:
        listener.close()
    t0 = time.monotonic()
    assert not await wait_listening("127.0.0.1", port, 0.3)
    assert time.monotonic() - t0 >= 0.3


@pytest.mark.anyio
async def test_connect_when_listening_hands_over_the_connection() -> None:
    """The connection that found the port listening is the caller's (the SSH login goes on on it); None for
    a port nobody listens on, once the time is up."""
    from sandbox_mcp.hostnet.listening import connect_when_listening

    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        sock = await connect_when_listening("127.0.0.1", port, 5)
        assert sock is not None
        with sock:
            conn, _ = listener.accept()
            with conn:
                assert conn.getpeername() == sock.getsockname()
                sock.send(b"SSH-2.0-test\r\n")
                assert conn.recv(100) == b"SSH-2.0-test\r\n"
    assert await connect_when_listening("127.0.0.1", port, 0.2) is None


@pytest.mark.anyio
@pytest.mark.parametrize("host", ["::1", "localhost"])
async def test_wait_listening_on_ipv6_and_by_name(host: str) -> None:
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    try:
        listener = socket.create_server(("::1" if host == "::1" else "127.0.0.1", 0), family=family)
    except OSError as exc:
        pytest.skip(f"no {host} here: {exc}")
    with listener:
        from sandbox_mcp.hostnet.listening import wait_listening

        assert await wait_listening(host, listener.getsockname()[1], 5)


@pytest.mark.anyio
async def test_wait_listening_polls_less_often_once_a_boot_takes_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fast at first (an idle host's boot listens in ~0.1 s), then each wait grows up to a bound: with many
    workspaces booting, every refused connect is this process's CPU."""
    from sandbox_mcp.hostnet import listening

    with socket.socket() as probe:  # a port nobody listens on: every connect is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        real, at = listening._connects, []

        async def counted(host: str, port_: int, timeout_s: float) -> socket.socket | None:
            at.append(time.monotonic())
            return await real(host, port_, timeout_s)

        monkeypatch.setattr(listening, "_connects", counted)
        assert not await listening.wait_listening("127.0.0.1", port, 1.5)
    start = at[0]
    early = [t for t in at if t - start < listening._FAST_FOR_S]
    late = [b - a for a, b in zip(at, at[1:], strict=False) if a - start > 1.0]
    # The first polls at the fast pace (give or take a slow machine), the late ones at the bound.
    assert len(early) >= listening._FAST_FOR_S / listening._POLL_S / 3
    assert late and min(late) >= listening._POLL_MAX_S * 0.9
    assert len(at) < 1.5 / listening._POLL_S / 2  # half the polls a fixed fast pace would make, or fewer
