"""Pydantic models shared by the MCP tools, the CLI, the runtimes and the registry file."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from .egress import Egress
from .supervise import ProcessRef

__all__ = [
    "BUILTIN_TYPES",
    "MAX_CPUS",
    "MAX_MEMORY_MIB",
    "MIN_CPUS",
    "MIN_MEMORY_MIB",
    "VM_MIN_MEMORY_MIB",
    "Check",
    "CreateSpec",
    "DestroyResult",
    "DiffFile",
    "DirEntry",
    "DirListing",
    "Egress",
    "ExecResult",
    "FetchResult",
    "FileContent",
    "Isolation",
    "Limits",
    "LogsResult",
    "Name",
    "PortUnpublished",
    "ProcessInfo",
    "ProcessList",
    "ProcessOutput",
    "ProcessStarted",
    "ProcessWait",
    "PublishedPort",
    "RepoInfo",
    "RuntimeDetail",
    "SSHInfo",
    "SnapshotDeleted",
    "SnapshotInfo",
    "SnapshotList",
    "Timings",
    "Workspace",
    "WorkspaceDiff",
    "WorkspaceList",
    "WorkspaceRecord",
    "WorkspaceState",
    "WorkspaceStatus",
    "WorkspaceType",
    "WriteResult",
]

# A workspace type is whatever a runtime realises: these are built in (in the order tools list them), and
# a runtime from another package may add its own (see runtimes.known_types).
WorkspaceType = str
BUILTIN_TYPES: tuple[WorkspaceType, ...] = ("container", "vm", "incus")
WorkspaceState = Literal["creating", "stopped", "starting", "running", "paused", "stopping", "error"]
Isolation = Literal["microvm", "unprivileged-container", "privileged-container"]


# The limits a workspace may be given, one source for the manager, the runtimes and the settings. A VM
# needs more memory than a container to boot its own kernel at all.
MIN_CPUS = 0.05
MAX_CPUS = 1024.0
MIN_MEMORY_MIB = 128
VM_MIN_MEMORY_MIB = 256
MAX_MEMORY_MIB = 1 << 22

# A workspace name as every tool takes it (naming.validate_name holds the same rule for other callers).
Name = Annotated[
    str,
    Field(
        description="Workspace name: lowercase letters, digits and '-', starting with a letter, at most 12 chars",
        pattern=r"^[a-z][a-z0-9-]{0,11}$",
        examples=["myproject", "test-2"],
    ),
]

# A workspace's RLIMIT_NOFILE hard limit (soft: 1024): systemd's default for services, which a VM's own
# systemd applies; containers get it from the runtime (nspawn --rlimit, Incus limits.kernel.nofile) so
# that no limit of the server's own process reaches them.
OPEN_FILES = 524288

_LEGACY_RUNTIME_FIELDS = ("image", "pid", "pid_start_time", "leader_pid", "leader_start_time")


def utcnow() -> datetime:
    return datetime.now(UTC)


class CreateSpec(BaseModel):
    """What a new workspace is asked to be: the create_workspace tool's arguments, one field each.

    The tool's parameters and the CLI's ``create`` flags are made from these fields, and the spec
    travels whole through the daemon and the ownership layer to the manager and the runtime. A
    new create argument is one field here plus the code that uses it.
    """

    model_config = ConfigDict(extra="forbid")

    name: Name
    type: Annotated[
        WorkspaceType,
        Field(
            description="'container' (the default: systemd-nspawn, shared kernel, boots in about a second), "
            "'vm' (qemu with its own kernel: stronger isolation, slower to boot) or 'incus' (an Incus "
            "container, on the local Incus daemon or a remote server/cluster when configured)"
        ),
    ] = "container"
    packages: Annotated[
        list[str],
        Field(
            description="Extra packages to install: Debian package names on a plain Linux host "
            "(e.g. ['python3', 'jq']), nixpkgs attribute paths on NixOS (e.g. ['ripgrep'])",
            max_length=200,
        ),
    ] = []  # noqa: RUF012 - pydantic copies defaults
    ip: Annotated[
        str | None,
        Field(description="Static IPv4 address in the workspace subnet; omit to get a free one"),
    ] = None
    start: Annotated[bool, Field(description="Start it and wait until SSH answers")] = True
    egress: Annotated[
        Egress,
        Field(
            description="Network access from inside: 'none' (the default) reaches nothing, not other "
            "workspaces, not the host, not the outside; 'internet' adds NAT to the outside (package "
            "downloads, git clone) while private ranges, link-local and the host stay closed; a list of "
            "domain names (['pypi.org', '*.pythonhosted.org']) reaches only the addresses those names "
            "resolve to (through the host's resolver, for their DNS TTL), every protocol, nothing else. "
            "'internet' and lists work only where the host allows NAT (SANDBOX_MCP_NAT=true)",
            examples=["none", "internet", ["pypi.org", "*.pythonhosted.org"]],
        ),
    ] = "none"
    cpus: Annotated[
        float | None,
        Field(description="CPUs it may use (fractions allowed, e.g. 0.5); omit for the server's default"),
    ] = None
    memory_mib: Annotated[
        int | None,
        Field(description="Memory in MiB (exceeding it kills a process inside); omit for the server's default"),
    ] = None
    repo: Annotated[
        str | None,
        Field(
            description="Absolute path of a git repository on the host that you (the calling user) can read; "
            "the workspace directory starts as a clone of it at `ref`, on branch 'sandbox/<name>'. No remotes, "
            "hooks or credentials come along. Needs start=true",
            examples=["/home/me/src/project"],
            max_length=4096,
        ),
    ] = None
    ref: Annotated[
        str,
        Field(
            description="With repo: the branch, tag or commit to start from (e.g. 'main', 'v1.2', 'HEAD~1')",
            pattern=r"^[A-Za-z0-9_.@/^~{}+:-]{1,256}$",
        ),
    ] = "HEAD"
    secrets: Annotated[
        list[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]],
        Field(
            description="Names of secrets configured on the host (by whoever runs the server) that the workspace "
            "may use without reading them: it gets placeholders (environment variables such as ANTHROPIC_API_KEY, "
            "git configuration) and a host-side proxy puts the real values into requests to the secrets' own "
            "hosts only. An unknown name is an error that lists the configured ones",
            examples=[["anthropic"], ["github"]],
            max_length=16,
        ),
    ] = []  # noqa: RUF012 - pydantic copies defaults


class SSHInfo(BaseModel):
    """How to reach the workspace's sshd; the host key is pinned by the server."""

    host: str
    port: int = 22
    user: str
    host_key_fingerprint: str = Field(description="SHA256 fingerprint of the pinned host key")
    known_hosts: str | None = Field(
        default=None,
        description="The pinned host key as an OpenSSH known_hosts line (for `ssh -o UserKnownHostsFile=...`)",
    )


