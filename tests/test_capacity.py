"""Issue 9.7: 30 container workspaces created at once through the MCP tools all run, then all go.

Every container's inotify instances count against host root's ``fs.inotify.max_user_instances``
(:mod:`sandbox_mcp.sysctls`); ``scripts/setup`` run as root raises it, as CI does first. Below
what 30 need, the test fails saying so instead of waiting for sshd timeouts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from mcp import Client

from sandbox_mcp import sysctls
from sandbox_mcp.bench.capacity import REST, cpu_by_part
from sandbox_mcp.config import Settings
from sandbox_mcp.errors import BackendError
from sandbox_mcp.host.cgroups import CgroupHost, group_for
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import CreateSpec
from sandbox_mcp.server import build_server

from .conftest import destroy_all
from .test_e2e import Session
from .test_escapes import assert_nothing_left

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

COUNT = 30
# Instances host root's own processes and other runs' containers may hold meanwhile (the default limit).
HOST_HEADROOM = 128
MIB_PER_WORKSPACE = 64  # ~16 MiB measured per idle workspace (recipe 11); the rest is headroom for booting


def _proc_int(rel: str) -> int:
    return int(Path("/proc", rel).read_text().split()[0])


@pytest.fixture
def wide_settings(settings: Settings) -> Iterator[Settings]:
    """The e2e settings on a bridge and subnet of this test's own. 30 boots share the CPUs, so the boot
    timeout is a bound for a hang only (this test is about how many fit, not how fast)."""
    yield settings.model_copy(update={"bridge": "sbxcap-br", "subnet": ipaddress.IPv4Network("192.168.88.0/24"),
                                      "boot_timeout_s": 600})


async def test_thirty_workspaces_created_at_once(wide_settings: Settings) -> None:
    settings = wide_settings
    limit = _proc_int("sys/fs/inotify/max_user_instances")
    need = COUNT * sysctls.INOTIFY_INSTANCES_BOOTING
    if limit < need + HOST_HEADROOM:
        pytest.fail(
            f"fs.inotify.max_user_instances is {limit}; {COUNT} workspaces booting at once need about {need} on top "
            f"of what the host holds. Run scripts/setup as root (it writes and applies {sysctls.CONF_PATH}) or "
            f"sysctl -w fs.inotify.max_user_instances={sysctls.RECOMMENDED['fs.inotify.max_user_instances']}"
        )
    available_mib = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available_mib = int(line.split()[1]) >> 10
    if available_mib is not None and available_mib < COUNT * MIB_PER_WORKSPACE:
        pytest.skip(f"{available_mib} MiB available; {COUNT} workspaces want {COUNT * MIB_PER_WORKSPACE} MiB")

    names = [f"par{i}" for i in range(COUNT)]
    failures: dict[str, str] = {}
    try:
        async with Client(build_server(settings)) as client:
            s = Session(client)

            async def create_and_exec(i: int, name: str) -> None:
                r = await client.call_tool("create_workspace", {"name": name})
                if r.is_error:
                    failures[name] = " ".join(getattr(c, "text", "") for c in r.content)[:400]
                    return
                assert r.structured_content is not None and r.structured_content["state"] == "running"
                out = await s.call("exec", name=name, command=f"echo $(({i} * 7)) $(hostname)")
                assert (out["exit_code"], out["stdout"]) == (0, f"{i * 7} {name}\n")

            async with anyio.create_task_group() as tg:
                for i, name in enumerate(names):
                    tg.start_soon(create_and_exec, i, name)
            assert not failures, (
                f"{len(failures)} of {COUNT} creates failed (if their logs say 'Too many open files', raise "
                f"fs.inotify.max_user_instances: scripts/setup as root): {failures}"
            )
            status = await s.call("workspace_status", name=names[0])
            # No systemd as PID 1 here: the server made the cgroup itself (scopes.py is the other way).
            assert (status["runtime"]["cgroups"], status["runtime"]["unit"]) == ("direct", None)
            # What `bench --capacity` splits a workspace's CPU by, read from a real tree: systemd, the units
            # that run (the agent the image started at boot among them), and the rest (nspawn's setup, ...).
            cg = CgroupHost(group_for(settings.state_dir))
            parts = cpu_by_part(cg.layout.workspace_dirs(names[0], cg.group)["unified"])
            assert {"init.scope", "ssh.service", "sandbox-mcp-agent.service", REST} <= set(parts), parts
            assert all(seconds > 0 for seconds in parts.values()), parts
            listed = (await s.call("list_workspaces"))["workspaces"]
            assert sorted(w["name"] for w in listed) == sorted(names)
            assert {w["state"] for w in listed} == {"running"}

            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(lambda n: s.call("destroy_workspace", name=n), name)
            assert (await s.call("list_workspaces"))["workspaces"] == []
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)
    for name in names:
        assert_nothing_left(settings, name)


async def test_a_boot_the_inotify_limit_would_kill_is_refused_at_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Using up host root's inotify instances for real would break every other root process on the
    # host (and with the raised limit means a million fds), so the probe's answer is set here; the
    # probe itself is tested for real inside a user namespace (test_sysctls.py).
    asked: list[int] = []

    def no_room(needed: int) -> bool:
        asked.append(needed)
        return False

    monkeypatch.setattr(sysctls, "inotify_headroom", no_room)
    async with WorkspaceManager(settings) as m:
        with pytest.raises(BackendError, match=r"fs\.inotify\.max_user_instances = \d+\).*scripts/setup as root"):
            await m.create(CreateSpec(name="inofull"))
        assert (await m.list()).workspaces == []
    assert asked == [sysctls.INOTIFY_INSTANCES_BOOTING]
    assert not (settings.state_dir / "inofull").exists()
    assert_nothing_left(settings, "inofull")
