"""Escapes from a workspace, tried for real through the exec tool: each must fail.

Root inside a user-namespaced workspace has passwordless sudo, as agents do. These tests use it
to try what issue 9 found working against privileged containers, and check the host afterwards.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from mcp import Client

from sandbox_mcp import supervise
from sandbox_mcp.config import Settings
from sandbox_mcp.host.caps import open_files_ceiling
from sandbox_mcp.host.cgroups import CgroupHost, group_for
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import OPEN_FILES
from sandbox_mcp.naming import UID_RANGE
from sandbox_mcp.server import build_server

from .conftest import destroy_all
from .test_e2e import NOTHING_LEFT, Session, host_leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def assert_nothing_left(settings: Settings, name: str) -> None:
    """No process, link, netns, mount under the state dir or cgroup of workspace ``name`` is left."""
    assert host_leftovers(name) == NOTHING_LEFT
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f" {settings.state_dir}/{name}/" not in mounts
    layout, group = CgroupHost(group_for(settings.state_dir)).layout, group_for(settings.state_dir)
    assert not any(d.exists() for d in layout.workspace_dirs(name, group).values())
    mirror = layout.mirror_dir(name, group)
    assert mirror is None or not mirror.exists()


@pytest.fixture
async def mcp_session(settings: Settings):  # type: ignore[no-untyped-def]
    try:
        async with Client(build_server(settings)) as client:
            yield Session(client)
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)
    assert_nothing_left(settings, "esc")


def uid_base(settings: Settings, name: str) -> int:
    record = json.loads(settings.registry_path.read_text())["workspaces"][name]
    base = record.get("uid_base")
    if base is None:
        base = record.get("runtime_state", {}).get("uid_base")
    assert isinstance(base, int)
    return base


async def sudo(s: Session, name: str, command: str) -> dict:
    return await s.call("exec", name=name, command=f"sudo -n sh -c '{command}'")


async def test_root_inside_is_an_unprivileged_host_uid(mcp_session: Session, settings: Settings) -> None:
    s = mcp_session
    ws = await s.call("create_workspace", name="esc", cpus=1, memory_mib=512)
    assert ws["isolation"] == "unprivileged-container"
    # The root layer: root_layer_mib, at most half the memory (its tmpfs pages count as memory).
    open_files = open_files_ceiling(OPEN_FILES)  # 524288, or the server's own where it may not raise it
    assert ws["limits"] == {"cpus": 1.0, "memory_mib": 512, "tasks": settings.tasks_max, "disk_mib": 256,
                            "host_disk_mib": None, "file_size": "unlimited", "open_files": open_files}
    r = await s.call("exec", name="esc", command="df -m --output=size / | tail -1; ulimit -f; ulimit -Hn")
    assert r["stdout"].split() == ["256", "unlimited", str(open_files)], r
    status = await s.call("workspace_status", name="esc")
    assert status["isolation"] == "unprivileged-container" and status["limits"] == ws["limits"]
    base = uid_base(settings, "esc")
    assert base >= 8 * UID_RANGE and base % UID_RANGE == 0

    r = await sudo(s, "esc", "cat /proc/self/uid_map; id -u")
    assert r["stdout"].split() == ["0", str(base), str(UID_RANGE), "0"]  # not "0 0 4294967295"
    # Seen from the host, the workspace's processes run as its uid range, never as root.
    pid = status["runtime"]["pid"]
    leader = int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
    uids = Path(f"/proc/{leader}/status").read_text().split("Uid:")[1].split()[:4]
    assert uids == [str(base)] * 4


async def test_proc_sys_and_read_only_binds_stay_read_only(mcp_session: Session, settings: Settings) -> None:
    s = mcp_session
    await s.call("create_workspace", name="esc")
    # core_pattern is host-wide: the attempt writes back the value it read, so that even where the
    # escape works (a privileged container) the host is left as it was; only the write's success counts.
    before = Path("/proc/sys/kernel/core_pattern").read_text()
    r = await sudo(s, "esc", "mount -o remount,bind,rw /proc/sys; p=$(cat /proc/sys/kernel/core_pattern); "
                             "printf %s \"$p\" > /proc/sys/kernel/core_pattern")
    assert r["exit_code"] != 0, r
    assert "Read-only file system" in r["stderr"] or "Permission denied" in r["stderr"], r
    assert Path("/proc/sys/kernel/core_pattern").read_text() == before

    keys = settings.state_dir / "esc" / "ssh-host-keys"
    r = await sudo(s, "esc", "mount -o remount,rw /etc/ssh-host-keys; mount -o remount,rw,bind /etc/ssh-host-keys; "
                             "touch /etc/ssh-host-keys/planted")
    assert r["exit_code"] != 0, r
    assert "Read-only file system" in r["stderr"]
    assert not (keys / "planted").exists()
    r = await sudo(s, "esc", "echo x >> /etc/ssh-host-keys/authorized_keys")
    assert r["exit_code"] != 0
    assert "x" not in (keys / "authorized_keys").read_text().split()


async def test_no_device_nodes_and_no_setuid_root_on_the_host(mcp_session: Session, settings: Settings) -> None:
    s = mcp_session
    ws = await s.call("create_workspace", name="esc")
    host_dir = Path(ws["host_workspace_dir"])
    base = uid_base(settings, "esc")

    r = await sudo(s, "esc", "mknod /tmp/mem c 1 1; mknod ./mem c 1 1; head -c1 /tmp/mem")
    # Refused in the root layer; in the shared dir root has no id at all, which fails even earlier.
    assert r["exit_code"] != 0 and "/tmp/mem: Operation not permitted" in r["stderr"], r
    assert "./mem: Operation not permitted" in r["stderr"] or "./mem: Value too large" in r["stderr"], r
    assert not (host_dir / "mem").exists()

    # Root inside has no id on the shared dir: what it tries to create there fails (EOVERFLOW).
    r = await sudo(s, "esc", "install -m 4755 /bin/bash ./rootbash; touch ./by-root")
    assert r["exit_code"] != 0 and "Value too large" in r["stderr"], r
    assert not (host_dir / "rootbash").exists() and not (host_dir / "by-root").exists()
    # The agent's own copy, made setuid by root inside: the owner's, and nosuid does nothing inside either.
    r = await s.call("exec", name="esc", command="cp /bin/bash ./ownbash && sudo -n chmod 4755 ownbash && "
                                                  "touch by-agent && ./ownbash -p -c 'id -u'")
    assert r["stdout"].strip() == str(settings.user_uid), r
    planted = (host_dir / "ownbash").stat()
    assert planted.st_uid == settings.user_uid and planted.st_uid not in (0, base)  # the owner's, no one else's
    assert (host_dir / "by-agent").stat().st_uid == settings.user_uid  # the agent's: the host user's
    for entry in host_dir.iterdir():
        st = entry.lstat()
        assert not stat.S_ISCHR(st.st_mode) and not stat.S_ISBLK(st.st_mode)
        assert not (st.st_uid == 0 and st.st_mode & stat.S_ISUID)


async def test_memory_beyond_the_limit_is_killed_inside(mcp_session: Session) -> None:
    s = mcp_session
    await s.call("create_workspace", name="esc", memory_mib=256)
    r = await s.call("exec", name="esc", command="python3 -c 'b = b\"x\" * (512 << 20); print(len(b))'",
                     timeout_s=120)
    assert r["exit_code"] != 0 and r["stdout"] == "", r  # killed (137) or refused, never allocated
    r = await s.call("exec", name="esc", command="echo still here")
    assert r["stdout"] == "still here\n"
    assert (await s.call("workspace_status", name="esc"))["runtime"]["running"] is True


FORK_BOMB = """
import os
r, w = os.pipe()
n = 0
try:
    while n < 20000:
        if os.fork() == 0:
            os.close(w)
            os.read(r, 1)  # wait until the parent closes the pipe
            os._exit(0)
        n += 1