class Limits(BaseModel):
    """Every bound a workspace gets, as chosen and applied: cgroups (containers), the VM's size (microVMs),
    Incus limits. Nothing else limits it (no resource limit is inherited from the host's processes)."""

    cpus: float = Field(gt=0, description="CPUs (fractions allowed): a quota of CPU time, not pinning")
    memory_mib: int = Field(gt=0, description="Memory in MiB, including the container's writable root layer")
    tasks: int = Field(gt=0, description="Processes and threads together")
    disk_mib: int | None = Field(
        default=None,
        description="Size bound of the writable root file system in MiB (what is written outside the workspace "
        "dir; a write past it fails with ENOSPC or EDQUOT): a container's root layer (a tmpfs whose pages count "
        "against memory_mib, so at most half of it), a VM's root disk (the system's files included), an Incus "
        "instance's root disk. null: no bound of ours (an Incus pool that cannot enforce one: the pool's free "
        "space), or not started since it was created. The workspace dir is the host's: its free space is the bound",
    )
    host_disk_mib: int | None = Field(
        default=None,
        description="Size bound of everything the workspace keeps on the host's disk (the workspace dir, the "
        "Claude config, a VM's root layer, snapshots) in MiB: a write past it fails with ENOSPC. null: no bound "
        "of ours, they share the host's free space (HOST_DISK_MIB unset, or the server is not root; "
        "`sandbox-mcp doctor` says which)",
    )
    file_size: Literal["unlimited"] = Field(
        default="unlimited",
        description="The largest file a process may write (RLIMIT_FSIZE): unlimited in every type; a file is bounded "
        "only by the file system it is on",
    )
    open_files: int | None = Field(
        default=OPEN_FILES,
        description="Open files per process (RLIMIT_NOFILE): the hard limit; the soft one is 1024, raise it with "
        "`ulimit -n` up to this. 524288 (systemd's default for services) in every type, unless the server may "
        "not raise limits (no CAP_SYS_RESOURCE): a container then gets the server's own, and this says so. "
        "null: a remote Incus server's own default (its limits are not known here)",
    )


