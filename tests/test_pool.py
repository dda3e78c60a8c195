"""The warm pool (issue 26): a create of the default spec claims a booted slot and gets its own identity.

Real nspawn containers in the test namespace: the slot boots in the background, the create claims it
(``timings.from_pool``), and the workspace then has its name inside (host name, /etc/hosts), its own host
dirs under its name, the slot's address and pinned host key, and works like any other; the pool refills;
a spec the pool does not hold boots; stop and start, and destroy, work on a claimed workspace; nothing is
left when the pool's process exits. No time is asserted (the bench measures the claim).
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.errors import WorkspaceExists, WorkspaceNotFound
from sandbox_mcp.images.debootstrap import AGENT_SERVICE
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import CreateSpec, WorkspaceRecord
from sandbox_mcp.naming import is_pool_slot, veth_names

from .conftest import destroy_all

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def ready_slots(m: WorkspaceManager, n: int, other_than: set[str] = frozenset(), timeout_s: float = 120) -> list[WorkspaceRecord]:
    """Wait until ``n`` slots (none of ``other_than``) are booted and unclaimed."""
    with anyio.fail_after(timeout_s):
        while True:
            data = await m.registry.read()
            ready = [r for r in data.workspaces.values()
                     if r.pooled and r.state == "running" and r.name not in other_than]
            if len(ready) >= n:
                return ready
            await anyio.sleep(0.05)


def links() -> set[str]:
    return set(os.listdir("/sys/class/net"))


def nspawn_machines() -> set[str]:
    """--machine= arguments of the systemd-nspawn processes running now."""
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"systemd-nspawn"):
            out |= {a.split(b"=", 1)[1].decode() for a in argv if a.startswith(b"--machine=")}
    return out


async def test_a_create_claims_a_booted_slot_which_becomes_that_workspace(settings: Settings) -> None:
    s = settings.model_copy(update={"pool_size": 1})
    async with WorkspaceManager(s) as m:
        try:
            [slot] = await ready_slots(m, 1)
            assert is_pool_slot(slot.name)
            assert (await m.list()).workspaces == [], "a slot is nobody's workspace: list shows none"
            with pytest.raises(WorkspaceNotFound):
                await m.status(slot.name)

            ws = await m.create(CreateSpec(name="claimed"))
            assert ws.timings is not None and ws.timings.from_pool, ws.timings
            print(f"claimed in {ws.timings.total_s} s")
            assert ws.ip == slot.ip
            assert ws.ssh.host_key_fingerprint == slot.host_key_fingerprint != ""
            assert ws.host_workspace_dir == str(s.state_dir / "claimed" / "workspace")
            assert not (s.state_dir / slot.name).exists(), "the slot's dir became the workspace's"
            assert not (s.state_dir / ".locks" / f"{slot.name}.lock").exists(), "no lock file of the slot stays"

            r = await m.exec("claimed", "hostname; grep -c claimed /etc/hosts; pwd; echo hi > made-inside; id -un")
            assert r.exit_code == 0, r.stderr
            hostname, hosts, cwd, user = r.stdout.split()
            assert (hostname, hosts, user) == ("claimed", "1", s.user)
            # The slot booted without the agent that waits at boot for a first connection (the claim may
            # come hours later): the pool's connection started one the usual way, below sshd.
            r = await m.exec("claimed", f"systemctl show -p ConditionResult --value {AGENT_SERVICE}; "
                                        "ps -o comm= -p $(ps -o ppid= -p $PPID)")  # fmt: skip
            assert r.stdout.split() == ["no", "sshd"], r
            made = Path(ws.host_workspace_dir) / "made-inside"
            assert made.read_text() == "hi\n"
            assert made.stat().st_uid == s.user_uid, "the agent's files are the host user's, as in a booted one"
            assert [w.name for w in (await m.list()).workspaces] == ["claimed"]
            status = await m.status("claimed")
            assert status.runtime.running and status.timings is not None and status.timings.from_pool

            # The name is taken: the slot stays a slot (another claim does not steal it either).
            [refill] = await ready_slots(m, 1, other_than={slot.name})
            # A slot is as walled off as any workspace: the claimed one cannot reach it.
            probe = await m.exec("claimed", f"timeout 3 bash -c '</dev/tcp/{refill.ip}/22' && echo reached")
            assert probe.exit_code != 0 and "reached" not in probe.stdout, probe
            with pytest.raises(WorkspaceExists):
                await m.create(CreateSpec(name="claimed"))
            assert (await m.registry.get(refill.name)).pooled

            # A spec the pool does not hold boots, with a uid range of its own.
            other = await m.create(CreateSpec(name="sized", memory_mib=1024))
            assert other.timings is not None and not other.timings.from_pool
            bases = {n: r.runtime_state.get("uid_base") for n, r in (await m.registry.read()).workspaces.items()}
            assert len(set(bases.values())) == len(bases) == 3, bases

            # Stopped and started, it boots again (under the slot's host-side names) with its own name inside.
            await m.stop("claimed")
            assert f"sb-{slot.name}" not in links()
            await m.start("claimed")
            r = await m.exec("claimed", "hostname; cat made-inside; ps -o args= -p $PPID")
            assert r.stdout.split("\n", 2)[:2] == ["claimed", "hi"], r
            assert "--listen" in r.stdout.split("\n")[2], "booted as itself, it had the agent waiting at boot"

            await m.destroy("claimed")
            assert not (s.state_dir / "claimed").exists()
            assert veth_names(slot.name)[0] not in links()
            assert f"sbx-{slot.name}" not in nspawn_machines()
        finally:
            await destroy_all(m)  # the users' workspaces; the slots go with the manager
        slots = {r.name for r in (await m.registry.read()).workspaces.values() if r.pooled}
    assert slots, "a slot was ready while the manager ran"
    assert not any(r.pooled for r in (await m.registry.read()).workspaces.values()), "its slots went with it"
    assert not {f"sb-{n}" for n in slots} & links()
    assert not {f"sbx-{n}" for n in slots} & nspawn_machines()


async def test_through_an_mcp_session_and_from_a_second_process_that_keeps_no_pool(settings: Settings) -> None:
    """The server keeps the pool; create_workspace over MCP claims a slot and says so, and a manager that keeps
    none (the CLI's) claims the other slot from the same registry, connecting afresh with the pinned key."""
    from mcp import Client

    from sandbox_mcp.bench.calls import tool_caller
    from sandbox_mcp.server import build_server

    s = settings.model_copy(update={"pool_size": 2})
    async with Client(build_server(s)) as client:
        call = tool_caller(client)
        async with WorkspaceManager(s, serve_ports=False) as cli:
            try:
                await ready_slots(cli, 2)
                ws = await call("create_workspace", name="viamcp")
                assert ws["timings"]["from_pool"] is True
                status = await call("workspace_status", name="viamcp")
                assert status["timings"]["from_pool"] is True and status["runtime"]["running"]
                r = await call("exec", name="viamcp", command="hostname")
                assert r["stdout"].strip() == "viamcp"
                listed = await call("list_workspaces")
                assert [w["name"] for w in listed["workspaces"]] == ["viamcp"]

                other = await cli.create(CreateSpec(name="viacli"))
                assert other.timings is not None and other.timings.from_pool
                r2 = await cli.exec("viacli", "hostname")
                assert r2.stdout.strip() == "viacli"
                assert other.ip != ws["ip"]
            finally:
                await destroy_all(cli)
        # The CLI's manager closed without touching the server's slots: the server refills and keeps them.
        await ready_slots(cli, 2)


async def test_another_owners_create_gets_the_shares_mapped_for_them(settings: Settings, accounts: object) -> None:
    """A daemon user's create (owner_uid, as the daemon passes it) claims a slot booted for nobody: the
    workspace dir and Claude config become the owner's, the slot's binds are replaced (not covered) by
    mounts that map the owner to the workspace user, and what the agent writes is the owner's on the host."""
    alice = accounts.alice  # type: ignore[attr-defined]
    s = settings.model_copy(update={"pool_size": 1})
    async with WorkspaceManager(s) as m:
        try:
            await ready_slots(m, 1)
            ws = await m.create(CreateSpec(name="hers"), owner_uid=alice.uid)
            assert ws.timings is not None and ws.timings.from_pool, ws.timings
            r = await m.exec("hers", "echo x > by-agent && stat -c '%u %U' . by-agent "
                             "&& stat -c '%U' ~/claude-config/settings.json",
                             owner_uid=alice.uid)
            assert r.exit_code == 0, r.stderr
            lines = r.stdout.split("\n")
            assert lines[0].split()[1] == lines[1].split()[1] == lines[2] == s.user, r.stdout  # the agent's own
            config = Path(ws.host_workspace_dir).parent / "claude-config" / "settings.json"
            assert config.stat().st_uid == alice.uid
            made = Path(ws.host_workspace_dir) / "by-agent"
            assert (made.stat().st_uid, made.stat().st_gid) == (alice.uid, alice.gid)
            # root inside finds no old bind under the new one to unmount and write through as the slot's user
            r = await m.exec("hers", "sudo -n umount ~/workspace; echo > ~/workspace/after-umount; echo $?",
                             owner_uid=alice.uid)
            stray = [p for p in Path(ws.host_workspace_dir).iterdir() if p.name == "after-umount"]
            assert all(p.stat().st_uid == alice.uid for p in stray), r
            assert "0" in r.stdout.split(), r  # it wrote somewhere: the image's empty dir, if the umount worked
        finally:
            await destroy_all(m)


async def test_slots_a_killed_keeper_left_are_adopted_not_booted_again(settings: Settings) -> None:
    """A slot whose keeper process is gone (its registry entry names a dead PID) is adopted by the next
    keeper when it still runs and fits; while its keeper lives, another server leaves it alone."""
    from sandbox_mcp.supervise import ProcessRef

    s = settings.model_copy(update={"pool_size": 1})
    async with WorkspaceManager(s) as first:
        [slot] = await ready_slots(first, 1)
        async with WorkspaceManager(s, keep_pool=False) as bystander:  # keeps no pool: touches no slot
            assert (await bystander.registry.get(slot.name)).pool_holder == first.pool.holder
        with first.registry.transaction_sync() as data:  # as if its keeper had been killed
            data.workspaces[slot.name] = data.workspaces[slot.name].model_copy(
                update={"pool_holder": ProcessRef(pid=2**22 + 1, start_time=1)})
        async with WorkspaceManager(s) as second:
            adopted = await second.registry.get(slot.name)
            assert adopted.pooled and adopted.pool_holder == second.pool.holder, adopted
            assert adopted.ip == slot.ip and (await second.runtime_of(adopted).status(adopted)).running
            ws = await second.create(CreateSpec(name="adoptee"))
            assert ws.timings is not None and ws.timings.from_pool and ws.ip == slot.ip
            await second.destroy("adoptee")


async def test_stdio_serve_keeping_a_pool_ends_on_eof_and_leaves_nothing(settings: Settings) -> None:
    """What Claude Code runs: `serve` over stdio with POOL_SIZE=1 boots a slot, a create claims it, and when
    stdin closes the server exits with its slots destroyed: no process, link, netns or mount of theirs."""
    import sys

    from sandbox_mcp.registry import Registry

    from .test_e2e import NOTHING_LEFT, host_leftovers
    from .test_serve_stdio import Served, serve

    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_MCP_")}
    env.update({
        "SANDBOX_MCP_STATE_DIR": str(settings.state_dir), "SANDBOX_MCP_IMAGE_DIR": str(settings.image_dir),
        "SANDBOX_MCP_BRIDGE": settings.bridge, "SANDBOX_MCP_MODE": "direct", "SANDBOX_MCP_CONFIG": "/nonexistent",
        "SANDBOX_MCP_HOSTS_FILE": str(settings.hosts_file), "SANDBOX_MCP_BOOT_TIMEOUT_S": "60",
        "SANDBOX_MCP_DAEMON_SOCKET": str(settings.state_dir.parent / "no-daemon.sock"), "SANDBOX_MCP_POOL_SIZE": "1",
    })  # fmt: skip
    registry = Registry(settings.registry_path)

    async def slots() -> set[str]:
        with anyio.fail_after(120):
            while True:  # the slots are another process's: its registry is what shows them
                found = {n for n, r in (await registry.read()).workspaces.items() if r.pooled and r.state == "running"}
                if found:
                    return found
                await anyio.sleep(0.05)

    seen: set[str] = set()
    async with serve(Served("in-process", [sys.executable, "-m", "sandbox_mcp", "serve"], env, settings)) as wire:
        seen |= await slots()
        ws, _, _ = await wire.call("create_workspace", name="fromstdio")
        assert ws["timings"]["from_pool"] is True
        await wire.call("destroy_workspace", name="fromstdio")
        seen |= await slots()  # the refill
    assert wire.proc.returncode == 0, wire.stderr_text()[-2000:]
    assert not (await registry.read()).workspaces, "the server's slots went with it"
    for slot in seen:
        assert host_leftovers(slot) == NOTHING_LEFT, slot
