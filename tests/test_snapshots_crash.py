"""A server killed (SIGKILL) in the middle of a snapshot, restore or fork leaves the old state or the new
one, never half of one, and nothing that destroy_workspace does not clean (tests/test_crash.py's pattern:
the kill lands at an event, a progress message or a registry state, not after a delay).

The restore's swap itself (journal, renames) is killed at every step in tests/test_snapshots.py.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

import anyio
import pytest
from mcp import Client

from sandbox_mcp import supervise
from sandbox_mcp.config import Settings

from .test_crash import _UPPER_BOUND_S, _call, _kill_during, _params
from .test_e2e import NOTHING_LEFT, host_leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

# 64 MiB keep the copy busy for a while (unless the filesystem reflinks), small enough for a slow disk.
_FILL = ("for i in $(seq 16); do head -c 4M /dev/urandom > big$i; done && echo kept > kept.txt && "
         "sudo sh -c 'echo r > /etc/root-mark'")


@contextlib.asynccontextmanager
async def _destroyed_at_exit(client: Client, settings: Settings, *names: str) -> AsyncIterator[None]:
    """A failed check must not leave its workspaces (and their firewall ports) to later tests."""
    try:
        yield
    finally:
        for name in names:
            if (settings.state_dir / name).exists():
                await client.call_tool("destroy_workspace", {"name": name})


def _snapshot_dirs(settings: Settings, name: str) -> list[str]:
    d = settings.state_dir / name / "snapshots"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


async def _running_with_files(client: Client, name: str) -> None:
    await _call(client, "create_workspace", name=name)
    r = await _call(client, "exec", name=name, command=_FILL)
    assert r["exit_code"] == 0, r


async def _check_usable_and_destroy(client: Client, settings: Settings, name: str) -> dict[str, str]:
    """The workspace is in a state the tools act on: paused ones resume, stopped ones start; then it is
    destroyed and leaves nothing."""
    listed = {w["name"]: w for w in (await _call(client, "list_workspaces"))["workspaces"]}
    state = listed[name]["state"]
    assert state in ("running", "paused", "stopped"), listed[name]
    if state == "paused":
        assert (await _call(client, "resume_workspace", name=name))["state"] == "running"
    elif state == "stopped":
        await _call(client, "start_workspace", name=name)
    r = await _call(client, "exec", name=name, command="cat kept.txt /etc/root-mark")
    assert r["stdout"] == "kept\nr\n", r
    assert (await _call(client, "destroy_workspace", name=name))["destroyed"]
    assert supervise.tagged(supervise.workspace_tag(settings.state_dir, name)) == []
    assert host_leftovers(name) == NOTHING_LEFT
    assert not (settings.state_dir / name).exists()
    return {"reported": state}


async def test_killed_during_snapshot(settings: Settings) -> None:
    # The workspace is paused (and the registry says so) for exactly the copy: the kill lands then.
    await _kill_during(settings, "snapshot_workspace", {"name": "cks", "snapshot": "s1"},
                       at_progress="copying the files", before=lambda c: _running_with_files(c, "cks"))
    with anyio.fail_after(_UPPER_BOUND_S):
        async with Client(_params(settings, secrets.token_hex(8))) as client:
            async with _destroyed_at_exit(client, settings, "cks"):
                # No half snapshot: it is there whole (and restorable) or not at all, and no scratch copy stays.
                assert _snapshot_dirs(settings, "cks") in ([], ["s1"])
                listed = (await _call(client, "list_snapshots", name="cks"))["snapshots"]
                assert [s["snapshot"] for s in listed] == _snapshot_dirs(settings, "cks")
                print(await _check_usable_and_destroy(client, settings, "cks"))


async def test_killed_during_restore(settings: Settings) -> None:
    async def snapshot_then_change(client: Client) -> None:
        await _running_with_files(client, "ckr")
        await _call(client, "snapshot_workspace", name="ckr", snapshot="s1")
        await _call(client, "exec", name="ckr", command="echo later > later.txt")

    await _kill_during(settings, "restore_workspace", {"name": "ckr", "snapshot": "s1"},
                       at_progress="copying the snapshot", before=snapshot_then_change)
    with anyio.fail_after(_UPPER_BOUND_S):
        async with Client(_params(settings, secrets.token_hex(8))) as client:
            async with _destroyed_at_exit(client, settings, "ckr"):
                root = settings.state_dir / "ckr"
                assert not [p.name for p in root.iterdir() if p.name.endswith((".restoring", ".old"))]
                assert not (root / "restore.json").exists()
                # The kill lands as the copy starts, but the copy may be a reflink that ends first (and the
                # swap after it): either the old state, whole (later.txt still there), or the restored one,
                # whole (kept.txt without later.txt). The snapshot is intact either way.
                workspace = root / "workspace"
                assert (workspace / "kept.txt").read_text() == "kept\n"
                assert sorted(p.name for p in workspace.glob("big*")) == sorted(f"big{i}" for i in range(1, 17))
                print({"swapped": not (workspace / "later.txt").exists()})
                assert _snapshot_dirs(settings, "ckr") == ["s1"]
                restored = await _call(client, "restore_workspace", name="ckr", snapshot="s1")
                assert restored["state"] == "running"
                assert not (workspace / "later.txt").exists()
                print(await _check_usable_and_destroy(client, settings, "ckr"))


async def test_killed_during_fork(settings: Settings) -> None:
    await _kill_during(settings, "fork_workspace", {"name": "ckf", "new_name": "ckf2"},
                       at_progress="copying the files", before=lambda c: _running_with_files(c, "ckf"))
    with anyio.fail_after(_UPPER_BOUND_S):
        async with Client(_params(settings, secrets.token_hex(8))) as client:
            async with _destroyed_at_exit(client, settings, "ckf", "ckf2"):
                listed = {w["name"]: w for w in (await _call(client, "list_workspaces"))["workspaces"]}
                # The fork never finished: it is gone or marked error (destroy removes it), like a create.
                fork = listed.get("ckf2")
                assert fork is None or fork["state"] == "error", fork
                if fork is not None:
                    await _call(client, "destroy_workspace", name="ckf2")
                assert host_leftovers("ckf2") == NOTHING_LEFT
                assert not (settings.state_dir / "ckf2").exists()
                print(await _check_usable_and_destroy(client, settings, "ckf"))
