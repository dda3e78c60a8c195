"""The workspace lifecycle: create → start → stop → destroy, and everything done inside a running one.

The MCP tools and the CLI are thin layers over :class:`WorkspaceManager`. It owns
the registry, the SSH pool and the runtimes; it validates input before anything
changes, serialises operations on one workspace (across processes too), and
undoes a create or start that fails or is cancelled.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import shlex
import shutil
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from pathlib import Path

import anyio

from . import (
    agentfiles,
    budget,
    claude_workspace,
    diskimage,
    gitflow,
    hostgit,
    limit_hints,
    processes,
    provision,
    snapshots,
    ssh,
)
from . import egress as egress_policy
from .config import Settings
from .egress import Egress
from .errors import (
    BackendError,
    CommandTimeout,
    Conflict,
    InvalidSpec,
    InvalidState,
    LimitExceeded,
    SandboxError,
    Unsupported,
    WorkspaceExists,
    clip_repr,
)
from .fsutil import async_file_lock, lock_is_held, own_dir
from .models import (
    MAX_CPUS,
    MAX_MEMORY_MIB,
    MIN_CPUS,
    CreateSpec,
    DestroyResult,
    DirListing,
    ExecResult,
    FetchResult,
    FileContent,
    Limits,
    LogsResult,
    PortUnpublished,
    ProcessInfo,
    ProcessList,
    ProcessOutput,
    ProcessStarted,
    ProcessWait,
    PublishedPort,
    RepoInfo,
    SnapshotDeleted,
    SnapshotInfo,
    SnapshotList,
    SSHInfo,
    Timings,
    Workspace,
    WorkspaceDiff,
    WorkspaceList,
    WorkspaceRecord,
    WorkspaceStatus,
    WorkspaceType,
    WriteResult,
    utcnow,
)
from .naming import (
    agent_uid_for,
    allocate_ip,
    check_identity_collisions,
    cid_for,
    mac_for,
    validate_name,
    validate_packages,
)
from .output_relay import OutputRelay
from .ownership import owned
from .paths import WorkspacePaths
from .pool import WarmPool
from .ports import LOOPBACK, PortForwarder
from .progress import Progress, no_progress
from .registry import Registry
from .runtimes import GuestExec, Mode, Runtime, RuntimeContext, build_runtimes, resolve_mode, type_table
from .secrets.service import SecretsService, check_script_result
from .ssh.agent_ops import agent_op

__all__ = ["WorkspaceManager", "parse_mode"]

_MODE_RE = re.compile(r"^0?[0-7]{3}$")
log = logging.getLogger(__name__)


def parse_mode(mode: str | int | None) -> int | None:
    """Accept a file mode as octal text ('644', '0755') or an int; None keeps the default.

    Raises:
        InvalidSpec: anything else.
    """
    if mode is None or isinstance(mode, int):
        if isinstance(mode, int) and not 0 <= mode <= 0o777:
            raise InvalidSpec(f"mode {mode} is out of range; use octal text such as '644' or '755'")
        return mode
    if not _MODE_RE.fullmatch(mode):
        raise InvalidSpec(f"mode {clip_repr(mode)} is not an octal file mode; use e.g. '644' or '0755'")
    return int(mode, 8)


def _host_memory_mib() -> int:
    """The host's memory (MemTotal), MiB."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1 << 22


# Where a create's progress stands once its image is ready; the start takes it from there to the end.
_PREPARED = 0.6


def _span(progress: Progress, lo: float, hi: float) -> Progress:
    """``progress`` for one phase of a longer task: its fractions 0..1 land in ``lo``..``hi`` of the
    whole, so the phases of a create report on one scale (messages without a fraction stay so)."""

    async def report(message: str, fraction: float | None = None) -> None:
        await progress(message, None if fraction is None else lo + (hi - lo) * min(max(fraction, 0.0), 1.0))

    return report


