"""The benchmark's capacity section: how many container workspaces start at once, and what an idle one costs.

For unprivileged containers, and privileged ones in the same run when the settings allow them
(``SANDBOX_MCP_ALLOW_PRIVILEGED=true``):

- a ramp: 10, 20, 30, ... workspaces created at the same time (up to ``--parallel-max``, default
  40), each step all destroyed before the next; a step passes when every workspace runs and
  answers an exec, and the ramp stops at the first step that does not;
- MiB of host memory per idle workspace: the drop of ``MemAvailable`` from before a step to when
  all its workspaces have finished booting (``systemctl is-system-running`` inside says so) and a
  few seconds more, divided by their number, at each passing step; and, not disturbed by whatever
  else runs on the host (which moves MemAvailable by more than a workspace's worth on a shared
  machine), the mean memory charged to each workspace's cgroup then plus the private memory of its
  host processes outside that cgroup (the console-log copier; nspawn itself is in the cgroup);
- creates per second: the workspaces over the seconds until the last create returned (it had
  answered over SSH), next to "all running" (until systemd inside had finished booting too, polled
  only once every create has returned, so the polls take no CPU from the creates), against the
  baseline: the same number booted bare at once (:func:`.bare.bare_burst`: the network and the
  nspawn command until sshd's banner, without the registry, keys or the login), what this host's
  cores allow before anything of ours;
- the CPU it took, since on a small host CPU is what sets the pace: seconds of CPU per workspace in
  its cgroup (its whole boot: nspawn, systemd, sshd, the bench's polls), in this server process
  (per create: registry, network, SSH) and the host's busy CPU against what its cores could give
  while the creates ran (all of it: a step that used every core was CPU-bound); and the workspace's CPU by part
  (:func:`cpu_by_part`: systemd as PID 1, each unit still running, the rest);
- the host's ``fs.inotify.max_user_instances`` next to it, since that is what caps the ramp where
  ``scripts/setup`` has not raised it (:mod:`sandbox_mcp.sysctls`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from pathlib import Path
from typing import Any

import anyio

from .. import supervise
from ..config import Settings
from ..host.cgroups import CgroupHost, cpu_usage_s, group_for
from ..manager import WorkspaceManager
from ..models import CreateSpec
from ..runtimes.nspawn.settings import NspawnSettings
from .bare import bare_burst

__all__ = ["cpu_by_part", "format_capacity", "mem_available_mib", "ramp_steps", "run_capacity"]

_STEP = 10
# Until systemd inside has finished booting (asked as root: over systemd's own socket, so no dbus is started
# just to answer). Polled: `is-system-running --wait` never returned in a
# few of 40 workspaces started at once here, while polling saw every one "running".
_BOOTED = ('while s=$(sudo systemctl is-system-running); [ "$s" = starting ] || [ "$s" = initializing ]; do sleep 0.2; '
           'done; echo up')
_SETTLE_S = 5  # after the last one booted, before memory is read


def ramp_steps(cap: int, step: int = _STEP) -> list[int]:
    """10, 20, ... up to ``cap`` (``cap`` itself last when it is not a multiple)."""
    out = list(range(step, cap + 1, step))
    if cap > 0 and (not out or out[-1] != cap):
        out.append(cap)
    return out


def busy_cpu_s(stat: Path = Path("/proc/stat")) -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole host since boot, all cores (``/proc/stat``'s first line)."""
    fields = [int(x) for x in stat.read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields) - idle) / hz, sum(fields) / hz


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def private_mib(pid: int) -> float:
    """A process's private memory (``Private_Clean`` + ``Private_Dirty`` of its smaps_rollup) in MiB; 0 if it is gone."""
    kib = 0
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                kib += int(line.split()[1])
    return kib / 1024


def _outside_mib(state_dir: Path, group: str, name: str) -> float:
    """Private MiB of workspace ``name``'s tagged host processes that are not in its memory cgroup."""
    total = 0.0
    for ref in supervise.tagged(supervise.workspace_tag(state_dir, name)):
        with contextlib.suppress(OSError):
            memory = next((line for line in Path(f"/proc/{ref.pid}/cgroup").read_text().splitlines()
                           if ":memory:" in line or line.startswith("0::")), "")
            if f"/{group}/{name}" not in memory:
                total += private_mib(ref.pid)
    return total


# What cpu_by_part calls the CPU no unit's cgroup holds any more.
REST = "the rest"


def cpu_by_part(unified: Path) -> dict[str, float]:
    """CPU seconds of a workspace's cgroup (``unified``: its directory in the unified hierarchy) by part:
    ``init.scope`` (systemd as PID 1), each unit of ``system.slice`` still running (by unit name), and
    :data:`REST`: the total less those, which is nspawn's own setup, what ran before systemd moved itself
    into ``init.scope`` (its generators), and units that already finished (their cgroups are gone, their
    CPU stays in their parents'). Empty where the tree cannot be read."""
    try:
        total = cpu_usage_s(unified / "cpu.stat")
        parts: dict[str, float] = {}
        for stat in unified.rglob("cpu.stat"):
            where = stat.parent
            if where.name == "init.scope":
                parts["init.scope"] = parts.get("init.scope", 0.0) + cpu_usage_s(stat)
            elif where.parent.name == "system.slice":
                parts[where.name] = parts.get(where.name, 0.0) + cpu_usage_s(stat)
    except (OSError, ValueError):
        return {}
    parts[REST] = max(0.0, total - sum(parts.values()))
    return parts


