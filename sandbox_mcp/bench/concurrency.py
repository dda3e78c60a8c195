"""The benchmark's concurrency section: many ``exec true`` at once over several workspaces.

``--concurrent-calls`` (200) calls at once, spread round-robin over ``--concurrent-workspaces`` (10)
running containers, ``--concurrent-rounds`` (5) rounds, each path in turn within a round so load that
drifts during the run weighs on every path alike. The paths, from the wire down:

- ``stdio``: one ``sandbox-mcp serve`` child over stdio, working in process (the issue's figure);
- ``mcp``: the in-process MCP client on the server object (no transport);
- ``manager``: :meth:`WorkspaceManager.exec` in this process (the pool, the agent; no MCP);
- the baseline ``raw``: asyncssh on its own, a session per command (``conn.run``) on one connection
  per workspace to the same sshd, with the same keys: what SSH itself allows at this concurrency.

Per path: calls per second (the calls over the wall time of their round; the median round) and the
p50/p95 of each call's own latency over every round; and where the CPU went, in milliseconds per call:
this process (the client, and the server when in process), the stdio ``serve`` child, and the
workspaces (their cgroups: sshd, the exec agent, ``sh``). On a machine of N cores a path cannot
exceed N / (their sum) calls per millisecond, and one process not 1 / its own share: the section
prints that ceiling per path, and the floor under every call, the CPU one ``sh -c true`` started
on this host costs (each call starts one).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from ..config import Settings
from ..host.cgroups import CgroupHost, cpu_usage_s, group_for
from ..manager import WorkspaceManager
from .figures import pct

__all__ = ["format_concurrency", "run_concurrency", "serve_env"]

Call = Callable[[str], Awaitable[None]]


def serve_env(settings: Settings, daemon_socket: Path) -> dict[str, str]:
    """The environment of a ``sandbox-mcp serve`` child working on ``settings``' state and bridge
    (in process unless a daemon listens on ``daemon_socket``)."""
    return {**os.environ, "SANDBOX_MCP_STATE_DIR": str(settings.state_dir), "SANDBOX_MCP_BRIDGE": settings.bridge,
            "SANDBOX_MCP_MODE": "direct", "SANDBOX_MCP_HOSTS_FILE": "", "SANDBOX_MCP_IMAGE_DIR": str(settings.image_dir),
            "SANDBOX_MCP_SUBNET": str(settings.subnet), "SANDBOX_MCP_DAEMON_GROUP": "root",
            "SANDBOX_MCP_CONFIG": "/nonexistent", "SANDBOX_MCP_DAEMON_SOCKET": str(daemon_socket)}  # fmt: skip


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _serve_child() -> int | None:
    """The PID of this process's ``sandbox-mcp serve`` child (the stdio path's server)."""
    me = str(os.getpid())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == me and b"serve" in argv:
            return int(entry.name)
    return None


def _workspaces_cpu_s(cpu_stats: list[Path]) -> float | None:
    """CPU seconds the workspaces' cgroups used so far (cgroup2 ``cpu.stat``); None where unreadable."""
    try:
        return sum(cpu_usage_s(path) for path in cpu_stats)
    except (OSError, ValueError):
        return None


class _Cpu:
    """CPU used by this process, the serve child and the workspaces between two readings."""

    def __init__(self, serve_pid: int | None, cpu_stats: list[Path]) -> None:
        self.serve_pid, self.cpu_stats = serve_pid, cpu_stats

    def read(self) -> tuple[float, float, float | None]:
        serve = _proc_cpu_s(self.serve_pid) if self.serve_pid is not None else 0.0
        return time.process_time(), serve, _workspaces_cpu_s(self.cpu_stats)


async def _round(call: Call, names: list[str], calls: int) -> tuple[float, list[float]]:
    """``calls`` calls at once over ``names``; the wall seconds and each call's milliseconds."""
    latencies: list[float] = []
    failures: list[BaseException] = []

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        try:
            await call(names[i % len(names)])
        except Exception as exc:  # counted, reported after the round
            failures.append(exc)
            return
        latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(calls):
            tg.start_soon(one, i)
    wall = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} of {calls} concurrent execs failed; the first: {failures[0]!r}")
    return wall, latencies


def _mcp_call(client: Any) -> Call:
    async def call(name: str) -> None:
        r = await client.call_tool("exec", {"name": name, "command": "true"})
        if r.is_error or (r.structured_content or {}).get("exit_code") != 0:
            raise RuntimeError(f"exec on {name}: {r.content}")

    return call


