"""What this host offers user-namespaced containers, and the kernel limits that cap how many fit.

Read-only: for the nspawn runtime (which refuses to fall back to privileged containers
silently) and for ``sandbox-mcp doctor``. Each finding says what is missing and how to fix it.
"""

from __future__ import annotations

import re
import resource
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .. import sysctls
from ..models import Check

__all__ = ["KernelLimit", "isolation_checks", "kernel_limits", "open_files_ceiling", "userns_blockers"]

_RELEASE_RE = re.compile(r"^(\d+)\.(\d+)")
IDMAP_KERNEL = (5, 12)  # mount_setattr(MOUNT_ATTR_IDMAP)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


_CAP_SYS_RESOURCE = 24


def open_files_ceiling(wanted: int, status: str | None = None) -> int:
    """The RLIMIT_NOFILE hard limit a process this server starts can get: ``wanted``, unless the server
    may not raise its own hard limit (no CAP_SYS_RESOURCE, as in some sandboxes) and that is lower.

    A container's runtime (nspawn, Incus's LXC on this host) then clamps it to the server's: the
    limit the workspace really has, and so the one reported. ``status``: /proc/self/status's text.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= wanted:
        return wanted
    text = status if status is not None else (_read(Path("/proc/self/status")) or "")
    eff = next((line.split()[1] for line in text.splitlines() if line.startswith("CapEff:")), "0")
    return wanted if int(eff, 16) >> _CAP_SYS_RESOURCE & 1 else hard


def userns_blockers(proc: Path = Path("/proc"), release: str | None = None) -> list[str]:
    """Why user-namespaced containers cannot run here (each with its fix); empty if they can."""
    out = []
    max_ns = _read(proc / "sys/user/max_user_namespaces")
    if max_ns is not None and max_ns.isdigit() and int(max_ns) == 0:
        out.append("user namespaces are disabled (user.max_user_namespaces = 0): sysctl -w user.max_user_namespaces=65536")
    if not (proc / "self/ns/user").exists():
        out.append("the kernel has no user namespaces (CONFIG_USER_NS): use a kernel built with it")
    mounts = _read(proc / "self/mounts") or ""
    if not any(len(f := line.split()) > 2 and f[2] == "cgroup2" for line in mounts.splitlines()):
        out.append("no cgroup2 (unified) hierarchy is mounted: mount -t cgroup2 none /sys/fs/cgroup/unified")
    m = _RELEASE_RE.match(release if release is not None else (_read(proc / "sys/kernel/osrelease") or ""))
    if m and (int(m.group(1)), int(m.group(2))) < IDMAP_KERNEL:
        out.append(f"Linux {m.group(0)} has no idmapped mounts (5.12+ needed): upgrade the kernel")
    if "overlay" not in (_read(proc / "filesystems") or ""):
        out.append("overlayfs is missing: modprobe overlay")
    return out


@dataclass(frozen=True)
class KernelLimit:
    """A sysctl that caps how many workspaces fit, with its value and what it allows."""

    sysctl: str
    value: int | None
    detail: str
    fix: str | None


def kernel_limits(proc: Path = Path("/proc")) -> list[KernelLimit]:
    """The kernel limits that cap the number of workspaces, read from ``proc``.

    inotify instances and watches stay shared with user namespaces too: every container's count
    against host root's (:mod:`sandbox_mcp.sysctls` says why and what was measured). The fix
    for both is ``scripts/setup`` run as root, which writes and applies ``CONF_PATH``.
    """

    def num(rel: str) -> int | None:
        v = _read(proc / rel)
        return int(v) if v is not None and v.lstrip("-").isdigit() else None

    setup_fix = f"run scripts/setup as root (writes and applies {sysctls.CONF_PATH})"
    out = []
    inst = num("sys/fs/inotify/max_user_instances")
    if inst is not None:
        idle, booting = inst // sysctls.INOTIFY_INSTANCES_IDLE, inst // sysctls.INOTIFY_INSTANCES_BOOTING
        want = sysctls.RECOMMENDED["fs.inotify.max_user_instances"]
        out.append(
            KernelLimit(
                "fs.inotify.max_user_instances",
                inst,
                f"{inst} shared by all containers and host root (~{sysctls.INOTIFY_INSTANCES_IDLE} per idle "
                f"workspace, ~{sysctls.INOTIFY_INSTANCES_BOOTING} while one boots): about {idle} workspaces, "
                f"{booting} created at once, fewer as other root processes use some",
                None if booting >= 100 else f"{setup_fix}, or sysctl -w fs.inotify.max_user_instances={want}",
            )
        )
    watches = num("sys/fs/inotify/max_user_watches")
    if watches is not None:
        fits = watches // sysctls.INOTIFY_WATCHES_PER_WORKSPACE
        want = sysctls.RECOMMENDED["fs.inotify.max_user_watches"]
        out.append(
            KernelLimit(
                "fs.inotify.max_user_watches",
                watches,
                f"{watches} shared by all containers and host root (~{sysctls.INOTIFY_WATCHES_PER_WORKSPACE} per "
                f"workspace, more as agents watch files): about {fits} workspaces",
                None if fits >= 1000 else f"{setup_fix}, or sysctl -w fs.inotify.max_user_watches={want}",
            )
        )
    ns = num("sys/user/max_user_namespaces")
    if ns is not None:
        out.append(
            KernelLimit(
                "user.max_user_namespaces",
                ns,
                f"{ns} user namespaces (one per workspace, more for nested ones)",
                None if ns >= 256 else "sysctl -w user.max_user_namespaces=65536",
            )
        )
    pid_max = num("sys/kernel/pid_max")
    if pid_max is not None:
        out.append(
            KernelLimit(
                "kernel.pid_max",
                pid_max,
                f"{pid_max} processes host-wide; each workspace may use up to its tasks limit",
                None if pid_max >= 65536 else "sysctl -w kernel.pid_max=4194304",
            )
        )
    keys = num("sys/kernel/keys/maxkeys")
    if keys is not None:
        out.append(KernelLimit("kernel.keys.maxkeys", keys, f"{keys} keys per uid (per workspace root)", None))
    return out


def isolation_checks(
    *,
    private_users: bool,
    allow_privileged: bool,
    enforced: Mapping[str, str | None],
    proc: Path = Path("/proc"),
    release: str | None = None,
) -> list[Check]:
    """Doctor's checks for unprivileged containers, resource limits and the kernel limits on their number.

    ``enforced`` maps cgroup controllers to ``"v2"``/``"v1"``/None (:meth:`CgroupHost.enforced`).
    """
    blockers = userns_blockers(proc, release)
    userns_ok = not blockers
    if not private_users:
        detail = "private_users is false: containers run privileged (root inside is root on the host)"
    elif userns_ok:
        detail = "root inside a container is an unprivileged uid range on the host"
    else:
        detail = "; ".join(blockers)
    checks = [
        Check(
            name="unprivileged containers",
            ok=userns_ok and private_users,
            detail=detail,
            fix=None if userns_ok and private_users else (
                "; ".join(b.split(": ", 1)[-1] for b in blockers) if blockers else "set private_users = true"
            ) + (" (SANDBOX_MCP_ALLOW_PRIVILEGED=true is set: privileged containers are used meanwhile)"
                 if allow_privileged else " (until then create fails; SANDBOX_MCP_ALLOW_PRIVILEGED=true would "
                 "allow privileged containers instead)"),
            required=not allow_privileged,
        )
    ]
    missing = sorted(c for c, where in enforced.items() if where is None)
    checks.append(
        Check(
            name="resource limits",
            ok=not missing,
            detail=", ".join(f"{c}: cgroup {w}" if w else f"{c}: not enforceable" for c, w in sorted(enforced.items())),
            fix=None if not missing else f"enable the {', '.join(missing)} controller(s) (cgroup v2 "
            "cgroup.subtree_control, or mount the v1 hierarchy); without, those limits are not enforced",
            required=False,
        )
    )
    for limit in kernel_limits(proc):
        checks.append(
            Check(name=limit.sysctl, ok=limit.fix is None, detail=limit.detail, fix=limit.fix, required=False)
        )
    return checks
