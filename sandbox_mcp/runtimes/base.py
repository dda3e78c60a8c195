"""The small interface every runtime implements; the manager calls nothing else.

A runtime realises workspaces of some types (``types``) in one mode (``modes``): nspawn
containers, qemu VMs and Incus instances in direct mode, the NixOS module's units in nixos
mode. It is built from one :class:`RuntimeContext` (settings plus the host services it may
use) and keeps whatever it must remember about a workspace (PIDs, an image key, an instance
name) in its own typed :attr:`Runtime.State`, stored on the record as ``runtime_state``.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, ValidationError

from ..config import Settings, moved_name
from ..egress import Egress
from ..errors import BackendError, InvalidSpec, InvalidState, Unsupported
from ..models import MIN_MEMORY_MIB, Check, ExecResult, Limits, RuntimeDetail, WorkspaceRecord, WorkspaceType
from ..progress import Progress, no_progress

if TYPE_CHECKING:
    from ..hostnet import HostNetwork
    from ..images.store import ImageStore

__all__ = [
    "Endpoint",
    "ImageRootRuntime",
    "ImageRootState",
    "GuestExec",
    "Mode",
    "NetworkNeeds",
    "ON_THE_SUBNET",
    "PackageFlavour",
    "Progress",
    "Runtime",
    "RuntimeContext",
    "RuntimeSettings",
    "RuntimeState",
    "hosts_file",
    "resolv_conf",
    "log_tail_lines",
    "no_progress",
]

Mode = Literal["direct", "nixos"]
# Runs a shell command in the workspace as its user, from "/" (the manager's SSH pool): what a runtime is
# handed when it must act inside the guest.
GuestExec = Callable[[str], Awaitable[ExecResult]]
PackageFlavour = Literal["debian", "nix"]


_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_LOG_TAIL_BYTES = 256 * 1024


def log_tail_lines(path: Path) -> list[str] | None:
    """The lines of the last 256 KiB of a console log, colour codes and carriage returns removed
    (what ``workspace_logs`` shows); None when the file does not exist. Blocking."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _LOG_TAIL_BYTES))
            text = f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    return _ANSI_RE.sub("", text).replace("\r", "").splitlines()


def hosts_file(name: str, host_ip: str) -> str:
    """/etc/hosts for the workspace: its own name resolves (sudo needs that), and so does the host."""
    return f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n{host_ip}\tsandbox-host\n::1\tlocalhost ip6-localhost\n"


def resolv_conf(egress: Egress, host_ip: str) -> str:
    """/etc/resolv.conf for the workspace: with a domain list, the egress resolver on the bridge (its DNS to any
    address goes there anyway); otherwise the host's own resolvers, as the image had them."""
    if isinstance(egress, list):
        return f"# sandbox-mcp: the egress resolver (answers the names on this workspace's list)\nnameserver {host_ip}\n"
    from ..hostnet.firewall import host_nameservers

    return "".join(f"nameserver {a}\n" for a in host_nameservers()) or f"nameserver {host_ip}\n"


class Endpoint(NamedTuple):
    """Where the server reaches a workspace's sshd."""

    host: str
    port: int = 22


class NetworkNeeds(NamedTuple):
    """What a workspace needs of the workspace network, allocated by the manager on create (inside the
    registry transaction, unique among the registered workspaces) and kept on its record."""

    address: bool = False  # record.ip: an IPv4 address of the workspace subnet (settings.subnet)
    mac: bool = False  # record.mac: the MAC derived from its name (naming.mac_for)
    vsock_cid: bool = False  # record.cid: the vsock CID derived from its name (naming.cid_for)


ON_THE_SUBNET = NetworkNeeds(address=True, mac=True)  # a NIC with a static address on the workspace subnet