class Timings(BaseModel):
    """Seconds spent in each phase of the last create/start."""

    image_s: float | None = Field(default=None, description="Building or finding the root image")
    boot_s: float | None = Field(default=None, description="From launching the runtime until it runs")
    ssh_s: float | None = Field(default=None, description="Until SSH answered with the pinned key")
    total_s: float | None = None
    from_pool: bool = Field(
        default=False, description="The create claimed a booted workspace from the warm pool (pool_size) "
        "instead of booting one"
    )


class PublishedPort(BaseModel):
    """A workspace port reachable from the host's loopback (publish_port)."""

    port: int = Field(ge=1, le=65535, description="The port inside the workspace")
    host: str = Field(default="127.0.0.1", description="The host address it is reachable on (loopback only)")
    host_port: int = Field(ge=1, le=65535, description="The port on the host")
    url: str = Field(description="http://host:host_port, for convenience (the forward is plain TCP)")
class RepoInfo(BaseModel):
    """The host repository a workspace was cloned from, and where its work goes back to."""

    path: str = Field(description="The host repository (its top level) the workspace directory was cloned from")
    base: str = Field(description="The commit the clone started at (the `ref` given to create_workspace)")
    branch: str = Field(
        description="The branch inside the workspace, and the one fetch_workspace writes in the host repository "
        "(refs/heads/<branch>), e.g. 'sandbox/myproject'"
    )


class WorkspaceRecord(BaseModel):
    """One workspace as the registry stores it. The source of truth for names and addresses."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _legacy_runtime_fields(cls, data: Any) -> Any:
        """Registries written before ``runtime_state`` kept nspawn's fields on the record itself."""
        if isinstance(data, dict) and "runtime_state" not in data:
            legacy = {k: data[k] for k in _LEGACY_RUNTIME_FIELDS if data.get(k) is not None}
            if legacy:
                data = {**data, "runtime_state": legacy}
        return data

    name: str
    type: WorkspaceType = "container"
    state: WorkspaceState = "creating"
    runtime: str = Field(description="The runtime that realises it: 'nspawn', 'nixos', ...")
    # What its runtime asked for (Runtime.network_needs); None where it needs none.
    ip: str | None = None
    mac: str | None = None
    cid: int | None = None
    user: str
    owner_uid: int | None = Field(
        default=None, description="Host uid that created it (the daemon's peer); None: created before owners existed"
    )
    packages: list[str] = Field(default_factory=list)
    egress: Egress = "none"
    repo: RepoInfo | None = None
    secrets: dict[str, str] = Field(default_factory=dict, description="Secret name -> its placeholder inside")
    host_key_fingerprint: str = ""
    runtime_state: dict[str, Any] = Field(
        default_factory=dict,
        description="The runtime's own state (PIDs, image key, instance name), read through its State model",
    )
    isolation: Isolation | None = None
    limits: Limits | None = None
    ports: list[PublishedPort] = Field(default_factory=list, description="Published while it runs")
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    last_error: str | None = None
    timings: Timings | None = None
    pooled: bool = Field(
        default=False, description="A warm pool's slot, booted and unclaimed: no tool shows or reaches it"
    )
    pool_holder: ProcessRef | None = Field(
        default=None, description="The server process keeping this slot (it refills and, at exit, destroys it)"
    )


