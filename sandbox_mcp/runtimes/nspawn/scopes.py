"""Who makes a container workspace's cgroup: a delegated systemd scope, or this server by hand.

Where systemd is PID 1 it owns the cgroup tree, and writing into it behind its back is wrong
(systemd.io/CGROUP_DELEGATION): there nspawn starts inside a transient scope,
``systemd-run --scope --quiet --collect --unit=sandbox-mcp-NAME-TAG.scope -p Delegate=yes`` with the
workspace's limits as unit properties. ``systemd-run --scope`` registers the scope for its own PID
and then execs the command in place, so the PID the supervisor records is still nspawn's (the
console-log bound and environment wrappers exec in turn). nspawn keeps ``--keep-unit
--register=no``: it uses that scope as the container's cgroup and, with a user namespace, chowns the
delegated subtree to the container's root itself. Stopping the scope by its exact name
(``systemctl stop``) ends whatever is left in it; ``--collect`` lets systemd forget it once empty,
failed or not.

Elsewhere (no systemd as PID 1, as on the dev machines) :mod:`sandbox_mcp.host.cgroups` makes the
cgroup in the unified hierarchy. ``SANDBOX_MCP_CGROUPS`` (``auto``, ``systemd``, ``direct``)
forces either way; ``auto`` detects systemd as sd_booted(3) does.

The systemd path cannot run here (no systemd as PID 1): its argv are tested exactly, not run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from ... import hostcmd
from ...errors import BackendError, InvalidSpec
from ...models import Check, Limits
from ...naming import validate_ident
from ...supervise import workspace_tag

__all__ = [
    "CgroupManager",
    "cgroup_manager",
    "freeze_scope_argv",
    "manager_check",
    "scope_argv",
    "scope_unit",
    "stop_scope",
    "stop_scope_argv",
    "systemd_booted",
]

CgroupManager = Literal["systemd", "direct"]
_SCOPE_RE = re.compile(r"^sandbox-mcp-[a-z][a-z0-9-]{0,11}-[0-9a-f]{8}\.scope$")
_SD_BOOTED = Path("/run/systemd/system")
# systemctl's exit status for a unit that is not loaded (LSB "program is not installed"):
# the scope is gone already.
_NOT_LOADED = 5


def systemd_booted(marker: Path = _SD_BOOTED) -> bool:
    """Whether systemd is PID 1 here: sd_booted(3)'s test, ``/run/systemd/system`` is a directory."""
    return marker.is_dir()


def cgroup_manager(setting: str, booted: bool | None = None) -> CgroupManager:
    """The one choice: ``"systemd"`` (a delegated scope per workspace) or ``"direct"`` (cgroupfs).

    ``setting`` is ``Settings.cgroups``: ``"auto"`` picks systemd where it is PID 1 (``booted``,
    default: :func:`systemd_booted`).

    Raises:
        InvalidSpec: ``setting`` is not auto, systemd or direct.
        BackendError: ``"systemd"`` is forced on a host where systemd is not PID 1.
    """
    if setting not in ("auto", "systemd", "direct"):
        raise InvalidSpec(f"cgroups setting {setting!r} is not one of auto, systemd, direct")
    booted = systemd_booted() if booted is None else booted
    if setting == "direct":
        return "direct"
    if setting == "systemd" and not booted:
        raise BackendError(
            "SANDBOX_MCP_CGROUPS=systemd, but systemd is not PID 1 here (/run/systemd/system is missing); "
            "set SANDBOX_MCP_CGROUPS=auto or direct"
        )
    return "systemd" if booted else "direct"


def manager_check(setting: str, booted: bool | None = None) -> Check:
    """Doctor's line on which cgroup manager container workspaces use here, and why."""
    booted = systemd_booted() if booted is None else booted
    try:
        manager = cgroup_manager(setting, booted)
    except (InvalidSpec, BackendError) as exc:
        return Check(name="cgroup manager", ok=False, detail=str(exc), fix="set SANDBOX_MCP_CGROUPS=auto")
    why = "forced by SANDBOX_MCP_CGROUPS" if setting != "auto" else (
        "systemd is PID 1" if booted else "no systemd as PID 1")
    detail = (f"systemd: each workspace in a delegated scope sandbox-mcp-NAME-TAG.scope ({why})"
              if manager == "systemd" else f"direct: the server makes each workspace's cgroup itself ({why})")
    return Check(name="cgroup manager", ok=True, detail=detail, required=False)


def scope_unit(state_dir: Path, name: str) -> str:
    """The scope of workspace ``name``: ``sandbox-mcp-NAME-TAG.scope``, TAG from the state dir and name.

    Two servers (state dirs) never share a scope for one workspace name.

    Raises:
        InvalidSpec: ``name`` is not a valid workspace name.
    """
    validate_ident(name)
    unit = f"sandbox-mcp-{name}-{workspace_tag(state_dir, name)[:8]}.scope"
    return _check_scope(unit)


def _check_scope(unit: str) -> str:
    if not _SCOPE_RE.fullmatch(unit):
        raise InvalidSpec(f"{unit!r} is not a sandbox-mcp scope name (sandbox-mcp-NAME-XXXXXXXX.scope)")
    return unit


def scope_argv(unit: str, limits: Limits, argv: list[str]) -> list[str]:
    """``argv`` started in the delegated transient scope ``unit`` that enforces ``limits``.

    Memory includes swap (none beyond the limit), as on the direct path. CPU is a quota in
    percent of one CPU (at least 1%).

    Raises:
        InvalidSpec: ``unit`` is not a sandbox-mcp scope name, or ``argv`` is empty.
    """
    if not argv:
        raise InvalidSpec("no command to run in the scope")
    cpu_percent = max(1, round(limits.cpus * 100))
    return [
        "systemd-run",
        "--scope",
        "--quiet",
        "--collect",
        f"--unit={_check_scope(unit)}",
        "-p", "Delegate=yes",
        "-p", f"MemoryMax={limits.memory_mib}M",
        "-p", "MemorySwapMax=0",
        "-p", f"TasksMax={limits.tasks}",
        "-p", f"CPUQuota={cpu_percent}%",
        "--",
        *argv,
    ]  # fmt: skip


def freeze_scope_argv(unit: str, frozen: bool) -> list[str]:
    """``systemctl freeze|thaw UNIT``: systemd's own use of the cgroup freezer on the delegated scope.

    Raises:
        InvalidSpec: ``unit`` is not a sandbox-mcp scope name.
    """
    return ["systemctl", "freeze" if frozen else "thaw", "--", _check_scope(unit)]


def stop_scope_argv(unit: str) -> list[str]:
    """``systemctl stop UNIT``: ends every process left in the scope; systemd then drops it.

    Raises:
        InvalidSpec: ``unit`` is not a sandbox-mcp scope name.
    """
    return hostcmd.systemctl_argv("stop", _check_scope(unit), "none")


async def stop_scope(unit: str, timeout_s: float = 30) -> None:
    """Stop scope ``unit`` if it exists (a unit systemd does not know is fine).

    Raises:
        BackendError: systemctl failed otherwise (the message has its output).
        CommandTimeout: it did not finish within ``timeout_s``.
    """
    done = await hostcmd.run(stop_scope_argv(unit), timeout_s=timeout_s, check=False)
    if done.returncode not in (0, _NOT_LOADED):
        raise BackendError(
            f"systemctl stop {unit} failed ({done.returncode}): {(done.stderr or done.stdout).strip()[-500:]}; "
            "see 'systemctl status' for it"
        )
