"""A cgroup per workspace: delegated to the container's user namespace, with its limits.

What a user-namespaced ``systemd-nspawn --boot`` needs on a host without systemd as PID 1
(found on the dev machines: hybrid cgroup v1/v2, the unified hierarchy at
``/sys/fs/cgroup/unified`` with no controllers but ``hugetlb``):

* a cgroup in the unified hierarchy made beforehand, owned by the container's root (the
  uid base) so its systemd can make its own sub-cgroups (delegation), nspawn started
  inside it and ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`` in its environment; without it
  (``--private-users=pick`` alone) the container's systemd cannot create its cgroup;
* the limits in whichever hierarchy has the controller: cgroup v2 (``memory.max``,
  ``memory.swap.max``, ``pids.max``, ``cpu.max``) where the unified hierarchy offers it,
  else cgroup v1 (``memory.limit_in_bytes`` + ``memory.memsw.limit_in_bytes``, ``pids.max``,
  ``cpu.cfs_quota_us``). Limit files stay root-owned, so the container cannot raise them.

Each workspace's cgroups are ``GROUP/NAME`` (GROUP is ``sandbox-mcp-`` and a digest of the state
directory, so two servers or test runs never share one) under the server's own cgroup in each
hierarchy (under the unified root for v2). The process joins them before it execs nspawn
(:func:`join_argv`), so nothing it forks escapes the limits. On a host with systemd as PID 1 the
runtime uses a delegated systemd scope instead (:mod:`.scopes`), unless
``SANDBOX_MCP_CGROUPS=direct`` forces this way.

The ``*_for``/``parse_*``/``*_argv`` functions are pure; :class:`CgroupHost` reads
``/proc/self/mounts`` and ``/proc/self/cgroup`` and writes the tree.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BackendError, InvalidSpec
from ..models import Limits
from ..naming import validate_ident

__all__ = [
    "CONTROLLERS",
    "CgroupHost",
    "CgroupLayout",
    "Limits",
    "cpu_usage_s",
    "join_argv",
    "limit_writes",
    "parse_mounts",
    "group_for",
    "parse_proc_cgroup",
]

CONTROLLERS = ("memory", "pids", "cpu")
_GROUP = "sandbox-mcp"
_SYSTEMD_NAMED = "name=systemd"
_GROUP_RE = re.compile(r"^sandbox-mcp[a-z0-9-]{0,40}$")
_CPU_PERIOD_US = 100_000
# The files systemd's delegation hands to the delegatee (systemd.io/CGROUP_DELEGATION).
_DELEGATED_FILES = ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")


@dataclass(frozen=True)
class CgroupLayout:
    """Where the hierarchies are mounted and where this process sits in each.

    ``unified``: the cgroup2 mount (``/sys/fs/cgroup`` or ``/sys/fs/cgroup/unified``) or None;
    ``v2_controllers``: the controllers its root offers; ``v1``: controller → (mount, own path).
    """

    unified: Path | None
    v2_controllers: frozenset[str] = frozenset()
    v1: dict[str, tuple[Path, str]] = field(default_factory=dict)

    def where(self, controller: str) -> str | None:
        """``"v2"``, ``"v1"`` or None: the hierarchy that enforces ``controller`` here."""
        if controller in self.v2_controllers:
            return "v2"
        if controller in self.v1:
            return "v1"
        return None

    def workspace_dirs(self, name: str, group: str = _GROUP) -> dict[str, Path]:
        """The cgroup directories of workspace ``name``: ``"unified"`` and each v1 controller used.

        Raises:
            InvalidSpec: ``name`` is not a valid workspace name.
        """
        validate_ident(name)
        out: dict[str, Path] = {}
        if self.unified is not None:
            out["unified"] = self.unified / group / name
        for ctrl in CONTROLLERS:
            if self.where(ctrl) == "v1":
                mount, own = self.v1[ctrl]
                out[ctrl] = mount / own.lstrip("/") / group / name
        return out

    def mirror_dir(self, name: str, group: str = _GROUP) -> Path | None:
        """Where nspawn mirrors workspace ``name``'s cgroup in the v1 ``name=systemd`` hierarchy, if mounted."""
        validate_ident(name)
        if _SYSTEMD_NAMED not in self.v1:
            return None
        mount, own = self.v1[_SYSTEMD_NAMED]
        return mount / own.lstrip("/") / group / name


def group_for(state_dir: Path) -> str:
    """The cgroup group of the server whose state lives in ``state_dir``: ``sandbox-mcp-`` + 8 hex digits."""
    return f"{_GROUP}-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:8]}"