class Workspace(BaseModel):
    """A workspace as tools and the CLI report it."""

    name: str
    type: WorkspaceType
    state: WorkspaceState
    ip: str | None = Field(description="Its address on the workspace subnet; null where its runtime gives none")
    user: str
    workspace_dir: str = Field(description="The project directory inside the workspace; exec's default cwd")
    host_workspace_dir: str = Field(description="The same directory on the host; it survives restarts")
    ssh: SSHInfo
    packages: list[str] = Field(default_factory=list)
    egress: Egress = Field(
        default="none", description="'none': reaches nothing; 'internet': NAT to the outside, never private ranges; "
        "a list of domain names: only what those names resolve to (see set_egress)"
    )
    isolation: Isolation | None = Field(
        default=None, description="How the workspace is kept from the host: a microVM, or a container whose root "
        "is (unprivileged) or is not (privileged) an unprivileged uid on the host"
    )
    limits: Limits | None = None
    ports: list[PublishedPort] = Field(
        default_factory=list,
        description="Ports published to the host's loopback (publish_port); they go when the workspace stops",
    )
    repo: RepoInfo | None = Field(
        default=None, description="Set when it was created from a host repository (create_workspace repo=...)"
    )
    secrets: dict[str, str] = Field(
        default_factory=dict,
        description="Secret name -> the placeholder the workspace holds for it (in its environment and config "
        "files); the host's proxy swaps it for the value on requests to the secret's hosts only",
    )
    created_at: datetime
    started_at: datetime | None = None
    last_error: str | None = None
    timings: Timings | None = None


class RuntimeDetail(BaseModel):
    """What the runtime says about a workspace right now."""

    runtime: str
    running: bool
    pid: int | None = None
    unit: str | None = Field(default=None, description="systemd unit (nixos mode)")
    unit_state: str | None = None
    uptime_s: float | None = None
    accelerator: Literal["kvm", "tcg"] | None = Field(
        default=None, description="VMs: hardware virtualisation (kvm) or software emulation (tcg, slower)"
    )
    isolation: str | None = Field(default=None, description="'microvm' for VMs: the workspace has its own kernel")
    detail: str | None = None
    paused: bool = Field(default=False, description="Frozen by pause_workspace: running, but nothing in it runs")
    cgroups: Literal["systemd", "direct"] | None = Field(
        default=None,
        description="Containers: who made the workspace's cgroup: a delegated systemd scope (named in unit) "
        "or the server itself in the cgroup tree",
    )


class WorkspaceStatus(Workspace):
    """A workspace plus live runtime detail."""

    runtime: RuntimeDetail
    snapshot_bytes: int = Field(default=0, description="Host disk its snapshots take (list_snapshots: each one)")


class WorkspaceList(BaseModel):
    workspaces: list[Workspace]
    total: int | None = Field(default=None, description="How many workspaces there are")
    offset: int = Field(default=0, description="Index (in name order) of the first one listed")
    next_offset: int | None = Field(default=None, description="Pass as offset to list the next page")
    truncated: bool = Field(default=False, description="True when more follow: call again with offset=next_offset")


class DestroyResult(BaseModel):
    name: str
    destroyed: bool = True
    kept_data: bool = Field(default=False, description="True when the host workspace directory was kept")


