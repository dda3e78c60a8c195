"""Privilege separation end to end: a root `sandbox-mcp daemon`, and real unprivileged users reaching it.

Three throw-away accounts are made with useradd (and removed afterwards): two in the daemon's
group, one outside it. Each user's side runs as that user (setpriv drops to their uid, gid and
groups): `sandbox-mcp serve` over stdio, bridged to the daemon's socket, driven by an MCP client
in this process, exactly as Claude Code would start it; and the CLI. The daemon boots real
containers in the test namespace.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from sandbox_mcp import ssh
from sandbox_mcp.config import Settings
from sandbox_mcp.daemon import Peer, authorize
from sandbox_mcp.errors import AccessDenied
from sandbox_mcp.fsutil import file_lock
from sandbox_mcp.images import DebianRoot, ImageStore
from sandbox_mcp.naming import netns_name
from sandbox_mcp.paths import WorkspacePaths
from sandbox_mcp.registry import Registry
from sandbox_mcp.userkeys import user_key_path

from .deploy import Account, Accounts, Daemon, as_user, cli_as, mcp_as, running_daemon, user_env

pytestmark = pytest.mark.anyio

BRIDGE = "sbxd-br"
SUBNET = "192.168.89.0/24"  # not the other e2e tests' subnet: both bridges may exist at once


def test_authorize_rules() -> None:
    authorize(Peer(pid=1, uid=0, gid=0, groups=frozenset()), 4242, "g")  # root always
    authorize(Peer(pid=1, uid=1001, gid=4242, groups=frozenset()), 4242, "g")  # primary group
    authorize(Peer(pid=1, uid=1001, gid=100, groups=frozenset({5, 4242})), 4242, "g")  # supplementary
    for peer in (Peer(1, 1001, 100, frozenset({5})), Peer(1, 1001, 100, frozenset())):
        with pytest.raises(AccessDenied, match="usermod -aG g"):
            authorize(peer, 4242, "g")
    with pytest.raises(AccessDenied):
        authorize(Peer(1, 1001, 100, frozenset({4242})), None, "g")  # no such group: only root


async def test_the_sdk_still_serves_a_given_stream_pair() -> None:
    """server.lowlevel_server reaches into the SDK (no public way exists): if mcp renames or reshapes
    what it returns, this fails here rather than at the first connection to a deployed daemon."""
    import inspect

    from mcp.server.lowlevel import Server

    from sandbox_mcp.server import build_server, lowlevel_server

    lowlevel = lowlevel_server(build_server(Settings()))
    assert isinstance(lowlevel, Server)
    assert list(inspect.signature(lowlevel.run).parameters)[:3] == ["read_stream", "write_stream",
                                                                    "initialization_options"]  # fmt: skip
    assert lowlevel.create_initialization_options().server_name == "sandbox-mcp"


# --- the daemon, and clients running as a user (tests/deploy.py) ------------------------------


@pytest.fixture(scope="module")
def daemon(accounts: Accounts, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    image_dir = Path(os.environ.get("SANDBOX_MCP_IMAGE_DIR", "/var/cache/sandbox-mcp/images"))
    root = tmp_path_factory.mktemp("daemon")
    settings = Settings(mode="direct", state_dir=root / "state", image_dir=image_dir, bridge=BRIDGE, subnet=SUBNET,
                        hosts_file=root / "hosts", boot_timeout_s=60)  # fmt: skip
    store = DebianRoot(settings, ImageStore(settings.image_dir))
    if not store.exists(store.key(())):
        pytest.skip("the root image is not cached; ./scripts/test builds it before entering the test namespace")
    try:
        with running_daemon(settings, accounts.group) as d:
            _DAEMONS.append(d)
            yield d
    finally:
        subprocess.run(["ip", "link", "del", BRIDGE], check=False, capture_output=True)


_DAEMONS: list[Daemon] = []  # the running daemon, for failure messages


def _mcp_as(user: Account) -> Any:
    return mcp_as(user, _DAEMONS[-1])


def _cli_as(user: Account, *args: str) -> subprocess.CompletedProcess[str]:
    return cli_as(user, _DAEMONS[-1], *args)


async def refusal(user: Account) -> str:
    """The message of the error that ends ``user``'s attempt to open a session."""
    try:
        async with _mcp_as(user):
            pass
    except BaseException as exc:  # task groups wrap it
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        assert isinstance(exc, MCPError), repr(exc)
        return exc.error.message
    raise AssertionError(f"{user.name} was let in")