except OSError as exc:
    print(n, exc.errno)
os.close(w)
"""


async def test_fork_bomb_stops_at_the_tasks_limit(settings: Settings) -> None:
    settings = settings.model_copy(update={"tasks_max": 300})
    try:
        async with Client(build_server(settings)) as client:
            s = Session(client)
            ws = await s.call("create_workspace", name="esc")
            assert ws["limits"]["tasks"] == 300
            r = await s.call("exec", name="esc", command=f"python3 -c '{FORK_BOMB}'", timeout_s=120)
            forked, err = r["stdout"].split()
            assert err == str(11), r  # EAGAIN: the pids limit, not the host's
            assert 100 < int(forked) < 300
            r = await s.call("exec", name="esc", command="echo still here")
            assert r["stdout"] == "still here\n"
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)
    assert_nothing_left(settings, "esc")


async def test_privileged_only_when_allowed(settings: Settings) -> None:
    refused = settings.model_copy(update={"private_users": False})
    try:
        async with Client(build_server(refused)) as client:
            text = await Session(client).error("create_workspace", name="priv")
    finally:  # should the create succeed after all, it must not outlive the test
        async with WorkspaceManager(refused) as m:
            await destroy_all(m)
    assert "SANDBOX_MCP_ALLOW_PRIVILEGED=true" in text
    assert not (refused.state_dir / "priv").exists()
    assert_nothing_left(refused, "priv")

    allowed = refused.model_copy(update={"allow_privileged": True})
    try:
        async with Client(build_server(allowed)) as client:
            s = Session(client)
            ws = await s.call("create_workspace", name="priv", memory_mib=300)
            assert ws["isolation"] == "privileged-container"
            r = await s.call("exec", name="priv", command="cat /proc/self/uid_map")
            assert r["stdout"].split() == ["0", "0", "4294967295"]
    finally:
        async with WorkspaceManager(allowed) as m:
            await destroy_all(m)
    assert_nothing_left(allowed, "priv")


def _is_copier(pid: int) -> bool:
    """The console copier: supervise's bounded sink (a shell running its program)."""
    try:
        return supervise._SINK.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False


