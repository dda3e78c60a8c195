"""Host prerequisite checks for ``sandbox-mcp doctor``: each says what is wrong and exactly how to fix it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .config import Settings
from .errors import SandboxError
from .models import Check

__all__ = ["Check", "run_checks", "which_check"]


def which_check(program: str, package: str, why: str, *, name: str | None = None, required: bool = True) -> Check:
    """A check that ``program`` is on PATH, naming the Debian package that has it."""
    path = shutil.which(program)
    if path:
        return Check(name=name or program, ok=True, detail=path, required=required)
    return Check(name=name or program, ok=False, detail=f"{program} not found ({why})",
                 fix=f"apt-get install {package}", required=required)


def run_checks(settings: Settings, *, proc: Path = Path("/proc")) -> list[Check]:
    """Check what this host needs: the general prerequisites, then each runtime's own. Pure reads."""
    from .runtimes import RuntimeContext, build_runtimes, resolve_mode

    checks = [
        Check(
            name="root",
            ok=os.geteuid() == 0,
            detail=f"running as uid {os.geteuid()}",
            fix="run the server as root (sudo sandbox-mcp serve): it creates network namespaces and containers",
        ),
        which_check("cp", "coreutils", "copies image variants", name="coreutils"),
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
    # The runtimes of this host's mode add theirs; a runtime that refuses the settings says why.
    mode = resolve_mode(settings)
    try:
        runtimes = build_runtimes(mode, RuntimeContext.for_settings(settings, client_public_key=""))
    except SandboxError as exc:
        checks.append(Check(name=f"{mode} mode", ok=False, detail=str(exc), fix="see the message"))
        runtimes = {}
    for runtime in runtimes.values():
        checks.extend(runtime.checks())
    checks.append(which_check("ssh", "openssh-client", "only for 'sandbox-mcp ssh' and the benchmark",
                              name="ssh client", required=False))
    return checks