class ExecResult(BaseModel):
    exit_code: int | None = Field(description="The command's exit status; null when it was killed by a signal")
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = Field(
        default=False, description="True when stdout or stderr was cut: their head and tail are kept, a marker "
        "line stands where the middle was left out"
    )
    duration_ms: float
    hint: str | None = Field(
        default=None,
        description="When the command ran into a limit (its timeout_s; out of memory: the OOM killer ended a "
        "process; a full file system): which limit, and what to do",
    )
    stdout_bytes: int | None = Field(default=None, description="Size of the command's whole stdout in bytes")
    stderr_bytes: int | None = Field(default=None, description="Size of the command's whole stderr in bytes")
    stdout_omitted: int = Field(default=0, description="Bytes of stdout left out of this result (from its middle)")
    stderr_omitted: int = Field(default=0, description="Bytes of stderr left out of this result (from its middle)")
    stdout_path: str | None = Field(
        default=None, description="Where the whole stdout was saved inside the workspace when it was cut: page it "
        "with read_file. Null when nothing was cut or it could not be saved"
    )
    stderr_path: str | None = Field(default=None, description="The same for stderr")

    # Where the marker line of a cut stream lies in stdout/stderr (start, end), so a further cut
    # (budget.fit) keeps the head and the tail around it; and where a stream was saved whole even
    # though nothing was cut yet, for such a cut to name. Not part of the result.
    _splits: dict[str, tuple[int, int]] = PrivateAttr(default_factory=dict)
    _saved: dict[str, str] = PrivateAttr(default_factory=dict)

    def splits(self) -> dict[str, tuple[int, int]]:
        """The marker positions of cut streams (see budget.join_stream)."""
        return dict(self._splits)

    def set_splits(self, splits: dict[str, tuple[int, int]]) -> None:
        self._splits = dict(splits)

    def saved(self) -> dict[str, str]:
        """Where streams were saved whole in the workspace, cut or not (by stream name)."""
        return dict(self._saved)

    def set_saved(self, saved: dict[str, str]) -> None:
        self._saved = dict(saved)


class ProcessStarted(BaseModel):
    process_id: str = Field(description="Names the process in process_output, wait_process, stop_process")
    pid: int = Field(description="Its PID inside the workspace (also its process group)")
    state: Literal["running", "exited"]


class ProcessInfo(BaseModel):
    """A process started with start_process, as it is now."""

    process_id: str
    command: str = Field(description="The command line (the first 1000 characters)")
    pid: int
    running: bool
    exit_code: int | None = Field(description="Its exit status once it exited; null while running or if killed")
    signal: str | None = Field(default=None, description="The signal that ended it (e.g. 'TERM', 'KILL')")
    started_at: datetime
    ended_at: datetime | None = None
    output_bytes: int = Field(default=0, description="Bytes of output (both streams) it has written so far")
    dropped_bytes: int = Field(default=0, description="Of those, the oldest ones no longer kept (the buffer is bounded)")


class ProcessList(BaseModel):
    processes: list[ProcessInfo]


class ProcessOutput(BaseModel):
    stdout: str
    stderr: str
    next_cursor: int = Field(description="Pass as cursor to read on from here (counts bytes of both streams)")
    running: bool
    exit_code: int | None
    signal: str | None = None
    dropped_bytes: int = Field(
        description="Bytes between your cursor and the oldest output still kept, skipped (the buffer holds the last "
        "part of the output only)"
    )
    more: bool = Field(default=False, description="More output is already there: call again with next_cursor")


class ProcessWait(BaseModel):
    matched: bool = Field(description="The condition was met (false: timed out, or the process exited first)")
    running: bool
    exit_code: int | None
    signal: str | None = None
    next_cursor: int = Field(
        description="For output:REGEX, just past the matching line; otherwise the end of the output so far"
    )


class PortUnpublished(BaseModel):
    port: int
    published: bool = False


class FileContent(BaseModel):
    path: str = Field(description="Absolute path inside the workspace")
    content: str
    encoding: Literal["utf-8", "base64"]
    size: int = Field(description="Total size of the file in bytes")
    offset: int = 0
    truncated: bool = Field(description="True when bytes remain after this chunk")
    next_offset: int | None = Field(default=None, description="Pass as offset to read the rest")