async def call(client: Client, tool: str, progress: Callable[..., Any] | None = None, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args, progress_callback=progress)
    tail = _DAEMONS[-1].tail() if _DAEMONS else ""
    assert not result.is_error, f"{tool} failed: {result.content}\ndaemon log:\n{tail}"
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def error(client: Client, tool: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool} unexpectedly succeeded: {result.structured_content}"
    return " ".join(getattr(c, "text", "") for c in result.content)


def registry(daemon: Daemon) -> dict[str, Any]:
    return Registry(daemon.settings.registry_path).read_sync().workspaces


# --- the tests -------------------------------------------------------------------------------


async def test_a_user_in_the_group_drives_the_lifecycle(daemon: Daemon, accounts: Accounts) -> None:
    alice = accounts.alice
    progress: list[str] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append(message or "")

    async with _mcp_as(alice) as client:
        ws = await call(client, "create_workspace", on_progress, name="dalice")
        assert ws["state"] == "running" and progress and "workspace running" in progress
        assert registry(daemon)["dalice"].owner_uid == alice.uid
        r = await call(client, "exec", name="dalice", command="id -un; echo hello >&2", timeout_s=60)
        assert (r["exit_code"], r["stdout"], r["stderr"]) == (0, "agent\n", "hello\n")
        await call(client, "write_file", name="dalice", path="notes/a.txt", content="from alice")
        assert (await call(client, "read_file", name="dalice", path="notes/a.txt"))["content"] == "from alice"
        assert [e["name"] for e in (await call(client, "list_dir", name="dalice", path="notes"))["entries"]] == ["a.txt"]
        assert (await call(client, "workspace_status", name="dalice"))["runtime"]["running"] is True
        assert [w["name"] for w in (await call(client, "list_workspaces"))["workspaces"]] == ["dalice"]
        assert (await call(client, "stop_workspace", name="dalice"))["state"] == "stopped"
        assert (await call(client, "start_workspace", name="dalice"))["state"] == "running"
        assert (await call(client, "read_file", name="dalice", path="notes/a.txt"))["content"] == "from alice"

        # The CLI as the same user reaches the same workspaces through the daemon.
        r = _cli_as(alice, "ls", "--json")
        assert r.returncode == 0, r.stderr
        assert [w["name"] for w in json.loads(r.stdout)["workspaces"]] == ["dalice"]
        r = _cli_as(alice, "exec", "dalice", "echo", "via-cli")
        assert (r.returncode, r.stdout) == (0, "via-cli\n"), r.stderr
        # `sandbox-mcp ssh` as alice: her own key, the host key pinned from the daemon's answer.
        r = _cli_as(alice, "ssh", "dalice", "id -un; hostname")
        assert (r.returncode, r.stdout) == (0, "agent\ndalice\n"), r.stderr
        key = user_key_path(Settings(daemon_socket=daemon.socket), alice.uid)
        for path, owner, mode in ((key, alice.uid, 0o600), (key.parent, alice.uid, 0o700), (key.parent.parent, 0, 0o711)):
            st = path.lstat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner, mode), path
        key.unlink()  # as a reboot or a restart of the unit would (the copy lives under /run)
        r = _cli_as(alice, "ssh", "dalice", "hostname")  # connecting publishes it again
        assert (r.returncode, r.stdout) == (0, "dalice\n"), r.stderr

        assert (await call(client, "destroy_workspace", name="dalice"))["destroyed"] is True
    assert "dalice" not in registry(daemon)
    assert not (daemon.settings.state_dir / "dalice").exists()
    assert not Path(f"/run/netns/{netns_name('dalice')}").exists()


async def test_another_user_cannot_see_or_touch_it(daemon: Daemon, accounts: Accounts) -> None:
    async with _mcp_as(accounts.alice) as alice:
        await call(alice, "create_workspace", name="dmine")
        try:
            async with _mcp_as(accounts.bob) as bob:
                assert (await call(bob, "list_workspaces"))["workspaces"] == []
                for tool, args in (("workspace_status", {}), ("exec", {"command": "true"}),
                                   ("read_file", {"path": "x"}), ("write_file", {"path": "x", "content": "y"}),
                                   ("list_dir", {}), ("workspace_logs", {}), ("stop_workspace", {}),
                                   ("start_workspace", {}), ("destroy_workspace", {}),
                                   ("pause_workspace", {}), ("resume_workspace", {}), ("list_snapshots", {}),
                                   ("snapshot_workspace", {"snapshot": "s"}), ("restore_workspace", {"snapshot": "s"}),
                                   ("delete_snapshot", {"snapshot": "s"}),
                                   ("fork_workspace", {"new_name": "dsteal"})):  # fmt: skip
                    text = await error(bob, tool, name="dmine", **args)
                    assert "'dmine' not found" in text, (tool, text)  # indistinguishable from a missing one
                assert "already exists" in await error(bob, "create_workspace", name="dmine")  # names are global
                assert "dsteal" not in registry(daemon) and not (daemon.settings.state_dir / "dsteal").exists()
                await call(bob, "create_workspace", name="dbob", start=False)
                assert [w["name"] for w in (await call(bob, "list_workspaces"))["workspaces"]] == ["dbob"]
                await _ssh_is_per_user(daemon, accounts)
                await call(bob, "destroy_workspace", name="dbob")
            # Still alice's, untouched; root (the CLI as root, through the daemon) sees every workspace.
            assert (await call(alice, "workspace_status", name="dmine"))["state"] == "running"
            r = subprocess.run([sys.executable, "-m", "sandbox_mcp", "ls", "--json"], env=daemon.client_env,
                               capture_output=True, text=True, timeout=120)  # fmt: skip
            assert r.returncode == 0 and "dmine" in r.stdout, r.stderr
        finally:
            await call(alice, "destroy_workspace", name="dmine")