def parse_mounts(text: str) -> tuple[Path | None, dict[str, Path]]:
    """From ``/proc/self/mounts``: the cgroup2 mount point and the v1 mount of each controller.

    The v1 ``name=systemd`` hierarchy counts as one: nspawn mirrors the workspace's cgroup path
    there on hybrid hosts, and :meth:`CgroupHost.remove` removes that copy too.
    """
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        _, mnt, fstype, opts = parts[:4]
        if fstype == "cgroup2" and unified is None:
            unified = Path(mnt)
        elif fstype == "cgroup":
            for opt in opts.split(","):
                if opt in CONTROLLERS or opt == _SYSTEMD_NAMED:
                    v1.setdefault(opt, Path(mnt))
    return unified, v1


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """From ``/proc/self/cgroup``: controller → path; the unified hierarchy's entry is ``""``."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hid == "0" and ctrls == "":
            out[""] = path
        for ctrl in ctrls.split(","):
            if ctrl:
                out[ctrl] = path
    return out


def limit_writes(limits: Limits, layout: CgroupLayout, memsw: bool = True) -> list[tuple[str, str, str]]:
    """The ``(hierarchy, file, value)`` writes that enforce ``limits``; hierarchy is ``"unified"`` or a v1 controller.

    Memory includes swap (none beyond the limit): exceeding it OOM-kills inside the
    workspace. ``memsw`` says whether v1 has ``memory.memsw.*`` (swap accounting).
    """
    mem = str(limits.memory_mib << 20)
    quota = max(1000, round(limits.cpus * _CPU_PERIOD_US))
    out: list[tuple[str, str, str]] = []
    where = {c: layout.where(c) for c in CONTROLLERS}
    if where["memory"] == "v2":
        out += [("unified", "memory.max", mem), ("unified", "memory.swap.max", "0")]
    elif where["memory"] == "v1":
        out.append(("memory", "memory.limit_in_bytes", mem))
        if memsw:
            out.append(("memory", "memory.memsw.limit_in_bytes", mem))
    if where["pids"] == "v2":
        out.append(("unified", "pids.max", str(limits.tasks)))
    elif where["pids"] == "v1":
        out.append(("pids", "pids.max", str(limits.tasks)))
    if where["cpu"] == "v2":
        out.append(("unified", "cpu.max", f"{quota} {_CPU_PERIOD_US}"))
    elif where["cpu"] == "v1":
        out += [("cpu", "cpu.cfs_period_us", str(_CPU_PERIOD_US)), ("cpu", "cpu.cfs_quota_us", str(quota))]
    return out


def join_argv(procs_files: list[Path], argv: list[str]) -> list[str]:
    """``argv`` run by a shell that first moves itself into each cgroup (its ``cgroup.procs``), then execs.

    Exit status 125 if a cgroup cannot be joined (the command never runs).
    """
    script = 'for f; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; shift; exec "$@"'
    return ["sh", "-c", script, "sh", *map(str, procs_files), "--", *argv]


class CgroupHost:
    """This host's cgroup hierarchies, read once."""

    def __init__(self, group: str = _GROUP, mounts: str | None = None, own: str | None = None) -> None:
        if not _GROUP_RE.fullmatch(group):
            raise InvalidSpec(f"cgroup group name {group!r} is not a plain name")
        self.group = group
        mounts = Path("/proc/self/mounts").read_text() if mounts is None else mounts
        own_map = parse_proc_cgroup(Path("/proc/self/cgroup").read_text() if own is None else own)
        unified, v1_mounts = parse_mounts(mounts)
        v2: frozenset[str] = frozenset()
        if unified is not None:
            with contextlib.suppress(OSError):
                v2 = frozenset((unified / "cgroup.controllers").read_text().split())
        self.layout = CgroupLayout(
            unified=unified,
            v2_controllers=v2 & set(CONTROLLERS),
            v1={c: (m, own_map.get(c, "/")) for c, m in v1_mounts.items() if c not in v2},
        )

    def enforced(self) -> dict[str, str | None]:
        """Controller → ``"v2"``/``"v1"``/None (not enforceable here), for doctor and status."""
        return {c: self.layout.where(c) for c in CONTROLLERS}

    def prepare(self, name: str, uid_base: int | None, limits: Limits) -> list[Path]:
        """Make workspace ``name``'s cgroups with ``limits``; return the ``cgroup.procs`` files to join.

        With ``uid_base``, the unified cgroup is delegated to that uid (the container's root).
        A tree left over by an earlier run of the same name is removed first.

        Raises:
            BackendError: no unified hierarchy, or the kernel refused a directory or a limit.
        """
        layout = self.layout
        if layout.unified is None:
            raise BackendError(
                "no cgroup2 (unified) hierarchy is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) "
                "and run 'sandbox-mcp doctor'"
            )
        self.remove(name)
        dirs = layout.workspace_dirs(name, self.group)
        try:
            self._enable_v2(layout.unified)
            for d in dirs.values():
                d.mkdir(parents=True, exist_ok=True)
            memory_dir = dirs.get("memory")
            memsw = memory_dir is None or (memory_dir / "memory.memsw.limit_in_bytes").exists()
            for hierarchy, fname, value in limit_writes(limits, layout, memsw=memsw):
                (dirs[hierarchy] / fname).write_text(value)
            if uid_base is not None:
                unified = dirs["unified"]
                os.chown(unified, uid_base, uid_base)
                for fname in _DELEGATED_FILES:
                    os.chown(unified / fname, uid_base, uid_base)
        except OSError as exc:
            self.remove(name)
            raise BackendError(
                f"setting up the cgroups of workspace {name!r} failed: {exc}; run 'sandbox-mcp doctor'"
            ) from exc
        return [d / "cgroup.procs" for d in dirs.values()]

    def _enable_v2(self, unified: Path) -> None:
        """Enable the v2 controllers we use in the subtree down to ``sandbox-mcp`` (no-ops where absent)."""
        wanted = sorted(self.layout.v2_controllers)
        parent = unified / self.group
        parent.mkdir(exist_ok=True)
        if not wanted:
            return
        for d in (unified, parent):
            (d / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))

    def usage(self, name: str) -> dict[str, float]:
        """Current memory bytes, task count and CPU seconds used so far of workspace ``name`` (what can be
        read; the CPU from the unified hierarchy's ``cpu.stat``, there with or without its controller)."""
        dirs = self.layout.workspace_dirs(name, self.group)
        out: dict[str, int] = {}
        for key, candidates in (
            ("memory_bytes", [("memory", "memory.usage_in_bytes"), ("unified", "memory.current")]),
            ("tasks", [("pids", "pids.current"), ("unified", "pids.current")]),
        ):
            for hierarchy, fname in candidates:
                with contextlib.suppress(OSError, KeyError, ValueError):
                    out[key] = int((dirs[hierarchy] / fname).read_text())
                    break
        with contextlib.suppress(OSError, KeyError, ValueError):
            out["cpu_s"] = cpu_usage_s(dirs["unified"] / "cpu.stat")
        return out

    def oom_kills(self, name: str) -> int | None:
        """OOM kills in workspace ``name``'s cgroups since they were made (at its start); None if unreadable."""
        dirs = self.layout.workspace_dirs(name, self.group)
        where = self.layout.where("memory")
        if where == "v2":
            return oom_kills_in(dirs["unified"], v2=True)
        return oom_kills_in(dirs["memory"], v2=False) if where == "v1" else None

    def oom_kills_of(self, pid: int, top: str) -> int | None:
        """OOM kills under the cgroup named ``top`` among the ancestors of process ``pid``'s memory cgroup
        (e.g. an Incus container's ``lxc.payload.NAME``); None when ``pid`` is gone or not under one."""
        try:
            own = parse_proc_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
        except OSError:
            return None
        v2 = self.layout.where("memory") == "v2"
        key, mount = ("", self.layout.unified) if v2 else ("memory", self.layout.v1.get("memory", (None, ""))[0])
        parts = own.get(key, "").strip("/").split("/")
        if mount is None or top not in parts:
            return None
        return oom_kills_in(mount.joinpath(*parts[: parts.index(top) + 1]), v2=v2)

    def remove(self, name: str, timeout_s: float = 10.0) -> None:
        """Kill whatever is left in workspace ``name``'s cgroups and remove them; nothing if absent.

        Raises:
            BackendError: a cgroup stays busy after its processes were killed.
        """
        dirs = list(self.layout.workspace_dirs(name, self.group).values())
        mirror = self.layout.mirror_dir(name, self.group)
        for top in [*dirs, *([mirror] if mirror is not None else [])]:
            if not top.exists():
                continue
            deadline = time.monotonic() + timeout_s
            while True:
                _kill_all(top)
                try:
                    _rmdir_tree(top)
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise BackendError(f"cannot remove cgroup {top}: {exc}; its processes did not exit") from exc
                    time.sleep(0.05)
            with contextlib.suppress(OSError):
                top.parent.rmdir()  # the group, once its last workspace is gone

    def freeze(self, name: str, frozen: bool, timeout_s: float = 10.0) -> None:
        """Freeze (or thaw) every process in workspace ``name``'s unified cgroup and below it.

        cgroup v2's freezer (``cgroup.freeze``, Linux 5.2+): a core file, so it works on a hybrid host's
        unified hierarchy without any controller. The file stays root's (not delegated), and a
        frozen ancestor freezes every descendant whatever they write, so the container cannot thaw
        itself. Returns once ``cgroup.events`` says the whole subtree is (un)frozen. Blocking.

        Raises:
            BackendError: the workspace has no cgroup here (not running), the kernel lacks the v2
                freezer, or the subtree did not settle within ``timeout_s``.
        """
        unified = self.layout.workspace_dirs(name, self.group).get("unified")
        if unified is None or not (unified / "cgroup.procs").exists():
            raise BackendError(f"workspace {name!r} has no cgroup on this host; is it running?")
        control = unified / "cgroup.freeze"
        if not control.exists():
            raise BackendError("this kernel has no cgroup v2 freezer (cgroup.freeze, Linux 5.2+); pause needs it")
        try:
            control.write_text("1" if frozen else "0")
        except OSError as exc:
            raise BackendError(f"{'freezing' if frozen else 'thawing'} workspace {name!r} failed: {exc}") from exc
        want = f"frozen {int(frozen)}"
        deadline = time.monotonic() + timeout_s
        while want not in (unified / "cgroup.events").read_text().splitlines():
            if time.monotonic() > deadline:
                raise BackendError(
                    f"workspace {name!r} did not {'freeze' if frozen else 'thaw'} within {timeout_s:g} s"
                )
            time.sleep(0.001)

    def is_frozen(self, name: str) -> bool:
        """Whether workspace ``name``'s unified cgroup is frozen (False when it has none)."""
        unified = self.layout.workspace_dirs(name, self.group).get("unified")
        with contextlib.suppress(OSError):
            return (unified / "cgroup.freeze").read_text().strip() == "1" if unified else False
        return False

    def live_uid_bases(self) -> set[int]:
        """Owners of the delegated unified cgroups of every server's workspaces: uid bases in use here.

        Both kinds: the cgroups made here (``GROUP/NAME``) and the systemd scopes
        (``SLICE/sandbox-mcp-NAME-TAG.scope``, chowned by nspawn, :mod:`.scopes`).
        """
        unified = self.layout.unified
        out: set[int] = set()
        if unified is None:
            return out
        for d in [*unified.glob(f"{_GROUP}*/*"), *unified.glob(f"*.slice/{_GROUP}-*.scope")]:
            with contextlib.suppress(OSError):
                st = d.stat()
                if d.is_dir() and st.st_uid != 0:
                    out.add(st.st_uid)
        return out


