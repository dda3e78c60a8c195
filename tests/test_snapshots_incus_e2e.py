# ruff: noqa: F811 - the fixtures imported from test_incus_e2e are used by name
"""End to end for Incus workspaces: pause/resume through Incus's freeze/unfreeze on a private incusd;
snapshots and forks are refused with a message that says so (Incus instances here are ephemeral:
their root, and any Incus snapshot of it, goes at every stop)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.runtimes.incus import incusd as incus_daemon
from sandbox_mcp.runtimes.incus import instance_name

from .test_incus_e2e import NOTHING, call, firewall_retired, incus_leftovers, incusd, local, local_settings  # noqa: F401

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def _error(client: Any, tool: str, **args: Any) -> str:
    r = await client.call_tool(tool, args)
    assert r.is_error, f"{tool} unexpectedly succeeded"
    return " ".join(getattr(c, "text", "") for c in r.content)


async def test_incus_pause_and_resume(local: Any, local_settings: Settings,
                                      incusd: incus_daemon.PrivateIncusd) -> None:  # fmt: skip
    ws = await call(local, "create_workspace", name="ipz", type="incus", memory_mib=512)
    tick = Path(ws["host_workspace_dir"]) / "tick"
    r = await call(local, "exec", name="ipz", command="setsid nohup sh -c 'i=0; while :; do i=$((i+1)); "
                   "echo $i > tick.new; mv tick.new tick; sleep 0.05; done' >/dev/null 2>&1 &")
    assert r["exit_code"] == 0, r
    for _ in range(300):
        if tick.exists():
            break
        await anyio.sleep(0.05)
    assert (await call(local, "pause_workspace", name="ipz"))["state"] == "paused"
    assert incusd.api("GET", f"/1.0/instances/{instance_name('ipz')}")["status"] == "Frozen"
    status = await call(local, "workspace_status", name="ipz")
    assert status["runtime"]["running"] is True and status["runtime"]["paused"] is True
    first = tick.read_text()
    await anyio.sleep(0.5)
    assert tick.read_text() == first, "a process ran in a frozen instance"
    assert "resume_workspace" in await _error(local, "exec", name="ipz", command="true")
    assert [w["state"] for w in (await call(local, "list_workspaces"))["workspaces"]] == ["paused"]
    assert (await call(local, "resume_workspace", name="ipz"))["state"] == "running"
    assert incusd.api("GET", f"/1.0/instances/{instance_name('ipz')}")["status"] == "Running"
    for _ in range(300):
        if tick.read_text() != first:
            break
        await anyio.sleep(0.05)
    assert tick.read_text() != first
    # Snapshots and forks: refused, saying what Incus workspaces offer; nothing is made.
    assert "incus runtime cannot snapshot" in await _error(local, "snapshot_workspace", name="ipz", snapshot="s")
    assert "incus runtime cannot snapshot" in await _error(local, "fork_workspace", name="ipz", new_name="ipz2")
    assert [w["name"] for w in (await call(local, "list_workspaces"))["workspaces"]] == ["ipz"]
    # Paused, then stopped: the stop unfreezes it first.
    await call(local, "pause_workspace", name="ipz")
    assert (await call(local, "stop_workspace", name="ipz"))["state"] == "stopped"
    assert (await call(local, "destroy_workspace", name="ipz"))["destroyed"]
    assert incus_leftovers(incusd, local_settings) == NOTHING
    assert not (local_settings.state_dir / "ipz").exists()
