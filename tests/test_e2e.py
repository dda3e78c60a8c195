"""End to end: an in-process MCP client against the server, driving real systemd-nspawn containers.

Every test here boots real containers from the cached Debian image, reaches them over SSH
on the test bridge (inside the private network namespace of ./scripts/test) and checks
the host afterwards: no process, link, network namespace, mount or registry entry left.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from sandbox_mcp.config import Settings
from sandbox_mcp.images import DebianRoot, ImageStore
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.naming import netns_name, veth_names
from sandbox_mcp.runtimes.nspawn import NspawnState
from sandbox_mcp.server import build_server

from .conftest import destroy_all
from .points import process_alive, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


class Session:
    """A connected MCP client plus helpers that assert on results."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.progress: list[tuple[float, float | None, str | None]] = []

    async def call(self, tool: str, **args: Any) -> dict[str, Any]:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            self.progress.append((progress, total, message))

        result = await self.client.call_tool(tool, args, progress_callback=on_progress)
        assert not result.is_error, f"{tool} failed: {result.content}"
        assert isinstance(result.structured_content, dict)
        return result.structured_content

    async def error(self, tool: str, **args: Any) -> str:
        result = await self.client.call_tool(tool, args)
        assert result.is_error, f"{tool} unexpectedly succeeded: {result.structured_content}"
        text = " ".join(getattr(c, "text", "") for c in result.content)
        assert "Traceback" not in text
        return text


@pytest.fixture
async def mcp_session(settings: Settings):  # type: ignore[no-untyped-def]
    server = build_server(settings)
    try:
        async with Client(server) as client:
            yield Session(client)
    finally:
        # Clean up with a separate manager so a failing test leaves nothing behind.
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)


def host_leftovers(name: str) -> dict[str, Any]:
    """What of workspace ``name`` exists on the host: links, netns, processes, mounts."""
    host_veth, _ = veth_names(name)
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    link_names = {link["ifname"] for link in json.loads(links)}
    procs = subprocess.run(["pgrep", "-f", f"--machine=sbx-{name}( |$)"], capture_output=True, text=True).stdout
    mounts = Path("/proc/self/mountinfo").read_text()
    return {
        "link": host_veth in link_names,
        "netns": Path(f"/run/netns/{netns_name(name)}").exists(),
        "processes": procs.split(),
        "mounts": [line for line in mounts.splitlines() if netns_name(name) in line],
    }


NOTHING_LEFT = {"link": False, "netns": False, "processes": [], "mounts": []}


