"""The warm pool: booted, unclaimed workspaces of the default spec that a create claims instead of booting.

A slot is a real workspace under a name no user can give (:func:`~sandbox_mcp.naming.pool_slot_name`):
its own uid range, cgroup, veth and firewall port, egress ``none``, no owner, marked ``pooled`` in
the registry, which hides it from every tool (:func:`~sandbox_mcp.ownership.owned`, ``list``).

A create the pool can serve (:meth:`WarmPool.fits`: the default type, packages and limits, no
static address, no secrets) claims one, whoever its owner:

1. its state directory ``<state>/<slot>`` is renamed to ``<state>/<name>`` (the mounts the
   running container uses are below it and move along);
2. one registry transaction renames the record and gives it its owner and egress (two claims
   of one slot, or of one name, cannot both win);
3. the directories are provisioned again for the new record (authorized keys, Claude config, the
   owner's ids);
4. the runtime mounts the shares in for that owner and sets the host name and ``/etc/hosts`` inside
   (:meth:`~sandbox_mcp.runtimes.base.Runtime.claim`), the firewall takes the egress asked for, and
   the SSH connection (and exec agent) opened when the slot booted is kept under the new name.

What the runtime made on the host from the slot's name (machine name, veth, cgroup, tag) keeps it
(:meth:`~sandbox_mcp.runtimes.base.Runtime.slot_claimed`). A claim that fails half-way destroys the
slot and the create boots instead. The process that runs the pool (``serve``, the daemon:
``WorkspaceManager(keep_pool=True)``) refills it in the background, one boot at a time, and
destroys its slots when it exits; any process (the CLI too) may claim.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import TYPE_CHECKING

import anyio

from .. import agentfiles, supervise
from ..errors import SandboxError, WorkspaceExists
from ..models import CreateSpec, Limits, Timings, WorkspaceRecord, utcnow
from ..naming import pool_slot_name
from ..progress import Progress, no_progress
from ..runtimes.base import Runtime

if TYPE_CHECKING:
    from . import WorkspaceManager

__all__ = ["WarmPool"]

log = logging.getLogger(__name__)

_RETRY_MAX_S = 60.0  # longest pause between refills that fail (a host out of room, a broken image)
# A refill waits this long after a claim: a boot takes a core for a while, and the workspace just claimed
# is about to get its first commands.
_SETTLE_S = 0.5


class WarmPool:
    """The warm pool of one manager: which creates it serves, claims, and (in the holder) the refill."""

    def __init__(self, manager: WorkspaceManager, *, keep: bool) -> None:
        self.manager = manager
        self.keep = keep  # this process refills the pool and destroys its slots at exit
        self.holder = supervise.identify(os.getpid())  # what its slots record as their keeper
        self._wanted = anyio.Event()

    @property
    def size(self) -> int:
        return self.manager.settings.pool_size

    def runtime(self) -> Runtime | None:
        """The runtime of the default type, if it can keep a pool; else None."""
        try:
            runtime = self.manager._runtime_for_type("container")
        except SandboxError:
            return None
        return runtime if runtime.has_pool else None

    def why_not(self) -> str | None:
        """Why this server keeps no pool (None: it does, or may)."""
        if self.size == 0:
            return "pool_size is 0"
        if self.runtime() is None:
            return f"the container runtime of {self.manager.mode} mode cannot keep a pool"
        if self.manager.settings.host_disk_mib is not None:
            return "host_disk_mib is set (each workspace's state dir is a disk image of its own)"
        return None

    def _default_limits(self, runtime: Runtime) -> Limits:
        return self.manager._limits(runtime, "container", None, None)

    def fits(self, spec: CreateSpec, runtime: Runtime, packages: list[str], limits: Limits,
             owner_uid: int | None) -> bool:
        """Whether a slot can become the workspace ``spec`` asks for: what a slot was booted with (the
        default type, no packages, the default limits), no static address or secrets, a name with no
        kept data, and a Claude config the owner may have (a slot's is seeded as a workspace without owner's).
        Another owner's files are fine: the claim maps the shares anew (see :meth:`Runtime.claim`)."""
        if not runtime.has_pool or self.why_not() is not None:
            return False
        if spec.type != "container" or packages or spec.ip is not None or spec.secrets or not spec.start:
            return False
        if limits != self._default_limits(runtime):
            return False
        if self.manager._paths(spec.name).root.exists():  # kept data: adopted by a cold create
            return False
        # A slot's Claude config holds the server's credentials when configured, which only root's may get.
        return owner_uid in (None, 0) or not self.manager.settings.copy_claude_credentials

    # -- claim ------------------------------------------------------------------------------------

    async def claim(self, spec: CreateSpec, runtime: Runtime, owner_uid: int | None,
                    progress: Progress = no_progress) -> WorkspaceRecord | None:
        """Make a ready slot the workspace ``spec`` names; None when no slot is ready (or one failed half-way:
        it is destroyed), and the caller boots one instead.

        Raises:
            WorkspaceExists: the name is taken. LimitExceeded: the owner's fair share is used up.
        """
        t0 = time.monotonic()
        m = self.manager
        for slot in await self._ready_slots(runtime):
            async with m._locked(slot), m._locked(spec.name):
                taken = await self._take(slot, spec, runtime, owner_uid)
                if taken is None:
                    continue
                record, remap = taken
                try:
                    await progress("claiming a booted workspace from the warm pool", 0.5)
                    record = await self._hand_over(slot, record, runtime, remap, t0)
                except BaseException as exc:
                    with anyio.CancelScope(shield=True):
                        log.warning("pool: claiming %s as %s failed, destroying it: %s", slot, spec.name, exc)
                        await m._undo_create(record, runtime, prepared=True, started=True, existed=False)
                    if not isinstance(exc, Exception):
                        raise
                    return None
                finally:
                    self.wake()
            with contextlib.suppress(FileNotFoundError):  # the slot's name is gone for good
                m._lock_path(slot).unlink()
            m._locks.pop(slot, None)
            return record
        self.wake()
        return None

    async def _ready_slots(self, runtime: Runtime, *, mine: bool = False) -> list[str]:
        """Slots ready to claim (anyone's; ``mine``: those this process keeps)."""
        data = await self.manager.registry.read()
        limits = self._default_limits(runtime)
        return sorted(n for n, r in data.workspaces.items()
                      if r.pooled and r.state == "running" and r.runtime == runtime.name and r.limits == limits
                      and (not mine or r.pool_holder == self.holder))

    async def _take(self, slot: str, spec: CreateSpec, runtime: Runtime,
                    owner_uid: int | None) -> tuple[WorkspaceRecord, bool] | None:
        """Rename the slot's directory and record to ``spec.name``; and whether its shares must be mapped
        anew (the new owner's files are another host identity's). None: the slot went meanwhile, or it
        cannot map its shares anew (a privileged container)."""
        m = self.manager
        settings = m.settings
        new_root = m._paths(spec.name).root
        old_root = m._paths(slot).root

        def take() -> tuple[WorkspaceRecord, bool] | None:
            with m.registry.transaction_sync() as data:
                found = data.workspaces.get(slot)
                if found is None or not found.pooled or found.state != "running" or new_root.exists():
                    return None
                if not old_root.is_dir():  # a holder killed mid-claim moved it: the refill loop drops the slot
                    data.workspaces[slot] = found.model_copy(update={"state": "error"})
                    return None
                if spec.name in data.workspaces:
                    raise WorkspaceExists(spec.name)
                if owner_uid not in (None, 0):
                    m._check_share(owner_uid, [r for r in data.workspaces.values() if r.owner_uid == owner_uid],
                                   found.limits)
                record = found.model_copy(update={
                    "name": spec.name, "pooled": False, "owner_uid": owner_uid, "egress": spec.egress,
                    "state": "starting", "created_at": utcnow(), "last_error": None,
                })
                runtime.validate(record)  # the egress asked for is allowed here (NAT)
                remap = agentfiles.files_identity(settings, record) != agentfiles.files_identity(settings, found)
                if remap and found.isolation != "unprivileged-container":
                    return None  # a privileged container's binds show host ids as they are: boot one
                record = runtime.slot_claimed(record, slot)
                os.rename(old_root, new_root)  # before the registry is written: it names the new place
                del data.workspaces[slot]
                data.workspaces[spec.name] = record
                return record, remap

        return await anyio.to_thread.run_sync(take)

    async def _hand_over(self, slot: str, record: WorkspaceRecord, runtime: Runtime, remap: bool,
                         t0: float) -> WorkspaceRecord:
        """Provision the renamed slot for its new record and give it its name inside (see the module doc)."""
        m = self.manager
        record = await m._provision(record)  # the shares become the new owner's (or its own uid's) here
        await runtime.claim(record, remap_shares=remap)
        if record.egress != "none":
            await runtime.set_egress(record)
        m.ssh.rekey(slot, m._target(record))
        timings = Timings(total_s=round(time.monotonic() - t0, 3), from_pool=True)
        record = record.model_copy(update={"state": "running", "started_at": utcnow(), "timings": timings})
        await m.registry.put(record)
        await m._sync_hosts()
        return record

    # -- the holder's side: refill and clean up ----------------------------------------------------

    def wake(self) -> None:
        """Ask the refill loop to look again (after a claim)."""
        self._wanted.set()

    async def run(self) -> None:
        """Keep ``pool_size`` slots ready, one boot at a time, until cancelled. Failures are logged and retried
        with a growing pause; they never end the server."""
        runtime = self.runtime()
        if not self.keep or runtime is None:
            return
        pause = 1.0
        while True:
            self._wanted = anyio.Event()
            await self._drop_dead()
            if self.why_not() is None and len(await self._ready_slots(runtime, mine=True)) < self.size:
                try:
                    await self._fill(runtime)
                    pause = 1.0
                    continue
                except Exception as exc:  # noqa: BLE001 - a refill failure must not end the server
                    log.warning("pool: booting a slot failed (again in %.0f s): %s", pause, str(exc)[-500:] or exc)
                    with anyio.move_on_after(pause):
                        await self._wanted.wait()
                    pause = min(pause * 2, _RETRY_MAX_S)
                    continue
            await self._wanted.wait()
            await anyio.sleep(_SETTLE_S)

    async def _fill(self, runtime: Runtime) -> None:
        slot = pool_slot_name()
        spec = CreateSpec.model_construct(name=slot)  # the defaults, under a name no user can give
        m = self.manager
        record = await m._create(spec, runtime, [], self._default_limits(runtime), no_progress, None,
                                 time.monotonic(), None, pooled=True)
        # The exec agent starts on a connection's first command (a Python start inside, tens of ms): done
        # now, the claimer's first exec finds it running.
        await m.ssh.exec(m._target(record), "true", timeout_s=30)

    def _orphaned(self, r: WorkspaceRecord) -> bool:
        """A slot whose keeper is gone (killed, or of before keepers were recorded)."""
        return r.pooled and r.pool_holder != self.holder and not supervise.alive(r.pool_holder)

    async def take_over(self) -> None:
        """At the keeper's start: slots a killed keeper left are adopted when they run and are of today's spec
        and image, destroyed otherwise (all of them when this server keeps no pool). Another live server's
        slots are its own business."""
        runtime = self.runtime()
        limits = self._default_limits(runtime) if runtime is not None else None
        data = await self.manager.registry.read()
        for name, r in data.workspaces.items():
            if not self._orphaned(r):
                continue
            fresh = runtime is not None and self.size > 0 and r.runtime == runtime.name and r.limits == limits
            if fresh and r.state == "running" and runtime is not None and (await runtime.status(r)).running and (
                    runtime.root_base(r) == runtime.default_root_base()):
                await self._adopt(name)
            else:
                await self._destroy(name)

    async def _adopt(self, slot: str) -> None:
        def adopt() -> None:
            with self.manager.registry.transaction_sync() as data:
                r = data.workspaces.get(slot)
                if r is not None and self._orphaned(r):
                    data.workspaces[slot] = r.model_copy(update={"pool_holder": self.holder})

        await anyio.to_thread.run_sync(adopt)

    async def _drop_dead(self) -> None:
        """Slots found stopped (a reconcile saw them die) or left half-made: nobody will claim them."""
        data = await self.manager.registry.read()
        for name, r in data.workspaces.items():
            if r.pooled and r.state in ("stopped", "error"):
                await self._destroy(name)

    async def _destroy(self, slot: str) -> None:
        with contextlib.suppress(SandboxError):
            await self.manager._destroy_slot(slot)

    async def close(self) -> None:
        """The keeper destroys its slots (they would idle unseen otherwise), and those a killed keeper left;
        another live server's stay."""
        if not self.keep:
            return
        data = await self.manager.registry.read()
        slots = [n for n, r in data.workspaces.items() if r.pooled and (r.pool_holder == self.holder or self._orphaned(r))]
        async with anyio.create_task_group() as tg:
            for slot in slots:
                tg.start_soon(self._destroy, slot)