class WorkspaceManager:
    """One per server process. Use as ``async with WorkspaceManager(settings) as m:``.

    The runtimes come from the registry in :mod:`sandbox_mcp.runtimes`, those of the configured
    mode; ``runtimes`` replaces them (tests pass a fake or a prepared one).
    """

    def __init__(
        self, settings: Settings, runtimes: dict[str, Runtime] | None = None, *, serve_ports: bool = True,
        keep_pool: bool | None = None,
    ) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry_path)
        self._snapshot_budget = anyio.Lock()  # one owner-bound check and commit at a time
        self.client_key_path = settings.state_dir / ".server" / "client_ed25519_key"
        self.ssh = ssh.SSHPool()
        self._runtimes = runtimes
        self._mode: Mode | None = None
        self._types: dict[WorkspaceType, Runtime] | None = None  # which runtime serves each type
        self._locks: dict[str, anyio.Lock] = {}
        # (name, started_at) -> the OOM kills already reported for that boot of the workspace.
        self._oom_seen: dict[tuple[str, datetime | None], int] = {}
        # uid -> that user's own public key, authorised in their workspaces (the daemon sets it:
        # userkeys.UserKeys.public_key); in process, only the server's key is.
        self.owner_keys: Callable[[int], str] | None = None
        # Published ports are served by this process while it runs (the server, the daemon); the
        # CLI's short-lived managers leave them to that process.
        self.ports = PortForwarder()
        self._serve_ports = serve_ports
        self.secrets = SecretsService(settings)
        # Like published ports, the warm pool is refilled by the long-running process (the server, the
        # daemon); the CLI's short-lived managers only claim from it.
        self.pool = WarmPool(self, keep=serve_ports if keep_pool is None else keep_pool)
        self._pool_tasks: anyio.abc.TaskGroup | None = None

    # Set-up ------------------------------------------------------------------------------------

    async def __aenter__(self) -> WorkspaceManager:
        if self._serve_ports:
            await self.ports.__aenter__()
        try:
            await self.open()
            if self._serve_ports:
                await self._restore_ports()
            if self.pool.keep:
                await self.pool.take_over()  # what a killed keeper left
            if self.pool.keep and self.settings.pool_size > 0:
                self._pool_tasks = anyio.create_task_group()
                await self._pool_tasks.__aenter__()
                self._pool_tasks.start_soon(self.pool.run)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._pool_tasks is not None:
                tasks, self._pool_tasks = self._pool_tasks, None
                tasks.cancel_scope.cancel()
                await tasks.__aexit__(None, None, None)
            with anyio.CancelScope(shield=True):
                await self.pool.close()
            await self.close()
        finally:
            if self.ports.serving:
                await self.ports.__aexit__(None, None, None)

    async def open(self) -> None:
        """Create the state dir and client key, pick the runtimes, reconcile the registry with reality."""
        state = self.settings.state_dir
        state.mkdir(parents=True, exist_ok=True)
        if state.stat().st_uid == os.geteuid():
            # Owners pass through to their own workspace dirs; nobody lists whose workspaces are here.
            state.chmod(0o711)
        # The server's own keys, tokens and locks: nobody else's business.
        own_dir(self.client_key_path.parent, os.geteuid(), os.getegid(), 0o700)
        self.client_public_key = await anyio.to_thread.run_sync(ssh.ensure_client_key, self.client_key_path)
        if self._runtimes is None:
            self._mode = resolve_mode(self.settings)
            ctx = RuntimeContext.for_settings(self.settings, self.client_public_key)
            self._runtimes = build_runtimes(self._mode, ctx)
        else:
            self._mode = next(iter(sorted({m for r in self._runtimes.values() for m in r.modes})), "direct")
        self._types = type_table(self._runtimes, self.settings.runtime_for_type)  # two claims, no choice: refused
        await self.reconcile()

    async def close(self) -> None:
        await self.ssh.close()

    @property
    def mode(self) -> Mode:
        """'nixos' or 'direct': the mode whose runtimes this manager uses."""
        assert self._mode is not None, "call open() first"
        return self._mode

    @property
    def runtimes(self) -> dict[str, Runtime]:
        assert self._runtimes is not None, "call open() first"
        return self._runtimes

    def _runtime_for_type(self, type_: WorkspaceType) -> Runtime:
        assert self._types is not None, "call open() first"
        runtime = self._types.get(type_)
        if runtime is not None:
            return runtime
        supported = sorted(self._types)
        raise InvalidSpec(
            f"type {type_!r} is not available in {self.mode} mode on this host (available: "
            f"{', '.join(supported) or 'none'}); run 'sandbox-mcp doctor' to see what this host lacks"
        )

    def runtime_of(self, record: WorkspaceRecord) -> Runtime:
        """The runtime that realises ``record`` (for the benchmark's baselines).

        Raises:
            InvalidState: this server does not run that workspace's runtime.
        """
        return self._runtime_of(record)

    def _runtime_of(self, record: WorkspaceRecord) -> Runtime:
        try:
            return self.runtimes[record.runtime]
        except KeyError:
            raise InvalidState(
                f"workspace {record.name!r} belongs to the {record.runtime!r} runtime, which this server "
                f"(mode {self.mode}) does not run; use a server in that mode"
            ) from None

    async def _check_exists(self, name: str) -> None:
        """Refuse a bad or unknown name before a lock file is made for it (it would stay behind).

        Raises:
            InvalidSpec: the name breaks the naming rules.
            WorkspaceNotFound: no workspace of that name.
        """
        validate_name(name)
        await self.registry.get(name)

    @contextlib.asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        """Serialise operations on one workspace, in this process and across processes."""
        lock = self._locks.setdefault(name, anyio.Lock())
        async with lock, async_file_lock(self._lock_path(name)):
            yield

    def _lock_path(self, name: str) -> Path:
        return self.settings.state_dir / ".locks" / f"{name}.lock"

    def _paths(self, name: str) -> WorkspacePaths:
        return WorkspacePaths.of(self.settings.state_dir, name)

    def view(self, r: WorkspaceRecord) -> Workspace:
        """The workspace as tools report it."""
        runtime = self.runtimes.get(r.runtime)
        host, port = runtime.endpoint(r) if runtime is not None else (r.ip or "", 22)
        known_hosts = None
        with contextlib.suppress(SandboxError):  # no host key yet (being created)
            host_pub = self._paths(r.name).host_key
            known_hosts = ssh.known_hosts_line(host, host_pub.with_name(host_pub.name + ".pub"), port)
        return Workspace(
            name=r.name,
            type=r.type,
            state=r.state,
            ip=r.ip,
            user=r.user,
            workspace_dir=claude_workspace.workspace_dir_inside(r.user),
            host_workspace_dir=(
                runtime.host_workspace_dir(r, self._paths(r.name).workspace) if runtime is not None
                else str(self._paths(r.name).workspace)
            ),
            ssh=SSHInfo(host=host, port=port, user=r.user, host_key_fingerprint=r.host_key_fingerprint,
                        known_hosts=known_hosts),
            packages=r.packages,
            egress=r.egress,
            isolation=r.isolation,
            limits=r.limits,
            ports=r.ports,
            repo=r.repo,
            secrets=r.secrets,
            created_at=r.created_at,
            started_at=r.started_at,
            last_error=r.last_error,
            timings=r.timings,
        )

    def _target(self, r: WorkspaceRecord) -> ssh.SSHTarget:
        host, port = self._runtime_of(r).endpoint(r)
        return ssh.SSHTarget(
            key=r.name,
            host=host,
            port=port,
            user=r.user,
            host_key_path=self._paths(r.name).host_key,
            host_key_fingerprint=r.host_key_fingerprint,  # this incarnation's, not a successor's
            client_key_path=self.client_key_path,
            workspace_dir=claude_workspace.workspace_dir_inside(r.user),
        )

    # Reconcile ---------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Make the registry match reality after a server exited, whenever it exited.

        A workspace another live process is working on (it holds the workspace's lock) is left
        alone. Otherwise: an interrupted create becomes ``error`` (destroy_workspace removes it), an
        interrupted start or stop becomes ``stopped``, a dead ``running`` one too; in each case what
        the runtime may have left running is stopped first, so nothing outlives its record.
        """
        data = await self.registry.read()
        for record in data.workspaces.values():
            runtime = self.runtimes.get(record.runtime)
            if lock_is_held(self._lock_path(record.name)):
                continue
            # A snapshot, restore or fork the server was killed in: finish it or drop it (snapshots.py).
            await anyio.to_thread.run_sync(self._recover_files, record.name)
            if runtime is None or record.state in ("stopped", "error"):
                continue
            if record.state in ("running", "paused") and (await runtime.status(record)).running:
                continue
            why = {
                "creating": "creation was interrupted (the server exited); destroy_workspace it",
                "starting": "the server exited while starting it; call start_workspace",
                "stopping": None,  # the stop is finished now
                "running": "found stopped when the server started",
                "paused": "found stopped when the server started",
            }[record.state]
            try:
                await runtime.stop(record)  # ends whatever is left, recorded or not, and its links
            except SandboxError as exc:
                log.warning("reconcile: stopping %s: %s", record.name, exc)
            if record.state == "creating":
                record.state, record.last_error = "error", why
                await self.registry.put(record)
            else:
                await self.registry.put(self._stopped(runtime, record, why))
        for runtime in self.runtimes.values():
            await runtime.reconcile([r for r in data.workspaces.values() if r.runtime == runtime.name])
        await self._sync_hosts()
        await self._sync_secrets()

    async def _sync_secrets(self) -> None:
        """The secrets proxy serves the running workspaces with secrets (started again if it died), no other."""
        data = await self.registry.read()
        running = {r.name: (r.ip, r.secrets) for r in data.workspaces.values()
                   if r.secrets and r.state in ("running", "paused")}
        if running or self.secrets.paths.root.exists():
            await self.secrets.sync(running)

    def _stopped(self, runtime: Runtime, record: WorkspaceRecord, error: str | None) -> WorkspaceRecord:
        """``record`` as stopped: the runtime forgets what only a running workspace has."""
        record = runtime.mark_stopped(record)
        record.state, record.last_error = "stopped", error
        record.ports = []  # published ports go with the workspace's processes (not back on start)
        return record

    async def _sync_hosts(self) -> None:
        """Keep 'workspace-NAME' resolvable on the host for workspaces on this host's bridge."""
        on_bridge = [r for r in self.runtimes.values() if r.host_network]
        if not on_bridge:
            return
        data = await self.registry.read()
        names = {r.name for r in on_bridge}
        entries = {n: r.ip for n, r in data.workspaces.items()
                   if r.runtime in names and r.state != "creating" and r.ip is not None and not r.pooled}  # fmt: skip
        await on_bridge[0].ctx.network.publish_names(entries)

    async def _refresh(self, record: WorkspaceRecord) -> WorkspaceRecord:
        """Notice a workspace that died behind our back."""
        if record.state in ("running", "paused"):
            runtime = self.runtimes.get(record.runtime)
            if runtime is not None and not (await runtime.status(record)).running:
                async with self._locked(record.name):
                    record = await self.registry.get(record.name)
                    if record.state in ("running", "paused") and not (await runtime.status(record)).running:
                        await runtime.stop(record)
                        await self.ssh.drop(record.name)
                        await self.ports.unpublish_all(record.name)
                        await self.secrets.detach(record.ip)
                        record = self._stopped(runtime, record, "the workspace exited")
                        await self.registry.put(record)
        return record

    # Lifecycle ---------------------------------------------------------------------------------

    async def create(
        self, spec: CreateSpec, progress: Progress = no_progress, *, owner_uid: int | None = None
    ) -> Workspace:
        """Register, prepare and (if ``spec.start``) start a new workspace.

        Validation happens before anything changes. On failure or cancellation
        everything created is removed again. ``owner_uid`` is recorded as the creator. With ``repo``,
        the workspace directory becomes a clone of that host repository at ``ref`` on branch
        ``sandbox/NAME``, read by ``owner_uid``'s git (as root: the repository owner's), see :mod:`gitflow`.

        Raises:
            InvalidSpec: bad name, type, packages or IP; ``repo`` is no git repository or ``ref`` no commit in it.
            AccessDenied: the caller may not read ``repo``.
            WorkspaceExists: the name is taken.
            Conflict: the IP (or the name's derived MAC/CID) is in use; another user's kept data has the name.
            BackendError: building, declaring or booting failed (the message has the log tail).
        """
        t0 = time.monotonic()
        validate_name(spec.name)
        runtime = self._runtime_for_type(spec.type)
        packages = validate_packages(spec.packages, runtime.package_flavour)
        limits = self._limits(runtime, spec.type, spec.cpus, spec.memory_mib)
        if packages:
            await anyio.to_thread.run_sync(self._check_image_variants, runtime, packages)
        source = await self._repo_source(spec, owner_uid)
        if self.pool.fits(spec, runtime, packages, limits, owner_uid):
            record = await self.pool.claim(spec, runtime, owner_uid, progress)
            if record is not None:
                if source is not None:
                    record = await self._clone(record, *source, progress)
                return self.view(record)
        record = await self._create(spec, runtime, packages, limits, progress, owner_uid, t0, source)
        return self.view(record)

    async def _create(
        self,
        spec: CreateSpec,
        runtime: Runtime,
        packages: list[str],
        limits: Limits,
        progress: Progress,
        owner_uid: int | None,
        t0: float,
        source: tuple[hostgit.HostUser, hostgit.ResolvedRepo] | None,
        *,
        pooled: bool = False,
    ) -> WorkspaceRecord:
        """Register, provision, prepare and start a workspace the slow way (a boot); ``pooled``: as a warm pool
        slot (see :mod:`sandbox_mcp.pool`), whose name no user can give."""
        name = spec.name
        placeholders = self.secrets.placeholders(spec.secrets, owner_uid, runtime.host_network)
        live = await runtime.addresses_in_use()
        async with self._locked(name):
            record = await anyio.to_thread.run_sync(
                self._register, spec, packages, live, runtime, limits, owner_uid, placeholders, pooled
            )
            paths = self._paths(name)
            existed = paths.root.exists()
            prepared = started = False
            try:
                record = await self._provision(record, self.secrets.environment(record.secrets))
                await self.registry.put(record)
                t_image = time.monotonic()
                await progress("preparing the root image (cached after the first time)", 0.0)
                record = await runtime.prepare(record, _span(progress, 0.0, _PREPARED))
                prepared = True
                record.state = "stopped"
                record.timings = Timings(image_s=round(time.monotonic() - t_image, 3))
                await self.registry.put(record)
                await self._sync_hosts()
                if spec.start:
                    started = True
                    record = await self._start(record, runtime, _span(progress, _PREPARED, 1.0), t0)
                if source is not None:
                    record = await self._clone(record, *source, progress)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._undo_create(record, runtime, prepared, started, existed)
                raise
        return record

    async def _provision(
        self, record: WorkspaceRecord, environment: Mapping[str, str] | None = None
    ) -> WorkspaceRecord:
        """Make the workspace's host dirs (provision.py), with ``environment`` (its secrets' placeholders) in
        its Claude config; the record gets its host key and disk bound."""
        made = await anyio.to_thread.run_sync(
            lambda: provision.prepare_state_dirs(self.settings, record, self._authorized_keys(record), environment)
        )
        update: dict[str, object] = {"host_key_fingerprint": made.fingerprint}
        if record.limits is not None:
            update["limits"] = record.limits.model_copy(update={"host_disk_mib": made.host_disk_mib})
        return record.model_copy(update=update)

    async def _repo_source(
        self, spec: CreateSpec, owner_uid: int | None
    ) -> tuple[hostgit.HostUser, hostgit.ResolvedRepo] | None:
        """Whose git reads ``spec.repo`` and the commit ``spec.ref`` names there (None without a repo).

        Raises:
            InvalidSpec: not a repository, no such commit, or start=false; AccessDenied: not the caller's to read.
        """
        if spec.repo is None:
            return None
        if not spec.start:
            raise InvalidSpec("repo needs start=true: the clone is made inside the running workspace")
        path = hostgit.validate_repo_path(spec.repo)
        hostgit.validate_ref(spec.ref)
        user = hostgit.host_user(hostgit.run_uid(owner_uid, path))
        return user, await hostgit.resolve_repo(user, path, spec.ref)

    async def _clone(
        self, record: WorkspaceRecord, user: hostgit.HostUser, source: hostgit.ResolvedRepo, progress: Progress
    ) -> WorkspaceRecord:
        """Clone ``source`` into the new, running workspace and record where its work goes back to."""
        await progress(f"cloning {source.path} at {source.base[:12]} into the workspace")
        await gitflow.clone_into(self.ssh, self._target(record), record.name, user, source.path, source.base,
                                 self.settings)  # fmt: skip
        record.repo = RepoInfo(path=source.path, base=source.base, branch=gitflow.branch_for(record.name))
        await self.registry.put(record)
        return record

    def _limits(self, runtime: Runtime, type_: WorkspaceType, cpus: float | None, memory_mib: int | None) -> Limits:
        """The workspace's limits: the arguments, else the runtime's defaults (a VM's differ from a container's).

        Raises:
            InvalidSpec: a value out of range (the message gives the range).
        """
        s = self.settings
        defaults = runtime.default_limits()
        cpus = defaults.cpus if cpus is None else cpus
        memory_mib = defaults.memory_mib if memory_mib is None else memory_mib
        local_cpus = runtime.max_cpus()
        most_cpus = MAX_CPUS if local_cpus is None else local_cpus
        if isinstance(cpus, bool) or not isinstance(cpus, int | float) or not MIN_CPUS <= cpus <= most_cpus:
            where = "" if local_cpus is None else " (this host's CPUs)"
            raise InvalidSpec(f"cpus must be between {MIN_CPUS:g} and {most_cpus:g}{where}, got {cpus!r}")
        least = runtime.min_memory_mib(type_)
        if isinstance(memory_mib, bool) or not isinstance(memory_mib, int) or not least <= memory_mib <= MAX_MEMORY_MIB:
            raise InvalidSpec(
                f"memory_mib must be a whole number of MiB between {least} and {MAX_MEMORY_MIB} for a {type_!r} "
                f"workspace, got {memory_mib!r}"
            )
        limits = Limits(cpus=float(cpus), memory_mib=memory_mib, tasks=s.tasks_max, host_disk_mib=s.host_disk_mib)
        return runtime.complete_limits(limits)

    def _register(
        self,
        spec: CreateSpec,
        packages: list[str],
        live: set[str],
        runtime: Runtime,
        limits: Limits | None = None,
        owner_uid: int | None = None,
        secrets: dict[str, str] | None = None,
        pooled: bool = False,
    ) -> WorkspaceRecord:
        name = spec.name
        with self.registry.transaction_sync() as data:
            if name in data.workspaces:
                raise WorkspaceExists(name)
            if owner_uid not in (None, 0):
                self._check_share(owner_uid, [r for r in data.workspaces.values() if r.owner_uid == owner_uid], limits)
            # Only what the runtime says its workspaces need of the network (an address, a MAC, a vsock CID).
            needs = runtime.network_needs(spec.type)
            if spec.ip is not None and not needs.address:
                raise InvalidSpec(f"{spec.type!r} workspaces get no address on the workspace subnet; create without ip")
            others = {n: (r.mac, r.cid) for n, r in data.workspaces.items()}
            check_identity_collisions(name, others, mac=needs.mac, cid=needs.vsock_cid)
            taken = {r.ip for r in data.workspaces.values() if r.ip is not None} | live
            record = WorkspaceRecord(
                name=name,
                type=spec.type,
                state="creating",
                runtime=runtime.name,
                ip=allocate_ip(self.settings.subnet, taken, spec.ip) if needs.address else None,
                mac=mac_for(name) if needs.mac else None,
                cid=cid_for(name) if needs.vsock_cid else None,
                user=self.settings.user,
                owner_uid=owner_uid,
                packages=packages,
                egress=spec.egress,
                limits=limits,
                secrets=secrets or {},
                pooled=pooled,
                pool_holder=self.pool.holder if pooled else None,
            )
            runtime.validate(record)
            record = runtime.assign(record, [r for n, r in data.workspaces.items() if n != name])
            data.workspaces[name] = record
        return record

    def _check_share(self, uid: int, theirs: list[WorkspaceRecord], limits: Limits | None) -> None:
        """One user's fair share through the daemon: workspaces, and the sums of their CPUs and memory.

        Checked in the registry transaction that registers the workspace, so two creates racing
        cannot both take the last place.

        Raises:
            LimitExceeded: the new workspace would go past one of them (the message names it).
        """
        s = self.settings
        if len(theirs) >= s.uid_max_workspaces:
            raise LimitExceeded(
                f"uid {uid} already has {len(theirs)} workspaces, the most one user may have "
                f"(uid_max_workspaces = {s.uid_max_workspaces}); destroy one you no longer need "
                "(list_workspaces, destroy_workspace) and create again"
            )
        if limits is None:
            return
        used_cpus = sum(r.limits.cpus for r in theirs if r.limits)
        max_cpus = s.uid_max_cpus or 4.0 * (os.cpu_count() or 1)
        if used_cpus + limits.cpus > max_cpus + 1e-9:
            raise LimitExceeded(
                f"uid {uid}'s workspaces have {used_cpus:g} cpus; {limits.cpus:g} more would pass the "
                f"{max_cpus:g} one user may have (uid_max_cpus); create with fewer cpus, or destroy one"
            )
        used_mib = sum(r.limits.memory_mib for r in theirs if r.limits)
        max_mib = s.uid_max_memory_mib or 2 * _host_memory_mib()
        if used_mib + limits.memory_mib > max_mib:
            raise LimitExceeded(
                f"uid {uid}'s workspaces have {used_mib} MiB of memory; memory_mib={limits.memory_mib} more would "
                f"pass the {max_mib} MiB one user may have (uid_max_memory_mib); create with a smaller "
                "memory_mib, or destroy one"
            )

    def _check_image_variants(self, runtime: Runtime, packages: list[str]) -> None:
        """A new package set makes a new cached image (hundreds of MiB): at most ``image_variants_max`` of them.

        Raises:
            LimitExceeded: the set is new and the cache holds as many variants as allowed.
        """
        variants = {tuple(m.get("packages") or ()) for m in runtime.ctx.images.list_images()} - {()}
        limit = self.settings.image_variants_max
        if tuple(sorted(packages)) not in variants and len(variants) >= limit:
            known = "; ".join(" ".join(v) for v in sorted(variants)[:5])
            raise LimitExceeded(
                f"this host already caches {len(variants)} images with packages (image_variants_max = {limit}); "
                f"use a package set it has (e.g. {known}), or install what you need inside the workspace "
                "with sudo apt-get, or ask an administrator to run `sandbox-mcp image prune`"
            )

    def _assign(self, record: WorkspaceRecord, runtime: Runtime) -> WorkspaceRecord:
        """What ``runtime`` allocates per workspace, for a record registered without it (in the registry
        transaction, as on create)."""
        with self.registry.transaction_sync() as data:
            record = runtime.assign(record, [r for n, r in data.workspaces.items() if n != record.name])
            data.workspaces[record.name] = record
        return record

    def _authorized_keys(self, record: WorkspaceRecord) -> list[str]:
        """The keys that open the workspace: the server's, and its owner's own (see userkeys)."""
        keys = [self.client_public_key]
        if self.owner_keys is not None and record.owner_uid not in (None, 0):
            keys.append(self.owner_keys(record.owner_uid))
        return keys

    async def _undo_create(
        self, record: WorkspaceRecord, runtime: Runtime, prepared: bool, started: bool, existed: bool
    ) -> None:
        if started:
            with contextlib.suppress(Exception):
                await runtime.stop(record, force=True)  # thrown away: no clean power-off to wait for
        if prepared:
            with contextlib.suppress(Exception):
                await runtime.destroy(record)
        await self.ssh.drop(record.name)
        with contextlib.suppress(Exception):  # a new image goes; kept data's is unmounted again
            await anyio.to_thread.run_sync(
                lambda: diskimage.release(self.settings.state_dir, record.name, delete=not existed)
            )
        if not existed:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(self._paths(record.name).root, ignore_errors=True))
        await self.registry.remove(record.name)
        await self._sync_hosts()

    async def start(self, name: str, progress: Progress = no_progress, *, owner_uid: int | None = None) -> Workspace:
        """Start a stopped workspace; returns once SSH answers with the pinned host key. Idempotent.

        ``owner_uid`` (on every operation): act only on that uid's workspaces (see ownership.owned).

        Raises:
            WorkspaceNotFound (also: another owner's), InvalidState (still being created), BackendError (boot failed).
        """
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            runtime = self._runtime_of(record)
            if record.state == "running" and (await runtime.status(record)).running:
                return self.view(record)
            if record.state == "paused" and (await runtime.status(record)).running:
                return self.view(await self._resume(record, runtime))
            if record.state == "creating":
                raise InvalidState(f"workspace {name!r} is still being created; try again shortly")
            if not runtime.assigned(record):  # registered by an older version
                record = await anyio.to_thread.run_sync(self._assign, record, runtime)
            record = await self._start(record, runtime, progress, time.monotonic())
        return self.view(record)

    async def _start(self, record: WorkspaceRecord, runtime: Runtime, progress: Progress, t0: float) -> WorkspaceRecord:
        timings = record.timings or Timings()
        record.state, record.last_error = "starting", None
        await self.registry.put(record)
        try:
            if self.owner_keys is not None:  # the owner's key may be new since create
                keys = self._paths(record.name).authorized_keys
                await anyio.to_thread.run_sync(lambda: ssh.write_authorized_keys(keys, self._authorized_keys(record)))
            t_boot = time.monotonic()
            await progress("starting the workspace", 0.0)
            record = await runtime.start(record, progress)
            await self.registry.put(record)
            await self.secrets.attach(record.name, record.ip, record.secrets)
            timings.boot_s = round(time.monotonic() - t_boot, 3)
            await progress("waiting for SSH (pinned host key)", 0.5)
            t_ssh = time.monotonic()
            await self._wait_ssh(record, runtime)
            await self._provision_secrets(record)
            timings.ssh_s = round(time.monotonic() - t_ssh, 3)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await runtime.stop(record, force=True)  # it never ran for anyone: nothing to shut down cleanly
                await self.ssh.drop(record.name)
                with contextlib.suppress(Exception):
                    await self.secrets.detach(record.ip)
                record = self._stopped(runtime, record, str(exc)[-2000:] or type(exc).__name__)
                await self.registry.put(record)
            raise
        timings.total_s = round(time.monotonic() - t0, 3)
        record.state, record.started_at, record.timings = "running", utcnow(), timings
        await self.registry.put(record)
        await progress("workspace running", 1.0)
        return record

    async def _provision_secrets(self, record: WorkspaceRecord) -> None:
        """Write the workspace's placeholders and git configuration inside (as root, through sudo), then
        reconnect: sshd was reloaded with them, and every later session starts with them.

        Raises:
            SSHError: the script failed or the workspace could not be reached.
        """
        script = self.secrets.inside_script(record.secrets)
        if script is None:
            return
        result = await self.ssh.exec(self._target(record), "sudo -n sh -c " + shlex.quote(script), timeout_s=60)
        check_script_result(result.exit_code, result.stderr)
        await self.ssh.drop(record.name)
        await self.ssh.wait_ready(self._target(record), self.settings.boot_timeout_s)

    async def _wait_ssh(self, record: WorkspaceRecord, runtime: Runtime) -> None:
        """Wait for SSH, failing fast (with the log tail) if the workspace dies while booting.

        Raises:
            BackendError: the workspace exited while booting (the message has the log tail).
            CommandTimeout: no SSH within the boot timeout; the message names it and points at workspace_logs.
            SSHError: SSH answered with another key.
        """
        died = False
        failure: SandboxError | None = None
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal died, failure
                try:
                    while True:
                        await anyio.sleep(0.1)
                        if not (await runtime.status(record)).running:
                            died = True
                            break
                except SandboxError as exc:
                    failure = exc
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await self.ssh.wait_ready(self._target(record), self.settings.boot_timeout_s)
            except SandboxError as exc:
                # Raised out of the task group it would arrive wrapped in an ExceptionGroup, which
                # the tools do not recognise: the agent would lose the message that says what to do.
                failure = exc
            tg.cancel_scope.cancel()
        if died:
            tail = await runtime.logs(record, 25)
            raise BackendError(f"workspace {record.name!r} exited while booting; last log lines:\n{tail}")
        if isinstance(failure, CommandTimeout):
            tail = ""
            with contextlib.suppress(SandboxError, OSError):
                tail = await runtime.logs(record, 15)
            raise CommandTimeout(
                f"workspace {record.name!r} did not answer over SSH within the boot timeout of "
                f"{self.settings.boot_timeout_s:g} s (boot_timeout_s; raise it with SANDBOX_MCP_BOOT_TIMEOUT_S "
                f"on a slow host). {failure}. Last log lines:\n{tail or '(none yet)'}"
            ) from failure
        if failure is not None:
            raise failure

    async def _halt(self, record: WorkspaceRecord) -> Runtime:
        """Mark the workspace ``stopping``, close our SSH connection and stop its runtime; returns that runtime.

        The mark is written first: a server killed in the middle leaves ``stopping``, which the
        next start-up's reconcile finishes.
        """
        runtime = self._runtime_of(record)
        if record.state not in ("stopped", "error", "creating"):
            await self.registry.put(record.model_copy(update={"state": "stopping"}))
        await self.ports.unpublish_all(record.name)
        await self.ssh.drop(record.name)
        await runtime.stop(record)
        await self.secrets.detach(record.ip)
        return runtime

    async def stop(self, name: str, *, owner_uid: int | None = None) -> Workspace:
        """Stop a workspace (its root filesystem is discarded; the workspace dir stays). Idempotent.

        Raises:
            WorkspaceNotFound (also: another owner's), BackendError.
        """
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            runtime = await self._halt(record)
            if record.state != "error":
                record = self._stopped(runtime, record, None)
            record.ports = []
            await self.registry.put(record)
        return self.view(record)

    async def destroy(self, name: str, keep_data: bool = False, *, owner_uid: int | None = None) -> DestroyResult:
        """Stop and remove a workspace: runtime artefacts, registry entry and (unless keep_data) its host dirs.

        Raises:
            WorkspaceNotFound (also: another owner's), BackendError.
        """
        await self._check_exists(name)
        async with self._locked(name):
            await self._destroy_locked(owned(await self.registry.get(name), owner_uid), keep_data)
        await self._forget(name)
        return DestroyResult(name=name, destroyed=True, kept_data=keep_data)

    async def _destroy_slot(self, slot: str) -> None:
        """Destroy a warm pool slot (if it is still one: a claim may have taken it meanwhile)."""
        async with self._locked(slot):
            record = (await self.registry.read()).workspaces.get(slot)
            if record is None or not record.pooled:
                return
            await self._destroy_locked(record, keep_data=False)
        await self._forget(slot)

    async def _destroy_locked(self, record: WorkspaceRecord, keep_data: bool) -> None:
        """Stop ``record`` and remove its runtime parts, registry entry and (unless ``keep_data``) host dirs;
        the caller holds its lock."""
        name = record.name
        runtime = await self._halt(record)
        await runtime.destroy(record)
        paths = self._paths(name)
        if keep_data:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(paths.runtime, ignore_errors=True))
        # The disk image (if any) is unmounted first: kept, or gone with the rest.
        await anyio.to_thread.run_sync(lambda: diskimage.release(self.settings.state_dir, name, delete=not keep_data))
        if not keep_data:
            await anyio.to_thread.run_sync(lambda: shutil.rmtree(paths.root, ignore_errors=True))
            await self._collect_roots(runtime)  # its snapshots' roots, where the runtime keeps them
        await self.registry.remove(name)
        if runtime.host_network:
            await runtime.ctx.network.retire()  # our firewall tables go with the last workspace

    async def _forget(self, name: str) -> None:
        """After a destroy, outside its lock: the hosts file, the lock file."""
        await self._sync_hosts()
        with contextlib.suppress(FileNotFoundError):
            self._lock_path(name).unlink()
        self._locks.pop(name, None)

    async def list(self, *, owner_uid: int | None = None) -> WorkspaceList:
        """All registered workspaces (those of ``owner_uid`` if given), with dead ones noticed."""
        data = await self.registry.read()
        mine = [r for r in data.workspaces.values() if not r.pooled and (owner_uid is None or r.owner_uid == owner_uid)]
        records = [await self._refresh(r) for r in mine]
        return WorkspaceList(workspaces=[self.view(r) for r in sorted(records, key=lambda r: r.name)])

    async def status(self, name: str, *, owner_uid: int | None = None) -> WorkspaceStatus:
        """The workspace plus what its runtime reports right now. Raises WorkspaceNotFound."""
        record = owned(await self._refresh(owned(await self.registry.get(name), owner_uid)), owner_uid)
        detail = await self._runtime_of(record).status(record)
        used = await anyio.to_thread.run_sync(self._snapshots(record.name).total_bytes)
        return WorkspaceStatus(**self.view(record).model_dump(), runtime=detail, snapshot_bytes=used)

    async def logs(self, name: str, lines: int = 200, *, owner_uid: int | None = None) -> LogsResult:
        """The tail of the workspace's boot log. Raises WorkspaceNotFound."""
        record = owned(await self.registry.get(name), owner_uid)
        text = await self._runtime_of(record).logs(record, lines)
        return LogsResult(name=name, log=text, lines=len(text.splitlines()))

    # Inside a running workspace ----------------------------------------------------------------

    async def _running(self, name: str, owner_uid: int | None) -> WorkspaceRecord:
        # The registry's word is enough here: if the workspace died, the SSH call fails and
        # _ssh_call notices it then, keeping the runtime check off every exec. No per-name lock here
        # (a long exec must not hold up stop): the owner is checked on the record the call uses,
        # whose host key the SSH target pins (a successor under the same name has another).
        # Shared, not copied (Registry.peek): callers read it; one that changes it copies it first.
        record = owned(await self.registry.peek(name), owner_uid)
        if record.state == "paused":
            raise InvalidState(f"workspace {name!r} is paused (nothing in it runs); call resume_workspace first")
        if record.state != "running":
            raise InvalidState(f"workspace {name!r} is {record.state}; call start_workspace first")
        return record

    async def ssh_target(self, name: str, *, owner_uid: int | None = None) -> ssh.SSHTarget:
        """How to reach a running workspace over SSH (for the CLI's interactive ssh and the benchmark).

        Raises:
            WorkspaceNotFound, InvalidState (not running).
        """
        return self._target(await self._running(name, owner_uid))

    async def _ssh_call(self, record: WorkspaceRecord, call):  # type: ignore[no-untyped-def]
        try:
            return await call(self._target(record))
        except SandboxError as exc:
            if isinstance(exc, InvalidSpec):
                raise
            record = await self._refresh(record)
            if record.state != "running":
                raise InvalidState(
                    f"workspace {record.name!r} stopped unexpectedly; see workspace_logs, then start_workspace"
                ) from exc
            raise

    async def exec(
        self,
        name: str,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 120,
        stdin: str | None = None,
        progress: Progress | None = None,
        *,
        owner_uid: int | None = None,
    ) -> ExecResult:
        """Run a shell command as the workspace user. See :meth:`ssh.SSHPool.exec`.

        Each stream keeps its head and tail within what a result carries (:func:`budget.exec_keep`,
        at most ``exec_output_cap``); a longer one is saved whole in the workspace (``exec_save_mib``).
        ``progress``: the output also goes there while the command runs (see :mod:`output_relay`);
        the result is the same either way.
        """
        record = await self._running(name, owner_uid)
        budget_bytes = self.settings.result_budget_bytes
        keep = min(self.settings.exec_output_cap, budget.exec_keep(budget_bytes))
        relay = OutputRelay(progress) if progress is not None else None

        def call(t: ssh.SSHTarget):  # type: ignore[no-untyped-def]
            return self.ssh.exec(
                t, command, cwd=cwd, env=env, stdin=stdin, timeout_s=timeout_s, output_cap=keep,
                save_max=self.settings.exec_save_mib << 20, save_over=min(keep, budget.exec_save_over(budget_bytes)),
                on_output=relay.feed if relay else None,
            )  # fmt: skip

        if relay is None:
            return await self._with_hint(record, await self._ssh_call(record, call))
        outcome: ExecResult | BaseException
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay.run)
            try:
                outcome = await self._ssh_call(record, call)
            except Exception as exc:  # raised outside the task group, so not wrapped in a group
                outcome = exc
            tg.cancel_scope.cancel()
        await relay.close()  # every notification before the result
        if isinstance(outcome, BaseException):
            raise outcome
        return await self._with_hint(record, outcome)

    async def _with_hint(self, record: WorkspaceRecord, result: ExecResult) -> ExecResult:
        """``result`` with a hint naming the limit the command ran into, if it did (:mod:`.limit_hints`)."""
        hint = None
        if limit_hints.maybe_oom_killed(result):
            runtime = self._runtime_of(record)
            kills = await runtime.oom_kills(record)
            if kills is None and runtime.own_kernel:
                with contextlib.suppress(SandboxError):
                    probe = await self.ssh.exec(self._target(record), limit_hints.OOM_PROBE, timeout_s=15,
                                                output_cap=4096)  # fmt: skip
                    kills = limit_hints.parse_oom_probe(probe.stdout)
            key = (record.name, record.started_at)  # counters start at 0 with each boot
            if kills is not None and kills > (seen := self._oom_seen.get(key, 0)):
                self._oom_seen[key] = kills
                hint = limit_hints.oom_hint(kills - seen, record.limits)
        hint = hint or limit_hints.disk_hint(result.stderr, record.limits)
        return result.model_copy(update={"hint": hint}) if hint else result

    async def read_file(
        self, name: str, path: str, offset: int = 0, limit: int | None = None, *, owner_uid: int | None = None
    ) -> FileContent:
        """Read up to ``limit`` bytes from ``offset``: by default, and at most, what one result carries
        (:func:`budget.read_limit`; ``truncated``/``next_offset`` say where to go on)."""
        if offset < 0:
            raise InvalidSpec("offset must be ≥ 0")
        room = min(budget.read_limit(self.settings.result_budget_bytes), self.settings.read_limit_max)
        limit = min(limit or room, room)
        record = await self._running(name, owner_uid)
        return await self._ssh_call(record, lambda t: self.ssh.read_file(t, path, offset=offset, limit=limit))

    async def write_file(
        self,
        name: str,
        path: str,
        content: str,
        encoding: str = "utf-8",
        append: bool = False,
        mode: str | int | None = None,
        *,
        owner_uid: int | None = None,
    ) -> WriteResult:
        """Write (or append) text or base64 content to a file, creating parent directories."""
        if encoding == "utf-8":
            data = content.encode()
        elif encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except ValueError as exc:
                raise InvalidSpec(f"content is not valid base64: {exc}") from exc
        else:
            raise InvalidSpec(f"encoding must be 'utf-8' or 'base64', not {clip_repr(encoding)}")
        if len(data) > self.settings.write_max:
            raise InvalidSpec(
                f"content is {len(data)} bytes; the limit is {self.settings.write_max}. "
                f"Write it in parts with append=true, or put it in the host workspace dir"
            )
        file_mode = parse_mode(mode)
        record = await self._running(name, owner_uid)
        return await self._ssh_call(
            record, lambda t: self.ssh.write_file(t, path, data, append=append, mode=file_mode)
        )

    async def list_dir(
        self, name: str, path: str = ".", offset: int = 0, limit: int | None = None, *, owner_uid: int | None = None
    ) -> DirListing:
        """List a directory in name order, ``limit`` entries (default: a page) from index ``offset``
        (relative paths resolve against the workspace dir)."""
        record = await self._running(name, owner_uid)
        page = limit or ssh.DEFAULT_LIST_PAGE
        return await self._ssh_call(record, lambda t: self.ssh.list_dir(t, path, offset, page))

    # Processes ---------------------------------------------------------------------------------

    async def _agent_op(
        self, record: WorkspaceRecord, process_id: str | None, request: dict, timeout_s: float, *, retry: bool
    ) -> dict:
        """One process request to the workspace's exec agent; its checked ``ok`` part (see processes.py)."""
        reply = await self._ssh_call(
            record,
            lambda t: agent_op(self.ssh, t, request, timeout_s=timeout_s, reply_cap=processes.reply_cap(request),
                               retry=retry),
        )
        return processes.check_reply(record.name, process_id, reply)

    async def start_process(
        self,
        name: str,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        process_id: str | None = None,
        *,
        owner_uid: int | None = None,
    ) -> ProcessStarted:
        """Start ``command`` detached in the workspace (see :mod:`processes`); returns its id and PID.

        Raises:
            InvalidSpec: a bad command, cwd, env or process_id; an id in use; too many processes.
            WorkspaceNotFound, InvalidState (not running), SSHError.
        """
        validate_name(name)
        process_id = processes.validate_process_id(process_id) if process_id is not None else processes.new_process_id()
        workspace_dir = claude_workspace.workspace_dir_inside(self.settings.user)
        wd = ssh.resolve_path(workspace_dir, cwd) if cwd is not None else workspace_dir
        if not command.strip():
            raise InvalidSpec("command must not be empty")
        ssh.build_exec_command(command, cwd=wd, env=env, timeout_s=1)  # validates command, cwd and env
        record = await self._running(name, owner_uid)
        request = processes.start_request(process_id, command, wd, dict(env or {}), self.settings.process_output_cap)
        ok = await self._agent_op(record, process_id, request, 30 + _SLOW_GUEST_S, retry=False)
        return processes.started_result(name, ok)

    async def process_output(
        self,
        name: str,
        process_id: str,
        cursor: int = 0,
        wait_s: float = 0,
        max_bytes: int = 65536,
        *,
        owner_uid: int | None = None,
    ) -> ProcessOutput:
        """Output of a process from ``cursor`` (bytes of both streams in arrival order), waiting up to ``wait_s``.

        Raises:
            InvalidSpec (also ProcessNotFound), WorkspaceNotFound, InvalidState, SSHError.
        """
        validate_name(name)
        processes.validate_process_id(process_id)
        if cursor < 0:
            raise InvalidSpec("cursor must be ≥ 0 (0 reads from the start; pass next_cursor to read on)")
        if not 1 <= max_bytes <= processes.MAX_READ_BYTES:
            raise InvalidSpec(f"max_bytes must be between 1 and {processes.MAX_READ_BYTES}")
        processes.checked_wait_s(wait_s)
        record = await self._running(name, owner_uid)
        request = processes.read_request(process_id, cursor, max_bytes, wait_s)
        ok = await self._agent_op(record, process_id, request, wait_s + _SLOW_GUEST_S, retry=True)
        return processes.output_result(name, ok, cursor, max_bytes)

    async def wait_process(
        self,
        name: str,
        process_id: str,
        until: str = "exit",
        timeout_s: float = 60,
        cursor: int = 0,
        *,
        owner_uid: int | None = None,
    ) -> ProcessWait:
        """Wait until the process exits, listens on a port, or prints a line matching a regex (``until``).

        Raises:
            InvalidSpec (a bad until or regex; ProcessNotFound), WorkspaceNotFound, InvalidState, SSHError.
        """
        validate_name(name)
        processes.validate_process_id(process_id)
        until = processes.parse_until(until)
        if not 0 <= timeout_s <= processes.wire.WAIT_MAX_S:
            raise InvalidSpec(f"timeout_s must be between 0 and {processes.wire.WAIT_MAX_S:g}")
        if cursor < 0:
            raise InvalidSpec("cursor must be ≥ 0")
        record = await self._running(name, owner_uid)
        request = processes.wait_request(process_id, until, cursor, timeout_s)
        ok = await self._agent_op(record, process_id, request, timeout_s + _SLOW_GUEST_S, retry=True)
        return processes.wait_result(name, ok)

    async def stop_process(
        self,
        name: str,
        process_id: str,
        signal: str = "TERM",
        grace_s: float = 5,
        *,
        owner_uid: int | None = None,
    ) -> ProcessInfo:
        """Send ``signal`` to the process's whole tree, then KILL what is left after ``grace_s``; its final state.

        Raises:
            InvalidSpec (a bad signal or grace; ProcessNotFound), WorkspaceNotFound, InvalidState, SSHError.
        """
        validate_name(name)
        processes.validate_process_id(process_id)
        sig = processes.checked_signal(signal)
        if not 0 <= grace_s <= 300:
            raise InvalidSpec("grace_s must be between 0 and 300 seconds")
        record = await self._running(name, owner_uid)
        request = processes.stop_request(process_id, sig, grace_s)
        ok = await self._agent_op(record, process_id, request, grace_s + 5 + _SLOW_GUEST_S, retry=True)
        return processes.info_result(name, ok)

    async def list_processes(self, name: str, *, owner_uid: int | None = None) -> ProcessList:
        """The workspace's processes (since it last started), running and exited.

        Raises:
            WorkspaceNotFound, InvalidState (not running: a stopped workspace has no processes), SSHError.
        """
        validate_name(name)
        record = await self._running(name, owner_uid)
        ok = await self._agent_op(record, None, processes.list_request(), _SLOW_GUEST_S, retry=True)
        return processes.list_result(name, ok)

    # Published ports ----------------------------------------------------------------------------

    def _allowed_uids(self, record: WorkspaceRecord) -> frozenset[int]:
        """Who may connect to its published ports: its owner (this process's user if none) and root."""
        return frozenset({0, record.owner_uid if record.owner_uid is not None else os.geteuid()})

    async def _restore_ports(self) -> None:
        """Listen again on the published ports of running workspaces (after a server restart).

        A host port that cannot be had again is dropped from the record: whoever holds it now (another
        local user, perhaps) must not be taken for the workspace by its owner.
        """
        data = await self.registry.read()
        for record in data.workspaces.values():
            if record.state != "running" or not record.ports or record.runtime not in self.runtimes:
                continue
            host = self._runtime_of(record).endpoint(record)[0]
            lost = []
            for p in record.ports:
                try:
                    await self.ports.publish(record.name, p.port, p.host_port, host, self._allowed_uids(record))
                except SandboxError as exc:
                    lost.append(p.port)
                    log.warning("%s: port %d is no longer published: host port %d: %s", record.name, p.port,
                                p.host_port, exc)  # fmt: skip
            if lost:
                async with self._locked(record.name):
                    current = await self.registry.get(record.name)
                    current.ports = [p for p in current.ports if p.port not in lost]
                    await self.registry.put(current)

    async def publish_port(
        self, name: str, port: int, host_port: int | None = None, *, owner_uid: int | None = None
    ) -> PublishedPort:
        """Make ``port`` of a running workspace reachable on the host's loopback (127.0.0.1:host_port).

        Only the workspace's owner and root may connect. Publishing a published port again returns
        it as it is. Raises:
            InvalidSpec: a port outside 1-65535, a host_port outside 1024-65535.
            Conflict: host_port is in use, or the port is published on another host port.
            WorkspaceNotFound, InvalidState (not running), BackendError (this process serves no ports).
        """
        validate_name(name)
        _check_port("port", port, 1)
        if host_port is not None:
            _check_port("host_port", host_port, 1024)
        await self._check_exists(name)
        async with self._locked(name):
            record = (await self._running(name, owner_uid)).model_copy(deep=True)  # changed below
            for p in record.ports:
                if p.port == port and self.ports.host_port(name, port) == p.host_port:
                    if host_port not in (None, p.host_port):
                        raise Conflict(
                            f"port {port} of {name!r} is already published on host port {p.host_port}; "
                            "unpublish_port it first to move it"
                        )
                    return p
            host = self._runtime_of(record).endpoint(record)[0]
            bound = await self.ports.publish(name, port, host_port or 0, host, self._allowed_uids(record))
            published = PublishedPort(port=port, host=LOOPBACK, host_port=bound, url=f"http://{LOOPBACK}:{bound}")
            try:
                record.ports = [p for p in record.ports if p.port != port] + [published]
                await self.registry.put(record)
            except BaseException:
                await self.ports.unpublish(name, port)
                raise
        return published

    async def unpublish_port(self, name: str, port: int, *, owner_uid: int | None = None) -> PortUnpublished:
        """Close the host side of a published port (and its open connections). Idempotent.

        Raises:
            InvalidSpec (a port outside 1-65535), WorkspaceNotFound.
        """
        validate_name(name)
        _check_port("port", port, 1)
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            await self.ports.unpublish(name, port)
            if any(p.port == port for p in record.ports):
                record.ports = [p for p in record.ports if p.port != port]
                await self.registry.put(record)
        return PortUnpublished(port=port, published=False)

    # git: a branch per workspace (see gitflow) ------------------------------------------------

    async def _repo_of(self, name: str, owner_uid: int | None) -> tuple[WorkspaceRecord, RepoInfo]:
        record = await self._running(name, owner_uid)
        if record.repo is None:
            raise InvalidState(
                f"workspace {name!r} was not created from a host repository; create one with "
                "create_workspace(name, repo='/path/to/repo')"
            )
        return record, record.repo

    async def git_diff(self, name: str, stat_only: bool = False, *, owner_uid: int | None = None) -> WorkspaceDiff:
        """What changed in the workspace's clone since its base (committed and not), computed inside it.

        Raises:
            WorkspaceNotFound, InvalidState (not running, or not made from a repository), BackendError, SSHError.
        """
        record, repo = await self._repo_of(name, owner_uid)
        return await self._ssh_call(
            record, lambda t: gitflow.workspace_diff(self.ssh, t, repo, self.settings, stat_only)
        )

    async def git_fetch(
        self, name: str, include_uncommitted: bool = False, *, owner_uid: int | None = None
    ) -> FetchResult:
        """The workspace's branch into its host repository as ``refs/heads/sandbox/NAME``, by the git protocol over
        the exec channel, written by ``owner_uid``'s git (as root: the repository owner's). See :mod:`gitflow`.

        Raises:
            WorkspaceNotFound, InvalidState (not running, not from a repository, no such branch), InvalidSpec (the
            pack is over the bound), AccessDenied (the repository is not the caller's to write), BackendError.
        """
        record, repo = await self._repo_of(name, owner_uid)
        user = hostgit.host_user(hostgit.run_uid(owner_uid, repo.path))
        return await self._ssh_call(
            record,
            lambda t: gitflow.fetch_from(self.ssh, t, name, user, repo, self.settings,
                                         include_uncommitted=include_uncommitted),
        )  # fmt: skip

    # Pause, snapshots, forks (the files' side: snapshots.py) -----------------------------------

    def _recover_files(self, name: str) -> None:
        """Mount the workspace's disk image again (after a reboot), finish or drop a restore, and drop
        half-taken snapshots, that a killed server left. Blocking."""
        paths = self._paths(name)
        if diskimage.unavailable() is None:
            try:
                diskimage.ensure(self.settings.state_dir, name, None)
            except SandboxError as exc:
                log.warning("reconcile: the disk image of %s: %s", name, exc)
        if paths.root.is_dir():
            snapshots.recover_restore(paths)
            snapshots.SnapshotStore(paths, name).recover()

    async def set_egress(self, name: str, egress: Egress, *, owner_uid: int | None = None) -> Workspace:
        """Change a workspace's network policy: a running (or paused) one at once, without a restart; a stopped
        one at its next start. ``egress`` is ``"none"``, ``"internet"`` or a list of domain names.

        Raises:
            InvalidSpec: a malformed policy, or one this host or runtime cannot give (nothing changed).
            WorkspaceNotFound (also: another owner's), InvalidState (being created, started or stopped),
            Unsupported (the runtime cannot change a running workspace's policy), BackendError.
        """
        policy = egress_policy.parse(egress)
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            runtime = self._runtime_of(record)
            updated = record.model_copy(update={"egress": policy})
            runtime.validate(updated)
            if record.state in ("running", "paused"):
                await runtime.set_egress(updated)
            elif record.state not in ("stopped", "error"):
                raise InvalidState(f"workspace {name!r} is {record.state}; try again once it is running or stopped")
            await self.registry.put(updated)
        return self.view(updated)

    async def pause(self, name: str, *, owner_uid: int | None = None) -> Workspace:
        """Freeze a running workspace: its processes stop where they are and keep their memory. Idempotent.

        Raises:
            WorkspaceNotFound (also: another owner's), InvalidState (not running), Unsupported, BackendError.
        """
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            if record.state == "paused":
                return self.view(record)
            if record.state != "running":
                raise InvalidState(f"workspace {name!r} is {record.state}; only a running workspace can be paused")
            record = await self._pause(record, self._runtime_of(record))
        return self.view(record)

    async def _pause(self, record: WorkspaceRecord, runtime: Runtime) -> WorkspaceRecord:
        # Recorded first: a server killed between the two leaves 'paused' on a running workspace, which
        # resume sets right; the other order would leave a frozen one the registry calls running.
        record.state = "paused"
        await self.registry.put(record)
        try:
            await runtime.pause(record)
        except BaseException:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(SandboxError):
                    await runtime.resume(record)
                record.state = "running"
                await self.registry.put(record)
            raise
        return record

    async def resume(self, name: str, *, owner_uid: int | None = None) -> Workspace:
        """Thaw a paused workspace. Idempotent on a running one.

        Raises:
            WorkspaceNotFound (also: another owner's), InvalidState (stopped: start_workspace it), BackendError.
        """
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            if record.state == "running":
                return self.view(record)
            if record.state != "paused":
                raise InvalidState(f"workspace {name!r} is {record.state}, not paused; call start_workspace")
            record = await self._resume(record, self._runtime_of(record))
        return self.view(record)

    async def _resume(self, record: WorkspaceRecord, runtime: Runtime) -> WorkspaceRecord:
        await runtime.resume(record)
        record.state = "running"
        await self.registry.put(record)
        return record

    @contextlib.asynccontextmanager
    async def _held_still(self, record: WorkspaceRecord, runtime: Runtime) -> AsyncIterator[None]:
        """Keep a running workspace paused while its files are copied (a consistent copy), then resume it.

        A paused or stopped one stays as it is. The guest flushes its caches first where the runtime asks.
        """
        if record.state != "running":
            yield
            return
        if runtime.sync_before_capture:
            with contextlib.suppress(SandboxError):
                await self.ssh.exec(self._target(record), "sync", timeout_s=60)
        await self._pause(record, runtime)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self._resume(record, runtime)

    def _snapshots(self, name: str) -> snapshots.SnapshotStore:
        return snapshots.SnapshotStore(self._paths(name), name)

    def _capturable(self, record: WorkspaceRecord, what: str) -> None:
        """Refuse ``what`` (a snapshot, restore, fork) before anything changes, saying why.

        Raises:
            Unsupported: the runtime has no snapshots. InvalidState: being created, starting, failed.
        """
        runtime = self._runtime_of(record)
        if not runtime.has_snapshots:
            raise Unsupported(
                f"the {runtime.name} runtime cannot snapshot, restore or fork workspace {record.name!r} (type "
                f"{record.type!r}); pause_workspace works, and the workspace dir survives stop/start. Containers "
                "and VMs have snapshots"
            )
        if record.state not in ("running", "paused", "stopped"):
            raise InvalidState(
                f"workspace {record.name!r} is {record.state}; {what} needs a running, paused or stopped one"
            )

    async def _collect_roots(self, runtime: Runtime) -> None:
        """Let the runtime free captured roots nothing names any more; a failure only leaves garbage for later."""
        with contextlib.suppress(SandboxError):
            await runtime.collect_roots()

    def _snapshot_limit_bytes(self) -> int:
        """The most one owner's snapshots may take: uid_max_snapshot_mib, else half the state filesystem. Blocking."""
        if self.settings.uid_max_snapshot_mib is not None:
            return self.settings.uid_max_snapshot_mib << 20
        st = os.statvfs(self.settings.state_dir)
        return st.f_blocks * st.f_frsize // 2

    async def _owner_snapshot_bytes(self, owner_uid: int | None) -> int:
        """What the snapshots of every workspace of ``owner_uid`` take (their recorded sizes)."""
        names = [r.name for r in (await self.registry.read()).workspaces.values() if r.owner_uid == owner_uid]
        return await anyio.to_thread.run_sync(lambda: sum(self._snapshots(n).total_bytes() for n in names))

    def _memory_capturable(self, record: WorkspaceRecord, runtime: Runtime) -> None:
        """Refuse a memory snapshot where there is no running state to keep.

        Raises:
            Unsupported: the runtime keeps none. InvalidState: the workspace is not running.
        """
        if not runtime.has_memory_snapshots:
            raise Unsupported(
                f"the {runtime.name} runtime keeps no running state in a snapshot (memory=true is for type 'vm'); "
                "take a disk snapshot (memory=false): after restore_workspace the workspace starts from its saved "
                "files, then start its processes again"
            )
        if record.state != "running":
            hint = "resume_workspace" if record.state == "paused" else "start_workspace"
            raise InvalidState(
                f"workspace {record.name!r} is {record.state}: a memory snapshot keeps running processes, so it "
                f"needs a running workspace; call {hint} first, or take a disk snapshot (memory=false)"
            )

    def _guest_exec(self, record: WorkspaceRecord) -> GuestExec:
        """Run a command in ``record`` as its user from "/" (for a runtime that acts inside the guest)."""
        target = self._target(record)
        return lambda command: self.ssh.exec(target, command, cwd="/", timeout_s=300)

    async def _copy_parts(self, record: WorkspaceRecord, runtime: Runtime, dest: Callable[[str], Path]) -> None:
        """Copy the workspace's parts (snapshots.PARTS) to ``dest(part)``: its dirs, and its root via the runtime."""
        paths = self._paths(record.name)
        await runtime.capture_root(record, dest("root"))
        await snapshots.copy_tree(paths.workspace, dest("workspace"))
        if paths.claude_config.is_dir():
            await snapshots.copy_tree(paths.claude_config, dest("claude-config"))

    async def snapshot(
        self,
        name: str,
        snapshot: str,
        memory: bool = False,
        progress: Progress = no_progress,
        *,
        owner_uid: int | None = None,
    ) -> SnapshotInfo:
        """Save the workspace's files: its workspace dir, Claude config and writable root (installed packages).

        A running workspace is paused for the copy and resumed; a stopped one gives the root it
        would start from. Built aside and renamed into place: a crash leaves no half snapshot.

        Raises:
            InvalidSpec (bad name), WorkspaceNotFound, Conflict (the snapshot exists), InvalidState
            (being created, or failed), Unsupported (memory, or a runtime without snapshots), BackendError.
        """
        snapshots.validate_snapshot_name(snapshot)
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            self._capturable(record, "a snapshot")
            runtime = self._runtime_of(record)
            if memory:
                self._memory_capturable(record, runtime)
            store = self._snapshots(name)
            await anyio.to_thread.run_sync(self._recover_files, name)
            store.check_free(snapshot)
            # Refused before any copy when the owner's snapshots fill their room already.
            limit = await anyio.to_thread.run_sync(self._snapshot_limit_bytes)
            snapshots.check_bound(name, snapshot, await self._owner_snapshot_bytes(record.owner_uid), 1, limit)
            source_state = record.state
            tmp = await anyio.to_thread.run_sync(store.aside, snapshot)
            try:
                ticket = None
                if memory:
                    await progress("unmounting the guest's shares", None)
                    ticket = await runtime.prepare_memory(record, self._guest_exec(record))
                try:
                    async with self._held_still(record, runtime):
                        await progress("copying the files", None)
                        await self._copy_parts(record, runtime, lambda part: tmp / part)
                        if memory:
                            await progress("saving the memory", None)
                            await runtime.save_memory(record, ticket, tmp / "root")
                finally:
                    if memory:
                        with anyio.CancelScope(shield=True):
                            await runtime.release_memory(record, ticket)
                method = await anyio.to_thread.run_sync(snapshots.copy_method, tmp)
                size = await anyio.to_thread.run_sync(
                    lambda: snapshots.tree_size(tmp) + runtime.held_elsewhere_bytes(tmp / "root"))
                info = SnapshotInfo(name=name, snapshot=snapshot, created_at=utcnow(), size_bytes=size, method=method,
                                    memory=memory, source_state=source_state, root_base=runtime.root_base(record))
                # Checked again with the real size, and committed under one lock (this process's and the state
                # dir's; no workspace name starts with '.'): two snapshots of one owner's workspaces cannot both
                # fit in the same room.
                async with self._snapshot_budget, async_file_lock(self.settings.state_dir / ".locks" / ".snapshot-budget.lock"):
                    used = await self._owner_snapshot_bytes(record.owner_uid)
                    snapshots.check_bound(name, snapshot, used, size, limit)
                    await anyio.to_thread.run_sync(store.commit, tmp, info)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))
                    await self._collect_roots(runtime)
                raise
        return info

    async def list_snapshots(self, name: str, *, owner_uid: int | None = None) -> SnapshotList:
        """The workspace's snapshots, oldest first. Raises WorkspaceNotFound."""
        await self._check_exists(name)
        record = owned(await self.registry.get(name), owner_uid)
        found = await anyio.to_thread.run_sync(self._snapshots(name).list)
        return SnapshotList(
            name=name, snapshots=found, total_bytes=sum(i.size_bytes for i in found),
            owner_bytes=await self._owner_snapshot_bytes(record.owner_uid),
            owner_limit_bytes=await anyio.to_thread.run_sync(self._snapshot_limit_bytes),
        )

    async def delete_snapshot(self, name: str, snapshot: str, *, owner_uid: int | None = None) -> SnapshotDeleted:
        """Remove one snapshot. Raises InvalidSpec, WorkspaceNotFound, InvalidState (no such snapshot)."""
        snapshots.validate_snapshot_name(snapshot)
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            await anyio.to_thread.run_sync(self._snapshots(name).delete, snapshot)
            await self._collect_roots(self._runtime_of(record))
        return SnapshotDeleted(snapshot=snapshot, deleted=True)

    async def restore(
        self, name: str, snapshot: str, progress: Progress = no_progress, *, owner_uid: int | None = None
    ) -> Workspace:
        """Put the workspace back to ``snapshot``: its files exactly (later ones are gone) and its root layer.

        The copies are built beside the live parts while it still runs; then it stops, the parts are
        swapped in by renames behind a journal (a crash finishes or drops the swap as a whole), and
        it starts again from the restored root if it was running or the snapshot was of a running one.

        Raises:
            InvalidSpec, WorkspaceNotFound, InvalidState (no such snapshot; its image is gone), BackendError.
        """
        snapshots.validate_snapshot_name(snapshot)
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            self._capturable(record, "a restore")
            runtime = self._runtime_of(record)
            store = self._snapshots(name)
            info = await anyio.to_thread.run_sync(store.get, snapshot)
            runtime.with_root_base(record, info.root_base)  # refuses a layer whose image is gone, before any change
            paths = self._paths(name)
            await anyio.to_thread.run_sync(self._recover_files, name)
            # A memory snapshot always runs afterwards: its processes carry on.
            run_after = record.state in ("running", "paused") or info.source_state in ("running", "paused") \
                or info.memory
            source = store.path(snapshot)
            try:
                await progress("copying the snapshot", None)
                for part in snapshots.PARTS:
                    if (source / part).is_dir():
                        await snapshots.copy_tree(source / part, snapshots.staging(paths, part))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(snapshots.recover_restore, paths)
                raise
            runtime = await self._halt(record)
            record = self._stopped(runtime, record, None)
            await self.registry.put(record)
            await anyio.to_thread.run_sync(snapshots.restore_swap, paths)
            record = runtime.with_root_base(record, info.root_base)
            await self.registry.put(record)
            try:
                if run_after:
                    record = await self._start(record, runtime, progress, time.monotonic())
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(snapshots.drop_old, paths)
                    await self._collect_roots(runtime)  # the replaced root layer's
        return self.view(record)

    async def fork(
        self,
        name: str,
        new_name: str,
        snapshot: str | None = None,
        progress: Progress = no_progress,
        *,
        owner_uid: int | None = None,
    ) -> Workspace:
        """A new workspace ``new_name`` holding ``name``'s files and root now (or at ``snapshot``), running.

        It is made as create makes one (its own IP, MAC, host key, uid range); the files are copied
        (reflinks where the filesystem has them) and given to its uid range. A running source is
        paused for the copy. On failure or cancellation the new workspace is removed again.

        Raises:
            InvalidSpec (bad names), WorkspaceNotFound, WorkspaceExists, Conflict (kept data of that
            name), InvalidState (no such snapshot; source not running/paused/stopped), BackendError.
        """
        t0 = time.monotonic()
        validate_name(new_name)
        if snapshot is not None:
            snapshots.validate_snapshot_name(snapshot)
        await self._check_exists(name)
        if new_name == name:
            raise WorkspaceExists(new_name)
        async with contextlib.AsyncExitStack() as stack:
            for n in sorted((name, new_name)):  # one order for every caller: no deadlock between forks
                await stack.enter_async_context(self._locked(n))
            source = owned(await self.registry.get(name), owner_uid)
            self._capturable(source, "a fork")
            runtime = self._runtime_of(source)
            info = await anyio.to_thread.run_sync(self._snapshots(name).get, snapshot) if snapshot else None
            paths = self._paths(new_name)
            if new_name in (await self.registry.read()).workspaces:
                raise WorkspaceExists(new_name)
            if paths.root.exists():
                raise Conflict(
                    f"the host still has data kept from an earlier workspace {new_name!r} "
                    f"({paths.root}); pick another name for the fork"
                )
            live = await runtime.addresses_in_use()
            spec = CreateSpec(name=new_name, type=source.type, packages=source.packages, egress=source.egress)
            record = await anyio.to_thread.run_sync(
                self._register, spec, source.packages, live, runtime, source.limits,
                source.owner_uid if owner_uid is None else owner_uid,
                dict(source.secrets),  # the same placeholders: its files are the source's copies
            )  # fmt: skip
            prepared = started = False
            try:
                record = await self._provision(record, self.secrets.environment(record.secrets))
                await self.registry.put(record)
                await progress("copying the files", None)

                def staged(part: str) -> Path:
                    return snapshots.staging(paths, part)

                if info is not None:
                    src = self._snapshots(name).path(info.snapshot)
                    for part in snapshots.PARTS:
                        if (src / part).is_dir():
                            await snapshots.copy_tree(src / part, staged(part))
                    base = info.root_base
                else:
                    async with self._held_still(source, runtime):
                        await self._copy_parts(source, runtime, staged)
                    base = runtime.root_base(source)
                await runtime.adopt_files(source, record, [staged(p) for p in snapshots.PARTS if staged(p).exists()])
                # The agent's files are the fork's own uid's (agentfiles.py), not the source's.
                trees = [staged(p) for p in ("workspace", "claude-config") if staged(p).exists()]
                await anyio.to_thread.run_sync(
                    lambda: agentfiles.adopt(trees, agent_uid_for(source.name), agent_uid_for(new_name))
                )
                await anyio.to_thread.run_sync(snapshots.restore_swap, paths)
                await anyio.to_thread.run_sync(snapshots.drop_old, paths)  # the empty dirs provisioning made
                record = await runtime.prepare(record, progress)
                prepared = True
                record = runtime.with_root_base(record, base)
                record.state = "stopped"
                record.timings = Timings(image_s=round(time.monotonic() - t0, 3))
                await self.registry.put(record)
                await self._sync_hosts()
                started = True
                record = await self._start(record, runtime, progress, t0)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._undo_create(record, runtime, prepared, started, existed=False)
                    await self._collect_roots(runtime)
                raise
        return self.view(record)


# A guest under emulation (a VM under TCG) answers an agent request slowly: on top of any wait.
_SLOW_GUEST_S = 30.0


def _check_port(what: str, port: int, low: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise InvalidSpec(f"{what} must be a number from {low} to 65535, got {port!r}")