async def test_full_lifecycle(mcp_session: Session, settings: Settings) -> None:
    s = mcp_session
    tools = {t.name: t for t in (await s.client.list_tools()).tools}
    assert set(tools) >= {
        "create_workspace", "start_workspace", "stop_workspace", "destroy_workspace", "list_workspaces",
        "workspace_status", "exec", "read_file", "write_file", "list_dir", "workspace_logs",
    }  # fmt: skip
    assert tools["destroy_workspace"].annotations.destructive_hint is True
    assert tools["list_workspaces"].annotations.read_only_hint is True

    ws = await s.call("create_workspace", name="life")
    assert ws["state"] == "running"
    assert ws["ip"].startswith("192.168.83.")
    assert ws["ssh"]["host_key_fingerprint"].startswith("SHA256:")
    assert ws["timings"]["total_s"] > 0
    assert s.progress, "create sent no progress notifications"
    values = [p for p, _, _ in s.progress]
    assert values == sorted(values) and len(set(values)) == len(values), "progress must increase"
    assert any("SSH" in (m or "") for _, _, m in s.progress)
    assert f"{ws['ip']}\tworkspace-life" in settings.hosts_file.read_text()  # type: ignore[union-attr]

    r = await s.call("exec", name="life", command="id -un; hostname; pwd; sudo -n id -u")
    assert r["exit_code"] == 0, r
    assert r["stdout"].split() == [settings.user, "life", f"/home/{settings.user}/workspace", "0"]
    assert r["stderr"] == ""

    r = await s.call("exec", name="life", command="echo out; echo err >&2; exit 3")
    assert (r["exit_code"], r["stdout"], r["stderr"]) == (3, "out\n", "err\n")

    r = await s.call("exec", name="life", command="cat; echo $FOO; pwd", stdin="piped\n", env={"FOO": "bar"},
                     cwd="/tmp")
    assert r["stdout"] == "piped\nbar\n/tmp\n"

    # Files: text, binary, paging, listing; relative paths land in the workspace dir on the host.
    await s.call("write_file", name="life", path="notes/hello.txt", content="héllo\n")
    host_file = Path(ws["host_workspace_dir"]) / "notes" / "hello.txt"
    assert host_file.read_text() == "héllo\n"
    got = await s.call("read_file", name="life", path="notes/hello.txt")
    assert (got["content"], got["encoding"], got["truncated"]) == ("héllo\n", "utf-8", False)

    blob = bytes(range(256)) * 64
    await s.call("write_file", name="life", path="bin/blob", content=base64.b64encode(blob).decode(),
                 encoding="base64", mode="755")
    got = await s.call("read_file", name="life", path="bin/blob", limit=10000)
    assert got["encoding"] == "base64" and got["truncated"] and got["next_offset"] == 10000
    rest = await s.call("read_file", name="life", path="bin/blob", offset=10000, limit=100000)
    assert base64.b64decode(got["content"]) + base64.b64decode(rest["content"]) == blob
    r = await s.call("exec", name="life", command="stat -c %a bin/blob; sha256sum < bin/blob")
    import hashlib

    assert r["stdout"].split()[:2] == ["755", hashlib.sha256(blob).hexdigest()]

    listing = await s.call("list_dir", name="life", path=".")
    entries = {e["name"]: e["type"] for e in listing["entries"]}
    assert entries == {"notes": "dir", "bin": "dir"}

    # Claude Code's config is seeded and visible inside, with the workspace trusted.
    r = await s.call("exec", name="life", command="cat \"$CLAUDE_CONFIG_DIR/.claude.json\"")
    claude = json.loads(r["stdout"])
    assert claude["hasCompletedOnboarding"] is True
    assert claude["projects"][f"/home/{settings.user}/workspace"]["hasTrustDialogAccepted"] is True

    # A restart gives a fresh root while the workspace dir persists.
    await s.call("exec", name="life", command="sudo touch /etc/dirty && touch keep.txt")
    stopped = await s.call("stop_workspace", name="life")
    assert stopped["state"] == "stopped"
    assert "start_workspace" in await s.error("exec", name="life", command="true")
    assert host_leftovers("life") == NOTHING_LEFT
    started = await s.call("start_workspace", name="life")
    assert started["state"] == "running"
    r = await s.call("exec", name="life", command="test -e /etc/dirty; echo $?; ls keep.txt")
    assert r["stdout"] == "1\nkeep.txt\n"

    status = await s.call("workspace_status", name="life")
    assert status["runtime"]["running"] is True and status["runtime"]["pid"]
    logs = await s.call("workspace_logs", name="life", lines=50)
    assert "systemd" in logs["log"] or "Reached target" in logs["log"]
    assert [w["name"] for w in (await s.call("list_workspaces"))["workspaces"]] == ["life"]

    done = await s.call("destroy_workspace", name="life")
    assert done == {"name": "life", "destroyed": True, "kept_data": False}
    assert host_leftovers("life") == NOTHING_LEFT
    assert not (settings.state_dir / "life").exists()
    assert "workspace-life" not in settings.hosts_file.read_text()  # type: ignore[union-attr]
    assert (await s.call("list_workspaces"))["workspaces"] == []


async def test_bad_input_changes_nothing(mcp_session: Session, settings: Settings) -> None:
    s = mcp_session
    registry_before = settings.registry_path.read_bytes() if settings.registry_path.exists() else b""
    for bad in ["Upper", "1abc", "way-too-long-name", "has_underscore", "", "semi;colon"]:
        assert "name" in (await s.error("create_workspace", name=bad)).lower()
    assert "not found" in await s.error("exec", name="ghost", command="true")
    assert "list_workspaces" in await s.error("workspace_status", name="ghost")
    assert "outside" in await s.error("create_workspace", name="ipout", ip="10.0.0.5")
    assert "not a valid debian package" in (await s.error("create_workspace", name="pk", packages=["rm -rf /"])).lower()
    after = settings.registry_path.read_bytes() if settings.registry_path.exists() else b""
    assert json.loads(after or b'{"workspaces": {}}')["workspaces"] == json.loads(
        registry_before or b'{"workspaces": {}}'
    )["workspaces"]
    assert not [p.name for p in settings.state_dir.iterdir() if not p.name.startswith(".") and p.is_dir()]

    ws = await s.call("create_workspace", name="dup", start=False)
    assert ws["state"] == "stopped"
    assert "already exists" in await s.error("create_workspace", name="dup")
    assert "in use" in await s.error("create_workspace", name="other", ip=ws["ip"])
    names = [w["name"] for w in (await s.call("list_workspaces"))["workspaces"]]
    assert names == ["dup"]


