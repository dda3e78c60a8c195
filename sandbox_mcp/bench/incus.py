"""The benchmark's Incus section: create → first exec of ``type="incus"`` against a bare instance launch.

Runs inside the benchmark's private network namespace, on a private incusd started there (the
host's daemon, if any, sits in the host's namespace and could not reach the bench bridge). The
image is packed and imported before anything is timed, so both figures are with a cached image:

- create → first exec through the MCP tools (registry, keys, instance, boot, SSH with the pinned key);
- baseline: the runtime's own launch (instance from the image, files pushed, start) until sshd
  sends its banner, in the same run.

Skipped, saying why, where incusd is not installed.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

from ..config import Settings
from ..manager import WorkspaceManager
from ..runtimes.incus import incusd
from .bare import bare_boot
from .calls import tool_caller

__all__ = ["format_incus", "run_incus"]


async def run_incus(settings: Settings, runs: int) -> dict[str, dict[str, float]] | str:
    """The Incus figures (seconds), or why they were skipped; the baseline is :func:`.bare.bare_boot`."""
    from mcp import Client

    from ..server import build_server

    reason = incusd.missing_reason()
    if reason:
        return reason
    daemon = incusd.start()
    state = Path(tempfile.mkdtemp(prefix="sandbox-mcp-bench-incus-"))
    s = settings.model_copy(update={"state_dir": state}).with_runtime("incus", socket=daemon.socket)
    try:
        async with Client(build_server(s)) as client:

            call = tool_caller(client)

            # Warm-up, not timed: packs the image (once per recipe) and imports it into this daemon.
            await call("create_workspace", name="biw", type="incus")
            await call("destroy_workspace", name="biw")
            creates, bares, launches, sshs = [], [], [], []
            for i in range(runs):
                t0 = time.monotonic()
                ws = await call("create_workspace", name=f"bi{i}", type="incus")
                timings = ws.get("timings") or {}
                launches.append(float(timings.get("boot_s") or 0))
                sshs.append(float(timings.get("ssh_s") or 0))
                await call("exec", name=f"bi{i}", command="true")
                creates.append(time.monotonic() - t0)
                await call("stop_workspace", name=f"bi{i}")
                async with WorkspaceManager(s) as m:
                    bares.append(await bare_boot(m, f"bi{i}"))
                await call("destroy_workspace", name=f"bi{i}")
        return {
            "incus_pool": {"btrfs": float(daemon.driver == "btrfs")},
            "incus_create_to_first_exec_s": {"p50": statistics.median(creates), "min": min(creates),
                                             "max": max(creates), "runs": float(len(creates)),
                                             "launch_p50": statistics.median(launches),
                                             "ssh_wait_p50": statistics.median(sshs)},
            "incus_bare_launch_to_sshd_s": {"p50": statistics.median(bares), "min": min(bares)},
        }  # fmt: skip
    finally:
        async with WorkspaceManager(s) as m:
            for name in list((await m.registry.read()).workspaces):
                await m.destroy(name)
        daemon.cleanup_instances()
        daemon.stop()
        incusd.remove(daemon)
        shutil.rmtree(state, ignore_errors=True)


def format_incus(results: dict[str, dict[str, float]] | str) -> str:
    """The section as the benchmark prints it."""
    if isinstance(results, str):
        return f"incus: skipped ({results})"
    c, b = results["incus_create_to_first_exec_s"], results["incus_bare_launch_to_sshd_s"]
    pool = "btrfs" if results.get("incus_pool", {}).get("btrfs") else "dir"
    return (f"incus ({pool} pool) create -> first exec (cached image): p50 {c['p50']:.3f} s  (min {c['min']:.3f}, "
            f"max {c['max']:.3f}, {c['runs']:.0f} runs; of which instance launch p50 {c['launch_p50']:.3f} s, "
            f"SSH wait p50 {c['ssh_wait_p50']:.3f} s)\n"
            f"  baseline, bare instance launch -> sshd banner: p50 {b['p50']:.3f} s; "
            f"ratio {c['p50'] / b['p50']:.2f}x")
