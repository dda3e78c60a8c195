"""One user's view of the manager: the owner is checked on the workspace the call acts on.

The race: user A's call passes the ownership check, the workspace is destroyed and re-created under
the same name by user B, then A's call acts on B's workspace. Here it is forced, not hoped for: the
test holds the workspace's lock, A's call is seen waiting for it, the name changes hands meanwhile,
and only then is the lock let go. With the check before the lock (as it was), A destroyed B's.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from sandbox_mcp.errors import WorkspaceNotFound
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import CreateSpec
from sandbox_mcp.owners import OwnedManager

from .points import wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

ALICE, BOB = 60401, 60402  # owners are uids; no account is needed for the manager's view


def _waiting(manager: WorkspaceManager, name: str) -> bool:
    """True once another task waits for ``name``'s lock (the lock this test holds)."""
    lock = manager._locks.get(name)  # noqa: SLF001 - the lock's queue is the evidence
    return lock is not None and lock.statistics().tasks_waiting > 0


@pytest.mark.parametrize("operation", ["destroy", "stop", "start"])
async def test_a_name_that_changes_hands_under_a_waiting_call(manager: WorkspaceManager, operation: str) -> None:
    alice, bob = OwnedManager(manager, ALICE), OwnedManager(manager, BOB)
    await alice.create(CreateSpec(name="race", start=False))
    outcome: dict[str, object] = {}

    async def alices_call() -> None:
        try:
            outcome["result"] = await getattr(alice, operation)("race")
        except WorkspaceNotFound as exc:
            outcome["error"] = exc

    async with anyio.create_task_group() as tg:
        async with manager._locked("race"):  # noqa: SLF001 - holding the lock is the interleaving
            tg.start_soon(alices_call)
            await wait_until(lambda: _waiting(manager, "race"), "alice's call to wait for the workspace's lock")
            # Meanwhile the name went to bob: destroyed by alice's other session and re-created by
            # bob, which under this lock amounts to the record now being bob's.
            record = await manager.registry.get("race")
            await manager.registry.put(record.model_copy(update={"owner_uid": BOB}))
    assert isinstance(outcome.get("error"), WorkspaceNotFound), outcome
    # Bob's workspace is untouched and still his.
    record = await manager.registry.get("race")
    assert record.owner_uid == BOB and record.state == "stopped"
    assert [w.name for w in (await bob.list()).workspaces] == ["race"]
    assert (await alice.list()).workspaces == []


async def test_kept_data_stays_with_its_owner(manager: WorkspaceManager) -> None:
    """destroy(keep_data=True) leaves project files and host key for the next create of that name: the
    owner's or root's, never another user's."""
    from sandbox_mcp.errors import Conflict

    alice, bob, root = OwnedManager(manager, ALICE), OwnedManager(manager, BOB), OwnedManager(manager, 0)
    ws = await alice.create(CreateSpec(name="kept", start=False))
    (Path(ws.host_workspace_dir) / "alices.txt").write_text("hers")
    await alice.destroy("kept", keep_data=True)
    with pytest.raises(Conflict, match="another user kept"):
        await bob.create(CreateSpec(name="kept", start=False))
    assert "kept" not in (await manager.registry.read()).workspaces
    assert (Path(ws.host_workspace_dir) / "alices.txt").read_text() == "hers"  # refused, and left alone
    again = await alice.create(CreateSpec(name="kept", start=False))
    assert (Path(again.host_workspace_dir) / "alices.txt").read_text() == "hers"
    await alice.destroy("kept", keep_data=True)
    await root.create(CreateSpec(name="kept", start=False))  # root may take it over
    await root.destroy("kept")
    ws = await bob.create(CreateSpec(name="kept", start=False))  # gone with its data: the name is free for anyone
    assert not (Path(ws.host_workspace_dir) / "alices.txt").exists()
