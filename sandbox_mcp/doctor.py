"""Host prerequisite checks for ``sandbox-mcp doctor``: each says what is wrong and exactly how to fix it."""

from __future__ import annotations

import grp
import os
import pwd
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from . import diskimage
from .checks import which_check
from .config import Settings
from .errors import SandboxError
from .models import Check
from .registry import Registry

if TYPE_CHECKING:
    from .runtimes import Runtime

__all__ = [
    "Check", "daemon_checks", "firewall_check", "host_services_check", "pool_check", "run_checks", "serve_check",
    "which_check",
]


def serve_check(settings: Settings) -> Check:
    """Where ``serve`` and the CLI send their calls (the daemon or this process), and whether settings
    given here would be ignored there (then they refuse to start)."""
    from .daemon_use import daemon_socket_present, ignored_settings, where_serve_goes

    detail = where_serve_goes(settings)
    ignored = ignored_settings(settings) if settings.use_daemon and daemon_socket_present(settings) else []
    if ignored:
        detail += f"; but {', '.join(ignored)} set here would be ignored there, so serve and the CLI refuse"
    return Check(name="serve goes", ok=not ignored, detail=detail, required=False,
                 fix="unset those settings to use the daemon, or pass --no-daemon to work in process (as root)")


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


def host_disk_check(settings: Settings, unavailable: str | None) -> Check:
    """Whether a workspace's host files are bounded (``host_disk_mib``, see :mod:`sandbox_mcp.diskimage`),
    and why not. ``unavailable``: :func:`sandbox_mcp.diskimage.unavailable`'s answer for this server."""
    limit = settings.host_disk_mib
    if limit is not None and unavailable is None:
        return Check(name="workspace host disk", ok=True, required=False,
                     detail=f"each workspace's state dir is a {limit} MiB disk image of its own (HOST_DISK_MIB)")
    why = ("HOST_DISK_MIB is not set" if limit is None else
           f"HOST_DISK_MIB={limit} is set, but {unavailable}")  # fmt: skip
    return Check(
        name="workspace host disk", ok=False, required=False,
        detail=f"{why}: a workspace's files are limited only by the free space under {settings.state_dir}, so "
        "one workspace can fill it for the others and the host (limits.host_disk_mib is null)",
        fix="set SANDBOX_MCP_HOST_DISK_MIB (e.g. 20480) with a root server, or put the state dir on a file "
        "system of its own",
    )  # fmt: skip


def pool_check(settings: Settings, runtimes: Mapping[str, Runtime]) -> Check:
    """The warm pool (:mod:`sandbox_mcp.manager.pool`): its size, the slots ready now, or why there is none."""
    size = settings.pool_size
    keeper = next((r for r in runtimes.values() if "container" in r.types and r.has_pool), None)
    fix = ("set SANDBOX_MCP_POOL_SIZE (e.g. 2) for the server (serve, the daemon): a create of the default spec then "
           "claims a booted container in about 10 ms instead of booting one; each slot costs an idle container's "
           "memory (about 14 MiB)")
    if size == 0 or keeper is None or settings.host_disk_mib is not None:
        why = ("pool_size is 0" if size == 0 else "host_disk_mib is set" if keeper is not None
               else "this mode's containers cannot be pooled")  # fmt: skip
        return Check(name="warm pool", ok=False, required=False, detail=f"{why}: every create boots", fix=fix)
    try:
        records = Registry(settings.registry_path).read_sync().workspaces.values()
    except SandboxError as exc:
        return Check(name="warm pool", ok=False, required=False, detail=f"the registry cannot be read: {exc}", fix=fix)
    ready = sum(1 for r in records if r.pooled and r.state == "running")
    return Check(name="warm pool", ok=True, required=False,
                 detail=f"{ready} of {size} slots ready now ({keeper.name}; the running server refills them); a "
                 "create that claimed one says timings.from_pool")


def host_services_check(settings: Settings) -> Check:
    """The host's own services for running workspaces: the egress resolver (workspaces with a domain list)
    and the secrets proxy (workspaces with secrets); each running, not needed, or down."""
    from .hostnet.resolver_service import ResolverService
    from .manager.watchdog import CHECK_INTERVAL_S
    from .secrets.service import SecretsService

    name = "host services"
    server_dir = settings.state_dir / ".server"
    if server_dir.exists() and not os.access(server_dir, os.R_OK | os.X_OK):
        return Check(name=name, ok=True, required=False, detail=f"{server_dir} is not readable by this user (the "
                     "daemon's): ask whoever runs it, or run doctor as root")  # fmt: skip
    resolver, secrets = ResolverService(settings), SecretsService(settings)
    services = [
        ("egress resolver", len(resolver.workspaces()), resolver.process(), "with a domain list", resolver.log_path),
        ("secrets proxy", len(secrets.paths.client_ips()), secrets.proxy_running(), "with secrets", secrets.paths.log),
    ]
    parts, down = [], []
    for what, users, ref, having, log_path in services:
        if ref is not None:
            parts.append(f"{what} running (pid {ref.pid}) for {users} workspace(s) {having}")
        elif users:
            parts.append(f"{what} DOWN: {users} workspace(s) {having} go without it (its log: {log_path})")
            down.append(what)
        else:
            parts.append(f"{what} not needed (no running workspace {having})")
    return Check(name=name, ok=not down, required=False, detail="; ".join(parts),
                 fix=f"a running server or daemon starts {' and '.join(down) or 'them'} again within "
                 f"{CHECK_INTERVAL_S:g} s; with none running, start one (sandbox-mcp serve, the daemon), or "
                 "start_workspace a workspace that needs it")