async def test_exec_timeout_kills_and_output_is_capped(mcp_session: Session) -> None:
    s = mcp_session
    await s.call("create_workspace", name="limits")
    r = await s.call("exec", name="limits", command="sleep 300 & sleep 301; echo never", timeout_s=1.5)
    assert r["timed_out"] is True and "never" not in r["stdout"]
    r = await s.call("exec", name="limits", command="pgrep -f 'sleep 30[01]' || echo none")
    assert r["stdout"].strip() == "none", "the timed-out command is still running"

    r = await s.call("exec", name="limits", command="head -c 5000000 /dev/zero | tr '\\0' x; echo tail >&2")
    assert r["truncated"] is True and r["exit_code"] == 0
    assert len(r["stdout"]) == 1 << 20 and r["stderr"] == "tail\n"


async def test_two_workspaces_are_isolated(mcp_session: Session) -> None:
    """Each workspace sees its own files, root filesystem, hostname and processes, none of the other's.

    (Whether they can reach each other over the network is the network policy's test.)
    """
    s = mcp_session
    a = await s.call("create_workspace", name="iso-a")
    b = await s.call("create_workspace", name="iso-b")
    assert a["ip"] != b["ip"] and a["ssh"]["host_key_fingerprint"] != b["ssh"]["host_key_fingerprint"]
    assert a["host_workspace_dir"] != b["host_workspace_dir"]
    tag = f"{random.getrandbits(64):016x}"  # names nothing else on the machine has

    async def sh(name: str, command: str) -> str:
        r = await s.call("exec", name=name, command=command)
        assert r["exit_code"] == 0, r
        return r["stdout"]

    # Files: a's workspace file, a's root-filesystem change and a's host directory stay a's.
    await s.call("write_file", name="iso-a", path=f"secret-{tag}", content="a only")
    await sh("iso-a", f"sudo touch /etc/root-{tag}")
    assert await sh("iso-a", f"cat secret-{tag}; ls /etc/root-{tag}") == f"a only/etc/root-{tag}\n"
    assert await sh("iso-b", "ls -A") == ""
    found = await sh("iso-b", f"sudo find / -xdev \\( -name 'secret-{tag}' -o -name 'root-{tag}' \\) -print; "
                              f"sudo find /home /etc /tmp /root -name '*{tag}*' -print")
    assert found == ""
    assert await sh("iso-b", f"test -e {a['host_workspace_dir']} && echo visible || echo absent") == "absent\n"
    # Names and processes: a's long-running process exists in a, not in b.
    assert (await sh("iso-a", "hostname"), await sh("iso-b", "hostname")) == ("iso-a\n", "iso-b\n")
    seconds = f"3600.{int(tag, 16) % 10**9:09d}"  # an hour, with a fraction no other process has
    await sh("iso-a", f"sleep {seconds} >/dev/null 2>&1 &")
    probe = f"pgrep -f '[s]leep {seconds}' >/dev/null && echo running || echo none"
    assert (await sh("iso-a", probe), await sh("iso-b", probe)) == ("running\n", "none\n")
    assert await sh("iso-b", "cat /proc/1/comm") == "systemd\n"  # its own PID namespace, its own init


async def test_packages_are_installed(mcp_session: Session, settings: Settings) -> None:
    store = DebianRoot(settings, ImageStore(settings.image_dir))
    if not store.exists(store.key(["jq"])):
        pytest.skip("the jq image variant is not cached (./scripts/test builds it before entering the namespace)")
    ws = await mcp_session.call("create_workspace", name="pkgs", packages=["jq"])
    assert ws["packages"] == ["jq"]
    r = await mcp_session.call("exec", name="pkgs", command="echo '{\"a\": 41}' | jq '.a + 1'")
    assert r["stdout"] == "42\n"


