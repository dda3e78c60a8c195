"""Direct-mode Incus runtime: ``type="incus"`` workspaces as ephemeral, unprivileged Incus containers.

It talks to the Incus REST API (:mod:`.api`): the local daemon's unix socket by default,
or a remote server or cluster over TLS with a pinned certificate (``[runtimes.incus]``), where
Incus places the instance. Per start it creates an ephemeral instance from the cached image
(:mod:`.image`), pushes its address, hostname and hosts file, and starts it; a
stop deletes it (ephemeral), so every start boots a clean root.

Snapshots (local daemon): the root is Incus's to copy. A capture takes an Incus snapshot of the
(frozen) instance, publishes it as an image of our own (uncompressed, tagged with this server and
a root id) and drops the Incus snapshot; the snapshot's ``root/incus.json`` names that image. A
restore or fork puts that file in the workspace's root layer, and a start from it creates the
instance from that image instead of the base one: a restored root stays across restarts, as a
container's does. An image is freed once no snapshot and no root layer under the state dir names
its root id (:meth:`IncusRuntime.collect_roots`, after deletes and at start-up); the id is
written before the image is made, so a capture in flight is never collected. On a ``dir`` pool
each capture and each start from one copies the whole root (``btrfs``/``zfs`` pools clone it).

Local daemon: the NIC is bridged to our bridge with the workspace's MAC, and the workspace dir,
the Claude config and the host keys are the host's directories as disk devices. The two
read-write ones are not shifted (``shift`` maps the host's ids unchanged: a setuid-root program
written inside would be one on the host) but mounted as containers' are: an idmapped mount of
each (:mod:`..idmap`, ``nosuid,nodev``) maps exactly its owner (uid and gid) to the host ids the
instance's workspace user has (read from ``volatile.idmap.next`` once Incus allocated the
instance's own range), so the agent's files are the owner's, and root and every other id inside
have no id on it at all (what they try to create there fails). The mounts sit under
``/run/sandbox-mcp/incus-shares/TAG/`` (0711), where the instance's unprivileged root can walk
to them (the state dir may be below a 0700 home), placed in incusd's mount namespace, and go
when the instance stops. Only the read-only host keys are shifted, so that root inside can read
root's key. Remote server: the host's
directories are not there, so the workspace dir is a custom storage volume that outlives the
ephemeral instance (deleted on destroy) and the host keys and the Claude config are pushed
into the root before start. The MCP host reaches the instance by its address on the
workspace subnet, so on a remote server that subnet must be routed or bridged to this host
(README: "Incus workspaces").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import json
import math
import os
import secrets
import socket
import stat
import struct
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio

from ... import claude_workspace, idmap, supervise
from ...egress import check_nat
from ...errors import BackendError, InvalidSpec, InvalidState, Unsupported
from ...host import caps  # the host's own limits (what LXC may raise a container's to)
from ...host.cgroups import CgroupHost
from ...identity import host_identity
from ...models import OPEN_FILES, Check, Limits, RuntimeDetail, WorkspaceRecord
from ...naming import veth_names
from ...paths import WorkspacePaths
from ..base import ON_THE_SUBNET, NetworkNeeds, Progress, Runtime, RuntimeContext, RuntimeState, hosts_file
from .api import IncusAPIError, IncusClient, cert_fingerprint, probe
from .image import NETWORK_ENV_PATH, IncusImage
from .settings import IncusSettings

__all__ = ["IncusRuntime", "IncusState", "instance_body", "instance_name", "network_env"]

TAG_KEY = "user.sandbox-mcp.tag"
SHARES_DIR = Path("/run/sandbox-mcp/incus-shares")  # traversable by the instances' unprivileged roots
_SHARES = ("workspace", "claude-config")
_MNT_DETACH = 0x2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_CLAUDE_PUSH_MAX = 1 << 20  # bytes per file pushed from the host's claude-config (remote only)


def instance_name(name: str) -> str:
    """The Incus instance of workspace ``name``; prefixed so it never clashes with others' instances."""
    return f"sbx-{name}"


def volume_name(name: str) -> str:
    """The custom volume holding a remote workspace's directory."""
    return f"sbx-{name}-workspace"


def network_env(ip: str, subnet: ipaddress.IPv4Network, gateway: ipaddress.IPv4Address) -> str:
    """``/etc/sandbox-mcp/network.env``: what the image's set-up unit configures. Values validated here.

    Raises:
        InvalidSpec: ``ip`` is not an address in ``subnet``.
    """
    try:
        addr = ipaddress.IPv4Address(ip)
    except ValueError as exc:
        raise InvalidSpec(f"{ip!r} is not an IPv4 address") from exc
    if addr not in subnet:
        raise InvalidSpec(f"{addr} is not in the workspace subnet {subnet}")
    return f"IFACE=eth0\nADDRESS={addr}/{subnet.prefixlen}\nGATEWAY={ipaddress.IPv4Address(gateway)}\n"


