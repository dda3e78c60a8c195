"""Direct-mode container runtime: the server runs and supervises ``systemd-nspawn --boot`` itself.

Per workspace: a network namespace with a veth on the bridge (``hostnet/netlink.py``),
the shared cached root image with a fresh overlay per boot (``--volatile=overlay``,
so a restart gives a clean root and the image is never written), and bind mounts
of the persistent host directories. The nspawn process runs in its own session,
so workspaces outlive the MCP server process; the registry records its PID and
start time, which is how a later server process finds (and may stop) it without
confusing it with a reused PID.

Works on any Linux host with systemd-nspawn, run as root, with or without systemd
as PID 1 (``--register=no --keep-unit`` keeps nspawn off the system bus).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import anyio
from pydantic import Field, model_validator

from ... import claude_workspace, hostcmd, snapshots, supervise, sysctls
from ...checks import which_check
from ...egress import check_nat
from ...errors import BackendError, InvalidSpec, InvalidState, Unsupported
from ...fsutil import atomic_write, write_in_place
from ...host import caps
from ...host.cgroups import CgroupHost, group_for, join_argv
from ...identity import host_identity
from ...images import DebianRoot
from ...images.debootstrap import POOL_SLOT_ARG
from ...models import OPEN_FILES, Check, Limits, RuntimeDetail, WorkspaceRecord
from ...naming import UID_RANGE, allocate_uid_base, veth_names
from ...paths import WorkspacePaths
from ...supervise import ProcessRef
from ..base import (
    ON_THE_SUBNET,
    ImageRootRuntime,
    ImageRootState,
    NetworkNeeds,
    Progress,
    RuntimeContext,
    hosts_file,
    log_tail_lines,
    resolv_conf,
)
from . import handover, rootfs, scopes
from .rootfs import RootMounts
from .settings import NspawnSettings

__all__ = ["DROPPED_CAPABILITIES", "NspawnRuntime", "NspawnState", "hosts_file", "launch_argv", "nspawn_argv"]

_NSPAWN_MISSING = (
    "install it (Debian/Ubuntu: apt-get install systemd-container) and run 'sandbox-mcp doctor'"
)


def machine_name(name: str) -> str:
    """nspawn's machine name; prefixed so it never clashes with the host's other containers."""
    return f"sbx-{name}"


# Beyond what a dev box needs (nspawn's default set keeps them): device nodes, audit rules,
# immutable flags, terminal configuration.
DROPPED_CAPABILITIES = ("CAP_MKNOD", "CAP_AUDIT_CONTROL", "CAP_LINUX_IMMUTABLE", "CAP_SYS_TTY_CONFIG")


def nspawn_argv(
    *,
    name: str,
    image_root: Path,
    netns_path: Path | None,
    paths: WorkspacePaths,
    user: str,
    uid_base: int | None = None,
    mounts: RootMounts | None = None,
    tag: str,
    hostname: str | None = None,
    shares: bool = True,
) -> list[str]:
    """The exact systemd-nspawn command that boots workspace ``name`` (its machine name; ``hostname``
    inside, default ``name``: a claimed pool slot boots under its slot's name).

    Privileged (``uid_base`` None): the image with a fresh overlay per boot, joining the
    prepared ``netns_path``. User-namespaced: ``--private-users=BASE:65536`` on the host-made
    ``mounts`` (:mod:`.rootfs`: the root overlay and idmapped binds), and a network
    namespace of nspawn's own (``--private-network``; the host adds the veth after start).
    ``shares=False`` (a user-namespaced warm pool slot) leaves out the workspace dir and the Claude
    config: nspawn's binds could never be unmounted again, and the claim mounts the owner's in; nor
    does its init start the exec agent at boot (``POOL_SLOT_ARG``).

    Raises:
        InvalidSpec: a host path contains ':' or ',' (nspawn's separators), or the arguments
            do not fit one of the two kinds.
    """
    if uid_base is None:
        if netns_path is None:
            raise InvalidSpec("a privileged container needs its network namespace path")
        binds = [
            ("--bind", paths.workspace, claude_workspace.workspace_dir_inside(user)),
            ("--bind", paths.claude_config, claude_workspace.claude_config_dir_inside(user)),
            ("--bind-ro", paths.ssh_host_keys, "/etc/ssh-host-keys"),
        ]
        kind = [
            f"--directory={image_root}",
            "--volatile=overlay",  # a fresh writable layer per boot; the shared image stays untouched
            f"--network-namespace-path={netns_path}",
        ]
    else:
        if mounts is None:
            raise InvalidSpec("a user-namespaced container needs its prepared mounts")
        binds = [
            ("--bind", mounts.workspace, claude_workspace.workspace_dir_inside(user)),
            ("--bind", mounts.claude, claude_workspace.claude_config_dir_inside(user)),
        ] if shares else []
        binds.append(("--bind-ro", mounts.keys, "/etc/ssh-host-keys"))
        kind = [
            f"--directory={mounts.root}",
            f"--private-users={uid_base}:{UID_RANGE}",
            "--private-users-ownership=off",  # the mounts are idmapped already; nothing is chowned
            "--private-network",
        ]
    binds.append(("--bind-ro", paths.runtime / "hosts", "/etc/hosts"))
    # Rewritten in place by set_egress (a bind follows the inode), so DNS follows the policy without a restart.
    binds.append(("--bind-ro", paths.runtime / "resolv.conf", "/etc/resolv.conf"))
    for _, src, _ in binds:
        if ":" in str(src) or "," in str(src):
            raise InvalidSpec(f"state path {src} contains ':' or ','; set SANDBOX_MCP_STATE_DIR to a plain path")
    return [
        "systemd-nspawn",
        "--quiet",
        "--boot",
        "--register=no",  # no machined/system bus needed (hosts without systemd as PID 1)
        "--keep-unit",
        f"--machine={machine_name(name)}",
        f"--hostname={hostname or name}",
        *kind,
        f"--drop-capability={','.join(DROPPED_CAPABILITIES)}",
        # The resource limits the container starts with are ours (Limits.file_size, open_files), not
        # whatever the server runs under. The console log is bounded by its copier, not by a limit.
        "--rlimit=RLIMIT_FSIZE=infinity",
        f"--rlimit=RLIMIT_NOFILE=1024:{OPEN_FILES}",
        "--link-journal=no",
        "--console=read-only",
        # The container's init carries the workspace tag, so an orphaned container is found by it.
        f"--setenv={supervise.TAG_ENV}={tag}",
        *(f"{opt}={src}:{dst}" for opt, src, dst in binds),
        # Arguments for the container's init, which systemd reads as its kernel command line: a pool
        # slot boots without the exec agent that waits at boot (its claim may be hours away).
        *([] if shares else [POOL_SLOT_ARG]),
    ]


def launch_argv(
    argv: list[str],
    procs_files: list[Path],
    user_namespaced: bool,
    *,
    scope: str | None = None,
    limits: Limits | None = None,
) -> list[str]:
    """``argv`` started inside the workspace's cgroups (joined before exec, so nothing escapes them).

    Direct cgroups: the shell joins ``procs_files`` first. With ``scope`` (systemd as PID 1,
    :mod:`.scopes`): ``systemd-run --scope`` makes the delegated scope with ``limits``
    and execs the rest in place, so the PID spawned is still nspawn's.

    User-namespaced: with ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``, so nspawn gives the container
    the delegated unified cgroup (its systemd cannot use the host's v1 hierarchies).

    No resource limit is set here: whatever nspawn runs under, every process in the container
    inherits (a file-size limit meant for the console log once reached them all, issue 28). The
    console log is bounded by the copier nspawn's output goes to (``NspawnRuntime.start``).
    """
    env = ["env", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1"] if user_namespaced else []
    if scope is not None:
        if limits is None or procs_files:
            raise InvalidSpec("a scope takes limits and no cgroup.procs files")
        return scopes.scope_argv(scope, limits, [*env, *argv])
    return join_argv(procs_files, [*env, *argv])


class NspawnState(ImageRootState):
    """What nspawn remembers of a workspace: its root image, and while it runs, the two processes."""

    uid_base: int | None = Field(
        default=None, description="First host uid of the container's user namespace; None: privileged"
    )
    process: ProcessRef | None = Field(default=None, description="systemd-nspawn itself")
    leader: ProcessRef | None = Field(default=None, description="the container's init (PID 1 inside)")
    cgroups: scopes.CgroupManager | None = Field(
        default=None, description="who made its cgroup at the last start: a systemd scope or the server"
    )
    slot: str | None = Field(
        default=None, description="The warm pool slot's name it was booted and claimed under: its machine name, "
        "veth, cgroup and tag keep it for good. None: its own name"
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy(cls, data: Any) -> Any:
        """Registries of before runtime_state kept flat fields (pid, pid_start_time, leader_*)."""
        if isinstance(data, dict) and "pid" in data:
            data = dict(data)
            pid, start = data.pop("pid", None), data.pop("pid_start_time", None)
            lpid, lstart = data.pop("leader_pid", None), data.pop("leader_start_time", None)
            if pid and start is not None:
                data["process"] = {"pid": pid, "start_time": start}
            if lpid and lstart is not None:
                data["leader"] = {"pid": lpid, "start_time": lstart}
        return data


class NspawnRuntime(ImageRootRuntime):
    """Containers booted by systemd-nspawn on this host."""

    name = "nspawn"
    types = frozenset({"container"})
    modes = frozenset({"direct"})
    package_flavour = "debian"
    host_network = True
    has_snapshots = True
    has_pool = True
    State = NspawnState
    Config = NspawnSettings
    config: NspawnSettings

    def network_needs(self, type_: str) -> NetworkNeeds:
        """A veth on the bridge: the name's MAC and an address on the subnet."""
        return ON_THE_SUBNET

    def __init__(self, ctx: RuntimeContext) -> None:
        super().__init__(ctx)
        self.network = ctx.network
        self.images = DebianRoot(ctx.settings, ctx.images)
        self._cg: CgroupHost | None = None
        self._cg_manager: scopes.CgroupManager | None = None

    def state(self, record: WorkspaceRecord) -> NspawnState:
        return NspawnState.model_validate(record.runtime_state)

    def _paths(self, record: WorkspaceRecord) -> WorkspacePaths:
        return WorkspacePaths.of(self.settings.state_dir, record.name)

    def _cgroups(self) -> CgroupHost:
        if self._cg is None:
            self._cg = CgroupHost(group_for(self.settings.state_dir))
        return self._cg

    def _cgroup_manager(self) -> scopes.CgroupManager:
        """Systemd scopes or direct cgroups (SANDBOX_MCP_CGROUPS); see :mod:`.scopes`.

        Raises:
            BackendError: systemd is forced but is not PID 1 here.
        """
        if self._cg_manager is None:
            self._cg_manager = scopes.cgroup_manager(self.config.cgroups)
        return self._cg_manager

    def _ident(self, record: WorkspaceRecord) -> str:
        """The name its host-side parts carry (machine, veth, netns, cgroup, scope, tag): its own, or the
        pool slot's it was claimed from (those parts were made before the workspace had its name)."""
        return self.state(record).slot or record.name

    def _scope(self, record: WorkspaceRecord) -> str:
        return scopes.scope_unit(self.settings.state_dir, self._ident(record))

    def _mounts(self, record: WorkspaceRecord) -> RootMounts:
        return RootMounts(self._paths(record).runtime / "mnt")

    def complete_limits(self, limits: Limits) -> Limits:
        """The root layer's size: ``root_layer_mib``, at most half of ``memory_mib``; the open files nspawn
        can give (:func:`~sandbox_mcp.host.caps.open_files_ceiling`).

        The layer is a tmpfs whose pages count against the workspace's memory (no swap). Larger
        than the memory left to it, filling it would not fail with ENOSPC but wake the OOM killer,
        which ends some process of the workspace (whichever uses the most memory, not the writer).
        """
        if limits.disk_mib is not None:
            return limits
        return limits.model_copy(update={"disk_mib": min(self.settings.root_layer_mib, limits.memory_mib // 2),
                                         "open_files": caps.open_files_ceiling(OPEN_FILES)})

    def assign(self, record: WorkspaceRecord, others: list[WorkspaceRecord]) -> WorkspaceRecord:
        """Pick the isolation and, for a user-namespaced container, a uid range no other workspace has.

        Raises:
            BackendError: user-namespaced containers cannot run here (or are switched off) and
                privileged ones are not allowed; the message says why and how to allow them.
        """
        blockers = [] if self.config.private_users else ["private_users is false in the settings"]
        blockers = blockers or caps.userns_blockers()
        state = self.state(record)
        if blockers:
            if not self.config.allow_privileged:
                raise BackendError(
                    "cannot run a user-namespaced container here: " + "; ".join(blockers) + ". Fix that, or "
                    "allow privileged containers (root inside is root on the host) with "
                    "SANDBOX_MCP_ALLOW_PRIVILEGED=true"
                )
            record = record.model_copy(update={"isolation": "privileged-container"})
            return self.with_state(record, state.model_copy(update={"uid_base": None}))
        taken = {b for r in others if r.runtime == self.name and (b := self.state(r).uid_base) is not None}
        base = allocate_uid_base(taken | self._cgroups().live_uid_bases())
        record = record.model_copy(update={"isolation": "unprivileged-container"})
        return self.with_state(record, state.model_copy(update={"uid_base": base}))

    def _marker(self, record: WorkspaceRecord) -> bytes:
        return f"--machine={machine_name(self._ident(record))}".encode()

    def _tag(self, record: WorkspaceRecord) -> str:
        return supervise.workspace_tag(self.settings.state_dir, self._ident(record))

    def _running(self, record: WorkspaceRecord) -> bool:
        return supervise.alive(self.state(record).process, self._marker(record))

    def mark_stopped(self, record: WorkspaceRecord) -> WorkspaceRecord:
        return self.with_state(record, self.state(record).model_copy(update={"process": None, "leader": None}))

    def validate(self, record: WorkspaceRecord) -> None:
        check_nat(record.egress, self.settings.nat)

    def checks(self) -> list[Check]:
        return [
            which_check("systemd-nspawn", "systemd-container", "runs the containers"),
            which_check("nft", "nftables", "enforces the workspace network policy"),
            which_check("debootstrap", "debootstrap", "builds the root image once"),
            self._image_check(),
            scopes.manager_check(self.config.cgroups),
            *caps.isolation_checks(
                private_users=self.config.private_users,
                allow_privileged=self.config.allow_privileged,
                enforced=self._cgroups().enforced(),
            ),
        ]

    def _image_check(self) -> Check:
        key = self.images.key(())
        built = self.images.exists(key)
        return Check(
            name="root image",
            ok=built,
            detail=(f"cached at {self.images.path(key)}" if built else
                    f"not built yet ({self.images.suite}, mirror {self.images.mirror or 'debootstrap default'})"),
            fix="the first create_workspace builds it (about a minute); or run 'sandbox-mcp image build'",
            required=False,
        )

    async def addresses_in_use(self) -> set[str]:
        return await self.network.live_addresses()

    async def prepare(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        key = await self.images.ensure(record.packages, progress)
        return self.with_state(record, self.state(record).model_copy(update={"image": key}))

    @staticmethod
    async def _check_inotify_room() -> None:
        """Refuse a boot the host's inotify limit would kill half-way (slowly, as an SSH timeout)."""
        if await anyio.to_thread.run_sync(sysctls.inotify_headroom, sysctls.INOTIFY_INSTANCES_BOOTING):
            return
        limit = sysctls.read_current().get("fs.inotify.max_user_instances")
        raise BackendError(
            f"the host's inotify limit is used up (fs.inotify.max_user_instances = {limit}): every container's "
            f"instances count against host root's, and one needs about {sysctls.INOTIFY_INSTANCES_BOOTING} "
            "to boot. Stop or destroy workspaces you do not need, or raise the limit: run scripts/setup as root "
            f"(it writes {sysctls.CONF_PATH}) or `sysctl -w fs.inotify.max_user_instances="
            f"{sysctls.RECOMMENDED['fs.inotify.max_user_instances']}`"
        )

    async def start(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        if self._running(record):
            return record
        await self._check_inotify_room()
        state = self.state(record)
        if not state.image or not self.images.exists(state.image):
            # The cache was cleared, or the recipe changed since create: rebuild quietly.
            record = await self.prepare(record, progress)
            state = self.state(record)
        assert state.image is not None
        paths = self._paths(record)
        paths.runtime.mkdir(parents=True, exist_ok=True)
        atomic_write(paths.runtime / "hosts", hosts_file(record.name, str(self.settings.host_ip)))
        atomic_write(paths.runtime / "resolv.conf", resolv_conf(record.egress, str(self.settings.host_ip)))
        base = state.uid_base
        mounts = self._mounts(record)
        image_root = self.images.path(state.image)
        await progress("setting up the network", None)
        await self.network.ensure()
        try:
            netns = None
            if base is None:
                netns = await self.network.attach_veth(self._ident(record), record.ip, record.mac)
                await self._admit(record)
            manager = self._cgroup_manager()
            procs: list[Path] = []
            if manager == "systemd":
                await scopes.stop_scope(self._scope(record))  # what an earlier run may have left in it
            else:
                procs = await anyio.to_thread.run_sync(
                    self._cgroups().prepare, self._ident(record), base, self.limits_of(record)
                )
            state = state.model_copy(update={"cgroups": manager})
            # A record made before disk_mib existed gets it now (reported from this start on). A privileged
            # container's root is nspawn's own --volatile tmpfs, which no bound of ours sizes: none reported.
            limits = self.limits_of(record)
            root_layer_mib = limits.disk_mib or self.settings.root_layer_mib
            limits = limits.model_copy(update={"disk_mib": root_layer_mib if base is not None else None})
            record = self.with_state(record, state).model_copy(update={"limits": limits})
            if base is not None:
                await anyio.to_thread.run_sync(
                    lambda: rootfs.mount_all(
                        mounts,
                        image=image_root,
                        workspace=paths.workspace,
                        claude_config=paths.claude_config,
                        host_keys=paths.ssh_host_keys,
                        uid_base=base,
                        root_layer_mib=root_layer_mib,
                        seed=paths.root_layer if paths.root_layer.is_dir() else None,
                        user_ids=(self.settings.user_uid, self.settings.user_uid),
                    )
                )
            argv = nspawn_argv(
                name=self._ident(record),
                hostname=record.name,
                image_root=image_root,
                netns_path=netns,
                paths=paths,
                user=record.user,
                uid_base=base,
                mounts=mounts if base is not None else None,
                tag=self._tag(record),
                shares=not record.pooled,
            )
            await progress("booting the container", None)
            launch = launch_argv(argv, procs, base is not None,
                                 scope=self._scope(record) if manager == "systemd" else None,
                                 limits=self.limits_of(record))  # fmt: skip
            process = await anyio.to_thread.run_sync(lambda: self._spawn(record, launch))
            state = state.model_copy(update={"process": process})
            record = self.with_state(record, state)
            leader = await self._find_leader(process, self.settings.boot_timeout_s)
            if leader is None:
                raise BackendError(f"the container did not start; see {paths.console_log} (workspace_logs)")
            state = state.model_copy(update={"leader": leader})
            record = self.with_state(record, state)
            if base is not None:
                # nspawn made the container's network namespace (one owned by the container's user
                # namespace; joining a host-made one is refused there); the veth goes in from here.
                # The init unshares it only after entering its user namespace: wait for that, or the
                # veth would land in our own namespace (seen with 30 creates at once).
                if not await self._own_netns(leader, self.settings.boot_timeout_s):
                    raise BackendError(f"the container got no network namespace; see {paths.console_log}")
                await self.network.attach_veth(self._ident(record), record.ip, record.mac, pid=leader.pid)
                await self._admit(record)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop(record)
            raise
        return record

    def _spawn(self, record: WorkspaceRecord, argv: list[str]) -> ProcessRef:
        """Start nspawn with its output (the container's console) in a pipe to the bounded log copier.

        The log keeps the first ``console_log_mib`` MiB and the copier drops the rest, so a
        container flooding its console neither fills the host's disk nor is stopped for it, and
        no limit of the log's reaches the workspace. The copier carries the workspace's tag (stop,
        destroy and the reconcile end it with nspawn) and ends by itself at EOF, when nspawn exits.
        """
        log = self._paths(record).console_log
        _, write_end = supervise.spawn_bounded_sink(log, self.settings.console_log_mib << 20, tag=self._tag(record))
        try:
            return supervise.spawn(argv, log, tag=self._tag(record), missing_hint=_NSPAWN_MISSING, stdout=write_end)
        finally:
            os.close(write_end)  # nspawn holds the only write end now: its exit is the copier's EOF

    async def _admit(self, record: WorkspaceRecord) -> None:
        """Let the workspace's veth through the host's policy (egress as the record asks)."""
        await self.network.admit(veth_names(self._ident(record))[0], record.ip, record.mac, egress=record.egress,
                                 owner=host_identity(self.settings, record)[0])

    async def set_egress(self, record: WorkspaceRecord) -> None:
        """The firewall and resolver first, then the container's resolv.conf (rewritten in place: it is a bind)."""
        await self._admit(record)
        await anyio.to_thread.run_sync(
            write_in_place, self._paths(record).runtime / "resolv.conf",
            resolv_conf(record.egress, str(self.settings.host_ip)),
        )

    def default_root_base(self) -> str | None:
        return self.images.key(())

    def slot_claimed(self, record: WorkspaceRecord, slot: str) -> WorkspaceRecord:
        state = self.state(record)
        return self.with_state(record, state.model_copy(update={"slot": state.slot or slot}))

    async def claim(self, record: WorkspaceRecord, *, remap_shares: bool = False) -> None:
        """The host name (set in its UTS namespace), /etc/hosts (a bind of a host file, rewritten in place), and
        (user-namespaced: a slot boots without them) the workspace dir and Claude config mounted into its mount
        namespace, mapping their owner now (:func:`.handover.mount_shares`). A privileged slot has its binds
        from boot, showing host ids as they are: it cannot take another owner (``remap_shares``)."""
        state = self.state(record)
        leader = state.leader
        if leader is None or not self._running(record):
            raise BackendError(f"the pool slot claimed for {record.name!r} is not running")
        if state.uid_base is None and remap_shares:
            raise BackendError("a privileged container's shares cannot be mapped anew")
        if state.uid_base is not None:
            paths = self._paths(record)
            shares = [(paths.workspace, claude_workspace.workspace_dir_inside(record.user)),
                      (paths.claude_config, claude_workspace.claude_config_dir_inside(record.user))]
            await handover.mount_shares(leader, shares, state.uid_base, (self.settings.user_uid, self.settings.user_uid))
        await handover.set_hostname(leader, record.name)
        await anyio.to_thread.run_sync(
            write_in_place, self._paths(record).runtime / "hosts", hosts_file(record.name, str(self.settings.host_ip))
        )

    @staticmethod
    async def _own_netns(leader: ProcessRef, timeout_s: float) -> bool:
        """Wait until ``leader`` is in a network namespace other than ours; False if it died or time ran out."""
        ours = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and supervise.alive(leader):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{leader.pid}/ns/net") != ours:
                    return True
            await anyio.sleep(0.01)
        return False

    async def _find_leader(self, process: ProcessRef, timeout_s: float) -> ProcessRef | None:
        """The container's init: nspawn's child in another PID namespace (nspawn is its subreaper).

        Recorded so that a container orphaned by a killed nspawn can still be ended; its network
        namespace is the container's. None if nspawn exits first or ``timeout_s`` passes.
        """
        pid = process.pid
        own_ns = os.readlink(f"/proc/{pid}/ns/pid") if os.path.exists(f"/proc/{pid}/ns/pid") else None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and supervise.alive(process):
            for child in supervise.children(pid):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{child}/ns/pid") != own_ns:
                        return supervise.identify(child)
            await anyio.sleep(0.01)
        return None

    async def stop(self, record: WorkspaceRecord, *, force: bool = False) -> None:
        state = self.state(record)
        # A frozen nspawn cannot act on SIGTERM: thaw it, so the container powers off cleanly.
        if state.cgroups != "systemd" and self._cgroups().is_frozen(self._ident(record)):
            with contextlib.suppress(BackendError):
                await anyio.to_thread.run_sync(self._cgroups().freeze, self._ident(record), False)
        # SIGTERM makes nspawn power the container off cleanly; SIGKILL if it will not (at once if forced).
        grace_s = 0.0 if force else self.settings.stop_timeout_s
        await supervise.terminate(state.process, grace_s=grace_s, marker=self._marker(record))
        # nspawn died without taking its container along: killing a PID namespace's init ends all of it.
        await supervise.kill(state.leader)
        # What a server killed between spawn and record never wrote down: found by the workspace's tag.
        await supervise.kill_tagged(self._tag(record))
        await self.network.revoke(veth_names(self._ident(record))[0])
        await self._release(record)

    async def _release(self, record: WorkspaceRecord) -> None:
        """What a stopped container leaves: its cgroups or scope (and stragglers in them), mounts, veth/netns."""
        await self._release_cgroup(record)
        await anyio.to_thread.run_sync(rootfs.unmount_all, self._mounts(record))
        await self.network.detach(self._ident(record))

    async def _release_cgroup(self, record: WorkspaceRecord) -> None:
        """Stop its scope, or remove the cgroups this server made: the way its last start went."""
        # None: never started, or started before the choice was recorded, when it was always direct.
        if self.state(record).cgroups == "systemd":
            await scopes.stop_scope(self._scope(record))
        else:
            await anyio.to_thread.run_sync(self._cgroups().remove, self._ident(record))

    async def destroy(self, record: WorkspaceRecord) -> None:
        await self._release(record)  # before the manager removes the state dir: nothing mounted under it

    async def oom_kills(self, record: WorkspaceRecord) -> int | None:
        """From the cgroups this server made at its start (a systemd scope's are not read: None)."""
        if self.state(record).cgroups == "systemd":
            return None
        return await anyio.to_thread.run_sync(self._cgroups().oom_kills, self._ident(record))

    async def status(self, record: WorkspaceRecord) -> RuntimeDetail:
        state = self.state(record)
        running = self._running(record)
        manager = state.cgroups if running else None
        return RuntimeDetail(
            runtime=self.name,
            running=running,
            pid=state.process.pid if running and state.process else None,
            unit=self._scope(record) if manager == "systemd" else None,
            cgroups=manager,
            uptime_s=supervise.uptime_s(state.process) if running and state.process else None,
            paused=running and manager != "systemd" and self._cgroups().is_frozen(self._ident(record)),
            detail=f"systemd-nspawn --machine={machine_name(self._ident(record))}"
            + (f" image {state.image}" if state.image else "")
            + (f", uids {state.uid_base}+{UID_RANGE}" if state.uid_base is not None else ", privileged"),
        )

    # -- pause and snapshots ----------------------------------------------------------------------

    async def pause(self, record: WorkspaceRecord) -> None:
        """Freeze the container's cgroup (the v2 freezer; ``systemctl freeze`` on a systemd scope)."""
        await self._freeze(record, True)

    async def resume(self, record: WorkspaceRecord) -> None:
        await self._freeze(record, False)

    async def _freeze(self, record: WorkspaceRecord, frozen: bool) -> None:
        if not self._running(record):
            raise InvalidState(f"workspace {record.name!r} is not running; call start_workspace")
        if self.state(record).cgroups == "systemd":
            await hostcmd.run(scopes.freeze_scope_argv(self._scope(record), frozen), timeout_s=30)
        else:
            await anyio.to_thread.run_sync(self._cgroups().freeze, self._ident(record), frozen)

    async def capture_root(self, record: WorkspaceRecord, dest: Path) -> None:
        """The overlay's upper dir (on its tmpfs) while it runs, else the saved layer it would start from.

        Raises:
            Unsupported: a privileged container (nspawn's own --volatile overlay, out of the server's reach).
        """
        if self.state(record).uid_base is None:
            raise Unsupported(
                f"workspace {record.name!r} is a privileged container, whose root layer nspawn keeps to itself; "
                "only user-namespaced containers can be snapshotted or forked"
            )
        paths = self._paths(record)
        src = self._mounts(record).rw / "upper" if self._running(record) else paths.root_layer
        if src.is_dir():
            await snapshots.copy_tree(src, dest)
        else:
            dest.mkdir(mode=0o755)  # never restored or forked: the clean root, an empty layer

    async def adopt_files(self, source: WorkspaceRecord, target: WorkspaceRecord, trees: list[Path]) -> None:
        """Shift owners from the source's uid range to the fork's (root inside is another host uid)."""
        old, new = self.state(source).uid_base, self.state(target).uid_base
        if old is not None and new is not None:
            await anyio.to_thread.run_sync(lambda: snapshots.shift_owners(trees, old, new, UID_RANGE))

    async def logs(self, record: WorkspaceRecord, lines: int) -> str:
        path = self._paths(record).console_log

        def _tail() -> str:
            return "\n".join((log_tail_lines(path) or [])[-lines:])

        return await anyio.to_thread.run_sync(_tail)

    async def reconcile(self, records: list[WorkspaceRecord]) -> None:
        """Tear down network namespaces and veths of our workspaces that are not running.

        Only names in our registry: links and namespaces of another server on this host (another
        state directory) are not ours to remove.
        """
        running = {self._ident(r) for r in records if self._running(r)}
        ours = {self._ident(r) for r in records}
        for name in await self.network.leftovers():
            if name in ours and name not in running:
                await self.network.detach(name)
        for r in records:
            if r.name not in running and r.runtime == self.name:
                await self._release_cgroup(r)
                await anyio.to_thread.run_sync(rootfs.unmount_all, self._mounts(r))
