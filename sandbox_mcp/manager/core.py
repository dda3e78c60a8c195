"""The manager's core: set-up (runtimes, client key), the registry and its locks, what a workspace looks
like to the tools (view), how it is reached (SSH target), and the reconcile after a server exited.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Self

import anyio

from .. import claude_workspace, ssh
from ..config import Settings
from ..errors import InvalidSpec, InvalidState, SandboxError, WorkspaceNotFound
from ..fsutil import async_file_lock, lock_is_held, own_dir
from ..hostnet import HostNetwork
from ..models import SSHInfo, Workspace, WorkspaceRecord, WorkspaceType
from ..naming import validate_name
from ..ownership import owned
from ..paths import WorkspacePaths
from ..ports import PortForwarder
from ..registry import Registry
from ..runtimes import Mode, Runtime, RuntimeContext, build_runtimes, resolve_mode, type_table
from ..secrets.service import SecretsService
from .pool import WarmPool
from .watchdog import watch_host_services

__all__ = ["ManagerCore"]

log = logging.getLogger("sandbox_mcp.manager")  # one logger for the manager, as before the split


class ManagerCore:
    """What every part of the manager stands on (see :class:`~sandbox_mcp.manager.WorkspaceManager`)."""

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
        # The long-running process's own work: the pool's refills, the host services' watchdog.
        self._background: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> Self:
        if self._serve_ports:
            await self.ports.__aenter__()
        try:
            await self.open()
            if self._serve_ports:
                await self._restore_ports()
            if self.pool.keep:
                await self.pool.take_over()  # what a killed keeper left
            refill = self.pool.keep and self.settings.pool_size > 0
            if refill or self._serve_ports:
                self._background = anyio.create_task_group()
                await self._background.__aenter__()
                if refill:
                    self._background.start_soon(self.pool.run)
                if self._serve_ports:
                    network = self._host_network()
                    self._background.start_soon(watch_host_services, [network] if network else [], self.secrets,
                                                self._restore_firewall)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        cancelled: BaseException | None = None
        try:
            if self._background is not None:
                tasks, self._background = self._background, None
                tasks.cancel_scope.cancel()
                try:
                    await tasks.__aexit__(None, None, None)
                except anyio.get_cancelled_exc_class() as exc:
                    # A server stops by cancellation (stdin closed, a signal): its slots must go all the same,
                    # or they would run on, unseen.
                    cancelled = exc
            with anyio.CancelScope(shield=True):
                await self.pool.close()
            await self.close()
        finally:
            if self.ports.serving:
                await self.ports.__aexit__(None, None, None)
        if cancelled is not None:
            raise cancelled

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

    def _host_network(self) -> HostNetwork | None:
        """This host's bridge and firewall, one for all of this manager's runtimes (RuntimeContext); None where
        no runtime puts workspaces on it."""
        return next((r.ctx.network for r in self.runtimes.values() if r.host_network), None)

    async def _restore_firewall(self) -> list[str]:
        """If our firewall tables went missing while workspaces of this host's bridge run (or hold fewer ports
        than run), load them again and admit each running workspace anew (under its lock: a stop or start
        meanwhile has the last word); the names admitted again. Never raises for one workspace: it is logged,
        and the others go on.

        Raises:
            Conflict, BackendError: the tables could not be loaded.
        """
        network = self._host_network()
        if network is None:
            return []
        on_bridge = {name: r for name, r in self.runtimes.items() if r.host_network}
        data = await self.registry.peek_all()
        running = [r.name for r in data.workspaces.values()
                   if r.runtime in on_bridge and r.state in ("running", "paused")]
        if not running or not await network.restore_tables(len(running)):
            return []
        admitted = []
        for name in running:
            async with self._locked(name):
                with contextlib.suppress(WorkspaceNotFound):  # destroyed meanwhile
                    record = await self.registry.get(name)
                    if record.state not in ("running", "paused"):
                        continue  # stopped meanwhile
                    try:
                        await on_bridge[record.runtime].set_egress(record)
                        admitted.append(name)
                    except SandboxError as exc:
                        log.warning("firewall tables loaded again, but %s could not be admitted: %s", name, exc)
        return admitted

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
        data = await self.registry.peek_all()  # read only: every create and destroy calls this
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
