"""The workspace lifecycle: create (a boot, or a claim from the warm pool) → start → stop → destroy, with
the checks before anything changes (names, limits, the owner's fair share) and the undo of a create or
start that fails or is cancelled; list, status, logs, and a running workspace's egress.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .. import diskimage, gitflow, hostgit, provision, ssh
from .. import egress as egress_policy
from ..egress import Egress
from ..errors import (
    BackendError,
    CommandTimeout,
    InvalidSpec,
    InvalidState,
    LimitExceeded,
    SandboxError,
    WorkspaceExists,
)
from ..hostnet.listening import connect_when_listening
from ..models import (
    MAX_CPUS,
    MAX_MEMORY_MIB,
    MIN_CPUS,
    CreateSpec,
    DestroyResult,
    Limits,
    LogsResult,
    RepoInfo,
    Timings,
    Workspace,
    WorkspaceList,
    WorkspaceRecord,
    WorkspaceStatus,
    WorkspaceType,
    utcnow,
)
from ..naming import (
    allocate_ip,
    check_identity_collisions,
    cid_for,
    mac_for,
    validate_name,
    validate_packages,
)
from ..ownership import owned
from ..progress import Progress, no_progress
from ..runtimes import Runtime
from ..secrets.service import check_script_result

if TYPE_CHECKING:
    from . import WorkspaceManager as _Manager
else:
    _Manager = object

__all__ = ["LifecycleOps"]


def _host_memory_mib() -> int:
    """The host's memory (MemTotal), MiB."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return 1 << 22


# Where a create's progress stands once its image is ready; the start takes it from there to the end.
_PREPARED = 0.6

# How often a boot that SSH does not answer yet is checked for a workspace that died: a runtime's status is
# ~0.1 ms of this process's CPU, and with 30 booting at once for seconds each, 10 a second were 30 per create.
_DIED_CHECK_S = 0.25


def _span(progress: Progress, lo: float, hi: float) -> Progress:
    """``progress`` for one phase of a longer task: its fractions 0..1 land in ``lo``..``hi`` of the
    whole, so the phases of a create report on one scale (messages without a fraction stay so)."""

    async def report(message: str, fraction: float | None = None) -> None:
        await progress(message, None if fraction is None else lo + (hi - lo) * min(max(fraction, 0.0), 1.0))

    return report


class LifecycleOps(_Manager):
    """create, start, stop, destroy, list, status, logs, set_egress."""

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
        slot (see :mod:`sandbox_mcp.manager.pool`), whose name no user can give."""
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
                # Not written yet: the record says "creating" until prepared, and an interrupted create is
                # destroyed by name, so its host key's fingerprint is written with the next state.
                record = await self._provision(record, self.secrets.environment(record.secrets))
                t_image = time.monotonic()
                await progress("preparing the root image (cached after the first time)", 0.0)
                record = await runtime.prepare(record, _span(progress, 0.0, _PREPARED))
                prepared = True
                record.state = "stopped"
                record.timings = Timings(image_s=round(time.monotonic() - t_image, 3))
                if spec.start:  # _start writes the record ("starting") first: one registry write here, not two
                    started = True
                    record = await self._start(record, runtime, _span(progress, _PREPARED, 1.0), t0)
                else:
                    await self.registry.put(record)
                # After the boot, not before it: the name resolves on the host before anyone can use it
                # either way, and a cold create waits ~1 ms less.
                await self._sync_hosts()
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
            self.ssh.start_agent_soon(self._target(record))  # while this call finishes and the next arrives
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
                        await anyio.sleep(_DIED_CHECK_S)
                        if not (await runtime.status(record)).running:
                            died = True
                            break
                except SandboxError as exc:
                    failure = exc
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                # Refused connects first (a SYN and a RST each), one login once sshd listens, on the connection
                # that found it listening: a login attempt per poll was most of this process's CPU with 30
                # workspaces booting (hostnet/listening.py).
                target, waited = self._target(record), time.monotonic()
                sock = await connect_when_listening(target.host, target.port, self.settings.boot_timeout_s)
                left = self.settings.boot_timeout_s - (time.monotonic() - waited)
                await self.ssh.wait_ready(target, max(1.0, left), sock=sock)
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
