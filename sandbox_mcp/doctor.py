"""Host prerequisite checks for ``sandbox-mcp doctor``: each says what is wrong and exactly how to fix it."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import socket
from pathlib import Path

from pydantic import BaseModel

from .config import Settings
from .images.debootstrap import ImageStore

__all__ = ["Check", "daemon_checks", "run_checks"]


class Check(BaseModel):
    name: str
    ok: bool
    detail: str
    fix: str | None = None
    required: bool = True


def _which(program: str, package: str, name: str, why: str) -> Check:
    path = shutil.which(program)
    if path:
        return Check(name=name, ok=True, detail=path)
    return Check(name=name, ok=False, detail=f"{program} not found ({why})", fix=f"apt-get install {package}")


def daemon_checks(settings: Settings, *, uid: int | None = None) -> list[Check]:
    """Whether the daemon answers on its socket, and whether user ``uid`` (default: this one) may use it."""
    uid = os.geteuid() if uid is None else uid
    path = settings.daemon_socket
    answers, why = False, "not running (no socket)"
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            answers, why = True, f"answers at {path}"
        except PermissionError:
            why = f"{path} exists, but this user may not connect (see the group check)"
        except OSError as exc:
            why = f"{path} exists but nobody answers ({exc.strerror}): a stale socket"
        finally:
            probe.close()
    checks = [
        Check(
            name="daemon",
            ok=answers,
            detail=why,
            fix="sudo systemctl start sandbox-mcp (where systemd runs), else sudo scripts/serve --daemon",
            required=uid != 0,  # root can work in process
        )
    ]
    group = settings.daemon_group
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        checks.append(Check(name="daemon group", ok=uid == 0, detail=f"group {group!r} does not exist",
                            fix=f"groupadd --system {group} (scripts/setup does)", required=uid != 0))  # fmt: skip
        return checks
    if uid == 0:
        checks.append(Check(name="daemon group", ok=True, detail="root needs no group", required=False))
        return checks
    try:
        entry = pwd.getpwuid(uid)
        listed = gid in os.getgrouplist(entry.pw_name, entry.pw_gid)
        name = entry.pw_name
    except KeyError:
        listed, name = False, str(uid)
    active = uid != os.geteuid() or gid in (os.getegid(), *os.getgroups())
    ok = listed and active
    detail = (f"{name} is in group {group!r}" if ok else
              f"{name} is in group {group!r}, but this login predates it" if listed else
              f"{name} is not in group {group!r}")  # fmt: skip
    fix = "log in again (or run `newgrp " + group + "`)" if listed else f"sudo usermod -aG {group} {name}, then log in again"
    checks.append(Check(name="daemon group", ok=ok, detail=detail, fix=fix))
    return checks


def run_checks(settings: Settings, *, proc: Path = Path("/proc")) -> list[Check]:
    """Check what direct mode needs on this host. Pure reads: changes nothing."""
    daemon = daemon_checks(settings)
    checks = [
        Check(
            name="root",
            ok=os.geteuid() == 0 or daemon[0].ok,
            detail=f"running as uid {os.geteuid()}" + ("; the daemon does the root work" if daemon[0].ok else ""),
            fix="start the daemon (sudo systemctl start sandbox-mcp, or sudo scripts/serve --daemon), or run as "
            "root: workspaces need network namespaces and containers",
        ),
        *daemon,
        _which("systemd-nspawn", "systemd-container", "systemd-nspawn", "runs the containers"),
        _which("debootstrap", "debootstrap", "debootstrap", "builds the root image once"),
        _which("cp", "coreutils", "coreutils", "copies image variants"),
    ]
    filesystems = (proc / "filesystems").read_text() if (proc / "filesystems").exists() else ""
    checks.append(
        Check(
            name="overlayfs",
            ok="overlay" in filesystems,
            detail="overlay listed in /proc/filesystems" if "overlay" in filesystems else "overlay filesystem missing",
            fix="modprobe overlay (kernel CONFIG_OVERLAY_FS); each boot gets a fresh overlay on the shared image",
        )
    )
    checks.append(
        Check(
            name="network namespaces",
            ok=(proc / "self/ns/net").exists(),
            detail="/proc/self/ns/net present",
            fix="a kernel with CONFIG_NET_NS is required",
        )
    )
    mountinfo = (proc / "self/mountinfo").read_text() if (proc / "self/mountinfo").exists() else ""
    cgroup2 = " - cgroup2 " in mountinfo
    checks.append(
        Check(
            name="cgroup v2",
            ok=cgroup2,
            detail="a cgroup2 hierarchy is mounted" if cgroup2 else "no cgroup2 mount",
            fix="mount cgroup2 at /sys/fs/cgroup (or /sys/fs/cgroup/unified): nspawn boots systemd inside with it",
        )
    )
    tun = Path("/dev/net/tun").exists()
    checks.append(
        Check(
            name="/dev/net/tun",
            ok=tun,
            detail="present" if tun else "missing (only VMs need it)",
            fix="modprobe tun",
            required=False,
        )
    )
    existing = next(p for p in (settings.state_dir, *settings.state_dir.parents) if p.exists())
    writable = existing.is_dir() and os.access(existing, os.W_OK)
    checks.append(
        Check(
            name="state dir",
            ok=writable,
            detail=str(settings.state_dir),
            fix="set SANDBOX_MCP_STATE_DIR to a writable directory",
        )
    )
    store = ImageStore(settings)
    built = store.exists(store.key(()))
    checks.append(
        Check(
            name="root image",
            ok=built,
            detail=(f"cached at {store.path(store.key(()))}" if built else
                    f"not built yet ({store.suite}, mirror {store.mirror or 'debootstrap default'})"),
            fix="the first create_workspace builds it (about a minute); or run 'sandbox-mcp create warmup'",
            required=False,
        )
    )
    if settings.nat:
        checks.append(_which("nft", "nftables", "nft", "SANDBOX_MCP_NAT=true masquerades the workspace subnet"))
    checks.append(_which("ssh", "openssh-client", "ssh client", "only for 'sandbox-mcp ssh' and the benchmark"))
    checks[-1].required = False
    return checks
