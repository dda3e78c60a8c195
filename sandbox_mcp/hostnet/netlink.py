"""The host side of direct mode's network: the bridge and each workspace's link, over netlink.

:class:`HostNetwork` is the host-network service every direct-mode runtime shares: the bridge
and the network policy (:mod:`.firewall`: nftables tables of our own, with opt-in NAT), ensured
by :meth:`HostNetwork.ensure`; the ``workspace-NAME`` names in the hosts file (:mod:`.hostsfile`);
and the ways a workspace attaches to it (a network namespace with a veth for containers, a TAP on
the bridge for VMs), each port then admitted to the policy (:meth:`HostNetwork.admit`).

Layout (names from :mod:`sandbox_mcp.naming`)::

    host netns                              named netns /run/netns/sbx-NAME
    ┌──────────────────────────────┐        ┌──────────────────────────────┐
    │ bridge (settings.bridge)     │        │ lo (up)                      │
    │   host_ip/prefix             │        │ sc-NAME  MAC mac_for(NAME)   │
    │   └─ port sb-NAME ═══════════╪═ veth ═╪═ ip/prefix, default via host │
    └──────────────────────────────┘        └──────────────────────────────┘

systemd-nspawn then joins the namespace with ``--network-namespace-path``; the
container configures nothing itself. This is the only module that imports
pyroute2; netlink and OS errors are translated here into :class:`BackendError`
or :class:`Conflict`, keeping the cause.

Named namespaces are made as ``ip netns add`` makes them (a bind mount of the
namespace on ``/run/netns/NAME``, with ``/run/netns`` a shared mount), but from
a short-lived thread rather than a forked process: network namespaces are per
thread, so the thread unshares, opens a netlink socket inside the new namespace
for us, bind-mounts it and ends. Forking a threaded server (what
``pyroute2.netns.create`` does) is slower and riskier.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import fcntl
import ipaddress
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..config import Settings
from ..egress import domains_of
from ..errors import BackendError, Conflict, InvalidSpec, SandboxError
from ..fsutil import async_file_lock
from ..naming import mac_for, netns_name, tap_name, validate_ident, validate_ip, veth_names
from . import egress_sets, firewall, hostsfile
from .resolver_service import ResolverService

__all__ = ["NETNS_DIR", "HostNetwork"]

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")  # where iproute2 (`ip netns`, `ip -n`) looks for named namespaces
BRIDGE_RECHECK_S = 2.0  # a change made to the bridge by hand is noticed by the starts after this

# Neighbour states that do not show a live peer: never resolved, or resolution failed.
_NUD_INCOMPLETE = 0x01
_NUD_FAILED = 0x20
_DEAD_NEIGHBOUR = _NUD_INCOMPLETE | _NUD_FAILED

_CLONE_NEWNET = 0x40000000
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
# /dev/net/tun: attach to a TAP by name (linux/if_tun.h).
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_VNET_HDR = 0x4000
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_SIOCGIFINDEX = 0x8933
_LOOPBACK_INDEX = 1  # the kernel registers lo first in every network namespace


class HostNetwork:
    """The bridge and the per-workspace network namespaces of direct mode, on this host.

    Every method needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN for the namespace mounts).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.resolver = ResolverService(settings)
        # The bridge's index and when it was last found complete: a burst of starts checks it once.
        self._bridge_checked: tuple[int, float] | None = None
        self._tables_checked: float | None = None  # when ensure last found the tables (and resolver) in place

    def _firewall_lock(self) -> AbstractAsyncContextManager[None]:
        # One change to our nft tables at a time, across the server processes of this state dir.
        return async_file_lock(self.settings.state_dir / ".server" / f"firewall-{self.bridge}.lock")

    async def ensure(self) -> None:
        """The host side every workspace needs: the bridge, and our firewall tables (with NAT where on).

        The tables are loaded only when missing (loading replaces them, which would drop the ports
        of running workspaces). Cheap when all is in place.

        Raises:
            Conflict, BackendError: see :meth:`ensure_bridge`; nft is missing or refused the tables.
        """
        await self.ensure_bridge()
        # Every start asks; the tables are nearly always complete, and then nothing needs the lock every
        # create and admit on the host queues for (found by listing them, in process: a millisecond with
        # one workspace, several with thirty). Within BRIDGE_RECHECK_S of the last look, none: a burst of
        # starts looks once, and admit reloads tables that went missing all the same.
        if self._tables_recently_checked():
            return
        needed = await self._missing_tables()
        if needed or self.resolver.workspaces():
            async with self._firewall_lock():
                if self._tables_recently_checked():  # another start of this server did it while this one waited
                    return
                await firewall.run_script(await self._missing_tables())  # again: another may have loaded them
                if self.resolver.workspaces():
                    await self.resolver.ensure_running()  # found dead (or the host rebooted): started again
        if self.settings.nat:
            await firewall.enable_forwarding()
        self._tables_checked = time.monotonic()

    def _tables_recently_checked(self) -> bool:
        return self._tables_checked is not None and time.monotonic() - self._tables_checked < BRIDGE_RECHECK_S

    async def restore_tables(self, running: int) -> bool:
        """Whether the ``running`` workspaces of this bridge must be admitted anew, loading our firewall tables
        again first if they went missing (``nft flush ruleset``, a firewall service restarted) or lost a rule
        that holds the policy (``nft flush table``: see :func:`firewall.missing_guards`). Without them every
        workspace reaches the host and the others; loaded, every port is closed until admitted.

        True when the tables were reloaded, or hold fewer admitted ports than ``running`` (a start that loaded
        them again admitted only itself). Admitting a workspace again is harmless, so a count is enough.

        Raises:
            Conflict, BackendError: as :meth:`ensure`.
        """
        present = await firewall.table_exists(self.bridge)
        if present is not None and not firewall.missing_guards(self.bridge, present):
            return len(firewall.admitted_ports(present)) < running
        self._tables_checked = None  # whatever a start saw a moment ago: look now
        await self.ensure()
        return True

    async def revive(self) -> bool:
        """Start the egress resolver again if a workspace has a domain list and it is not running (its
        supervisor was killed; the supervisor itself restarts a dead worker). True if it was started. Cheap
        when all is well: the policy file, a PID file and /proc, no lock.

        Raises:
            BackendError: it did not start (the message has its log).
        """
        if not self.resolver.workspaces() or self.resolver.process() is not None:
            return False
        async with self._firewall_lock():  # as admit: one start, never one over the last workspace's stop
            if not self.resolver.workspaces() or self.resolver.process() is not None:
                return False
            await self.resolver.ensure_running()
            return True

    async def _missing_tables(self, present: str | None = None, *, listed: bool = False) -> str:
        """The script that loads our tables if they are missing, else nothing (call under the lock).

        ``present``: the tables as listed already (``listed``), so they are not listed twice.
        """
        if not listed:
            present = await firewall.table_exists(self.bridge)
        if present is not None and firewall.missing_guards(self.bridge, present):
            present = None  # emptied (nft flush table) or a guard deleted: loaded whole again, as if missing
        limit = self.settings.egress_max_connections
        s = self.settings
        domains = egress_sets.domain_base_script(self.bridge, s.host_ip, s.egress_dns_port, present or "")
        if present is not None:
            return firewall.upgrade_script(self.bridge, present, max_connections=limit) + domains
        nameservers = firewall.host_nameservers() if self.settings.nat else []
        return firewall.base_script(self.bridge, self.settings.subnet, nat=self.settings.nat, nameservers=nameservers,
                                    max_connections=limit) + domains

    async def admit(self, port: str, ip: str, mac: str, *, egress: bool | str | list[str],
                    owner: int | None = None) -> None:
        """Let the workspace behind bridge port ``port`` send as ``mac``/``ip`` only; out as ``egress`` says
        (``"none"``/False, ``"internet"``/True, or a list of domain names: only what our resolver hands it);
        host uid ``owner`` (besides root) may connect to it.

        Call before the workspace runs; the tables are (re)loaded first if they went missing. Called again
        on a running workspace, it applies a new policy at once: a domain list that only grew keeps the
        addresses and connections allowed so far; any other change cuts the workspace's open connections
        (:mod:`.egress_sets`).

        Raises:
            InvalidSpec: malformed arguments. BackendError: nft refused, or the resolver did not start.
        """
        address = validate_ip(ip, self.settings.subnet)
        domains = domains_of(egress)
        outside = egress is True or egress == "internet"
        mac = _validate_mac(mac)
        async with self._firewall_lock():
            present = await firewall.table_exists(self.bridge)
            taken = firewall.claims_of_others(port, address, present or "")
            if taken:
                raise Conflict(
                    f"address {address} is already admitted on bridge {self.bridge} for another workspace "
                    f"({', '.join(taken)}): another sandbox-mcp server with its own state dir uses this bridge and "
                    "subnet, or a server was killed before it removed that workspace's rules. Give each server its "
                    "own bridge and subnet (SANDBOX_MCP_BRIDGE, SANDBOX_MCP_SUBNET); a server restarted on its "
                    "state dir removes what its own dead workspaces left"
                )
            script = await self._missing_tables(present, listed=True)
            script += firewall.admit_script(self.bridge, port, mac, address, egress=outside, owner=owner,
                                            mark=egress_sets.DOMAIN_MARK if domains is not None else None)
            if domains is None:
                script += egress_sets.revoke_domains_script(self.bridge, port, present or "")
            else:
                before = self.resolver.workspaces().get(str(address), {})
                epoch = egress_sets.current_epoch(port, present or "")
                grew = before.get("port") == port and set(before.get("domains", ())) <= set(domains)
                keep = grew and epoch is not None
                script += egress_sets.admit_domains_script(
                    self.bridge, port, address, epoch=epoch if keep and epoch else egress_sets.new_epoch(),
                    keep_addresses=keep, max_connections=self.settings.egress_max_connections,
                )
            await firewall.run_script(script)
            # Set and chain first, so every address the resolver hands out has its set to go into.
            await self.resolver.set_policy(port, str(address), domains)

    async def revoke(self, port: str) -> None:
        """Remove what :meth:`admit` added for ``port``; nothing happens where it is absent."""
        async with self._firewall_lock():
            present = await firewall.table_exists(self.bridge)
            if present is not None:
                await firewall.run_script(firewall.revoke_script(self.bridge, port, present)
                                          + egress_sets.revoke_domains_script(self.bridge, port, present))
            await self.resolver.set_policy(port, "", None)

    async def retire(self) -> bool:
        """Remove our firewall tables once no workspace port is admitted any more; True when removed.

        The bridge stays. Checked under the same lock as :meth:`admit`, so a workspace admitted
        meanwhile by another server process keeps its rules.
        """
        async with self._firewall_lock():
            present = await firewall.table_exists(self.bridge)
            if present is None:
                await self.resolver.stop()
                return True
            if firewall.admitted_ports(present):
                return False
            self._tables_checked = None
            await firewall.remove_tables(self.bridge)
            await self.resolver.stop()
            return True

    async def publish_names(self, entries: Mapping[str, str]) -> None:
        """Make ``workspace-NAME`` resolve on the host for ``entries`` (name -> IP); never fails a call.

        Our block in the hosts file (``settings.hosts_file``; None leaves it alone) is owned by
        this state directory, so several servers with their own state dirs keep their own blocks.
        """
        path = self.settings.hosts_file
        if path is None:
            return
        try:
            await anyio.to_thread.run_sync(
                hostsfile.update_hosts_file, path, dict(entries), str(self.settings.state_dir)
            )
        except OSError as exc:
            log.warning("cannot update %s: %s", path, exc)

    @property
    def bridge(self) -> str:
        return self.settings.bridge

    @property
    def host_interface(self) -> ipaddress.IPv4Interface:
        """The bridge's address with the subnet's prefix, e.g. ``192.168.83.1/24``."""
        return ipaddress.IPv4Interface(f"{self.settings.host_ip}/{self.settings.subnet.prefixlen}")

    @staticmethod
    def netns_path(name: str) -> Path:
        """The bind mount of workspace ``name``'s network namespace (for ``--network-namespace-path``)."""
        return NETNS_DIR / netns_name(name)

    # -- the bridge ---------------------------------------------------------------------------

    async def ensure_bridge(self) -> None:
        """Create the bridge, give it the host address and bring it up, as far as that is missing.

        Changes nothing when all is in place (one link lookup, one address dump).

        Raises:
            Conflict: a non-bridge link has the bridge's name; the bridge holds another address
                in the subnet; or another interface holds an address overlapping the subnet.
            BackendError: netlink refused a change (e.g. not running as root).
        """
        async with _iproute() as ipr:
            await self._ensure_bridge(ipr)

    async def _ensure_bridge(self, ipr: AsyncIPRoute) -> int:
        """Do :meth:`ensure_bridge` on an open socket; return the bridge's interface index.

        Within :data:`BRIDGE_RECHECK_S` of finding it complete, the same link (its index) is taken as
        complete still: the full check decodes the bridge's link and every host address, a few ms of
        this process's CPU per start, which 30 starts at once paid twice each.
        """
        checked, index = self._bridge_checked, _index_of(self.bridge)
        if checked is not None and checked[0] == index and time.monotonic() - checked[1] < BRIDGE_RECHECK_S:
            return index
        self._bridge_checked = None
        subnet, want = self.settings.subnet, self.host_interface
        link = await _get_link(ipr, self.bridge)
        self._check_is_bridge(link)
        index = link["index"] if link is not None else None
        have_address = False
        for addr in await _ipv4_addresses(ipr):
            if not addr.network.overlaps(subnet):
                continue
            if addr.index == index and addr.interface == want:
                have_address = True
            elif addr.index == index:
                raise Conflict(
                    f"bridge {self.bridge} holds {addr.interface}, not {want}; remove that address, "
                    f"or set SANDBOX_MCP_BRIDGE to another bridge name and SANDBOX_MCP_SUBNET to a free subnet"
                )
            else:
                raise Conflict(
                    f"interface {addr.ifname} already holds {addr.interface}, which overlaps the workspace "
                    f"subnet {subnet}; set SANDBOX_MCP_SUBNET to a free subnet "
                    f"(and SANDBOX_MCP_BRIDGE if {self.bridge} is taken too)"
                )
        try:
            if link is None:
                link = await self._create_bridge(ipr)
                index = link["index"]
            if not have_address:
                await _ignore_exists(
                    ipr.addr(
                        "add",
                        index=index,
                        address=str(want.ip),
                        prefixlen=want.network.prefixlen,
                        broadcast=str(want.network.broadcast_address),
                    )
                )
            if not link["flags"] & 1:  # IFF_UP
                await ipr.link("set", index=index, state="up")
            # The host ACKs workspaces at once. sshd keeps Nagle on for sessions without a pty, so a reply
            # written while its last packet awaits our delayed ACK (up to 40 ms) waits with it: an agent
            # channel opened right after login took 40 ms longer than one opened 10 ms later. This is the
            # kernel's own route for the bridge address (same key), so it is replaced, not doubled.
            await ipr.route("replace", dst=str(want.network), oif=index, prefsrc=str(want.ip), scope=253,
                            proto=2, table=254, metrics={"quickack": 1})  # fmt: skip
        except NetlinkError as exc:
            raise _translate(exc, f"setting up bridge {self.bridge} ({want})") from exc
        self._bridge_checked = (index, time.monotonic())
        return index

    async def _create_bridge(self, ipr: AsyncIPRoute) -> Any:
        # A fixed MAC: otherwise the bridge takes the lowest MAC among its ports and changes it as
        # workspaces come and go, leaving stale ARP entries for the host address in the others.
        # The "bridge:" prefix keeps it apart from every workspace's mac_for(name).
        try:
            await ipr.link(
                "add", ifname=self.bridge, kind="bridge", address=mac_for(f"bridge:{self.bridge}"), state="up"
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # else another process made it just now: check what it made
                raise
        link = await _get_link(ipr, self.bridge)
        self._check_is_bridge(link)
        if link is None:
            raise BackendError(f"bridge {self.bridge} vanished right after it was created; try again")
        return link

    def _check_is_bridge(self, link: Any) -> None:
        if link is not None and _kind(link) != "bridge":
            raise Conflict(
                f"network interface {self.bridge} exists and is not a bridge (kind {_kind(link)!r}); "
                f"set SANDBOX_MCP_BRIDGE to another name"
            )

    async def remove_bridge(self) -> None:
        """Delete the bridge (its ports are released, not deleted); nothing happens if it is absent.

        Raises:
            Conflict: a link of that name exists but is not a bridge (left alone).
            BackendError: netlink refused the deletion.
        """
        self._bridge_checked = None
        async with _iproute() as ipr:
            link = await _get_link(ipr, self.bridge)
            if link is None:
                return
            self._check_is_bridge(link)
            await _delete_link(ipr, link, f"bridge {self.bridge}")

    async def live_addresses(self) -> set[str]:
        """The subnet's IPv4 addresses in use here: on any host interface, answering ARP on the bridge, or
        held by our firewall rules (a workspace whose server was killed before it revoked its port).

        Neighbours whose resolution is incomplete or failed are not counted.

        Raises:
            BackendError: netlink refused the dump.
        """
        subnet = self.settings.subnet
        present = await firewall.table_exists(self.bridge)
        claimed = {str(a) for a in firewall.claimed_addresses(present or "") if a in subnet}
        async with _iproute() as ipr:
            used = claimed | {str(a.interface.ip) for a in await _ipv4_addresses(ipr) if a.interface.ip in subnet}
            index = _index_of(self.bridge)  # not the link itself: decoding a bridge's takes a millisecond
            if index is None:
                return used
            try:
                async for neigh in await ipr.neigh("dump", family=socket.AF_INET, ifindex=index):
                    dst = neigh.get("NDA_DST")
                    if dst and not neigh["state"] & _DEAD_NEIGHBOUR and ipaddress.IPv4Address(dst) in subnet:
                        used.add(dst)
            except NetlinkError as exc:
                raise _translate(exc, f"listing ARP neighbours on {self.bridge}") from exc
        return used

    # -- workspaces ---------------------------------------------------------------------------

    async def attach_veth(self, name: str, ip: str, mac: str, pid: int | None = None) -> Path:
        """Give workspace ``name`` its network namespace, joined to the bridge; return the namespace path.

        With ``pid``, the namespace is that process's (a user-namespaced container's, which nspawn
        made: such a container may not join one owned by the host's user namespace); it is named
        ``sbx-NAME`` all the same, so teardown and leftovers treat both kinds alike.

        Makes the bridge first if needed (:meth:`ensure_bridge`), and removes what an earlier run of
        the same name left behind. Inside the namespace: ``lo`` up, ``sc-NAME`` with ``mac`` and
        ``ip``/prefix, up, and a default route via the host's bridge address. On failure, whatever
        this call made is removed again.

        Raises:
            InvalidSpec: ``name``, ``ip`` or ``mac`` is malformed, or ``ip`` is outside the subnet.
            Conflict: an interface or namespace of that name appeared meanwhile and is not ours
                to remove, or the bridge conflicts (see :meth:`ensure_bridge`).
            BackendError: netlink or the namespace mount failed.
        """
        validate_ident(name)
        address = validate_ip(ip, self.settings.subnet)
        mac = _validate_mac(mac)
        host_if, ws_if = veth_names(name)
        path = self.netns_path(name)
        prefixlen = self.settings.subnet.prefixlen

        async with _iproute() as ipr:
            with anyio.CancelScope(shield=True):
                await self._teardown(ipr, name)  # what an earlier run left behind
            bridge_index = await self._ensure_bridge(ipr)
            try:
                with anyio.CancelScope(shield=True):  # a cancelled wait must not lose a made namespace
                    ns_socket = await _create_netns(path, pid)
                async with _iproute(fileno=ns_socket) as nsr:
                    step = f"creating veth pair {host_if}/{ws_if} on bridge {self.bridge}"
                    nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        await ipr.link(
                            "add",
                            ifname=host_if,
                            kind="veth",
                            master=bridge_index,
                            state="up",
                            peer={"ifname": ws_if, "address": mac, "net_ns_fd": nsfd},
                        )
                        step = f"configuring {ws_if} ({address}/{prefixlen}, {mac}) in {path}"
                        ws_index = _index_via(nsr.fileno(), ws_if)
                        await nsr.link("set", index=_LOOPBACK_INDEX, state="up")
                        await nsr.addr(
                            "add",
                            index=ws_index,
                            address=str(address),
                            prefixlen=prefixlen,
                            broadcast=str(self.settings.subnet.broadcast_address),
                        )
                        await nsr.link("set", index=ws_index, state="up")
                        await nsr.route("add", dst="0.0.0.0/0", gateway=str(self.settings.host_ip))
                    except (NetlinkError, OSError) as exc:
                        raise _translate(exc, step) from exc
                    finally:
                        os.close(nsfd)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    try:
                        await self._teardown(ipr, name)
                    except SandboxError as cleanup_exc:
                        log.warning("cleaning up after a failed setup of %s: %s", name, cleanup_exc)
                raise
        return path

    async def detach(self, name: str) -> None:
        """Remove workspace ``name``'s veth pair and network namespace; nothing happens if they are absent.

        A link called ``sb-NAME`` that is not a veth is not ours and is left alone. Processes still
        inside the namespace keep it alive until they exit; only its name goes.

        Raises:
            InvalidSpec: ``name`` is malformed.
            BackendError: netlink refused the deletion, or the namespace could not be unmounted.
        """
        validate_ident(name)
        with anyio.CancelScope(shield=True):  # half a teardown is worse than a late one
            async with _iproute() as ipr:
                await self._teardown(ipr, name)

    async def _teardown(self, ipr: AsyncIPRoute, name: str) -> None:
        host_if, _ = veth_names(name)
        # Usually absent (every attach looks first): an ioctl says so for less than a netlink lookup.
        link = await _get_link(ipr, host_if) if _index_of(host_if) is not None else None
        if link is not None and _kind(link) == "veth":
            await _delete_link(ipr, link, f"veth {host_if}")  # takes the peer inside the netns along
        _remove_netns(self.netns_path(name))

    async def attach_tap(self, name: str) -> str:
        """Give VM workspace ``name`` a persistent TAP ``vm-NAME`` on the bridge, up; return its name.

        qemu opens it by name (``-netdev tap,ifname=...``); the guest sets its own address. An
        earlier run's TAP of the same name is replaced. On failure, whatever this call made is removed.

        Raises:
            InvalidSpec: ``name`` is malformed.
            Conflict: ``vm-NAME`` exists and is not a TAP, or the bridge conflicts.
            BackendError: netlink or /dev/net/tun refused.
        """
        validate_ident(name)
        tap = tap_name(name)
        async with _iproute() as ipr:
            with anyio.CancelScope(shield=True):
                await self._teardown_tap(ipr, name)
            bridge_index = await self._ensure_bridge(ipr)
            try:
                with anyio.CancelScope(shield=True):
                    await ipr.link("add", ifname=tap, kind="tuntap", mode="tap")
                    index = (await ipr.link("get", ifname=tap))[0]["index"]
                    await ipr.link("set", index=index, master=bridge_index, state="up")
            except (NetlinkError, OSError) as exc:
                with anyio.CancelScope(shield=True):
                    await self._teardown_tap(ipr, name)
                raise _translate(exc, f"creating TAP {tap} on bridge {self.bridge}") from exc
        return tap

    def open_tap(self, name: str) -> int:
        """An fd attached to VM workspace ``name``'s TAP (made by :meth:`attach_tap`), for qemu's ``tap,fd=``.

        The server opens it so qemu, which runs unprivileged, needs neither ``/dev/net/tun`` (0600 on
        hosts without udev) nor ownership of the TAP; the caller closes its copy once qemu has it.

        Raises:
            InvalidSpec: ``name`` is malformed.
            BackendError: the TAP is missing or the kernel refused.
        """
        validate_ident(name)
        tap = tap_name(name)
        try:
            socket.if_nametoindex(tap)  # TUNSETIFF would make a missing one: a TAP on no bridge
        except OSError as exc:
            raise BackendError(f"TAP {tap} is missing; stop and start the workspace") from exc
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"cannot open /dev/net/tun ({exc.strerror}); run 'modprobe tun' and "
                               f"'sandbox-mcp doctor'") from exc
        try:
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", tap.encode(), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR))
        except OSError as exc:
            os.close(fd)
            raise BackendError(f"cannot attach to TAP {tap} ({exc.strerror}); stop and start the workspace") from exc
        return fd

    async def detach_tap(self, name: str) -> None:
        """Remove VM workspace ``name``'s TAP; nothing happens if it is absent or not a TAP (not ours).

        Raises:
            InvalidSpec: ``name`` is malformed.
            BackendError: netlink refused the deletion.
        """
        validate_ident(name)
        with anyio.CancelScope(shield=True):
            async with _iproute() as ipr:
                await self._teardown_tap(ipr, name)

    async def _teardown_tap(self, ipr: AsyncIPRoute, name: str) -> None:
        tap = tap_name(name)
        link = await _get_link(ipr, tap)
        if link is None:
            return
        if _kind(link) != "tun":
            raise Conflict(f"network interface {tap} exists and is not a TAP; remove it or pick another name")
        await _delete_link(ipr, link, f"TAP {tap}")

    async def tap_leftovers(self) -> list[str]:
        """Names of workspaces that have a TAP (``vm-NAME``) here, for the start-up reconcile.

        Raises:
            BackendError: netlink refused the dump.
        """
        return sorted(await _workspaces_with_link("tun", tap_name))

    async def leftovers(self) -> list[str]:
        """Names of workspaces that have a host veth (``sb-NAME``) or a named namespace (``sbx-NAME``) here.

        For the start-up reconcile: those whose workspace is not running can be torn down.

        Raises:
            BackendError: netlink refused the dump.
        """
        names = await _workspaces_with_link("veth", lambda n: veth_names(n)[0])
        try:
            entries = os.listdir(NETNS_DIR)
        except FileNotFoundError:
            entries = []
        names.update(ws for entry in entries if (ws := _workspace_of(entry, netns_name)) is not None)
        return sorted(names)


