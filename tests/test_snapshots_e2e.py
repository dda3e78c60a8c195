"""End to end: pause, snapshot, restore and fork of real containers, through the MCP client.

Runs in both deployments of tests/test_e2e.py (in process, and through the daemon as an
unprivileged user). A "package" here is a real .deb built inside with dpkg-deb and installed with
dpkg into the root layer (the workspaces have no network to fetch one): what matters is that it
lives outside the workspace dir, in the writable root a snapshot must capture.
"""

# ruff: noqa: F811 - the fixtures imported from test_e2e are used by name
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import anyio
import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.models import WorkspaceRecord
from sandbox_mcp.runtimes.nspawn import NspawnState

from .test_e2e import (  # noqa: F401 - fixtures used by name
    NOTHING_LEFT,
    Deployment,
    Session,
    deployment,
    host_leftovers,
    mcp_session,
    registry,
    settings,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

# Builds and installs the package sbx-demo (a script /usr/bin/sbx-demo) into the root layer.
INSTALL_DEMO = r"""set -e
d=$(mktemp -d); mkdir -p $d/DEBIAN $d/usr/bin
printf 'Package: sbx-demo\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: demo\n' > $d/DEBIAN/control
printf '#!/bin/sh\necho demo-ok\n' > $d/usr/bin/sbx-demo; chmod 755 $d/usr/bin/sbx-demo
dpkg-deb --root-owner-group -b $d /tmp/sbx-demo.deb >/dev/null; sudo dpkg -i /tmp/sbx-demo.deb >/dev/null
"""


async def _sh(s: Session, name: str, command: str) -> str:
    r = await s.call("exec", name=name, command=command)
    assert r["exit_code"] == 0, r
    return r["stdout"]


def _nspawn(settings: Settings, name: str) -> NspawnState:
    record: WorkspaceRecord = registry(settings)[name]
    return NspawnState.model_validate(record.runtime_state)


async def test_pause_freezes_and_resume_carries_on(mcp_session: Session, settings: Settings) -> None:
    s = mcp_session
    ws = await s.call("create_workspace", name="pz")
    tick = Path(ws["host_workspace_dir"]) / "tick"
    # A counter that writes into the workspace dir 20 times a second, visible on the host.
    await _sh(s, "pz", "setsid nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > tick.new; mv tick.new tick; "
                       "sleep 0.05; done' >/dev/null 2>&1 &")
    await _until(lambda: tick.exists())
    paused = await s.call("pause_workspace", name="pz")
    assert paused["state"] == "paused"
    first = tick.read_text()
    await anyio.sleep(0.5)
    assert tick.read_text() == first, "a process ran in a paused workspace"
    assert "resume_workspace" in await s.error("exec", name="pz", command="true")
    assert "resume_workspace" in await s.error("read_file", name="pz", path="tick")
    assert (await s.call("pause_workspace", name="pz"))["state"] == "paused"  # idempotent
    status = await s.call("workspace_status", name="pz")
    assert status["state"] == "paused" and status["runtime"]["paused"] is True and status["runtime"]["running"]
    assert [w["state"] for w in (await s.call("list_workspaces"))["workspaces"]] == ["paused"]
    # The freeze file is the host's: the container's root cannot see or reach it (its cgroup is a delegated child).
    resumed = await s.call("resume_workspace", name="pz")
    assert resumed["state"] == "running"
    await _until(lambda: tick.read_text() != first)
    assert (await s.call("resume_workspace", name="pz"))["state"] == "running"  # idempotent
    # The container's root sees its cgroup as /sys/fs/cgroup; the freeze control there stays the host's.
    r = await s.call("exec", name="pz", command="ls -ln /sys/fs/cgroup/cgroup.freeze; "
                                                "sudo sh -c 'echo 0 > /sys/fs/cgroup/cgroup.freeze'; echo $?")
    assert r["stdout"].split()[2] == "65534" and r["stdout"].strip().splitlines()[-1] != "0", r
    # Paused, then stopped: the stop thaws it and powers it off; a start gives a running one.
    await s.call("pause_workspace", name="pz")
    assert (await s.call("stop_workspace", name="pz"))["state"] == "stopped"
    assert host_leftovers("pz") == NOTHING_LEFT
    assert "not paused" in await s.error("resume_workspace", name="pz")
    assert "only a running" in await s.error("pause_workspace", name="pz")
    await s.call("start_workspace", name="pz")
    await s.call("pause_workspace", name="pz")
    assert (await s.call("start_workspace", name="pz"))["state"] == "running"  # start resumes a paused one
    assert (await s.call("destroy_workspace", name="pz"))["destroyed"]
    assert host_leftovers("pz") == NOTHING_LEFT


async def _until(check, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition never came true"
        await anyio.sleep(0.02)


async def test_snapshot_and_restore_put_files_and_root_back(mcp_session: Session, settings: Settings,
                                                            deployment: Deployment) -> None:  # fmt: skip
    s = mcp_session
    ws = await s.call("create_workspace", name="sn")
    host_dir = Path(ws["host_workspace_dir"])
    await _sh(s, "sn", INSTALL_DEMO + "echo before > before.txt; sudo sh -c 'echo root > /etc/sbx-marker'")
    snap = await s.call("snapshot_workspace", name="sn", snapshot="s1")
    assert (snap["name"], snap["snapshot"], snap["source_state"]) == ("sn", "s1", "running")
    assert snap["method"] in ("reflink", "copy") and snap["size_bytes"] > 0
    assert (await s.call("workspace_status", name="sn"))["state"] == "running"  # resumed after the copy
    assert "already has a snapshot" in await s.error("snapshot_workspace", name="sn", snapshot="s1")

    # Diverge: change and add files in both places, remove the package.
    await _sh(s, "sn", "echo changed > before.txt; echo after > after.txt; sudo touch /etc/after-marker; "
                       "sudo dpkg -r sbx-demo >/dev/null")
    assert (host_dir / "after.txt").exists()
    restored = await s.call("restore_workspace", name="sn", snapshot="s1")
    assert restored["state"] == "running"
    assert restored["ssh"]["host_key_fingerprint"] == ws["ssh"]["host_key_fingerprint"]
    out = await _sh(s, "sn", "cat before.txt; ls; cat /etc/sbx-marker; test -e /etc/after-marker || echo no-after; "
                             "sbx-demo; dpkg-query -W -f '${Status}\\n' sbx-demo")
    assert out == "before\nbefore.txt\nroot\nno-after\ndemo-ok\ninstall ok installed\n"
    assert not (host_dir / "after.txt").exists()

    # A restart starts from the restored root: the package stays installed.
    await s.call("stop_workspace", name="sn")
    await s.call("start_workspace", name="sn")
    assert await _sh(s, "sn", "sbx-demo; cat /etc/sbx-marker") == "demo-ok\nroot\n"
    # Inside, the restored root is root's, not some host uid's.
    assert await _sh(s, "sn", "stat -c '%u %g' /etc/sbx-marker /usr/bin/sbx-demo") == "0 0\n0 0\n"

    # Snapshots of a stopped workspace are allowed: the root it would start from.
    await s.call("stop_workspace", name="sn")
    stopped = await s.call("snapshot_workspace", name="sn", snapshot="s2-stopped")
    assert stopped["source_state"] == "stopped"
    listed = await s.call("list_snapshots", name="sn")
    assert [x["snapshot"] for x in listed["snapshots"]] == ["s1", "s2-stopped"]
    # Their disk counts: per workspace (also in workspace_status) and for the owner, against its bound.
    assert listed["total_bytes"] == sum(x["size_bytes"] for x in listed["snapshots"]) > 0
    assert listed["owner_limit_bytes"] > listed["owner_bytes"] >= listed["total_bytes"]
    assert (await s.call("workspace_status", name="sn"))["snapshot_bytes"] == listed["total_bytes"]
    if deployment.settings is None:  # in process, the bound is this test's own setting: less than 1 MiB of room
        settings.uid_max_snapshot_mib = -(-listed["owner_bytes"] // (1 << 20))
        (host_dir / "big.bin").write_bytes(os.urandom(3 << 20))
        try:
            refused = await s.error("snapshot_workspace", name="sn", snapshot="too-big")
            assert "uid_max_snapshot_mib" in refused and "delete_snapshot" in refused, refused
        finally:
            settings.uid_max_snapshot_mib = None
            (host_dir / "big.bin").unlink()
        after = await s.call("list_snapshots", name="sn")
        assert [x["snapshot"] for x in after["snapshots"]] == ["s1", "s2-stopped"]
        assert after["owner_bytes"] == listed["owner_bytes"]
    restored = await s.call("restore_workspace", name="sn", snapshot="s2-stopped")
    assert restored["state"] == "stopped"  # taken stopped, restored into a stopped workspace: stays stopped

    # Mistakes change nothing and say what to do.
    assert "list_snapshots" in await s.error("restore_workspace", name="sn", snapshot="nope")
    assert "list_snapshots" in await s.error("fork_workspace", name="sn", new_name="sn2", snapshot="nope")
    assert "not found" in await s.error("snapshot_workspace", name="ghost", snapshot="x")
    assert "memory=true is for type 'vm'" in await s.error("snapshot_workspace", name="sn", snapshot="m", memory=True)
    bad = await s.error("snapshot_workspace", name="sn", snapshot="../etc")
    assert "snapshot" in bad.lower()
    assert (await s.call("delete_snapshot", name="sn", snapshot="s2-stopped")) == {"snapshot": "s2-stopped",
                                                                                   "deleted": True}
    assert [x["snapshot"] for x in (await s.call("list_snapshots", name="sn"))["snapshots"]] == ["s1"]
    assert "list_snapshots" in await s.error("delete_snapshot", name="sn", snapshot="s2-stopped")
    state_dir = settings.state_dir / "sn"
    assert not [p for p in (state_dir / "snapshots").iterdir() if p.name.startswith(".")]
    assert (await s.call("destroy_workspace", name="sn"))["destroyed"]
    assert not state_dir.exists(), "snapshots go with destroy_workspace"
    assert host_leftovers("sn") == NOTHING_LEFT


async def test_fork_copies_then_diverges(mcp_session: Session, settings: Settings) -> None:
    s = mcp_session
    src = await s.call("create_workspace", name="fa")
    await _sh(s, "fa", INSTALL_DEMO + "echo shared > shared.txt; sudo sh -c 'echo fa > /etc/who'; sudo touch /rootfile")
    fork = await s.call("fork_workspace", name="fa", new_name="fb")
    assert fork["name"] == "fb" and fork["state"] == "running"
    assert fork["ip"] != src["ip"]
    assert fork["ssh"]["host_key_fingerprint"] != src["ssh"]["host_key_fingerprint"]
    assert (await s.call("workspace_status", name="fa"))["state"] == "running"
    assert registry(settings)["fb"].mac != registry(settings)["fa"].mac
    base_a, base_b = _nspawn(settings, "fa").uid_base, _nspawn(settings, "fb").uid_base
    assert base_a is not None and base_b is not None and base_a != base_b

    # The fork sees the source's files and packages, owned as inside the source. (Root's own file is in
    # the root layer: root inside has no id on the workspace dir, which maps only its owner.)
    out = await _sh(s, "fb", "cat shared.txt /etc/who; sbx-demo; stat -c %u /rootfile /etc/who; hostname; id -un")
    assert out == f"shared\nfa\ndemo-ok\n0\n0\nfb\n{settings.user}\n"
    # On the host, the fork's files belong to its own uid range, none to the source's.
    fb_root = settings.state_dir / "fb"
    owners = {st.st_uid for p in [fb_root / "workspace", fb_root / "root-layer"] for st in _lstat_tree(p)}
    assert not {u for u in owners if base_a <= u < base_a + 65536}, owners
    assert base_b in owners

    # Then they diverge, both running at once.
    await _sh(s, "fa", "echo a > only-a.txt; sudo touch /etc/only-a")
    await _sh(s, "fb", "echo b > only-b.txt; sudo touch /etc/only-b")
    assert await _sh(s, "fa", "ls /etc/only-* only-*") == "/etc/only-a\nonly-a.txt\n"
    assert await _sh(s, "fb", "ls /etc/only-* only-*") == "/etc/only-b\nonly-b.txt\n"

    # A fork from a snapshot: the files as they were then, not the source's later ones.
    await s.call("snapshot_workspace", name="fa", snapshot="base")
    await _sh(s, "fa", "echo later > later.txt")
    await s.call("stop_workspace", name="fb")  # one fewer container booted at once on a small test host
    fc = await s.call("fork_workspace", name="fa", new_name="fc", snapshot="base")
    assert fc["ip"] not in (src["ip"], fork["ip"])
    assert await _sh(s, "fc", "ls; ls /rootfile; cat /etc/who") == "only-a.txt\nshared.txt\n/rootfile\nfa\n"

    # A fork of a stopped workspace (fb, itself a fork): the root it would start with (its fork's, shifted
    # once more: /etc/only-b was written after that and went with the stop) and its workspace dir.
    fd = await s.call("fork_workspace", name="fb", new_name="fd")
    assert (await s.call("workspace_status", name="fb"))["state"] == "stopped"
    assert await _sh(s, "fd", "ls only-*; test -e /etc/only-b || echo gone; stat -c %u /etc/who; sbx-demo") == \
        "only-b.txt\ngone\n0\ndemo-ok\n"
    assert fd["ip"] not in (src["ip"], fork["ip"], fc["ip"])
    await s.call("destroy_workspace", name="fd")

    # Mistakes: the name is taken, or the source's own; bad names.
    assert "already exists" in await s.error("fork_workspace", name="fa", new_name="fc")
    assert "already exists" in await s.error("fork_workspace", name="fa", new_name="fa")
    assert "name" in (await s.error("fork_workspace", name="fa", new_name="Bad_Name")).lower()
    assert "not found" in await s.error("fork_workspace", name="ghost", new_name="fe")
    assert "fe" not in registry(settings)
    for name in ("fa", "fb", "fc"):
        assert (await s.call("destroy_workspace", name=name))["destroyed"]
        assert host_leftovers(name) == NOTHING_LEFT
        assert not (settings.state_dir / name).exists()


def _lstat_tree(root: Path) -> list[os.stat_result]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        out += [os.lstat(os.path.join(dirpath, n)) for n in [".", *dirnames, *filenames]]
    return out


async def test_restore_journal_file_is_gone_after_restore(mcp_session: Session, settings: Settings) -> None:
    """The swap leaves no staging, journal or old parts behind."""
    s = mcp_session
    await s.call("create_workspace", name="rj", start=False)
    await s.call("snapshot_workspace", name="rj", snapshot="a")
    await s.call("restore_workspace", name="rj", snapshot="a")
    left = sorted(p.name for p in (settings.state_dir / "rj").iterdir())
    assert not [n for n in left if n.endswith((".restoring", ".old")) or n == "restore.json"], left
    assert json.loads((settings.state_dir / "rj" / "snapshots" / "a" / "meta.json").read_text())["snapshot"] == "a"
    await s.call("destroy_workspace", name="rj")