async def _ssh_is_per_user(daemon: Daemon, accounts: Accounts) -> None:
    """Bob cannot `sandbox-mcp ssh` into alice's dmine, nor read her key, nor log in there with his own:
    his key is authorised in his dbob (made with it, not started: one booted container is enough here)."""
    bob = accounts.bob
    r = _cli_as(bob, "ssh", "dmine", "true")
    assert r.returncode == 2 and "'dmine' not found" in r.stderr, r.stderr
    r = _cli_as(bob, "ssh", "dbob", "true")
    assert r.returncode == 2 and "start_workspace" in r.stderr, r.stderr
    keys = Settings(daemon_socket=daemon.socket)
    alice_key, bob_key = user_key_path(keys, accounts.alice.uid), user_key_path(keys, bob.uid)
    assert subprocess.run(as_user(bob, "cat", str(alice_key)), capture_output=True).returncode != 0
    bob_public = ssh.ensure_client_key(daemon.settings.state_dir / ".server" / "users" / f"{bob.uid}_ed25519")

    def authorized(name: str) -> str:
        return WorkspacePaths.of(daemon.settings.state_dir, name).authorized_keys.read_text()

    assert bob_public in authorized("dbob") and bob_public not in authorized("dmine")
    # OpenSSH as bob with his own key, straight at alice's workspace (its host key pinned): refused.
    record = registry(daemon)["dmine"]
    host_key = WorkspacePaths.of(daemon.settings.state_dir, "dmine").host_key
    known_hosts = bob.home / "known_hosts-dmine"
    known_hosts.write_text(ssh.known_hosts_line(record.ip, host_key.with_name(host_key.name + ".pub")) + "\n")
    target = ssh.SSHTarget(key="dmine", host=record.ip, user=record.user, host_key_path=host_key,
                           client_key_path=bob_key, workspace_dir="/")  # fmt: skip
    argv = ssh.ssh_argv(target, known_hosts, ["hostname"])
    argv = [argv[0], "-o", "ConnectTimeout=5", *argv[1:]]
    # Bob's packets do not even reach it: on the host only root and a workspace's owner may connect to it.
    r = subprocess.run(as_user(bob, *argv), env=user_env(bob, daemon), capture_output=True, text=True, timeout=120)
    assert r.returncode == 255 and "timed out" in r.stderr, (r.returncode, r.stderr)
    # And his key does not open it either (tried from root, whom the firewall lets through).
    r = subprocess.run(argv, env=user_env(bob, daemon), capture_output=True, text=True, timeout=120)
    assert r.returncode == 255 and "Permission denied (publickey)" in r.stderr, (r.returncode, r.stderr)


async def test_a_user_outside_the_group_is_refused(daemon: Daemon, accounts: Accounts) -> None:
    carol = accounts.carol
    sock = daemon.socket
    assert oct(sock.stat().st_mode & 0o777) == "0o660" and sock.stat().st_gid == accounts.gid
    # The socket's mode keeps carol out...
    assert f"usermod -aG {accounts.group}" in await refusal(carol)
    r = _cli_as(carol, "ls")
    assert r.returncode == 2 and "permission denied" in r.stderr and f"usermod -aG {accounts.group}" in r.stderr
    # ...and so does the daemon's own check of her credentials, should the mode ever be loosened.
    os.chmod(sock, 0o666)
    try:
        assert f"uid {carol.uid} may not use the sandbox-mcp daemon" in await refusal(carol)
        r = _cli_as(carol, "ls")
        assert r.returncode == 2 and f"uid {carol.uid} may not use" in r.stderr, r.stderr
    finally:
        os.chmod(sock, 0o660)