# -- netlink helpers ----------------------------------------------------------------------------


async def _workspaces_with_link(kind: str, link_name: Callable[[str], str]) -> set[str]:
    """Workspaces that have a link of ``kind`` named ``link_name(workspace)`` here.

    Raises:
        BackendError: netlink refused the dump.
    """
    names: set[str] = set()
    async with _iproute() as ipr:
        try:
            async for link in await ipr.link("dump"):
                ws = _workspace_of(link.get("IFLA_IFNAME") or "", link_name)
                if ws is not None and _kind(link) == kind:
                    names.add(ws)
        except NetlinkError as exc:
            raise _translate(exc, "listing network interfaces") from exc
    return names


class _Address:
    """One IPv4 address of the host, as the dump shows it."""

    __slots__ = ("ifname", "index", "interface")

    def __init__(self, ifname: str, index: int, interface: ipaddress.IPv4Interface) -> None:
        self.ifname, self.index, self.interface = ifname, index, interface

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.interface.network


@asynccontextmanager
async def _iproute(**kwargs: Any) -> AsyncIterator[AsyncIPRoute]:
    """An rtnetlink socket; ``fileno`` adopts a socket made elsewhere (in another namespace)."""
    fileno = kwargs.get("fileno")
    try:
        ipr = AsyncIPRoute(**kwargs)
    except (NetlinkError, OSError) as exc:
        if fileno is not None:
            os.close(fileno)
        raise _translate(exc, "opening a netlink socket") from exc
    try:
        yield ipr
    finally:
        ipr.close()


