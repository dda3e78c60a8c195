# ruff: noqa: F811 - the fixtures imported from test_qemu_e2e are used by name
"""End to end for VMs (``type="vm"``, under TCG here): pause/resume (QMP stop/cont), a disk snapshot and
its restore (the qcow2 layer and the workspace dir), and a fork running beside its source.

Then a memory snapshot: a process that holds the shared workspace dir makes it refuse (naming the
process); one started from /tmp is running after the restore, with the same PID and its count going on,
while a file written after the snapshot is gone. The fork is made from that memory snapshot and boots
its disk state under its own name and address.

Three emulated boots (create, the restore's restart, the fork) and one memory load, small guests
(512 MiB) to keep it bounded.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from sandbox_mcp.config import Settings

from .test_e2e import Session
from .test_qemu_e2e import NOTHING_LEFT, vm_leftovers, vm_session, vm_settings  # noqa: F401
from .test_snapshots_e2e import INSTALL_DEMO

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.vm]


async def _sh(s: Session, name: str, command: str) -> str:
    r = await s.call("exec", name=name, command=command, timeout_s=300)
    assert r["exit_code"] == 0, r
    return r["stdout"]


async def test_vm_pause_snapshot_restore_fork(vm_session: Session, vm_settings: Settings) -> None:
    s, settings = vm_session, vm_settings
    ws = await s.call("create_workspace", name="vs", type="vm", memory_mib=512, cpus=1)
    host_dir = Path(ws["host_workspace_dir"])

    # Pause: QMP stop. A counter the guest writes into the shared dir stands still.
    await _sh(s, "vs", "setsid nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > tick.new; mv tick.new tick; "
                       "sleep 0.2; done' >/dev/null 2>&1 &")
    for _ in range(300):
        if (host_dir / "tick").exists():
            break
        await anyio.sleep(0.1)
    assert (await s.call("pause_workspace", name="vs"))["state"] == "paused"
    status = await s.call("workspace_status", name="vs")
    assert status["runtime"]["paused"] is True and status["runtime"]["running"] is True
    first = (host_dir / "tick").read_text()
    await anyio.sleep(1.5)
    assert (host_dir / "tick").read_text() == first, "the guest ran while paused"
    assert "resume_workspace" in await s.error("exec", name="vs", command="true")
    assert (await s.call("resume_workspace", name="vs"))["state"] == "running"
    assert (await s.call("workspace_status", name="vs"))["runtime"]["paused"] is False
    await _sh(s, "vs", "pkill -f '[t]ick[.]new'; true")

    # A disk snapshot: the root layer (a package installed with dpkg, a file in /etc) and the workspace dir.
    await _sh(s, "vs", INSTALL_DEMO + "echo before > before.txt; sudo sh -c 'echo vm > /etc/sbx-marker'")
    snap = await s.call("snapshot_workspace", name="vs", snapshot="s1")
    assert snap["source_state"] == "running" and snap["size_bytes"] > 0 and snap["memory"] is False
    await _sh(s, "vs", "echo changed > before.txt; echo after > after.txt; sudo dpkg -r sbx-demo >/dev/null; "
                       "sudo touch /etc/after-marker")
    restored = await s.call("restore_workspace", name="vs", snapshot="s1")
    assert restored["state"] == "running"
    out = await _sh(s, "vs", "cat before.txt; ls; cat /etc/sbx-marker; test -e /etc/after-marker || echo no-after; "
                             "sbx-demo")
    assert out == "before\nbefore.txt\ntick\nvm\nno-after\ndemo-ok\n", out
    assert not (host_dir / "after.txt").exists()

    # A memory snapshot needs the VM running: a paused one is refused, saying to resume it.
    await s.call("pause_workspace", name="vs")
    assert "resume_workspace" in await s.error("snapshot_workspace", name="vs", snapshot="m1", memory=True)
    await s.call("resume_workspace", name="vs")
    # A process with its cwd in the shared workspace dir holds the 9p share: refused,
    # naming it, and nothing changes (the share stays mounted, no snapshot appears).
    await _sh(s, "vs", "setsid nohup sleep 600 >/dev/null 2>&1 &")
    refusal = await s.error("snapshot_workspace", name="vs", snapshot="m1", memory=True)
    assert "sleep" in refusal and "/home/" in refusal and "memory=false" in refusal, refusal
    assert [i["snapshot"] for i in (await s.call("list_snapshots", name="vs"))["snapshots"]] == ["s1"]
    await _sh(s, "vs", "pkill -x sleep; echo still > still.txt")
    assert (host_dir / "still.txt").read_text() == "still\n"
    # A process started from /tmp keeps counting across the snapshot and after the restore.
    await _sh(s, "vs", "cd /tmp && setsid nohup sh -c 'echo $$ > /tmp/counter.pid; i=0; while :; do i=$((i+1)); "
                       "echo $i > /tmp/count; sleep 0.2; done' >/dev/null 2>&1 &")
    await _sh(s, "vs", "for i in $(seq 100); do test -s /tmp/count && break; sleep 0.1; done")
    pid = (await _sh(s, "vs", "cat /tmp/counter.pid")).strip()
    msnap = await s.call("snapshot_workspace", name="vs", snapshot="m1", memory=True)
    assert msnap["memory"] is True and msnap["source_state"] == "running"
    # The shares are back in the running VM: a write in the guest lands on the host.
    await _sh(s, "vs", "echo later > later.txt")
    assert (host_dir / "later.txt").read_text() == "later\n"
    await _sh(s, "vs", f"kill {pid}")
    restored = await s.call("restore_workspace", name="vs", snapshot="m1")
    assert restored["state"] == "running"
    out = await _sh(s, "vs", f"kill -0 {pid} && echo alive; a=$(cat /tmp/count); sleep 1; b=$(cat /tmp/count); "
                             "test $b -gt $a && echo counting; ls; cat /etc/sbx-marker")
    assert out.startswith("alive\ncounting\n"), out
    assert "later.txt" not in out and "still.txt" in out and out.endswith("vm\n"), out
    await _sh(s, "vs", "echo again > again.txt")  # the restored guest writes through the new qemu's share
    assert (host_dir / "again.txt").read_text() == "again\n"

    # A fork from the memory snapshot: it boots the snapshot's disk under its own name and address (the saved
    # memory belongs to the source's); both run at once, then diverge.
    fork = await s.call("fork_workspace", name="vs", new_name="vt", snapshot="m1")
    assert fork["type"] == "vm" and fork["state"] == "running"
    assert fork["ip"] != ws["ip"] and fork["ssh"]["host_key_fingerprint"] != ws["ssh"]["host_key_fingerprint"]
    assert await _sh(s, "vt", "cat before.txt /etc/sbx-marker; sbx-demo; hostname") == "before\nvm\ndemo-ok\nvt\n"
    await _sh(s, "vt", "echo t > only-t.txt")
    await _sh(s, "vs", "echo s > only-s.txt")
    assert "only-t.txt" not in await _sh(s, "vs", "ls")
    assert "only-s.txt" not in await _sh(s, "vt", "ls")

    for name in ("vt", "vs"):
        assert (await s.call("destroy_workspace", name=name))["destroyed"]
        assert vm_leftovers(name, settings) == NOTHING_LEFT
        assert not (settings.state_dir / name).exists()