class RuntimeSettings(BaseModel):
    """A runtime's own settings: its section ``[runtimes.NAME]`` of the settings file (in the environment
    ``SANDBOX_MCP_RUNTIMES_NAME_FIELD``). Subclass it per runtime (``Runtime.Config``); every field needs a
    default that works, and unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    section: ClassVar[str] = ""  # the runtime name whose section it reads by default

    @classmethod
    def of(cls, settings: Settings, name: str | None = None) -> Self:
        """Section ``[runtimes.NAME]`` of ``settings`` (``name`` or :attr:`section`), validated.

        Raises:
            InvalidSpec: a value fails validation, or a key is unknown (the message names section and field).
        """
        name = name or cls.section
        try:
            return cls.model_validate(settings.runtimes.get(name, {}))
        except ValidationError as exc:
            raise _settings_error(name, exc) from exc


def _settings_error(runtime: str, exc: ValidationError) -> InvalidSpec:
    """``exc`` as one message naming the section and each field (and the field's old name, if it had one)."""
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(the section)"
        old = moved_name(runtime, str(err["loc"][0])) if err["loc"] else None
        problems.append(f"{field}{f' (old name {old})' if old else ''}: {err['msg']}")
    where = f"[runtimes.{runtime}] (SANDBOX_MCP_RUNTIMES_{runtime.upper()}_*)"
    return InvalidSpec(f"invalid settings in {where}: " + "; ".join(problems))


class RuntimeState(BaseModel):
    """A runtime's private state of one workspace. Subclass it per runtime; unknown keys are ignored."""

    model_config = ConfigDict(extra="ignore")


@dataclass(frozen=True)
class RuntimeContext:
    """Everything a runtime is built from: the settings and the host services it may use.

    ``network`` (the bridge, NAT, the hosts file; per-workspace links) and ``images`` (the
    cached image store) are shared by all runtimes of one manager. ``client_public_key`` is the
    server's SSH client key line, for runtimes that must put it somewhere themselves.
    """

    settings: Settings
    network: HostNetwork
    images: ImageStore
    client_public_key: str

    @classmethod
    def for_settings(cls, settings: Settings, client_public_key: str) -> RuntimeContext:
        """A context with fresh host services for ``settings`` (nothing is touched on the host yet)."""
        from ..hostnet import HostNetwork
        from ..images.store import ImageStore

        return cls(settings, HostNetwork(settings), ImageStore(settings.image_dir), client_public_key)


class Runtime(ABC):
    """Realises workspaces of some types. Stateless between calls: the record carries the state.

    Every method may raise :class:`~sandbox_mcp.errors.BackendError` (or a subclass)
    with a message that says what failed and how to fix it.
    """

    name: ClassVar[str]
    types: ClassVar[frozenset[WorkspaceType]]
    modes: ClassVar[frozenset[Mode]]
    package_flavour: ClassVar[PackageFlavour] = "debian"
    # True when the runtime's workspaces sit on this host's bridge (their names go into the hosts file).
    host_network: ClassVar[bool] = False
    # True when the workspace runs a kernel of its own (a VM): its /proc/vmstat counts its OOM kills only.
    own_kernel: ClassVar[bool] = False
    State: ClassVar[type[RuntimeState]] = RuntimeState
    # Its own settings section, [runtimes.<name>]: read into ``self.config`` when it is built.
    Config: ClassVar[type[RuntimeSettings]] = RuntimeSettings
    # True when a snapshot of a running workspace should first flush the guest's own caches (``sync``
    # inside): a VM's page cache is invisible to the host; a container's is the host's.
    sync_before_capture: ClassVar[bool] = False
    # Whether capture_root works: snapshot, restore and fork are refused up front when it does not.
    has_snapshots: ClassVar[bool] = False
    # Whether a snapshot can keep the running state too (prepare_memory, save_memory, release_memory).
    has_memory_snapshots: ClassVar[bool] = False
    # Whether a running workspace can be renamed and handed over (a warm pool's claim: slot_claimed, claim).
    has_pool: ClassVar[bool] = False

    def __init__(self, ctx: RuntimeContext) -> None:
        """Raises: InvalidSpec: its settings section does not validate (the message names section, field)."""
        self.ctx = ctx
        self.settings = ctx.settings
        self.config = self.config_of(ctx.settings)

    @classmethod
    def config_of(cls, settings: Settings) -> RuntimeSettings:
        """This runtime's section of ``settings``, validated by :attr:`Config`.

        Raises:
            InvalidSpec: a value fails validation, or a key is unknown (the message names section and field).
        """
        return cls.Config.of(settings, cls.name)

    # -- choosing a runtime ---------------------------------------------------------------------

    @classmethod
    def claims_host(cls, settings: Settings) -> bool:
        """True when this host is set up for this runtime's mode (``mode = "auto"`` then picks it)."""
        return False

    # -- state ----------------------------------------------------------------------------------

    def state(self, record: WorkspaceRecord) -> RuntimeState:
        """The runtime's typed view of ``record.runtime_state``."""
        return self.State.model_validate(record.runtime_state)

    def with_state(self, record: WorkspaceRecord, state: RuntimeState) -> WorkspaceRecord:
        """A copy of ``record`` carrying ``state``."""
        return record.model_copy(update={"runtime_state": state.model_dump(mode="json", exclude_none=True)})

    def mark_stopped(self, record: WorkspaceRecord) -> WorkspaceRecord:
        """``record`` with whatever only a running workspace has (PIDs, sockets) forgotten."""
        return record

    def default_limits(self) -> Limits:
        """The limits of a workspace whose create gave none: the settings' container defaults.

        The CPU default is capped at this host's CPUs, so a small host needs no configuration.
        """
        s = self.settings
        return Limits(cpus=min(s.cpus, float(os.cpu_count() or 1)), memory_mib=s.memory_mib, tasks=s.tasks_max)

    def limits_of(self, record: WorkspaceRecord) -> Limits:
        """The limits ``record`` runs with: what create recorded, or (a record from before limits were
        recorded) this runtime's defaults; every bound the runtime adds filled in."""
        return self.complete_limits(record.limits or self.default_limits())

    def min_memory_mib(self, type_: WorkspaceType) -> int:
        """The least memory a workspace of ``type_`` may be given (create refuses less)."""
        return MIN_MEMORY_MIB

    def max_cpus(self) -> float | None:
        """The most CPUs a workspace may be given: this host's count by default; None where this host's
        count bounds nothing (a remote server's own limits apply)."""
        return float(os.cpu_count() or 1)

    def host_workspace_dir(self, record: WorkspaceRecord, local: Path) -> str:
        """Where the workspace dir lives on its host, as tools report it (``host_workspace_dir``).
        ``local`` is its directory under this server's state dir, what most runtimes share."""
        return str(local)

    async def oom_kills(self, record: WorkspaceRecord) -> int | None:
        """How many processes the OOM killer has ended in running workspace ``record`` since it started,
        as the host can tell (its cgroup's counters); None: not from here (see ``own_kernel``)."""
        return None

    def complete_limits(self, limits: Limits) -> Limits:
        """``limits`` (cpus, memory, tasks as create chose them) with every other bound this runtime gives a
        workspace filled in (``disk_mib``), as create records and reports them. Pure. Default: none."""
        return limits

    def network_needs(self, type_: WorkspaceType) -> NetworkNeeds:
        """What a workspace of ``type_`` needs of the workspace network (its address, MAC, vsock CID); the
        manager gives it that and nothing else (record fields it does not need stay None). Default: none,
        for a runtime whose workspaces are reached some other way (then override :meth:`endpoint`)."""
        return NetworkNeeds()

    def endpoint(self, record: WorkspaceRecord) -> Endpoint:
        """Where the manager reaches the workspace's sshd; by default its own address, port 22.

        Raises:
            BackendError: the workspace has no address (its runtime must then say where its sshd is).
        """
        if record.ip is None:
            raise BackendError(f"the {self.name} runtime gives workspace {record.name!r} no address and does not "
                               "say where its sshd is (Runtime.endpoint)")
        return Endpoint(record.ip, 22)

    # -- host -----------------------------------------------------------------------------------

    def checks(self) -> list[Check]:
        """What this runtime needs from the host, for ``sandbox-mcp doctor``. Pure reads."""
        return []

    async def addresses_in_use(self) -> set[str]:
        """IPs in the workspace subnet that are live on this host but may not be in the registry."""
        return set()

    # -- lifecycle ------------------------------------------------------------------------------

    def validate(self, record: WorkspaceRecord) -> None:  # noqa: B027 - optional hook
        """Refuse a new workspace this runtime cannot realise, before anything changes.

        Raises:
            InvalidSpec: with what to change.
        """

    def assigned(self, record: WorkspaceRecord) -> bool:
        """Whether ``record`` has what :meth:`assign` allocates. A record registered by an older
        version may lack it; the manager then assigns it before the next start. Default: True."""
        return True

    def assign(self, record: WorkspaceRecord, others: list[WorkspaceRecord]) -> WorkspaceRecord:
        """Allocate what the runtime needs per workspace (inside the registry transaction, like IPs).

        ``others`` are the registered workspaces. Called on create, and on start for a record that
        is not :meth:`assigned`. Default: nothing to allocate.

        Raises:
            InvalidSpec, Conflict, BackendError: the workspace cannot be realised here (the message says why).
        """
        return record

    @abstractmethod
    async def prepare(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        """Make the workspace startable (build/find the image, declare it, rebuild). Called once, on create."""

    @abstractmethod
    async def start(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        """Launch the workspace and return the updated record (its runtime state).

        Returns once the runtime runs; the manager then waits for SSH.
        """

    @abstractmethod
    async def stop(self, record: WorkspaceRecord, *, force: bool = False) -> None:
        """Stop the workspace and release its runtime resources (processes, links, mounts). Idempotent.

        ``force``: no clean power-off, kill it at once (the workspace is being thrown away, e.g. a
        create undone while its client shuts down)."""

    @abstractmethod
    async def destroy(self, record: WorkspaceRecord) -> None:
        """Undo ``prepare`` (the workspace is already stopped). Idempotent. Host state dirs are the manager's."""

    @abstractmethod
    async def status(self, record: WorkspaceRecord) -> RuntimeDetail:
        """What is running right now. Read-only."""

    @abstractmethod
    async def logs(self, record: WorkspaceRecord, lines: int) -> str:
        """The tail of the workspace's boot/unit log."""

    async def reconcile(self, records: list[WorkspaceRecord]) -> None:  # noqa: B027 - optional hook
        """Clean up what a crashed server left behind (links, namespaces) for workspaces not running."""

    # -- pause and snapshots (optional: the defaults refuse with a clear error) -----------------

    def _cannot(self, what: str) -> Unsupported:
        return Unsupported(
            f"the {self.name} runtime cannot {what}; stop_workspace and start_workspace (the workspace dir "
            "survives) or destroy_workspace are what it offers"
        )

    async def pause(self, record: WorkspaceRecord) -> None:
        """Freeze everything running in the workspace; it keeps its memory and network state, nothing runs.

        Raises:
            Unsupported: this runtime cannot pause.
            BackendError: the freeze did not take.
        """
        raise self._cannot("pause a workspace")

    async def resume(self, record: WorkspaceRecord) -> None:
        """Undo :meth:`pause`; a no-op on a workspace that is not frozen.

        Raises:
            Unsupported, BackendError: as :meth:`pause`.
        """
        raise self._cannot("resume a workspace")

    async def capture_root(self, record: WorkspaceRecord, dest: Path) -> None:
        """Copy the workspace's writable root into ``dest`` (which does not exist yet).

        Running (the manager has paused it): the live layer. Stopped: the layer its next start
        begins from (:attr:`WorkspacePaths.root_layer`, or an empty one). Blocking work is the
        runtime's to put in a thread.

        Raises:
            Unsupported: this runtime (or this kind of workspace) has no root the server can copy.
            BackendError: the copy failed.
        """
        raise self._cannot("snapshot a workspace's root filesystem")

    async def set_egress(self, record: WorkspaceRecord) -> None:
        """Apply ``record.egress`` (already validated with :meth:`validate`) to the running workspace at once,
        without a restart; the manager records it afterwards (a stopped workspace gets it at its next start).

        Raises:
            Unsupported: this runtime cannot change a running workspace's network policy.
            BackendError: the firewall or the resolver refused.
        """
        raise self._cannot("change the network policy of a running workspace")

    def default_root_base(self) -> str | None:
        """What a new workspace of the default spec would boot over today (see :meth:`root_base`): a pool slot
        over anything else is stale."""
        return None

    def slot_claimed(self, record: WorkspaceRecord, slot: str) -> WorkspaceRecord:
        """``record``, a running pool slot just renamed from ``slot`` to its workspace's name, keeping the
        host-side names its parts were made with. Called in the registry transaction of the claim."""
        raise self._cannot("keep a warm pool")

    async def claim(self, record: WorkspaceRecord, *, remap_shares: bool = False) -> None:
        """Give the running, renamed ``record`` its name inside (host name, /etc/hosts); with ``remap_shares``,
        mount its shared directories anew for the identity that owns them now (another owner's).

        Raises:
            BackendError: the slot is gone or the kernel refused; the manager destroys it and boots instead.
        """
        raise self._cannot("keep a warm pool")

    async def prepare_memory(self, record: WorkspaceRecord, guest: GuestExec) -> Any:
        """Ready the running workspace for :meth:`save_memory`; returns what :meth:`release_memory` needs.
        The manager calls release_memory after the save, whatever happened to it.

        Raises:
            Unsupported: no memory snapshots here. InvalidState: not now (the message says why). BackendError.
        """
        raise self._cannot("keep a workspace's running state in a snapshot (memory=true)")

    async def save_memory(self, record: WorkspaceRecord, ticket: Any, dest: Path) -> None:
        """Save the paused workspace's running state into the snapshot's root part ``dest`` (it exists):
        the next start from a root layer holding it resumes from it instead of booting.

        Raises:
            BackendError: the save failed.
        """
        raise self._cannot("keep a workspace's running state in a snapshot (memory=true)")

    async def release_memory(self, record: WorkspaceRecord, ticket: Any) -> None:  # noqa: B027 - optional hook
        """Undo :meth:`prepare_memory` once the workspace runs again."""

    def held_elsewhere_bytes(self, root_part: Path) -> int:
        """Bytes a captured root (``root_part``, a snapshot's root part) holds outside the state dir (e.g. an
        image on the Incus server), counted with the snapshot's size. Blocking. Default: none."""
        return 0

    async def collect_roots(self) -> None:  # noqa: B027 - optional hook
        """Free what the runtime keeps for captured roots (e.g. server-side images) that no snapshot or root
        layer under the state dir names any more. Called after deletes; must not fail loudly."""

    def root_base(self, record: WorkspaceRecord) -> str | None:
        """What a captured root layer applies to (the image key): kept with a snapshot, given back on restore."""
        return None

    def with_root_base(self, record: WorkspaceRecord, base: str | None) -> WorkspaceRecord:
        """``record`` booting its root layer over ``base`` (see :meth:`root_base`).

        Raises:
            InvalidState: that base is gone (an image pruned since); the layer cannot be used.
        """
        return record

    async def adopt_files(  # noqa: B027 - optional hook
        self, source: WorkspaceRecord, target: WorkspaceRecord, trees: list[Path]
    ) -> None:
        """Make ``trees`` copied from ``source``'s workspace right for ``target`` (a fork): e.g. shift owners
        from one uid range to the other. Default: nothing to change."""


class ImageRootState(RuntimeState):
    """The state of a workspace whose writable root layer sits over an image of the store."""

    image: str | None = None


class ImageRootRuntime(Runtime):
    """A runtime whose workspaces boot a writable root layer over a cached image (its store key in the
    state's ``image``): a snapshot keeps that key, and a restore or fork boots the layer over it again."""

    State: ClassVar[type[RuntimeState]] = ImageRootState
    image_kind: ClassVar[str] = "root image"  # what its image is called in messages ("VM image")

    def root_base(self, record: WorkspaceRecord) -> str | None:
        return self._image_state(record).image

    def with_root_base(self, record: WorkspaceRecord, base: str | None) -> WorkspaceRecord:
        state = self._image_state(record)
        if base is None or base == state.image:
            return record
        if not self.ctx.images.exists(base):
            raise InvalidState(
                f"the {self.image_kind} this snapshot's root layer was made on ({base}) is gone (pruned or "
                "rebuilt); the layer cannot be used. Restore the workspace dir by hand from another snapshot, "
                "or recreate"
            )
        return self.with_state(record, state.model_copy(update={"image": base}))

    def _image_state(self, record: WorkspaceRecord) -> ImageRootState:
        state = self.state(record)
        assert isinstance(state, ImageRootState), f"{self.name}: State must subclass ImageRootState"
        return state