def oom_kills_in(top: Path, *, v2: bool) -> int | None:
    """The OOM kills counted in memory cgroup ``top`` and below; None if it cannot be read.

    v2's ``memory.events`` counts the subtree already; v1 counts a kill only in the victim's own
    cgroup (``memory.oom_control``), so the subtree is summed (an Incus container's systemd makes
    cgroups of its own in v1 too).
    """
    try:
        if v2:
            return _field((top / "memory.events").read_text(), "oom_kill")
        total = 0
        for dirpath, _, files in os.walk(top):
            if "memory.oom_control" in files:
                total += _field((Path(dirpath) / "memory.oom_control").read_text(), "oom_kill") or 0
        return total if top.is_dir() else None
    except OSError:
        return None


def cpu_usage_s(cpu_stat: Path) -> float:
    """CPU seconds a cgroup used so far: ``usage_usec`` of its cgroup2 ``cpu.stat`` (there with or without
    the cpu controller).

    Raises:
        OSError: the file cannot be read.
        ValueError: it has no ``usage_usec``.
    """
    usec = _field(cpu_stat.read_text(), "usage_usec")
    if usec is None:
        raise ValueError(f"{cpu_stat} has no usage_usec")
    return usec / 1e6


def _field(text: str, key: str) -> int | None:
    """The value of ``key`` in a cgroup ``key value`` file (memory.events, memory.oom_control)."""
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key and v.strip().isdigit():
            return int(v)
    return None


def _kill_all(top: Path) -> None:
    kill = top / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
            return
    for procs in top.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            for pid in procs.read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)


def _rmdir_tree(top: Path) -> None:
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    top.rmdir()
