"""The warm pool section of ``sandbox-mcp bench``: create → first exec from the pool, against the cold path
and a bare boot, all through the MCP tools of an in-process server in the same run.

- from the pool: ``--pool-creates`` creates (default 20) of the default spec on a server with
  ``pool_size = --pool-size``, each one with the pool full again first (the claim is measured, not the
  refill; the refill's own time is reported beside it);
- the cold path: the same create → first exec on a server without a pool;
- the baseline: a bare boot of the same nspawn command until sshd's banner (:func:`.bare.bare_boot`);
- what a ready slot costs: the drop of MemAvailable while the pool fills, per slot.

Runs inside the benchmark's private namespaces (see :mod:`.bench`); every workspace is destroyed again.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

from ..config import Settings
from ..manager import WorkspaceManager
from .bare import bare_boot
from .calls import tool_caller
from .capacity import mem_available_mib
from .figures import pct

__all__ = ["format_pool", "run_pool"]

Figures = dict[str, float]


async def _ready(settings: Settings, n: int, timeout_s: float = 300) -> float:
    """Wait until ``n`` slots are booted and unclaimed; returns the seconds waited."""
    from ..registry import Registry

    registry = Registry(settings.registry_path)
    t0 = time.monotonic()
    with anyio.fail_after(timeout_s):
        while True:  # the pool lives in the server's process: its registry is what can be watched from here
            if sum(r.pooled and r.state == "running" for r in (await registry.read()).workspaces.values()) >= n:
                break
            await anyio.sleep(0.02)
    return time.monotonic() - t0


async def _create_exec_ms(call: Callable[..., Awaitable[dict]], name: str) -> tuple[float, float, float, bool]:
    """create_workspace → exec true: the whole, the create call, the server's own part of it (timings.total_s),
    in ms, and whether it came from the pool."""
    t0 = time.perf_counter()
    ws = await call("create_workspace", name=name)
    t1 = time.perf_counter()
    await call("exec", name=name, command="true")
    t2 = time.perf_counter()
    timings = ws.get("timings") or {}
    return (t2 - t0) * 1000, (t1 - t0) * 1000, (timings.get("total_s") or 0.0) * 1000, bool(timings.get("from_pool"))


async def run_pool(settings: Settings, state: Path, creates: int, size: int, cold_runs: int) -> Figures:
    """The figures (ms, MiB) of the section; raises if a create meant to claim a slot booted instead."""
    from mcp import Client

    from ..server import build_server

    pooled = settings.model_copy(update={"state_dir": state / "pool", "pool_size": size})
    cold = settings.model_copy(update={"state_dir": state / "cold", "pool_size": 0})
    claims, creates_ms, server_ms, refills = [], [], [], []
    before = mem_available_mib()
    async with Client(build_server(pooled)) as client:
        call = tool_caller(client)
        fill_s = await _ready(pooled, size)
        slot_mib = (before - mem_available_mib()) / size
        for i in range(creates):
            ms, create_ms, own_ms, from_pool = await _create_exec_ms(call, f"pool{i}")
            if not from_pool:
                raise RuntimeError(f"create {i} booted instead of claiming a slot (pool_size={size})")
            claims.append(ms)
            creates_ms.append(create_ms)
            server_ms.append(own_ms)
            await call("destroy_workspace", name=f"pool{i}")
            refills.append(await _ready(pooled, size))
    colds, bares = [], []
    async with Client(build_server(cold)) as client:
        call = tool_caller(client)
        for i in range(cold_runs):
            ms, *_ = await _create_exec_ms(call, f"cold{i}")
            colds.append(ms)
            await call("stop_workspace", name=f"cold{i}")
            async with WorkspaceManager(cold) as m:
                bares.append(await bare_boot(m, f"cold{i}") * 1000)
            await call("destroy_workspace", name=f"cold{i}")
    claim_p50, cold_p50, bare_p50 = statistics.median(claims), statistics.median(colds), statistics.median(bares)
    return {
        "pool_size": float(size),
        "creates": float(creates),
        "claim_p50_ms": round(claim_p50, 1),
        "claim_p95_ms": round(pct(claims, 0.95), 1),
        "claim_max_ms": round(max(claims), 1),
        "claim_create_call_p50_ms": round(statistics.median(creates_ms), 1),
        "claim_in_manager_p50_ms": round(statistics.median(server_ms), 1),
        "cold_p50_ms": round(cold_p50, 1),
        "bare_boot_p50_ms": round(bare_p50, 1),
        "cold_over_bare": round(cold_p50 / bare_p50, 2),
        "claim_over_bare": round(claim_p50 / bare_p50, 3),
        "first_fill_s": round(fill_s, 2),
        "refill_p50_s": round(statistics.median(refills), 2),
        "slot_mib": round(slot_mib, 1),
    }


def format_pool(f: Figures) -> str:
    """The section as the benchmark prints it."""
    return (
        f"warm pool (pool_size {f['pool_size']:.0f}, {f['creates']:.0f} creates through the MCP tools)\n"
        f"  create -> first exec from the pool   p50 {f['claim_p50_ms']:.1f} ms   p95 {f['claim_p95_ms']:.1f} ms   "
        f"max {f['claim_max_ms']:.1f} ms\n"
        f"    of which the create_workspace call p50 {f['claim_create_call_p50_ms']:.1f} ms, the claim in the manager "
        f"p50 {f['claim_in_manager_p50_ms']:.1f} ms\n"
        f"  cold path (no pool)                   p50 {f['cold_p50_ms']:.0f} ms\n"
        f"  baseline, bare nspawn boot -> sshd    p50 {f['bare_boot_p50_ms']:.0f} ms   cold/bare "
        f"{f['cold_over_bare']:.2f}x   pool/bare {f['claim_over_bare']:.3f}x\n"
        f"  refill after a claim p50 {f['refill_p50_s']:.2f} s (first fill {f['first_fill_s']:.2f} s); a ready slot "
        f"costs {f['slot_mib']:.1f} MiB of MemAvailable"
    )