async def test_console_flood_is_bounded_and_the_workspace_keeps_running(settings: Settings) -> None:
    """Root inside floods the console: the host's log keeps its first console_log_mib, the rest is
    dropped by the copier, and the workspace keeps running. No limit of the log's reaches the
    workspace (issue 28: nspawn's file-size limit once did, 16 MiB for every process inside)."""
    settings = settings.model_copy(update={"console_log_mib": 1})
    log = settings.state_dir / "esc" / "runtime" / "console.log"
    tag = supervise.workspace_tag(settings.state_dir, "esc")
    try:
        async with Client(build_server(settings)) as client:
            s = Session(client)
            await s.call("create_workspace", name="esc")
            nspawn = json.loads(settings.registry_path.read_text())["workspaces"]["esc"]["runtime_state"]["process"]
            copiers = [r for r in supervise.tagged(tag) if r.pid != nspawn["pid"] and _is_copier(r.pid)]
            assert len(copiers) == 1, supervise.tagged(tag)
            # Root inside writes 8 MiB to the console; nspawn copies it into the pipe to the copier.
            r = await s.call("exec", name="esc", timeout_s=120,
                             command="sudo sh -c 'head -c 8M /dev/zero | tr \"\\0\" x >/dev/console' && echo flooded")
            assert r["stdout"] == "flooded\n", r
            assert log.stat().st_size <= 1 << 20
            assert (await s.call("workspace_status", name="esc"))["runtime"]["running"] is True
            r = await s.call("exec", name="esc", command="head -c 50M /dev/zero > big && stat -c %s big && rm big; "
                             "grep 'Max file size' /proc/1/limits")
            assert r["stdout"].split()[0] == str(50 << 20) and r["stdout"].split()[-3:-1] == ["unlimited"] * 2, r
            await s.call("stop_workspace", name="esc")
            assert supervise.tagged(tag) == []  # nspawn, its container and the copier: all gone
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)
    assert_nothing_left(settings, "esc")