async def test_daemon_restart_under_a_connected_client(daemon: Daemon, accounts: Accounts) -> None:
    from sandbox_mcp.daemon_client import DaemonLost, RemoteManager

    # The CLI's (and HTTP serve's) client: a restart between calls is reported once, then it reconnects.
    remote_settings = Settings(daemon_socket=daemon.socket, daemon_group=accounts.group)
    async with RemoteManager(remote_settings) as remote:
        assert (await remote.list()).workspaces == []
        daemon.stop()
        daemon.start()
        with pytest.raises(DaemonLost, match="list_workspaces"):
            await remote.list()
        assert (await remote.list()).workspaces == []

    async with _mcp_as(accounts.alice) as client:
        ws = await call(client, "create_workspace", name="drestart")
        marker = Path(ws["host_workspace_dir"]) / "started"
        try:
            async with anyio.create_task_group() as tg:
                outcome: dict[str, Any] = {}

                async def long_exec() -> None:
                    try:
                        await client.call_tool(
                            "exec", {"name": "drestart", "command": "touch started; sleep 600", "timeout_s": 900}
                        )
                    except MCPError as exc:  # a protocol-level error: the call's session is gone
                        outcome["error"] = exc.error.message

                tg.start_soon(long_exec)
                await _until(marker.exists)  # the command runs in the workspace: restart the daemon now
                daemon.stop()
                daemon.start()
            assert "daemon restarted" in outcome["error"] and "list_workspaces" in outcome["error"]
            # The next call reconnects by itself.
            r = await call(client, "exec", name="drestart", command="echo back")
            assert r["stdout"] == "back\n"
        finally:
            await call(client, "destroy_workspace", name="drestart")


async def test_client_gone_mid_create_leaves_nothing(daemon: Daemon, accounts: Accounts) -> None:
    """The create is held at a chosen point (the build lock of a package set not cached), the client
    goes away, and only once the daemon has noticed is the create let go: it must undo itself."""
    store = DebianRoot(daemon.settings, ImageStore(daemon.settings.image_dir))
    packages = ["cowsay"]
    key = store.key(packages)
    assert not store.exists(key)
    with file_lock(store.store._lock_path(key)):  # noqa: SLF001 - the lock a build of that key waits for
        async with _mcp_as(accounts.alice) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(client.call_tool, "create_workspace", {"name": "dgone", "packages": packages})
                await _until(lambda: "dgone" in registry(daemon))  # registered, now waiting for the lock
                tg.cancel_scope.cancel()
        # The client (and with it its `serve` bridge) is gone; wait until the daemon says it cancelled.
        daemon.wait_for("hung up; cancelled")
    # Let go: the next operation on that name waits for the create's undo, which holds the name's lock.
    async with _mcp_as(accounts.alice) as client:
        assert "not found" in await error(client, "start_workspace", name="dgone")
    assert "dgone" not in registry(daemon)
    assert not (daemon.settings.state_dir / "dgone").exists()
    assert not store.exists(key)
    assert not Path(f"/run/netns/{netns_name('dgone')}").exists()


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition`` (checked often; the bound is only a safety net against a hang)."""
    deadline = time.monotonic() + 300
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        await anyio.sleep(0.02)



async def test_http_serve_as_a_user_goes_through_the_daemon(daemon: Daemon, accounts: Accounts) -> None:
    """`serve --http` as alice: her token, her workspaces, progress passed back through the daemon."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    alice = accounts.alice
    proc = subprocess.Popen(as_user(alice, sys.executable, "-m", "sandbox_mcp", "serve", "--http", "--port", "0"),
                            env=user_env(alice, daemon), cwd=str(alice.home), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stderr is not None
        url = None
        for line in proc.stderr:
            if m := re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1) + "/mcp"
                break
        assert url, f"serve --http exited with {proc.wait()}"
        token_file = alice.home / "sandboxed" / ".server" / "http-token"
        assert token_file.stat().st_uid == alice.uid  # the user's own token, in the user's own state dir
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token_file.read_text().strip()}"})
        progress: list[str] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append(message or "")

        async with http, Client(streamable_http_client(url, http_client=http)) as client:
            try:
                await call(client, "create_workspace", on_progress, name="dhttp")
                assert "workspace running" in progress
                assert registry(daemon)["dhttp"].owner_uid == alice.uid
                assert (await call(client, "exec", name="dhttp", command="echo over-http"))["stdout"] == "over-http\n"
                assert "'ghost' not found" in await error(client, "workspace_status", name="ghost")
            finally:
                await call(client, "destroy_workspace", name="dhttp")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
