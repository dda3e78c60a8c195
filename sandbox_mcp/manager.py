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
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio

from . import budget, onboarding, provision, ssh
from .config import Settings
from .errors import (
    BackendError,
    CommandTimeout,
    InvalidSpec,
    InvalidState,
    SandboxError,
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
    FileContent,
    Limits,
    LogsResult,
    SSHInfo,
    Timings,
    Workspace,
    WorkspaceList,
    WorkspaceRecord,
    WorkspaceStatus,
    WorkspaceType,
    WriteResult,
    utcnow,
)
from .naming import allocate_ip, check_identity_collisions, cid_for, mac_for, validate_name, validate_packages
from .ownership import owned
from .paths import WorkspacePaths
from .progress import Progress, no_progress
from .registry import Registry
from .runtimes import Mode, Runtime, RuntimeContext, build_runtimes, resolve_mode, type_table

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
    if not _MODE_RE.match(mode):
        raise InvalidSpec(f"mode {clip_repr(mode)} is not an octal file mode; use e.g. '644' or '0755'")
    return int(mode, 8)


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

    def __init__(self, settings: Settings, runtimes: dict[str, Runtime] | None = None) -> None:
        self.settings = settings
        self.registry = Registry(settings.registry_path)
        self.client_key_path = settings.state_dir / ".server" / "client_ed25519_key"
        self.ssh = ssh.SSHPool()
        self._runtimes = runtimes
        self._mode: Mode | None = None
        self._types: dict[WorkspaceType, Runtime] | None = None  # which runtime serves each type
        self._locks: dict[str, anyio.Lock] = {}
        # uid -> that user's own public key, authorised in their workspaces (the daemon sets it:
        # userkeys.UserKeys.public_key); in process, only the server's key is.
        self.owner_keys: Callable[[int], str] | None = None

    # Set-up ------------------------------------------------------------------------------------

    async def __aenter__(self) -> WorkspaceManager:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the state dir and client key, pick the runtimes, reconcile the registry with reality."""
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
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
        host, port = runtime.endpoint(r) if runtime is not None else (r.ip, 22)
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
            workspace_dir=onboarding.workspace_dir_inside(r.user),
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
            workspace_dir=onboarding.workspace_dir_inside(r.user),
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
            if runtime is None or record.state in ("stopped", "error"):
                continue
            if lock_is_held(self._lock_path(record.name)):
                continue
            if record.state == "running" and (await runtime.status(record)).running:
                continue
            why = {
                "creating": "creation was interrupted (the server exited); destroy_workspace it",
                "starting": "the server exited while starting it; call start_workspace",
                "stopping": None,  # the stop is finished now
                "running": "found stopped when the server started",
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

    def _stopped(self, runtime: Runtime, record: WorkspaceRecord, error: str | None) -> WorkspaceRecord:
        """``record`` as stopped: the runtime forgets what only a running workspace has."""
        record = runtime.mark_stopped(record)
        record.state, record.last_error = "stopped", error
        return record

    async def _sync_hosts(self) -> None:
        """Keep 'workspace-NAME' resolvable on the host for workspaces on this host's bridge."""
        on_bridge = [r for r in self.runtimes.values() if r.host_network]
        if not on_bridge:
            return
        data = await self.registry.read()
        names = {r.name for r in on_bridge}
        entries = {n: r.ip for n, r in data.workspaces.items() if r.runtime in names and r.state != "creating"}
        await on_bridge[0].ctx.network.publish_names(entries)

    async def _refresh(self, record: WorkspaceRecord) -> WorkspaceRecord:
        """Notice a workspace that died behind our back."""
        if record.state == "running":
            runtime = self.runtimes.get(record.runtime)
            if runtime is not None and not (await runtime.status(record)).running:
                async with self._locked(record.name):
                    record = await self.registry.get(record.name)
                    if record.state == "running" and not (await runtime.status(record)).running:
                        await runtime.stop(record)
                        await self.ssh.drop(record.name)
                        record = self._stopped(runtime, record, "the workspace exited")
                        await self.registry.put(record)
        return record

    # Lifecycle ---------------------------------------------------------------------------------

    async def create(
        self, spec: CreateSpec, progress: Progress = no_progress, *, owner_uid: int | None = None
    ) -> Workspace:
        """Register, prepare and (if ``spec.start``) start a new workspace.

        Validation happens before anything changes. On failure or cancellation
        everything created is removed again. ``owner_uid`` is recorded as the creator.

        Raises:
            InvalidSpec: bad name, type, packages or IP.
            WorkspaceExists: the name is taken.
            Conflict: the IP (or the name's derived MAC/CID) is in use; another user's kept data has the name.
            BackendError: building, declaring or booting failed (the message has the log tail).
        """
        t0 = time.monotonic()
        name = spec.name
        validate_name(name)
        runtime = self._runtime_for_type(spec.type)
        packages = validate_packages(spec.packages, runtime.package_flavour)
        limits = self._limits(runtime, spec.type, spec.cpus, spec.memory_mib)
        live = await runtime.addresses_in_use()
        async with self._locked(name):
            record = await anyio.to_thread.run_sync(
                self._register, spec, packages, live, runtime, limits, owner_uid
            )
            paths = self._paths(name)
            existed = paths.root.exists()
            prepared = started = False
            try:
                fingerprint = await anyio.to_thread.run_sync(
                    lambda: provision.prepare_state_dirs(self.settings, record, self._authorized_keys(record))
                )
                record = record.model_copy(update={"host_key_fingerprint": fingerprint})
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
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._undo_create(record, runtime, prepared, started, existed)
                raise
        return self.view(record)

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
        return Limits(cpus=float(cpus), memory_mib=memory_mib, tasks=s.tasks_max)

    def _register(
        self,
        spec: CreateSpec,
        packages: list[str],
        live: set[str],
        runtime: Runtime,
        limits: Limits | None = None,
        owner_uid: int | None = None,
    ) -> WorkspaceRecord:
        name = spec.name
        with self.registry.transaction_sync() as data:
            if name in data.workspaces:
                raise WorkspaceExists(name)
            check_identity_collisions(name, {n: (r.mac, r.cid) for n, r in data.workspaces.items()})
            taken = {r.ip for r in data.workspaces.values()} | live
            record = WorkspaceRecord(
                name=name,
                type=spec.type,
                state="creating",
                runtime=runtime.name,
                ip=allocate_ip(self.settings.subnet, taken, spec.ip),
                mac=mac_for(name),
                cid=cid_for(name),
                user=self.settings.user,
                owner_uid=owner_uid,
                packages=packages,
                egress=spec.egress,
                limits=limits,
            )
            runtime.validate(record)
            record = runtime.assign(record, [r for n, r in data.workspaces.items() if n != name])
            data.workspaces[name] = record
        return record

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
            timings.boot_s = round(time.monotonic() - t_boot, 3)
            await progress("waiting for SSH (pinned host key)", 0.5)
            t_ssh = time.monotonic()
            await self._wait_ssh(record, runtime)
            timings.ssh_s = round(time.monotonic() - t_ssh, 3)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(Exception):
                    await runtime.stop(record, force=True)  # it never ran for anyone: nothing to shut down cleanly
                await self.ssh.drop(record.name)
                record = self._stopped(runtime, record, str(exc)[-2000:] or type(exc).__name__)
                await self.registry.put(record)
            raise
        timings.total_s = round(time.monotonic() - t0, 3)
        record.state, record.started_at, record.timings = "running", utcnow(), timings
        await self.registry.put(record)
        await progress("workspace running", 1.0)
        return record

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
        await self.ssh.drop(record.name)
        await runtime.stop(record)
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
            await self.registry.put(record)
        return self.view(record)

    async def destroy(self, name: str, keep_data: bool = False, *, owner_uid: int | None = None) -> DestroyResult:
        """Stop and remove a workspace: runtime artefacts, registry entry and (unless keep_data) its host dirs.

        Raises:
            WorkspaceNotFound (also: another owner's), BackendError.
        """
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            runtime = await self._halt(record)
            await runtime.destroy(record)
            paths = self._paths(name)
            if keep_data:
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(paths.runtime, ignore_errors=True))
            else:
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(paths.root, ignore_errors=True))
            await self.registry.remove(name)
            if runtime.host_network:
                await runtime.ctx.network.retire()  # our firewall tables go with the last workspace
        await self._sync_hosts()
        with contextlib.suppress(FileNotFoundError):
            self._lock_path(name).unlink()
        self._locks.pop(name, None)
        return DestroyResult(name=name, destroyed=True, kept_data=keep_data)

    async def list(self, *, owner_uid: int | None = None) -> WorkspaceList:
        """All registered workspaces (those of ``owner_uid`` if given), with dead ones noticed."""
        data = await self.registry.read()
        mine = [r for r in data.workspaces.values() if owner_uid is None or r.owner_uid == owner_uid]
        records = [await self._refresh(r) for r in mine]
        return WorkspaceList(workspaces=[self.view(r) for r in sorted(records, key=lambda r: r.name)])

    async def status(self, name: str, *, owner_uid: int | None = None) -> WorkspaceStatus:
        """The workspace plus what its runtime reports right now. Raises WorkspaceNotFound."""
        record = owned(await self._refresh(owned(await self.registry.get(name), owner_uid)), owner_uid)
        detail = await self._runtime_of(record).status(record)
        return WorkspaceStatus(**self.view(record).model_dump(), runtime=detail)

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
        record = owned(await self.registry.get(name), owner_uid)
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
        *,
        owner_uid: int | None = None,
    ) -> ExecResult:
        """Run a shell command as the workspace user. See :meth:`ssh.SSHPool.exec`.

        Each stream keeps its head and tail within what a result carries (:func:`budget.exec_keep`,
        at most ``exec_output_cap``); a longer one is saved whole in the workspace (``exec_save_mib``).
        """
        record = await self._running(name, owner_uid)
        budget_bytes = self.settings.result_budget_bytes
        keep = min(self.settings.exec_output_cap, budget.exec_keep(budget_bytes))
        return await self._ssh_call(
            record,
            lambda t: self.ssh.exec(
                t, command, cwd=cwd, env=env, stdin=stdin, timeout_s=timeout_s, output_cap=keep,
                save_max=self.settings.exec_save_mib << 20, save_over=min(keep, budget.exec_save_over(budget_bytes)),
            ),
        )  # fmt: skip

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