def instance_body(
    *,
    record: WorkspaceRecord,
    fingerprint: str,
    tag: str,
    pool: str,
    limits: Limits,
    nic: dict[str, str],
    disks: dict[str, dict[str, str]],
) -> dict[str, Any]:
    """The exact ``POST /1.0/instances`` body of workspace ``record`` (created stopped, then started).

    No profiles: every device is ours, so a server's default profile (its own NIC) never joins.
    ``cpus`` may be a fraction: the instance sees ``ceil(cpus)`` CPUs and gets a CFS quota of
    ``cpus`` of them (``limits.cpu.allowance``), as nspawn's containers get ``CPUQuota``. The root
    disk gets ``limits.disk_mib`` as its ``size`` where that is set, and its resource limits are
    ours, not incusd's (``limits.kernel.fsize``, ``limits.kernel.nofile``): the limits reported are
    all there are.
    """
    return {
        "name": instance_name(record.name),
        "type": "container",
        "ephemeral": True,  # a stop deletes it: every start is a clean root
        "start": False,  # files are pushed before the first boot
        "profiles": [],
        "source": {"type": "image", "fingerprint": fingerprint},
        "config": {
            "security.privileged": "false",
            # A uid range of its own per instance, as nspawn's containers get (not Incus's shared default).
            "security.idmap.isolated": "true",
            "security.nesting": "false",
            "limits.cpu": str(max(1, math.ceil(limits.cpus))),
            "limits.cpu.allowance": f"{max(1, round(limits.cpus * 100))}ms/100ms",
            "limits.memory": f"{limits.memory_mib}MiB",
            "limits.processes": str(limits.tasks),
            "limits.kernel.fsize": "unlimited",
            # Not above what incusd may raise it to: LXC then fails the start (found where it lacks
            # CAP_SYS_RESOURCE); complete_limits says what that is, or None (a remote server's own).
            **({"limits.kernel.nofile": f"1024:{limits.open_files}"} if limits.open_files is not None else {}),
            TAG_KEY: tag,
            "user.sandbox-mcp.workspace": record.name,
        },
        "devices": {
            "root": {"type": "disk", "path": "/", "pool": pool,
                     **({"size": f"{limits.disk_mib}MiB"} if limits.disk_mib is not None else {})},
            "eth0": {"type": "nic", "name": "eth0", "hwaddr": record.mac, **nic},
            **disks,
        },
    }


# Instance states in which it still runs: a frozen one (pause_workspace) too.
_ALIVE = ("Running", "Frozen")


class IncusState(RuntimeState):
    """What the Incus runtime remembers: the image (store key, fingerprint) and the instance while it runs."""

    image: str | None = None
    fingerprint: str | None = None
    instance: str | None = None