def firewall_check(settings: Settings, runtimes: Mapping[str, Runtime]) -> Check | None:
    """Our nft tables, where this mode's workspaces run on the host's bridge: loaded with a port for each running
    workspace, or MISSING (``nft flush ruleset``, a firewall service restarted): then every running workspace
    reaches the host's services and the others until a server puts them back. None where no runtime uses the
    bridge."""
    from .hostnet import firewall
    from .manager.watchdog import CHECK_INTERVAL_S

    on_bridge = {r.name for r in runtimes.values() if r.host_network}
    if not on_bridge:
        return None
    name, bridge = "firewall", settings.bridge
    if os.geteuid() != 0:
        return Check(name=name, ok=True, required=False, detail="only root can list the host's nft tables: run "
                     "doctor as root to check them")  # fmt: skip
    fix = (f"a running server or daemon loads the tables again and admits every running workspace within "
           f"{CHECK_INTERVAL_S:g} s; with none running, start one (sandbox-mcp serve, the daemon), or stop the "
           "workspaces (sandbox-mcp stop NAME)")  # fmt: skip
    try:
        # Read only where there is a registry: opening one makes its lock file, and doctor changes nothing.
        exists = settings.registry_path.exists()
        records = list(Registry(settings.registry_path).read_sync().workspaces.values()) if exists else []
        present = firewall.table_exists_sync(bridge)
    except SandboxError as exc:
        return Check(name=name, ok=False, required=False, detail=f"cannot check: {exc}", fix=fix)
    running = sum(1 for r in records if r.runtime in on_bridge and r.state in ("running", "paused"))
    if present is None:
        if not running:
            return Check(name=name, ok=True, required=False,
                         detail=f"no tables for {bridge} and no workspace running on it (a start loads them)")
        return Check(name=name, ok=False, detail=f"the tables for {bridge} are MISSING while {running} "
                     "workspace(s) run on it: they reach the host's services and each other (someone ran nft "
                     "flush ruleset, or a firewall service restarted)", fix=fix)  # fmt: skip
    if (missing := firewall.missing_guards(bridge, present)) and not running:
        return Check(name=name, ok=True, required=False, detail=f"the tables for {bridge} lack rules, and no "
                     "workspace runs on it (a start loads them whole again)")  # fmt: skip
    if missing:
        return Check(name=name, ok=False, detail=f"the tables for {bridge} lack {len(missing)} of the rules that "
                     f"hold the policy ({'; '.join(missing[:3])}{'; ...' if len(missing) > 3 else ''}): workspaces "
                     "reach the host's services and each other (someone ran nft flush table, or deleted rules)",
                     fix=fix)  # fmt: skip
    admitted = len(firewall.admitted_ports(present))
    if admitted < running:
        return Check(name=name, ok=False, detail=f"the tables for {bridge} admit {admitted} port(s) for {running} "
                     "running workspace(s): the others are cut off (the tables were loaded again under them)",
                     fix=fix)  # fmt: skip
    return Check(name=name, ok=True, required=False,
                 detail=f"the tables for {bridge} are loaded: {admitted} port(s) admitted, {running} workspace(s) running")


def run_checks(settings: Settings, *, proc: Path = Path("/proc")) -> list[Check]:
    """Check what this host needs: the general prerequisites, then each runtime's own. Pure reads."""
    from .runtimes import RuntimeContext, build_runtimes, resolve_mode

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
        serve_check(settings),
        which_check("cp", "coreutils", "copies image variants", name="coreutils"),
        which_check("git", "git", "create_workspace with repo= and fetch_workspace run git on the host",
                    required=False),
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
    checks.append(host_disk_check(settings, diskimage.unavailable()))
    # The runtimes of this host's mode add theirs; a runtime that refuses the settings says why.
    mode = settings.mode
    try:
        mode = resolve_mode(settings)
        runtimes = build_runtimes(mode, RuntimeContext.for_settings(settings, client_public_key=""))
    except SandboxError as exc:
        checks.append(Check(name=f"{mode} mode", ok=False, detail=str(exc), fix="see the message"))
        runtimes = {}
    for runtime in runtimes.values():
        checks.extend(runtime.checks())
    checks.append(pool_check(settings, runtimes))
    checks.append(host_services_check(settings))
    if (fw := firewall_check(settings, runtimes)) is not None:
        checks.append(fw)
    checks.append(which_check("ssh", "openssh-client", "only for 'sandbox-mcp ssh' and the benchmark",
                              name="ssh client", required=False))
    return checks
