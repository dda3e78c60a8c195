# ruff: noqa: F811 - the fixtures imported from test_incus_e2e are used by name
"""End to end for Incus workspaces on a private incusd (a ``dir`` pool): pause/resume through Incus's
freeze/unfreeze; then, on the same workspace, a snapshot (the workspace dir, and the root published
as an image of ours), a restore (files and an installed package back, kept across a restart), a fork
from the snapshot running beside its source, and the images freed once nothing names them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.runtimes.incus import incusd as incus_daemon
from sandbox_mcp.runtimes.incus import instance_name

from .test_incus_e2e import NOTHING, call, firewall_retired, incus_leftovers, incusd, local, local_settings  # noqa: F401
from .test_snapshots_e2e import INSTALL_DEMO

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
    await _sh(local, "ipz", "pkill -f '[t]ick[.]new'; true")

    # A snapshot: the workspace dir, and the root (a package installed with dpkg, a file in /etc).
    host_dir = tick.parent
    await _sh(local, "ipz", INSTALL_DEMO + "echo before > before.txt; sudo sh -c 'echo incus > /etc/sbx-marker'")
    snap = await call(local, "snapshot_workspace", name="ipz", snapshot="s1")
    assert snap["source_state"] == "running" and snap["size_bytes"] > 0
    inst_path = f"/1.0/instances/{instance_name('ipz')}"
    assert incusd.api("GET", f"{inst_path}/snapshots") == [], "the Incus snapshot is dropped once published"
    (image,) = _our_images(incusd)
    # Its size counts the image on the Incus server too (the owner's snapshot bound holds it).
    assert snap["size_bytes"] >= incusd.api("GET", f"/1.0/images/{image}")["size"] > 0
    assert (await call(local, "workspace_status", name="ipz"))["state"] == "running"
    await _sh(local, "ipz", "echo changed > before.txt; echo after > after.txt; sudo touch /etc/after-marker; "
                            "sudo dpkg -r sbx-demo >/dev/null")
    restored = await call(local, "restore_workspace", name="ipz", snapshot="s1")
    assert restored["state"] == "running"
    expected = "before\nincus\nno-after\ndemo-ok\n"
    check = "cat before.txt /etc/sbx-marker; test -e /etc/after-marker || echo no-after; sbx-demo"
    assert await _sh(local, "ipz", check) == expected
    assert not (host_dir / "after.txt").exists()
    # A restart starts from the restored root (the instance is ephemeral; its image is ours).
    await call(local, "stop_workspace", name="ipz")
    await call(local, "start_workspace", name="ipz")
    assert await _sh(local, "ipz", check) == expected

    # A fork from the snapshot: its own instance, address and host key; both run at once, then diverge.
    fork = await call(local, "fork_workspace", name="ipz", new_name="ipf", snapshot="s1")
    assert fork["type"] == "incus" and fork["state"] == "running"
    assert fork["ip"] != ws["ip"] and fork["ssh"]["host_key_fingerprint"] != ws["ssh"]["host_key_fingerprint"]
    assert await _sh(local, "ipf", check + "; hostname") == expected + "ipf\n"
    await _sh(local, "ipf", "echo f > only-f.txt")
    await _sh(local, "ipz", "echo z > only-z.txt")
    assert "only-f.txt" not in await _sh(local, "ipz", "ls")
    assert "only-z.txt" not in await _sh(local, "ipf", "ls")

    # The image goes once nothing names it: not with the snapshot (the root layers still do), with the last one.
    assert (await call(local, "destroy_workspace", name="ipf"))["destroyed"]
    await call(local, "delete_snapshot", name="ipz", snapshot="s1")
    assert len(_our_images(incusd)) == 1, "ipz's restored root still names it"
    # Paused, then stopped: the stop unfreezes it first.
    await call(local, "pause_workspace", name="ipz")
    assert (await call(local, "stop_workspace", name="ipz"))["state"] == "stopped"
    # A stopped workspace's snapshot names the root it would start from: the same image, no new one.
    stopped = await call(local, "snapshot_workspace", name="ipz", snapshot="s2")
    assert stopped["source_state"] == "stopped" and stopped["size_bytes"] >= snap["size_bytes"] - (1 << 20)
    assert len(_our_images(incusd)) == 1
    assert (await call(local, "destroy_workspace", name="ipz"))["destroyed"]
    assert incus_leftovers(incusd, local_settings) == NOTHING
    assert not (local_settings.state_dir / "ipz").exists()


def _our_images(incusd: incus_daemon.PrivateIncusd) -> list[str]:
    return [i["fingerprint"] for i in incusd.api("GET", "/1.0/images?recursion=1")
            if "sandbox-mcp.root" in (i.get("properties") or {})]


async def _sh(client: Any, name: str, command: str) -> str:
    r = await call(client, "exec", name=name, command=command)
    assert r["exit_code"] == 0, r
    return r["stdout"]