class WriteResult(BaseModel):
    path: str
    bytes_written: int


class DirEntry(BaseModel):
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mtime: datetime


class DirListing(BaseModel):
    path: str
    entries: list[DirEntry]
    truncated: bool = Field(
        default=False, description="True when entries were left out of this result: call again with "
        "offset=next_offset for the next page"
    )
    offset: int = Field(default=0, description="Index (in name order) of the first entry listed")
    next_offset: int | None = Field(default=None, description="Pass as offset to list the next page")
    total: int | None = Field(
        default=None, description="Entries in the directory; null when it holds more than a listing reads "
        "(list those with exec, e.g. 'ls -A | sed -n 1,1000p')"
    )


class LogsResult(BaseModel):
    name: str
    log: str
    lines: int
    truncated: bool = Field(default=False, description="True when older lines were left out to fit the result")


class DiffFile(BaseModel):
    """One changed path in workspace_diff."""

    path: str
    status: Literal["added", "modified", "deleted", "type-changed", "unmerged"]
    added: int | None = Field(description="Lines added; null for a binary file")
    deleted: int | None = Field(description="Lines deleted; null for a binary file")


class WorkspaceDiff(BaseModel):
    """What changed in a workspace's clone since the commit it was created from."""

    base: str = Field(description="The commit the workspace was created from")
    head: str | None = Field(description="The workspace's current commit (null before the clone has one)")
    commits: int = Field(description="Commits on the workspace's branch since base")
    files: list[DiffFile] = Field(description="Every changed path: committed, staged, unstaged and untracked")
    patch: str = Field(description="The unified diff (base against the working tree); empty with stat_only")
    truncated: bool = Field(
        description="True when the patch (or the file list) was cut at the server's bound; read single files "
        "with read_file or run git diff with exec for the rest"
    )


class FetchResult(BaseModel):
    """The workspace's branch, now in the host repository."""

    ref: str = Field(description="The ref written in the host repository, e.g. 'refs/heads/sandbox/myproject'")
    head: str = Field(description="The commit it points at: the same id as inside the workspace")
    commits: int = Field(description="Commits on it since the base the workspace was created from")
    repo: str = Field(description="The host repository")
    committed: bool = Field(
        default=False, description="True when include_uncommitted made a commit of the uncommitted work first"
    )


class Check(BaseModel):
    """One host prerequisite as ``sandbox-mcp doctor`` reports it: what was found and how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True


class SnapshotInfo(BaseModel):
    """One snapshot of a workspace: its workspace dir, Claude config and writable root, as they were."""

    name: str = Field(description="The workspace it belongs to")
    snapshot: str
    created_at: datetime
    size_bytes: int = Field(description="Bytes it holds on the host (before sharing with reflinks)")
    method: Literal["reflink", "copy"] = Field(
        description="How its files were copied: 'reflink' (copy-on-write, near-instant; xfs, btrfs) or 'copy' "
        "(a full copy: ext4 and other filesystems without reflinks)"
    )
    memory: bool = Field(default=False, description="True when it also holds the running state (VMs)")
    source_state: WorkspaceState = Field(description="The workspace's state when it was taken")
    root_base: str | None = Field(default=None, description="The root image its root layer applies to")


class SnapshotList(BaseModel):
    name: str
    snapshots: list[SnapshotInfo]
    total_bytes: int = Field(default=0, description="What this workspace's snapshots take on the host")
    owner_bytes: int = Field(default=0, description="What all the owner's snapshots take, every workspace together")
    owner_limit_bytes: int | None = Field(
        default=None, description="The most the owner's snapshots may take (uid_max_snapshot_mib); a snapshot "
        "past it is refused: delete_snapshot old ones to make room"
    )


class SnapshotDeleted(BaseModel):
    snapshot: str
    deleted: bool = True
