"""Direct-mode container runtime: the server runs and supervises ``systemd-nspawn --boot`` itself.

Per workspace: a network namespace with a veth on the bridge (``net.py``),
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
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import anyio

from .. import hostcaps, nat, onboarding, rootfs
from ..cgroups import CgroupHost, group_for, join_argv
from ..config import Settings
from ..errors import BackendError, InvalidSpec
from ..images import ImageStore
from ..models import Limits, RuntimeDetail, WorkspaceRecord
from ..naming import UID_RANGE, allocate_uid_base
from ..net import HostNetwork
from ..paths import WorkspacePaths
from ..rootfs import RootMounts
from .base import Progress, Runtime

__all__ = ["DROPPED_CAPABILITIES", "NspawnRuntime", "hosts_file", "launch_argv", "nspawn_argv"]

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


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
) -> list[str]:
    """The exact systemd-nspawn command that boots workspace ``name``.

    Privileged (``uid_base`` None): the image with a fresh overlay per boot, joining the
    prepared ``netns_path``. User-namespaced: ``--private-users=BASE:65536`` on the host-made
    ``mounts`` (:mod:`sandbox_mcp.rootfs`: the root overlay and idmapped binds), and a network
    namespace of nspawn's own (``--private-network``; the host adds the veth after start).

    Raises:
        InvalidSpec: a host path contains ':' or ',' (nspawn's separators), or the arguments
            do not fit one of the two kinds.
    """
    if uid_base is None:
        if netns_path is None:
            raise InvalidSpec("a privileged container needs its network namespace path")
        binds = [
            ("--bind", paths.workspace, onboarding.workspace_dir_inside(user)),
            ("--bind", paths.claude_config, onboarding.claude_config_dir_inside(user)),
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
            ("--bind", mounts.workspace, onboarding.workspace_dir_inside(user)),
            ("--bind", mounts.claude, onboarding.claude_config_dir_inside(user)),
            ("--bind-ro", mounts.keys, "/etc/ssh-host-keys"),
        ]
        kind = [
            f"--directory={mounts.root}",
            f"--private-users={uid_base}:{UID_RANGE}",
            "--private-users-ownership=off",  # the mounts are idmapped already; nothing is chowned
            "--private-network",
        ]
    binds.append(("--bind-ro", paths.runtime / "hosts", "/etc/hosts"))
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
        f"--hostname={name}",
        *kind,
        f"--drop-capability={','.join(DROPPED_CAPABILITIES)}",
        "--link-journal=no",
        "--console=read-only",
        *(f"{opt}={src}:{dst}" for opt, src, dst in binds),
    ]


def launch_argv(argv: list[str], procs_files: list[Path], user_namespaced: bool) -> list[str]:
    """``argv`` started inside the workspace's cgroups (joined before exec, so nothing escapes them).

    User-namespaced: with ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``, so nspawn gives the container
    the delegated unified cgroup (its systemd cannot use the host's v1 hierarchies).
    """
    env = ["env", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1"] if user_namespaced else []
    return join_argv(procs_files, [*env, *argv])


def hosts_file(name: str, host_ip: str) -> str:
    """/etc/hosts for the workspace: its own name resolves (sudo needs that), and so does the host."""
    return f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n{host_ip}\tsandbox-host\n::1\tlocalhost ip6-localhost\n"


def _proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot), or None if the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _is_our_process(pid: int | None, start_time: int | None, name: str) -> bool:
    if not pid or start_time is None or _proc_start_time(pid) != start_time:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"--machine={machine_name(name)}".encode() in cmdline


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def _leader_alive(record: WorkspaceRecord) -> bool:
    return bool(record.leader_pid) and _proc_start_time(record.leader_pid) == record.leader_start_time  # type: ignore[arg-type]


def _uptime_s(start_time: int) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
    return max(0.0, boot_uptime - start_time / ticks)


class NspawnRuntime(Runtime):
    """Containers booted by systemd-nspawn on this host."""

    name = "nspawn"
    types = frozenset({"container"})

    def __init__(self, settings: Settings, network: HostNetwork | None = None, images: ImageStore | None = None):
        super().__init__(settings)
        self.network = network or HostNetwork(settings)
        self.images = images or ImageStore(settings)
        self._cg: CgroupHost | None = None

    def _paths(self, record: WorkspaceRecord) -> WorkspacePaths:
        return WorkspacePaths.of(self.settings.state_dir, record.name)

    def _cgroups(self) -> CgroupHost:
        if self._cg is None:
            self._cg = CgroupHost(group_for(self.settings.state_dir))
        return self._cg

    def _mounts(self, record: WorkspaceRecord) -> RootMounts:
        return RootMounts(self._paths(record).runtime / "mnt")

    def _limits(self, record: WorkspaceRecord) -> Limits:
        s = self.settings
        return record.limits or Limits(cpus=s.cpus, memory_mib=s.memory_mib, tasks=s.tasks_max)

    def assign(self, record: WorkspaceRecord, others: list[WorkspaceRecord]) -> WorkspaceRecord:
        """Pick the isolation and, for a user-namespaced container, a uid range no other workspace has.

        Raises:
            BackendError: user-namespaced containers cannot run here (or are switched off) and
                privileged ones are not allowed; the message says why and how to allow them.
        """
        blockers = [] if self.settings.private_users else ["private_users is false in the settings"]
        blockers = blockers or hostcaps.userns_blockers()
        if blockers:
            if not self.settings.allow_privileged:
                raise BackendError(
                    "cannot run a user-namespaced container here: " + "; ".join(blockers) + ". Fix that, or "
                    "allow privileged containers (root inside is root on the host) with "
                    "SANDBOX_MCP_ALLOW_PRIVILEGED=true"
                )
            return record.model_copy(update={"isolation": "privileged-container", "uid_base": None})
        taken = {r.uid_base for r in others if r.uid_base is not None} | self._cgroups().live_uid_bases()
        return record.model_copy(update={"isolation": "unprivileged-container", "uid_base": allocate_uid_base(taken)})

    async def addresses_in_use(self) -> set[str]:
        return await self.network.live_addresses()

    async def prepare(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        key = await self.images.ensure(record.packages, progress)
        return record.model_copy(update={"image": key})

    async def start(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        if _is_our_process(record.pid, record.pid_start_time, record.name):
            return record
        if not record.image or not self.images.exists(record.image):
            # The cache was cleared, or the recipe changed since create: rebuild quietly.
            record = await self.prepare(record, progress)
        paths = self._paths(record)
        paths.runtime.mkdir(parents=True, exist_ok=True)
        (paths.runtime / "hosts").write_text(hosts_file(record.name, str(self.settings.host_ip)))
        base = record.uid_base
        mounts = self._mounts(record)
        image_root = self.images.path(record.image)  # type: ignore[arg-type]
        await progress("setting up the network", None)
        if base is None:
            netns: Path | None = await self.network.setup_workspace(record.name, record.ip, record.mac)
        else:
            netns = None
            await self.network.ensure_bridge()
        if self.settings.nat:
            await nat.apply_nat(self.settings.bridge, self.settings.subnet)
        try:
            procs = await anyio.to_thread.run_sync(
                self._cgroups().prepare, record.name, base, self._limits(record)
            )
            if base is not None:
                await anyio.to_thread.run_sync(
                    lambda: rootfs.mount_all(
                        mounts,
                        image=image_root,
                        workspace=paths.workspace,
                        claude_config=paths.claude_config,
                        host_keys=paths.ssh_host_keys,
                        uid_base=base,
                        root_layer_mib=self.settings.root_layer_mib,
                    )
                )
            argv = nspawn_argv(
                name=record.name,
                image_root=image_root,
                netns_path=netns,
                paths=paths,
                user=record.user,
                uid_base=base,
                mounts=mounts if base is not None else None,
            )
            await progress("booting the container", None)
            pid, start_time = await anyio.to_thread.run_sync(
                self._spawn, launch_argv(argv, procs, base is not None), paths.console_log
            )
            record = record.model_copy(update={"pid": pid, "pid_start_time": start_time})
            leader = await self._find_leader(pid, self.settings.boot_timeout_s)
            if leader is None:
                raise BackendError(f"the container did not start; see {paths.console_log} (workspace_logs)")
            record = record.model_copy(
                update={"leader_pid": leader, "leader_start_time": _proc_start_time(leader)}
            )
            if base is not None:
                # nspawn made the container's network namespace (one owned by the container's user
                # namespace; joining a host-made one is refused); the veth goes in from here.
                await self.network.setup_workspace(record.name, record.ip, record.mac, pid=leader)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop(record)
            raise
        return record

    @staticmethod
    async def _find_leader(pid: int, timeout_s: float) -> int | None:
        """The container's init: nspawn's child in another PID namespace (nspawn is its subreaper).

        Recorded so that a container orphaned by a killed nspawn can still be ended; its network
        namespace is the container's. None if nspawn exits first or ``timeout_s`` passes.
        """
        start = _proc_start_time(pid)
        own_ns = os.readlink(f"/proc/{pid}/ns/pid") if os.path.exists(f"/proc/{pid}/ns/pid") else None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and start is not None and _proc_start_time(pid) == start:
            for child in _children(pid):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{child}/ns/pid") != own_ns:
                        return child
            await anyio.sleep(0.01)
        return None

    @staticmethod
    def _spawn(argv: list[str], log_path: Path) -> tuple[int, int]:
        with open(log_path, "wb") as log:  # the log shows the current boot
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # survives the server; stop() ends it by PID
                    close_fds=True,
                )
            except FileNotFoundError as exc:
                raise BackendError(
                    "systemd-nspawn not found; install it (Debian/Ubuntu: apt-get install systemd-container) "
                    "and run 'sandbox-mcp doctor'"
                ) from exc
        # Reap it when it exits while we run, so no zombie stays behind.
        threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
        start_time = _proc_start_time(proc.pid)
        if start_time is None:
            raise BackendError(f"systemd-nspawn exited at once; see {log_path}")
        return proc.pid, start_time

    async def stop(self, record: WorkspaceRecord) -> None:
        if _is_our_process(record.pid, record.pid_start_time, record.name):
            assert record.pid is not None
            # SIGTERM makes nspawn power the container off cleanly; SIGKILL if it will not.
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGTERM)
            if not await self._wait_gone(record, self.settings.stop_timeout_s):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, signal.SIGKILL)
                await self._wait_gone(record, 10)
        if _leader_alive(record):
            # nspawn died without taking its container along: killing a PID namespace's
            # init ends every process in it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.leader_pid, signal.SIGKILL)  # type: ignore[arg-type]
            for _ in range(200):
                if not _leader_alive(record):
                    break
                await anyio.sleep(0.05)
        await self._release(record)

    async def _release(self, record: WorkspaceRecord) -> None:
        """What a stopped container leaves: its cgroups (and stragglers in them), mounts, veth/netns."""
        await anyio.to_thread.run_sync(self._cgroups().remove, record.name)
        await anyio.to_thread.run_sync(rootfs.unmount_all, self._mounts(record))
        await self.network.teardown_workspace(record.name)

    async def _wait_gone(self, record: WorkspaceRecord, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _is_our_process(record.pid, record.pid_start_time, record.name):
                return True
            await anyio.sleep(0.05)
        return False

    async def destroy(self, record: WorkspaceRecord) -> None:
        await self._release(record)  # before the manager removes the state dir: nothing mounted under it

    async def status(self, record: WorkspaceRecord) -> RuntimeDetail:
        running = _is_our_process(record.pid, record.pid_start_time, record.name)
        return RuntimeDetail(
            runtime=self.name,
            running=running,
            pid=record.pid if running else None,
            uptime_s=_uptime_s(record.pid_start_time) if running and record.pid_start_time else None,
            detail=f"systemd-nspawn --machine={machine_name(record.name)}"
            + (f" image {record.image}" if record.image else "")
            + (f", uids {record.uid_base}+{UID_RANGE}" if record.uid_base is not None else ", privileged"),
        )

    async def logs(self, record: WorkspaceRecord, lines: int) -> str:
        path = self._paths(record).console_log

        def _tail() -> str:
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 256 * 1024))
                    text = f.read().decode("utf-8", "replace")
            except FileNotFoundError:
                return ""
            text = _ANSI_RE.sub("", text).replace("\r", "")
            return "\n".join(text.splitlines()[-lines:])

        return await anyio.to_thread.run_sync(_tail)

    async def reconcile(self, records: list[WorkspaceRecord]) -> None:
        """Tear down network namespaces and veths whose workspace is not running."""
        running = {r.name for r in records if _is_our_process(r.pid, r.pid_start_time, r.name)}
        for name in await self.network.leftovers():
            if name not in running:
                await self.network.teardown_workspace(name)
        for r in records:
            if r.name not in running and r.runtime == self.name:
                await anyio.to_thread.run_sync(self._cgroups().remove, r.name)
                await anyio.to_thread.run_sync(rootfs.unmount_all, self._mounts(r))