def _mean_parts(parts: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each part over the workspaces (one that lacks a part counts as 0 there)."""
    readable = [p for p in parts if p]
    keys = {k for p in readable for k in p}
    return {k: sum(p.get(k, 0.0) for p in readable) / len(readable) for k in keys} if readable else {}


def mem_available_mib(meminfo: Path = Path("/proc/meminfo")) -> float:
    """``MemAvailable`` in MiB."""
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no MemAvailable in {meminfo}")


async def _step(settings: Settings, n: int) -> dict[str, Any]:
    """Create ``n`` workspaces at once; which failed, the seconds until all ran, MiB per idle one."""
    errors: dict[str, str] = {}
    names = [f"cap{i}" for i in range(n)]
    created: list[float] = []
    async with WorkspaceManager(settings) as m:
        before = mem_available_mib()
        busy0, total0 = busy_cpu_s()
        own0 = _own_cpu_s()
        t0 = time.monotonic()

        async def create(name: str) -> None:
            try:
                await m.create(CreateSpec(name=name))
                created.append(time.monotonic() - t0)
            except Exception as exc:  # a figure: how many failed, and the first reason
                errors[name] = str(exc)[:300]

        async def booted(name: str) -> None:
            try:
                r = await m.exec(name, _BOOTED, timeout_s=300)
                if r.stdout.strip() != "up":
                    errors[name] = f"exec said {r.stdout!r} {r.stderr[-200:]!r}"
            except Exception as exc:
                errors[name] = str(exc)[:300]

        try:
            # The creates alone first: the polls for "booted" (a sudo and a systemctl each, five times a second
            # per workspace) would otherwise take CPU from the creates still running, and the figure with it.
            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(create, name)
            busy1, total1 = busy_cpu_s()
            own_s = _own_cpu_s() - own0
            async with anyio.create_task_group() as tg:
                for name in names:
                    if name not in errors:
                        tg.start_soon(booted, name)
            elapsed = time.monotonic() - t0
            await anyio.sleep(_SETTLE_S)
            per_ws = (before - mem_available_mib()) / n
            cg = CgroupHost(group_for(settings.state_dir))
            usages = [cg.usage(name) for name in names]
            charged = [u["memory_bytes"] for u in usages if "memory_bytes" in u]
            cgroup_mib = sum(charged) / len(charged) / (1 << 20) if charged else None
            cpu = [u["cpu_s"] for u in usages if "cpu_s" in u]
            parts = _mean_parts([cpu_by_part(cg.layout.workspace_dirs(name, cg.group)["unified"]) for name in names])
            outside = [_outside_mib(settings.state_dir, cg.group, name) for name in names]
        finally:
            for ws in list((await m.registry.read()).workspaces):
                await m.destroy(ws)
    bare = await _bare_step(settings, names)
    return {"n": n, "failed": len(errors), "first_error": next(iter(errors.values()), None), **bare,
            "all_running_s": elapsed, "mib_per_idle_workspace": per_ws, "cgroup_mib_per_workspace": cgroup_mib,
            "all_created_s": max(created) if len(created) == n else None,
            "creates_per_s": n / max(created) if len(created) == n else None,
            "cgroup_cpu_s_per_workspace": sum(cpu) / len(cpu) if cpu else None,
            "cgroup_cpu_s_by_part": parts,
            "outside_mib_per_workspace": sum(outside) / n,
            "server_cpu_s_per_create": own_s / n,
            "host_busy_cpu_s": busy1 - busy0, "host_cpu_s": total1 - total0}


async def _bare_step(settings: Settings, names: list[str]) -> dict[str, Any]:
    """The baseline of a step: the same workspaces registered (not timed), then their runtimes started bare,
    all at once (:func:`.bare.bare_burst`: network and nspawn until sshd's banner; no registry, keys or
    login). What booting that many at once costs this host, against which the creates are measured."""
    async with WorkspaceManager(settings) as m:
        try:
            for name in names:
                await m.create(CreateSpec(name=name, start=False))
            busy0, total0 = busy_cpu_s()
            async with bare_burst(m, names) as burst:
                busy1, total1 = busy_cpu_s()  # before the stops
            wall_s, errors = burst.wall_s, burst.errors
        finally:
            for ws in list((await m.registry.read()).workspaces):
                await m.destroy(ws)
    if errors:
        return {"bare_failed": len(errors), "bare_first_error": next(iter(errors.values()))}
    return {"bare_all_answering_s": wall_s, "bare_per_s": len(names) / wall_s,
            "bare_host_busy_cpu_s": busy1 - busy0, "bare_host_cpu_s": total1 - total0}


async def run_capacity(settings: Settings, parallel_max: int) -> dict[str, Any]:
    """The ramp for each isolation this host and its settings allow; figures as data."""
    inotify = int(Path("/proc/sys/fs/inotify/max_user_instances").read_text())
    kinds: dict[str, Settings | str] = {"unprivileged": settings.with_runtime("nspawn", private_users=True)}
    kinds["privileged"] = (
        settings.with_runtime("nspawn", private_users=False) if NspawnSettings.of(settings).allow_privileged
        else "skipped: set SANDBOX_MCP_ALLOW_PRIVILEGED=true to compare"
    )
    out: dict[str, Any] = {"max_user_instances": inotify, "parallel_max": parallel_max}
    for kind, s in kinds.items():
        if isinstance(s, str):
            out[kind] = s
            continue
        steps = []
        for n in ramp_steps(parallel_max):
            result = await _step(s, n)
            steps.append(result)
            if result["failed"]:
                break
        out[kind] = steps
    return out


def format_capacity(results: dict[str, Any]) -> str:
    """The capacity figures as lines for people."""
    lines = [f"workspaces started at once (10, 20, ... up to {results['parallel_max']}; "
             f"fs.inotify.max_user_instances = {results['max_user_instances']}):"]
    for kind in ("unprivileged", "privileged"):
        steps = results[kind]
        if isinstance(steps, str):
            lines.append(f"  {kind}: {steps}")
            continue
        passed = [s for s in steps if not s["failed"]]
        failed = [s for s in steps if s["failed"]]
        most = passed[-1]["n"] if passed else 0
        tail = (f"; {failed[0]['failed']} of {failed[0]['n']} failed ({failed[0]['first_error']})" if failed
                else f" (no failure up to {results['parallel_max']})")
        lines.append(f"  {kind}: all of {most} started" + tail)
        for s in passed:
            lines.append(f"    {s['n']:3d} at once: all running in {s['all_running_s']:.1f} s, "
                         f"{s['mib_per_idle_workspace']:.1f} MiB of host memory per idle workspace (MemAvailable)"
                         + (f", {s['cgroup_mib_per_workspace']:.1f} MiB charged to its cgroup"
                            if s.get("cgroup_mib_per_workspace") is not None else ""))
            if s.get("cgroup_mib_per_workspace") is not None and s.get("outside_mib_per_workspace") is not None:
                lines.append(f"        {s['cgroup_mib_per_workspace'] + s['outside_mib_per_workspace']:.1f} MiB per idle "
                             f"workspace in its cgroup and its host processes outside it "
                             f"({s['outside_mib_per_workspace']:.2f} MiB of those)")
            if s.get("creates_per_s") is not None:
                lines.append(f"        all created (SSH answering) in {s['all_created_s']:.1f} s: "
                             f"{s['creates_per_s']:.1f} creates per second")
            if s.get("bare_per_s") is not None:
                busy = s["bare_host_busy_cpu_s"] / s["bare_host_cpu_s"] if s.get("bare_host_cpu_s") else None
                lines.append(f"        baseline, the same {s['n']} booted bare at once (network, nspawn, until sshd's "
                             f"banner): {s['bare_all_answering_s']:.1f} s, {s['bare_per_s']:.1f} per second"
                             + (f", host busy {100 * busy:.0f}%" if busy is not None else "")
                             + (f"; creates at {s['creates_per_s'] / s['bare_per_s']:.2f}x its rate"
                                if s.get("creates_per_s") else ""))
            elif s.get("bare_failed"):
                lines.append(f"        baseline, the same {s['n']} booted bare at once: {s['bare_failed']} failed "
                             f"({s['bare_first_error']})")
            if s.get("host_cpu_s"):
                cgroup = s.get("cgroup_cpu_s_per_workspace")
                lines.append(
                    "        CPU: " + (f"{cgroup:.3f} s per workspace in its cgroup, " if cgroup is not None else "")
                    + f"{s['server_cpu_s_per_create']:.3f} s per create in this process; the host was busy "
                    f"{s['host_busy_cpu_s']:.1f} of {s['host_cpu_s']:.1f} CPU-seconds "
                    f"({100 * s['host_busy_cpu_s'] / s['host_cpu_s']:.0f}%, every process on it)")
            if parts := s.get("cgroup_cpu_s_by_part"):
                rest = parts.get(REST, 0.0)
                named = sorted(((k, v) for k, v in parts.items() if k != REST), key=lambda kv: -kv[1])
                lines.append("        CPU per workspace by part: " + ", ".join(
                    f"{k} {1000 * v:.0f} ms" for k, v in named)
                    + f", {REST} {1000 * rest:.0f} ms (nspawn's setup, systemd's generators, units that finished;"
                    " the agent's part includes this bench's commands)")
    return "\n".join(lines)