async def _delete_link(ipr: AsyncIPRoute, link: Any, what: str) -> None:
    """Delete ``link``; one that vanished meanwhile is fine. Raises BackendError otherwise."""
    try:
        await ipr.link("del", index=link["index"])
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:
            raise _translate(exc, f"deleting {what}") from exc


def _index_of(ifname: str) -> int | None:
    """The index of the link called ``ifname`` in this thread's network namespace, or None."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return None


def _index_via(fd: int, ifname: str) -> int:
    """The index of the link called ``ifname`` in the network namespace of socket ``fd`` (``SIOCGIFINDEX``:
    a netlink ``get`` would decode the whole link, ~0.5 ms of this process's CPU per start).

    Raises:
        OSError: no such link there (``ENODEV``).
    """
    request = struct.pack("16si20x", ifname.encode(), 0)
    return int(struct.unpack("16si20x", fcntl.ioctl(fd, _SIOCGIFINDEX, request))[1])


async def _get_link(ipr: AsyncIPRoute, ifname: str) -> Any | None:
    """The link called ``ifname``, or None."""
    try:
        return (await ipr.link("get", ifname=ifname))[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise _translate(exc, f"looking up network interface {ifname}") from exc


async def _ipv4_addresses(ipr: AsyncIPRoute) -> list[_Address]:
    try:
        out = []
        async for msg in await ipr.addr("dump", family=socket.AF_INET):
            # IFA_LOCAL is the address itself; IFA_ADDRESS is the peer's on point-to-point links.
            local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
            iface = ipaddress.IPv4Interface(f"{local}/{msg['prefixlen']}")
            out.append(_Address(msg.get("IFA_LABEL") or f"#{msg['index']}", msg["index"], iface))
        return out
    except NetlinkError as exc:
        raise _translate(exc, "listing the host's addresses") from exc


async def _ignore_exists(request: Any) -> None:
    try:
        await request
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise


def _kind(link: Any) -> str | None:
    return link.get(("linkinfo", "kind"))


def _workspace_of(name: str, derive: Callable[[str], str]) -> str | None:
    """The workspace whose derived interface/namespace name is ``name`` (``derive`` from naming), or None."""
    prefix = derive("")
    if not name.startswith(prefix):
        return None
    candidate = name[len(prefix) :]
    try:
        validate_ident(candidate)
    except InvalidSpec:
        return None
    return candidate if derive(candidate) == name else None


def _validate_mac(mac: str) -> str:
    norm = mac.lower() if isinstance(mac, str) else ""
    if not _MAC_RE.fullmatch(norm) or int(norm[:2], 16) & 1:
        raise InvalidSpec(f"MAC {mac!r} is not a unicast MAC address like 02:12:34:56:78:9a")
    return norm


def _translate(exc: BaseException, doing: str) -> SandboxError:
    """A netlink or OS error while ``doing`` something, as our own error."""
    code = getattr(exc, "code", None) or getattr(exc, "errno", None) or 0
    reason = os.strerror(code) if code else str(exc)
    if code == errno.EEXIST:
        return Conflict(f"{doing}: {reason}; something else holds that name, remove it or pick another name")
    if code in (errno.EPERM, errno.EACCES):
        return BackendError(f"{doing}: {reason}; direct mode needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
    return BackendError(f"{doing} failed: {reason}")


# -- named network namespaces ---------------------------------------------------------------------


def _check(ret: int, what: str) -> None:
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


_RUNDIR_LOCK = threading.Lock()


def _share_rundir(rundir: Path) -> None:
    """Make ``rundir`` a shared mount, binding it onto itself first if it is none, as iproute2 does.

    Shared, so that unmounting a namespace here also unmounts the copies in mount namespaces
    cloned meanwhile, which would otherwise keep the namespace alive.
    """
    rundir.mkdir(mode=0o755, parents=True, exist_ok=True)
    target = bytes(rundir)
    # One at a time: two first creates at once both found no mount point and bound it twice,
    # and a namespace made in between went missing (ENOENT with 30 creates at once).
    with _RUNDIR_LOCK:
        if _libc.mount(b"none", target, b"none", _MS_SHARED | _MS_REC, None) == 0:
            return
        if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
            _check(-1, f"making {rundir} a shared mount")
        _check(_libc.mount(target, target, b"none", _MS_BIND | _MS_REC, None), f"bind-mounting {rundir}")
        _check(_libc.mount(b"none", target, b"none", _MS_SHARED | _MS_REC, None), f"making {rundir} shared")


def _make_netns(path: Path, pid: int | None = None) -> int:
    """Create a network namespace bound at ``path``; return an rtnetlink socket (fd) inside it.

    With ``pid``, bind that process's namespace at ``path`` instead of a new one.
    Must run in a thread of its own that ends afterwards: it moves that thread into the namespace.
    """
    _share_rundir(path.parent)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        if pid is None:
            _check(_libc.unshare(_CLONE_NEWNET), "unshare(CLONE_NEWNET)")
            source = b"/proc/thread-self/ns/net"
        else:
            source = f"/proc/{int(pid)}/ns/net".encode()
            if os.stat(source).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
                # Its own namespace is not there yet: the veth and address would land in ours.
                raise OSError(errno.EAGAIN, f"process {pid} is still in the host's network namespace")
        _check(_libc.mount(source, bytes(path), b"none", _MS_BIND, None), f"mounting {path}")
        if pid is not None:
            nsfd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _check(_libc.setns(nsfd, _CLONE_NEWNET), f"setns({path})")  # os.setns is 3.12+
            finally:
                os.close(nsfd)
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, socket.NETLINK_ROUTE)
    except BaseException:
        _remove_netns(path)
        raise
    return sock.detach()


async def _create_netns(path: Path, pid: int | None = None) -> int:
    """Run :func:`_make_netns` in a fresh thread.

    Raises:
        Conflict: ``path`` exists already.
        BackendError: the namespace could not be made or mounted.
    """
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-netns")
    try:
        return await asyncio.wrap_future(pool.submit(_make_netns, path, pid))
    except FileExistsError as exc:
        raise Conflict(f"network namespace {path} exists already; another process is setting it up") from exc
    except OSError as exc:
        raise _translate(exc, f"creating network namespace {path}") from exc
    finally:
        pool.shutdown(wait=False)  # one task per thread: its namespace is not the host's any more


def _remove_netns(path: Path) -> None:
    """Unmount and delete a named namespace; nothing happens if it is absent.

    Raises:
        BackendError: it is there but cannot be unmounted or deleted.
    """
    if _libc.umount2(bytes(path), _MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):  # EINVAL: a bare file left by an interrupted setup
            raise _translate(OSError(code, os.strerror(code)), f"unmounting network namespace {path}")
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _translate(exc, f"removing network namespace {path}") from exc
