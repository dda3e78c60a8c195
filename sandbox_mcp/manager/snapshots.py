"""Pause, snapshots, restores and forks: the files' side (snapshots.py) and the runtime's (freeze, root
layers, VM memory), with the owner's snapshot bound and the recovery of one a killed server left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

from .. import agentfiles, diskimage, snapshots
from ..errors import Conflict, InvalidState, SandboxError, Unsupported, WorkspaceExists
from ..fsutil import async_file_lock
from ..models import (
    CreateSpec,
    SnapshotDeleted,
    SnapshotInfo,
    SnapshotList,
    Timings,
    Workspace,
    WorkspaceRecord,
    utcnow,
)
from ..naming import agent_uid_for, validate_name
from ..ownership import owned
from ..progress import Progress, no_progress
from ..runtimes import GuestExec, Runtime

if TYPE_CHECKING:
    from . import WorkspaceManager as _Manager
else:
    _Manager = object

__all__ = ["SnapshotOps"]

log = logging.getLogger("sandbox_mcp.manager")  # one logger for the manager, as before the split


class SnapshotOps(_Manager):
    """pause, resume, snapshot, list_snapshots, delete_snapshot, restore, fork."""

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