class IncusRuntime(Runtime):
    """Ephemeral unprivileged Incus containers, on the local daemon or a remote server/cluster."""

    name = "incus"
    types = frozenset({"incus"})
    modes = frozenset({"direct"})
    package_flavour = "debian"
    host_network = True
    has_snapshots = True  # on the local daemon; capture_root refuses a remote server's (the dirs are there)
    State = IncusState
    Config = IncusSettings
    config: IncusSettings

    def network_needs(self, type_: str) -> NetworkNeeds:
        """Local or remote, its NIC has the name's MAC and the address pushed in network.env (a remote server's
        instances are reached at it too, so the subnet must be routed or bridged there)."""
        return ON_THE_SUBNET

    def __init__(self, ctx: RuntimeContext) -> None:
        super().__init__(ctx)
        self.incus = self.config
        self.remote = bool(self.incus.url)
        # A remote instance is not on this host's bridge: no hosts-file names, no local links.
        self.host_network = not self.remote
        self.network = ctx.network
        self.images = IncusImage(ctx.settings, ctx.images)
        self._client: IncusClient | None = None
        self._sizes_roots: bool | None = None

    def max_cpus(self) -> float | None:
        """This host's CPUs on the local daemon; a remote server's are its own (it refuses what it lacks)."""
        return None if self.incus.url else super().max_cpus()

    def state(self, record: WorkspaceRecord) -> IncusState:
        return IncusState.model_validate(record.runtime_state)

    def client(self) -> IncusClient:
        """The API client (one per runtime, made on first use).

        Raises:
            InvalidSpec: the TLS files of a remote server cannot be loaded.
        """
        if self._client is None:
            self._client = IncusClient(self.incus)
        return self._client

    def _paths(self, record: WorkspaceRecord) -> WorkspacePaths:
        return WorkspacePaths.of(self.settings.state_dir, record.name)

    def _tag(self, record: WorkspaceRecord) -> str:
        return supervise.workspace_tag(self.settings.state_dir, record.name)

    def _instance_path(self, record: WorkspaceRecord) -> str:
        return f"/1.0/instances/{quote(instance_name(record.name), safe='')}"

    def _volume_path(self, record: WorkspaceRecord) -> str:
        pool = quote(self.incus.storage_pool, safe="")
        return f"/1.0/storage-pools/{pool}/volumes/custom/{quote(volume_name(record.name), safe='')}"

    def mark_stopped(self, record: WorkspaceRecord) -> WorkspaceRecord:
        return self.with_state(record, self.state(record).model_copy(update={"instance": None}))

    # -- host -----------------------------------------------------------------------------------

    def checks(self) -> list[Check]:
        where = self.incus.url or str(self.incus.socket)
        fix = ("start incusd (apt-get install -t bookworm-backports incus-base; incus admin init)" if not self.remote
               else "check url in [runtimes.incus], that this client certificate is trusted (incus config trust "
                    "add-certificate) and that its server_cert is the server's certificate")  # fmt: skip
        try:
            info = probe(self.incus)
        except (BackendError, InvalidSpec) as exc:
            return [Check(name="incus", ok=False, detail=str(exc), fix=fix, required=False)]
        checks = [
            Check(name="incus", ok=info.api_version == "1.0",
                  detail=f"{where}: Incus {info.server_version}, API {info.api_version}", fix=fix, required=False),
            Check(name="incus trust", ok=info.auth == "trusted", detail=f"auth: {info.auth}",
                  fix="add this client's certificate to the server's trust store", required=False),
        ]  # fmt: skip
        if self.remote and self.incus.server_cert:
            pin = cert_fingerprint(self.incus.server_cert)
            checks.append(Check(name="incus certificate pin", ok=info.peer_cert_sha256 == pin,
                                detail=f"server presented {info.peer_cert_sha256}, pinned {pin}", required=False))
        if not self.remote:
            checks.append(Check(
                name="incus idmapped mounts", ok=info.idmapped_mounts,
                detail="the kernel shifts disk devices" if info.idmapped_mounts else "no idmapped mounts",
                fix="a kernel with idmapped mounts (5.12+) is needed for the shifted workspace dir", required=False,
            ))  # fmt: skip
        return checks

    async def addresses_in_use(self) -> set[str]:
        return set() if self.remote else await self.network.live_addresses()

    # -- lifecycle ------------------------------------------------------------------------------

    async def prepare(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        # Before any image work: no daemon, or one that does not trust us, is a quick, clear error.
        info = await self.client().server()
        if info.auth != "trusted":
            raise BackendError(f"{self.incus.url or self.incus.socket} does not trust this client; add its "
                               "certificate on the server (incus config trust add-certificate) and retry")
        key, fingerprint = await self._ensure_image(record, progress)
        if self.remote and not await self.client().exists(self._volume_path(record)):
            pool = quote(self.incus.storage_pool, safe="")
            await self.client().call("POST", f"/1.0/storage-pools/{pool}/volumes/custom",
                                     json={"name": volume_name(record.name), "type": "custom", "config": {}})
        return self.with_state(record, self.state(record).model_copy(update={"image": key, "fingerprint": fingerprint}))

    async def _ensure_image(self, record: WorkspaceRecord, progress: Progress) -> tuple[str, str]:
        """The image in the store and on the server: packed once, uploaded when the server lacks it."""
        key = await self.images.ensure(record.packages, progress)
        fingerprint = self.images.fingerprint(key)
        if fingerprint is None:
            raise BackendError(f"image {key} has no fingerprint; run 'sandbox-mcp image prune' and create again")
        client = self.client()
        if not await client.exists(f"/1.0/images/{fingerprint}"):
            await progress("importing the image into Incus (once per image and server)", None)
            got = await client.import_image(self.images.tarball(key), progress)
            if got != fingerprint:
                raise BackendError(f"Incus imported image {key} as {got}, expected {fingerprint}; "
                                   "delete that image on the server and create again")
        return key, fingerprint

    def complete_limits(self, limits: Limits) -> Limits:
        """The root disk's size: ``root_layer_mib``, as a container's root layer (start drops it on a pool
        that cannot enforce it). Open files: on the local daemon, what this host lets a process raise its
        limit to (:func:`~sandbox_mcp.host.caps.open_files_ceiling`: LXC refuses to start past it); on a
        remote server, its own default (what it may raise limits to is not known here)."""
        if limits.disk_mib is not None:
            return limits
        open_files = None if self.remote else caps.open_files_ceiling(OPEN_FILES)
        return limits.model_copy(update={"disk_mib": self.settings.root_layer_mib, "open_files": open_files})

    async def _pool_sizes_roots(self) -> bool:
        """Whether the storage pool enforces a root disk's ``size``. A ``dir`` pool does only on a file
        system with project quotas, and Incus then skips the quota with a warning in its log: a size
        it would not hold is neither set nor reported."""
        if self._sizes_roots is None:
            pool = await self.client().request("GET", f"/1.0/storage-pools/{quote(self.incus.storage_pool, safe='')}")
            self._sizes_roots = pool.get("driver") != "dir"
        return self._sizes_roots

    def assign(self, record: WorkspaceRecord, others: list[WorkspaceRecord]) -> WorkspaceRecord:
        # Incus maps root inside to an unprivileged uid range it chooses (security.privileged=false).
        return record.model_copy(update={"isolation": "unprivileged-container"})

    def _disks(self, record: WorkspaceRecord) -> dict[str, dict[str, str]]:
        user = record.user
        if self.remote:
            return {"workspace": {"type": "disk", "pool": self.incus.storage_pool, "source": volume_name(record.name),
                                  "path": claude_workspace.workspace_dir_inside(user)}}
        paths, shares = self._paths(record), self._shares_dir(record)
        # The read-write shares are idmapped mounts of our own (their owner only, see _bind_shares); the
        # keys are root's and read-only: shifted, so root inside reads them as root's.
        return {
            "workspace": {"type": "disk", "source": str(shares / "workspace"),
                          "path": claude_workspace.workspace_dir_inside(user)},
            "claude-config": {"type": "disk", "source": str(shares / "claude-config"),
                              "path": claude_workspace.claude_config_dir_inside(user)},
            "ssh-host-keys": {"type": "disk", "source": str(paths.ssh_host_keys), "path": "/etc/ssh-host-keys",
                              "readonly": "true", "shift": "true"},
        }  # fmt: skip

    def _shares_dir(self, record: WorkspaceRecord) -> Path:
        return SHARES_DIR / self._tag(record)

    def _make_share_points(self, record: WorkspaceRecord) -> None:
        """The (empty) mount points of the shares, for the instance's disk devices to name.

        Raises:
            BackendError: a leftover mount could not be detached.
        """
        self._unbind_shares(record)
        top = self._shares_dir(record)
        SHARES_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        top.mkdir(mode=0o711, exist_ok=True)
        os.chmod(top, 0o711)
        for name in _SHARES:
            (top / name).mkdir(mode=0o700, exist_ok=True)

    def _bind_shares(self, record: WorkspaceRecord, user_ids: tuple[int, int]) -> None:
        """Mount the workspace dir and the Claude config on their points, idmapped: their owner on disk as
        ``user_ids`` (the host uid and gid of the instance's workspace user), no other id; nosuid,nodev.
        Where incusd has a mount namespace of its own, the mounts are placed in that one.

        Raises:
            BackendError: a share is not a directory or is root's, or the kernel refused the mount.
        """
        top, paths = self._shares_dir(record), self._paths(record)
        ns = self._incusd_mount_ns()
        try:
            for name, source in zip(_SHARES, (paths.workspace, paths.claude_config), strict=True):
                st = os.lstat(source)
                if not stat.S_ISDIR(st.st_mode) or st.st_uid == 0 or st.st_gid == 0:
                    raise BackendError(f"{source} is not a directory of the workspace's owner; chown it to the "
                                       "owner (or destroy and re-create the workspace) and start again")
                uids, gids = [(st.st_uid, user_ids[0], 1)], [(st.st_gid, user_ids[1], 1)]
                attrs = idmap.MOUNT_ATTR_NOSUID | idmap.MOUNT_ATTR_NODEV
                if ns is None:
                    idmap.idmapped_mount(source, top / name, uids, attrs, gid_map=gids)
                    continue
                fd = idmap.detached_idmapped_tree(source, uids, attrs, gid_map=gids)
                try:
                    _in_mount_ns(ns, "move", top / name, fd)
                finally:
                    os.close(fd)
        except BaseException:
            self._unbind_shares(record)
            raise

    def _unbind_shares(self, record: WorkspaceRecord) -> None:
        """Undo :meth:`_make_share_points` and :meth:`_bind_shares` (leftovers of a crash too); nothing if
        there is nothing.

        Raises:
            BackendError: a mount could not be detached.
        """
        top = self._shares_dir(record)
        if not top.exists():
            return
        ns = self._incusd_mount_ns()
        for name in _SHARES:
            target = top / name
            if ns is not None:
                _in_mount_ns(ns, "umount", target)
            while _libc.umount2(bytes(target), _MNT_DETACH) == 0:
                pass  # mounted more than once (a crash between a mount and its undo): all of them
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):
                raise BackendError(f"unmounting {target} failed: {os.strerror(code)}")
            with contextlib.suppress(FileNotFoundError):
                target.rmdir()
        with contextlib.suppress(FileNotFoundError):
            top.rmdir()

    def _incusd_mount_ns(self) -> Path | None:
        """The local incusd's mount namespace when it is not ours (a packaged daemon with a private one, or
        the tests' private daemon), else None: the shares must be mounted where incusd sees them."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(10)
                sock.connect(str(self.incus.socket))
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = struct.unpack("3i", raw)[0]
            theirs = Path(f"/proc/{pid}/ns/mnt")
            return None if theirs.stat().st_ino == Path("/proc/self/ns/mnt").stat().st_ino else theirs
        except OSError:
            return None  # no daemon to see anything: our own namespace is as good as any

    async def _user_host_ids(self, record: WorkspaceRecord) -> tuple[int, int]:
        """The host uid and gid of the workspace user inside the created (not yet started) instance.

        Raises:
            BackendError: Incus has not allocated the instance an unprivileged id range (``volatile.idmap.next``).
        """
        inst = await self._instance(record) or {}
        inside = self.settings.user_uid
        try:
            entries = json.loads((inst.get("config") or {}).get("volatile.idmap.next") or "[]")
            found = {}
            for kind in ("Isuid", "Isgid"):
                e = next(e for e in entries if e.get(kind) and e["Nsid"] <= inside < e["Nsid"] + e["Maprange"])
                found[kind] = int(e["Hostid"]) + inside - int(e["Nsid"])
        except (ValueError, KeyError, TypeError, StopIteration) as exc:
            raise BackendError(f"Incus gave instance {instance_name(record.name)} no id range holding uid {inside} "
                               "(volatile.idmap.next); is security.idmap.isolated supported by this server?") from exc
        if min(found.values()) < 65536:
            raise BackendError(f"Incus maps the workspace user of {instance_name(record.name)} to host id "
                               f"{min(found.values())}, not into an unprivileged range; not sharing the workspace dir")
        return found["Isuid"], found["Isgid"]

    def _nic(self, record: WorkspaceRecord) -> dict[str, str]:
        if self.remote:
            if self.incus.network:
                return {"network": self.incus.network}
            return {"nictype": "bridged", "parent": self.settings.bridge}
        # Our name for the host end, so the firewall's per-port rules apply as to nspawn's veths.
        return {"nictype": "bridged", "parent": self.settings.bridge, "host_name": self._port(record)}

    @staticmethod
    def _port(record: WorkspaceRecord) -> str:
        return veth_names(record.name)[0]

    def validate(self, record: WorkspaceRecord) -> None:
        if record.egress == "none":
            return
        if self.remote:
            what = "egress='internet'" if record.egress == "internet" else "egress by domain list"
            raise InvalidSpec(f"{what} is not available on a remote Incus server: its network policy is "
                              "the server's (Incus network ACLs); create with egress='none'")
        check_nat(record.egress, self.settings.nat)

    async def set_egress(self, record: WorkspaceRecord) -> None:
        """A local instance's port on our bridge gets the new policy (its DNS is redirected to the egress
        resolver when it has a list); a remote server's network policy is its own."""
        if self.remote:
            raise self._cannot("change the network policy of an instance on a remote Incus server")
        await self.network.admit(self._port(record), record.ip, record.mac, egress=record.egress,
                                 owner=host_identity(self.settings, record)[0])

    async def _instance(self, record: WorkspaceRecord) -> dict[str, Any] | None:
        try:
            return await self.client().request("GET", self._instance_path(record))
        except IncusAPIError as exc:
            if exc.status == 404:
                return None
            raise

    async def start(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        existing = await self._instance(record)
        if existing is not None and existing.get("status") == "Running":
            return record
        if existing is not None:
            await self._delete(record)  # created but never started (a crash between the two)
        key, fingerprint = await self._ensure_image(record, progress)
        state = self.state(record).model_copy(update={"image": key, "fingerprint": fingerprint})
        source = await self._root_source(record) or fingerprint
        if not self.remote:
            await progress("setting up the network", None)
            await self.network.ensure()
            await self.network.admit(self._port(record), record.ip, record.mac, egress=record.egress,
                                     owner=host_identity(self.settings, record)[0])
            await anyio.to_thread.run_sync(self._make_share_points, record)
        limits = self.limits_of(record)
        if not await self._pool_sizes_roots():
            limits = limits.model_copy(update={"disk_mib": None})
        body = instance_body(record=record, fingerprint=source, tag=self._tag(record),
                             pool=self.incus.storage_pool, limits=limits, nic=self._nic(record),
                             disks=self._disks(record))  # fmt: skip
        client = self.client()
        try:
            await progress("creating the Incus instance", None)
            await client.call("POST", "/1.0/instances", json=body)
            if not self.remote:
                user_ids = await self._user_host_ids(record)
                await anyio.to_thread.run_sync(self._bind_shares, record, user_ids)
            await self._push_boot_files(record)
            await progress("booting the Incus instance", None)
            await client.call("PUT", f"{self._instance_path(record)}/state", json={"action": "start", "timeout": 30})
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._delete(record)
                if not self.remote:
                    await self.network.revoke(self._port(record))
                    await anyio.to_thread.run_sync(self._unbind_shares, record)
            raise
        record = record.model_copy(update={"limits": limits})  # what this instance got, as reported
        return self.with_state(record, state.model_copy(update={"instance": instance_name(record.name)}))

    async def _push_boot_files(self, record: WorkspaceRecord) -> None:
        """What the instance needs before it boots: address, names, and on remote servers keys and config."""
        inst = instance_name(record.name)
        client = self.client()
        s = self.settings
        await client.push_file(inst, NETWORK_ENV_PATH, network_env(record.ip, s.subnet, s.host_ip).encode())
        await client.push_file(inst, "/etc/hostname", f"{record.name}\n".encode())
        await client.push_file(inst, "/etc/hosts", hosts_file(record.name, str(s.host_ip)).encode())
        if not self.remote:
            return
        paths = self._paths(record)
        await client.push_file(inst, "/etc/ssh-host-keys/ssh_host_ed25519_key", _read_plain(paths.host_key),
                               mode=0o600)
        await client.push_file(inst, "/etc/ssh-host-keys/authorized_keys", _read_plain(paths.authorized_keys))
        inside = claude_workspace.claude_config_dir_inside(record.user)
        uid = s.user_uid
        for rel, data in await anyio.to_thread.run_sync(_plain_files, paths.claude_config):
            parent = os.path.dirname(rel)
            if parent:
                await client.make_dir(inst, f"{inside}/{parent}", uid=uid, gid=uid, mode=0o700)
            await client.push_file(inst, f"{inside}/{rel}", data, uid=uid, gid=uid, mode=0o600)

    async def pause(self, record: WorkspaceRecord) -> None:
        """Incus's freeze (the cgroup freezer under the instance)."""
        await self._set_state(record, "freeze")

    async def resume(self, record: WorkspaceRecord) -> None:
        await self._set_state(record, "unfreeze")

    async def _set_state(self, record: WorkspaceRecord, action: str) -> None:
        inst = await self._instance(record)
        if inst is None or inst.get("status") not in _ALIVE:
            raise InvalidState(f"workspace {record.name!r} is not running; call start_workspace")
        if (action == "freeze") == (inst.get("status") == "Frozen"):
            return
        await self.client().call("PUT", f"{self._instance_path(record)}/state", json={"action": action, "timeout": 30})

    async def stop(self, record: WorkspaceRecord, *, force: bool = False) -> None:
        inst = await self._instance(record)
        if inst is not None and inst.get("status") == "Frozen":  # a frozen container cannot power off
            with contextlib.suppress(IncusAPIError):
                await self.client().call("PUT", f"{self._instance_path(record)}/state", json={"action": "unfreeze"})
            inst = await self._instance(record)
        if inst is not None and inst.get("status") == "Running" and not force:
            # A clean power-off first; past the grace time _delete kills it. Its root is thrown away
            # anyway and the workspace dir is a host directory or a volume, so a kill loses nothing.
            with contextlib.suppress(IncusAPIError):
                await self.client().call("PUT", f"{self._instance_path(record)}/state",
                                         json={"action": "stop", "timeout": max(1, int(self.settings.stop_timeout_s))})
        await self._delete(record)
        if not self.remote:
            await self.network.revoke(self._port(record))
            await anyio.to_thread.run_sync(self._unbind_shares, record)

    async def _delete(self, record: WorkspaceRecord) -> None:
        """Make sure the instance is gone: force-stop and delete what is left (ephemeral ones go by themselves).

        Raises:
            BackendError: it is still there after the operation timeout.
        """
        path = self._instance_path(record)
        with anyio.move_on_after(self.incus.operation_timeout_s):
            while (inst := await self._instance(record)) is not None:
                # Either may race with Incus deleting an ephemeral instance that just stopped.
                with contextlib.suppress(IncusAPIError):
                    if inst.get("status") in _ALIVE:
                        await self.client().call("PUT", f"{path}/state", json={"action": "stop", "force": True})
                    else:
                        await self.client().call("DELETE", path)
                        return
                await anyio.sleep(0.1)
            return
        raise BackendError(f"Incus instance {instance_name(record.name)} could not be deleted; "
                           "look at it with 'incus info --show-log' and delete it by hand")

    async def destroy(self, record: WorkspaceRecord) -> None:
        await self._delete(record)
        if self.remote:
            try:
                await self.client().call("DELETE", self._volume_path(record))
            except IncusAPIError as exc:
                if exc.status != 404:
                    raise

    async def oom_kills(self, record: WorkspaceRecord) -> int | None:
        """Local daemon: from the instance's memory cgroup on this host (found through its init's PID).
        Remote: None (its cgroups are on another host)."""
        if self.remote:
            return None
        try:
            state = await self.client().request("GET", f"{self._instance_path(record)}/state")
        except IncusAPIError:
            return None
        pid = state.get("pid") if isinstance(state, dict) else None
        if not isinstance(pid, int) or pid <= 0:
            return None
        top = f"lxc.payload.{instance_name(record.name)}"
        return await anyio.to_thread.run_sync(lambda: CgroupHost().oom_kills_of(pid, top))

    async def status(self, record: WorkspaceRecord) -> RuntimeDetail:
        inst = await self._instance(record)
        running = inst is not None and inst.get("status") in _ALIVE
        uptime = None
        if running and inst and inst.get("last_used_at"):
            with contextlib.suppress(ValueError):
                started = datetime.fromisoformat(str(inst["last_used_at"]).replace("Z", "+00:00"))
                uptime = round((datetime.now(started.tzinfo) - started).total_seconds(), 3)
        where = self.incus.url or "local incusd"
        location = f" on {inst.get('location')}" if inst and inst.get("location") not in (None, "", "none") else ""
        return RuntimeDetail(
            runtime=self.name, running=running, uptime_s=uptime, paused=bool(inst and inst.get("status") == "Frozen"),
            detail=f"Incus instance {instance_name(record.name)} ({where}{location}): "
                   f"{inst.get('status') if inst else 'absent'}",
        )  # fmt: skip

    async def logs(self, record: WorkspaceRecord, lines: int) -> str:
        try:
            raw = await self.client().request("GET", f"{self._instance_path(record)}/console", raw=True)
        except IncusAPIError as exc:
            if exc.status == 404:
                return ""
            raise
        text = raw.decode("utf-8", "replace").replace("\r", "") if isinstance(raw, bytes) else ""
        return "\n".join(text.splitlines()[-lines:])

    # -- snapshots: roots as images of our own ---------------------------------------------------

    def _server_tag(self) -> str:
        return supervise.workspace_tag(self.settings.state_dir, "")

    async def _root_source(self, record: WorkspaceRecord) -> str | None:
        """The image of the root layer a restore or fork left (None: the base image).

        Raises:
            InvalidState: that image is gone from Incus.
        """
        ref = await anyio.to_thread.run_sync(_read_root_ref, self._paths(record).root_layer)
        if ref is None or not ref.get("fingerprint"):
            return None
        fingerprint = str(ref["fingerprint"])
        if not await self.client().exists(f"/1.0/images/{quote(fingerprint, safe='')}"):
            raise InvalidState(
                f"the Incus image holding workspace {record.name!r}'s restored root ({fingerprint[:12]}) is gone "
                "from the server; restore_workspace another snapshot, or destroy and re-create the workspace"
            )
        return fingerprint

    async def capture_root(self, record: WorkspaceRecord, dest: Path) -> None:
        """Running (frozen by the manager): an Incus snapshot of the instance, published as an image of ours
        that ``dest/incus.json`` names. Stopped: the root layer's reference, if any (else the base image's).

        Raises:
            Unsupported: a remote server (the workspace dir is a volume there, not a host dir to copy).
            BackendError, IncusAPIError: Incus could not snapshot or publish it.
        """
        if self.remote:
            raise Unsupported(
                "snapshots of Incus workspaces on a remote server are not available (the workspace dir is a volume "
                "there); stop_workspace and start_workspace keep the workspace dir"
            )
        dest.mkdir(mode=0o700)
        inst = await self._instance(record)
        if inst is None or inst.get("status") not in _ALIVE:
            ref = await anyio.to_thread.run_sync(_read_root_ref, self._paths(record).root_layer)
            if ref is not None:
                await anyio.to_thread.run_sync(_write_root_ref, dest, ref)
            return
        root_id = secrets.token_hex(8)
        # Named before it exists: a collection running meanwhile keeps it.
        await anyio.to_thread.run_sync(_write_root_ref, dest, {"id": root_id})
        snap = f"sbx-capture-{root_id}"
        path = self._instance_path(record)
        client = self.client()
        await client.call("POST", f"{path}/snapshots", json={"name": snap, "stateful": False})
        try:
            meta = await client.call("POST", "/1.0/images", json={
                "source": {"type": "snapshot", "name": f"{instance_name(record.name)}/{snap}"},
                "compression_algorithm": "none",  # a local image: packing it would only cost time
                "properties": {_ROOT_KEY: root_id, _SERVER_KEY: self._server_tag(),
                               "description": f"sandbox-mcp: root of workspace {record.name}"},
            }, op_timeout_s=3600)
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(IncusAPIError):
                await client.call("DELETE", f"{path}/snapshots/{quote(snap, safe='')}")
        fingerprint = str((meta or {}).get("fingerprint", ""))
        if not fingerprint:
            raise BackendError(f"Incus published workspace {record.name!r}'s root without a fingerprint")
        image = await client.request("GET", f"/1.0/images/{quote(fingerprint, safe='')}")
        ref = {"id": root_id, "fingerprint": fingerprint, "size": int((image or {}).get("size") or 0)}
        await anyio.to_thread.run_sync(_write_root_ref, dest, ref, True)

    def held_elsewhere_bytes(self, root_part: Path) -> int:
        """The size of the image the snapshot's root names (on the Incus server's disk, not in the state dir)."""
        ref = _read_root_ref(root_part)
        return int(ref.get("size") or 0) if ref else 0

    async def collect_roots(self) -> None:
        """Delete the images of ours (this server's captured roots) that no snapshot or root layer names."""
        if self.remote:
            return
        try:
            images = await self.client().request("GET", "/1.0/images", params={"recursion": "1"})
        except (BackendError, InvalidSpec):
            return
        ours = {str(i.get("fingerprint")): (i.get("properties") or {}).get(_ROOT_KEY) for i in images or []
                if (i.get("properties") or {}).get(_SERVER_KEY) == self._server_tag()}
        if not ours:
            return
        named = await anyio.to_thread.run_sync(_named_roots, self.settings.state_dir)
        for fingerprint, root_id in ours.items():
            if root_id not in named:
                with contextlib.suppress(IncusAPIError):
                    await self.client().call("DELETE", f"/1.0/images/{quote(fingerprint, safe='')}")

    async def reconcile(self, records: list[WorkspaceRecord]) -> None:
        """Delete instances of this server's workspaces that the registry does not have running.

        An instance is ours when its tag is the tag of one of our records (or of a record that no
        longer exists under our state dir: a create that died before its record was written).
        """
        try:
            instances = await self.client().request("GET", "/1.0/instances", params={"recursion": "1"})
        except (BackendError, InvalidSpec):
            return  # no daemon, nothing of ours can be running there
        by_tag = {self._tag(r): r for r in records}
        running = {self._tag(r) for r in records if r.state in ("running", "paused", "starting")}
        for inst in instances or []:
            tag = (inst.get("config") or {}).get(TAG_KEY)
            if tag in by_tag and tag not in running:
                await self._delete(by_tag[tag])
                if not self.remote:
                    await self.network.revoke(self._port(by_tag[tag]))
        if not self.remote:
            for r in records:
                if self._tag(r) not in running:
                    await anyio.to_thread.run_sync(self._unbind_shares, r)
        await self.collect_roots()


# Run in incusd's mount namespace (nsenter): place a detached mount (an inherited fd), or unmount.
_IN_NS = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
op, target = sys.argv[1], os.fsencode(sys.argv[2])
if op == "move":
    if libc.syscall(429, int(sys.argv[3]), b"", -100, target, 4) != 0:  # move_mount, F_EMPTY_PATH
        sys.exit(os.strerror(ctypes.get_errno()))
else:
    while libc.umount2(target, 2) == 0:  # MNT_DETACH
        pass
    if ctypes.get_errno() not in (22, 2):  # EINVAL: not mounted, ENOENT: no such point
        sys.exit(os.strerror(ctypes.get_errno()))
"""


def _in_mount_ns(ns: Path, op: str, target: Path, fd: int | None = None) -> None:
    """``op`` ("move" the detached mount ``fd`` onto ``target``, or "umount" it) inside mount namespace ``ns``.

    Raises:
        BackendError: nsenter is missing, or the kernel refused.
    """
    argv = ["nsenter", f"--mount={ns}", "--", sys.executable, "-c", _IN_NS, op, str(target)]
    argv += [str(fd)] if fd is not None else []
    try:
        done = subprocess.run(argv, pass_fds=(fd,) if fd is not None else (), capture_output=True, text=True,
                              timeout=60, check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"cannot enter incusd's mount namespace to {op} {target}: {exc}") from exc
    if done.returncode != 0:
        raise BackendError(f"{op} of {target} in incusd's mount namespace failed: {done.stderr.strip()[-500:]}")


_ROOT_KEY = "sandbox-mcp.root"  # image property: the root id a snapshot's incus.json names
_SERVER_KEY = "sandbox-mcp.server"  # image property: which server's (state dir's) image it is
_ROOT_REF = "incus.json"


def _read_root_ref(directory: Path) -> dict[str, Any] | None:
    """The captured-root reference in ``directory`` (a snapshot's root part or a root layer), if any. Blocking."""
    try:
        ref = json.loads((directory / _ROOT_REF).read_text())
    except (OSError, ValueError):
        return None
    return ref if isinstance(ref, dict) else None


def _write_root_ref(directory: Path, ref: dict[str, Any], replace: bool = False) -> None:
    """Write ``ref`` as ``directory``'s captured-root reference. Blocking."""
    target = directory / _ROOT_REF
    tmp = target.with_name(target.name + ".new")
    tmp.write_text(json.dumps(ref))
    if not replace and target.exists():
        raise BackendError(f"{target} exists already")
    os.replace(tmp, target)


def _named_roots(state_dir: Path) -> set[str]:
    """Every root id a snapshot (finished, in flight or being deleted) or a root layer (live, staged or old)
    under ``state_dir`` names. Blocking."""
    named: set[str] = set()
    patterns = ("*/root-layer*/" + _ROOT_REF, "*/snapshots/*/root/" + _ROOT_REF)
    for pattern in patterns:
        for path in state_dir.glob(pattern):
            ref = _read_root_ref(path.parent)
            if ref and ref.get("id"):
                named.add(str(ref["id"]))
    return named


def _read_plain(path: Path) -> bytes:
    """A host file the server wrote itself, never through a symlink.

    Raises:
        BackendError: it is missing or not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise BackendError(f"cannot read {path}: {exc}; destroy and re-create the workspace") from exc
    with os.fdopen(fd, "rb") as f:
        return f.read(_CLAUDE_PUSH_MAX)


def _plain_files(root: Path, depth: int = 3) -> list[tuple[str, bytes]]:
    """Regular files under ``root`` (the workspace-writable Claude config): never a symlink, bounded."""
    out: list[tuple[str, bytes]] = []

    def walk(d: Path, rel: str, level: int) -> None:
        with contextlib.suppress(OSError), os.scandir(d) as it:
            for entry in it:
                sub = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode) and level < depth:
                    walk(Path(entry.path), sub, level + 1)
                elif stat.S_ISREG(st.st_mode) and st.st_size <= _CLAUDE_PUSH_MAX:
                    out.append((sub, _read_plain(Path(entry.path))))

    walk(root, "", 0)
    return out