async def run_concurrency(
    settings: Settings, state: Path, workspaces: int = 10, calls: int = 200, rounds: int = 5
) -> dict[str, dict[str, float]]:
    """Create ``workspaces`` containers, measure every path (see the module doc), destroy them.

    Raises:
        RuntimeError: a call failed (the figures would mean nothing).
    """
    from mcp import Client, StdioServerParameters

    from ..server import build_server
    from ..ssh.connect import open_connection

    names = [f"conc{i}" for i in range(workspaces)]
    serve = [sys.executable, "-m", "sandbox_mcp", "serve"]
    env = serve_env(settings, state / "run" / "none.sock")  # no daemon there: serve works in process
    raw_conns: dict[str, Any] = {}
    try:
        async with (
            WorkspaceManager(settings) as manager,
            Client(build_server(settings)) as client,
        ):
            for name in names:
                r = await client.call_tool("create_workspace", {"name": name})
                if r.is_error:
                    raise RuntimeError(f"create {name}: {r.content}")
            for name in names:
                target = await manager.ssh_target(name)
                raw_conns[name] = await open_connection(target, tcp_timeout_s=3, timeout_s=15,
                                                        keepalive_interval_s=0)  # fmt: skip

            async def raw(name: str) -> None:
                r = await raw_conns[name].run("true", check=False)
                if r.exit_status != 0:
                    raise RuntimeError(f"raw exec on {name}: {r.exit_status} {r.stderr!r}")

            async def direct(name: str) -> None:
                r = await manager.exec(name, "true")
                if r.exit_code != 0:
                    raise RuntimeError(f"exec on {name}: {r}")

            async with Client(StdioServerParameters(command=serve[0], args=serve[1:], env=env)) as stdio:
                paths: dict[str, Call] = {"raw": raw, "manager": direct, "mcp": _mcp_call(client),
                                          "stdio": _mcp_call(stdio)}  # fmt: skip
                for call in paths.values():  # connections, agents, imports: warm before timing
                    await _round(call, names, len(names))
                cg = CgroupHost(group_for(settings.state_dir))
                cpu = _Cpu(_serve_child(), [cg.layout.workspace_dirs(n, cg.group)["unified"] / "cpu.stat"
                                            for n in names if cg.layout.unified is not None])  # fmt: skip
                walls: dict[str, list[float]] = {k: [] for k in paths}
                lat: dict[str, list[float]] = {k: [] for k in paths}
                used: dict[str, list[float | None]] = {k: [0.0, 0.0, 0.0] for k in paths}
                for _ in range(rounds):
                    for key, call in paths.items():
                        before = cpu.read()
                        wall, ms = await _round(call, names, calls)
                        after = cpu.read()
                        walls[key].append(wall)
                        lat[key] += ms
                        used[key] = [None if u is None or a is None or b is None else u + a - b
                                     for u, a, b in zip(used[key], after, before, strict=True)]  # fmt: skip
    finally:
        for conn in raw_conns.values():
            conn.close()
        async with WorkspaceManager(settings) as m:
            for name in names:
                if name in (await m.registry.read()).workspaces:
                    await m.destroy(name)
    out: dict[str, dict[str, float]] = {}
    for key in walls:
        out[key] = {"per_s": calls / statistics.median(walls[key]), "p50_ms": statistics.median(lat[key]),
                    "p95_ms": pct(lat[key], 0.95), "wall_s": statistics.median(walls[key])}  # fmt: skip
        for name, seconds in zip(("cpu_self_ms", "cpu_serve_ms", "cpu_workspaces_ms"), used[key], strict=True):
            if seconds is not None and (name != "cpu_serve_ms" or key == "stdio"):
                out[key][name] = 1000 * seconds / (rounds * calls)
    out["setup"] = {"workspaces": float(workspaces), "calls": float(calls), "rounds": float(rounds)}
    out["floor"] = {"sh_cpu_ms": await anyio.to_thread.run_sync(_spawn_cpu_ms), "cores": float(os.cpu_count() or 1)}
    return out


def _spawn_cpu_ms(n: int = 200) -> float:
    """CPU milliseconds (its own, and the spawning) of one ``sh -c true`` started and reaped on this host."""
    sh = "/bin/sh"
    before, t0 = os.times(), time.process_time()
    for _ in range(n):
        os.waitpid(os.posix_spawn(sh, [sh, "-c", "true"], {}), 0)
    after = os.times()
    children = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    return 1000 * (children + time.process_time() - t0) / n


def format_concurrency(r: dict[str, dict[str, float]]) -> str:
    """The section's lines: each path against the raw-SSH baseline of the same run."""
    s, raw, floor = r["setup"], r["raw"], r.get("floor")
    cores = floor["cores"] if floor else float(os.cpu_count() or 1)
    lines = [f"{s['calls']:.0f} concurrent exec true over {s['workspaces']:.0f} workspaces "
             f"({s['rounds']:.0f} rounds, median round):"]  # fmt: skip
    names = {"stdio": "one stdio serve (in process)", "mcp": "in-process MCP client", "manager": "manager.exec (no MCP)",
             "raw": "baseline, raw asyncssh session per command"}  # fmt: skip
    for key in ("stdio", "mcp", "manager", "raw"):
        f = r[key]
        ratio = "" if key == "raw" else f"; {f['per_s'] / raw['per_s']:.2f}x the baseline's rate"
        lines.append(f"  {names[key]}: {f['per_s']:.0f} per second, p50 {f['p50_ms']:.1f} ms, "
                     f"p95 {f['p95_ms']:.1f} ms{ratio}")  # fmt: skip
        shares = [f"{label} {f[k]:.2f}" for label, k in (("this process", "cpu_self_ms"), ("serve", "cpu_serve_ms"),
                                                        ("workspaces", "cpu_workspaces_ms")) if k in f]  # fmt: skip
        total = sum(f[k] for k in ("cpu_self_ms", "cpu_serve_ms", "cpu_workspaces_ms") if k in f)
        if shares and total > 0:
            lines.append(f"    CPU ms per call: {', '.join(shares)}; ceiling on {cores:.0f} cores "
                         f"{1000 * cores / total:.0f} per second")  # fmt: skip
    if floor:
        lines.append(f"  floor: one `sh -c true` started on this host costs {floor['sh_cpu_ms']:.2f} ms of CPU "
                     f"(each call starts one in its workspace)")  # fmt: skip
    return "\n".join(lines)