@pytest.mark.parametrize(
    "point",
    [
        "setting up the network",  # nothing made yet for the boot
        "booting the container",  # the namespace and veth exist; nspawn is not running yet
        "waiting for SSH",  # nspawn runs and boots: before SSH answers
    ],
)
async def test_cancelled_create_leaves_nothing(manager: WorkspaceManager, settings: Settings, point: str) -> None:
    seen: list[str] = []
    with anyio.CancelScope() as scope:

        async def progress(message: str, fraction: float | None = None) -> None:
            seen.append(message)
            if message.startswith(point):
                scope.cancel()  # the create stops at its next await

        await manager.create("cancel", progress=progress)
    assert scope.cancelled_caught, f"never reported {point!r}: {seen}"
    assert "cancel" not in (await manager.registry.read()).workspaces
    assert not (settings.state_dir / "cancel").exists()
    assert host_leftovers("cancel") == NOTHING_LEFT


async def test_reconcile_after_crash(settings: Settings) -> None:
    async with WorkspaceManager(settings) as m:
        ws = await m.create("crash")
        state = NspawnState.model_validate((await m.registry.get("crash")).runtime_state)
        assert state.process and state.leader
        # Simulate a crash: the container dies while no server watches.
        os.kill(state.process.pid, signal.SIGKILL)
        await wait_until(lambda: not process_alive(state.process.pid), "the killed nspawn to be gone")
    try:
        assert host_leftovers("crash")["netns"]  # the crashed run left its namespace behind
        leader = state.leader.pid
        assert process_alive(leader)  # and its container, orphaned
        async with WorkspaceManager(settings) as m:
            record = await m.registry.get("crash")
            assert record.state == "stopped"
            assert NspawnState.model_validate(record.runtime_state).process is None
            assert host_leftovers("crash") == NOTHING_LEFT
            assert not process_alive(leader)
            again = await m.start("crash")
            assert again.state == "running" and again.ip == ws.ip
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)
    assert host_leftovers("crash") == NOTHING_LEFT


def test_cli_for_people(settings: Settings) -> None:
    """The CLI drives the same lifecycle; `ssh` uses the real OpenSSH client with the pinned key."""
    env = {
        **os.environ,
        "SANDBOX_MCP_MODE": "direct",
        "SANDBOX_MCP_STATE_DIR": str(settings.state_dir),
        "SANDBOX_MCP_IMAGE_DIR": str(settings.image_dir),
        "SANDBOX_MCP_BRIDGE": settings.bridge,
        "SANDBOX_MCP_CONFIG": "/nonexistent",
        "SANDBOX_MCP_HOSTS_FILE": str(settings.hosts_file),
    }

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "sandbox_mcp", *args], env=env, capture_output=True,
                              text=True, timeout=120)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    try:
        created = json.loads(cli("create", "clitest").stdout)
        assert created["state"] == "running"
        assert json.loads(cli("start", "clitest").stdout)["state"] == "running"  # already running: a no-op
        assert "clitest" in cli("ls").stdout
        r = cli("exec", "clitest", "echo hi; echo oops >&2; exit 7", check=False)
        assert (r.returncode, r.stdout, r.stderr) == (7, "hi\n", "oops\n")
        if shutil.which("ssh"):
            r = cli("ssh", "clitest", "hostname")
            assert r.stdout == "clitest\n"
        assert "Reached target" in cli("logs", "clitest", "-n", "500").stdout
        assert json.loads(cli("stop", "clitest").stdout)["state"] == "stopped"
        r = cli("exec", "clitest", "true", check=False)
        assert r.returncode == 2 and "start_workspace" in r.stderr
        r = cli("create", "Bad!", check=False)
        assert r.returncode == 2 and "invalid" in r.stderr
    finally:
        cli("rm", "clitest", check=False)
    assert host_leftovers("clitest") == NOTHING_LEFT
    assert json.loads(cli("ls", "--json").stdout) == {"workspaces": []}
