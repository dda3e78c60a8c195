"""End to end: an MCP client against the server, driving real systemd-nspawn containers.

Every test runs twice (the ``deployment`` fixture): against the server in this process, and
through the real deployment: a root `sandbox-mcp daemon` child process (its own socket and state
dir, this module's bridge) with `sandbox-mcp serve` over stdio, and the CLI, running as a real
unprivileged user in the daemon's group (tests/deploy.py). Every test boots real containers from
the cached Debian image, reaches them over SSH on the test bridge (inside the private network
namespace of ./scripts/test) and checks the host afterwards: no process, link, network
namespace, mount or registry entry left. The host side is read directly (the tests run as root).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from sandbox_mcp.config import Settings
from sandbox_mcp.errors import SandboxError
from sandbox_mcp.fsutil import file_lock
from sandbox_mcp.images import DebianRoot, ImageStore
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import WorkspaceRecord
from sandbox_mcp.naming import netns_name, veth_names
from sandbox_mcp.registry import Registry
from sandbox_mcp.runtimes.nspawn import NspawnState
from sandbox_mcp.server import build_server

from .conftest import destroy_all, e2e_settings, e2e_skip_reason
from .deploy import Account, Daemon, cli_as, mcp_as, running_daemon
from .points import HUNG_S, process_alive, wait_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


class Session:
    """A connected MCP client plus helpers that assert on results."""

    def __init__(self, client: Client, server_log: Callable[[], str] = lambda: "") -> None:
        self.client = client
        self.server_log = server_log
        self.progress: list[tuple[float, float | None, str | None]] = []

    async def call(self, tool: str, **args: Any) -> dict[str, Any]:
        async def on_progress(progress: float, total: float | None, message: str | None) -> None:
            self.progress.append((progress, total, message))

        result = await self.client.call_tool(tool, args, progress_callback=on_progress)
        assert not result.is_error, f"{tool} failed: {result.content}\n{self.server_log()}"
        assert isinstance(result.structured_content, dict)
        return result.structured_content

    async def error(self, tool: str, **args: Any) -> str:
        result = await self.client.call_tool(tool, args)
        assert result.is_error, f"{tool} unexpectedly succeeded: {result.structured_content}"
        text = " ".join(getattr(c, "text", "") for c in result.content)
        assert "Traceback" not in text
        return text


class InProcess:
    """The server built in this process (``build_server``); the CLI as root, working in process."""

    name = "in-process"
    settings: Settings | None = None  # each test its own (conftest's ``settings``)

    @contextlib.asynccontextmanager
    async def session(self, settings: Settings) -> AsyncIterator[Session]:
        async with Client(build_server(settings)) as client:  # its lifespan opens (and reconciles) a manager
            yield Session(client)

    async def stop_server(self) -> None:
        """Nothing: the server ended with its session."""

    def start_server(self) -> None:
        """Nothing: the next session's server reconciles when it opens."""

    async def clean(self, settings: Settings) -> None:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)

    def cli(self, settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "SANDBOX_MCP_MODE": "direct", "SANDBOX_MCP_STATE_DIR": str(settings.state_dir),
               "SANDBOX_MCP_IMAGE_DIR": str(settings.image_dir), "SANDBOX_MCP_BRIDGE": settings.bridge,
               "SANDBOX_MCP_CONFIG": "/nonexistent", "SANDBOX_MCP_HOSTS_FILE": str(settings.hosts_file),
               "SANDBOX_MCP_GIT_FETCH_MAX_BYTES": str(settings.git_fetch_max_bytes),
               # never a daemon this host may run: the CLI works in process, as root
               "SANDBOX_MCP_DAEMON_SOCKET": str(settings.state_dir.parent / "no-daemon.sock")}  # fmt: skip
        # -W error: any warning (ours or a library's) would break the exact stderr checks anyway; this
        # makes it fail loudly, naming the warning.
        return subprocess.run([sys.executable, "-W", "error", "-m", "sandbox_mcp", *args], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip


class ThroughDaemon:
    """The real deployment: `serve` (stdio) and the CLI as ``user``, over a root daemon child process."""

    name = "daemon"

    def __init__(self, daemon: Daemon, user: Account) -> None:
        self.daemon = daemon
        self.user = user
        self.settings = daemon.settings  # one state dir for the module: the daemon's

    @contextlib.asynccontextmanager
    async def session(self, settings: Settings) -> AsyncIterator[Session]:
        async with mcp_as(self.user, self.daemon) as client:
            yield Session(client, self.daemon.tail)

    async def stop_server(self) -> None:
        """SIGTERM: the daemon ends its sessions; workspaces keep running."""
        self.daemon.stop()

    def start_server(self) -> None:
        """A new daemon process, which reconciles the registry as it starts."""
        self.daemon.start()

    async def clean(self, settings: Settings) -> None:
        """Destroy every workspace through the daemon, as root (who sees all); without it, in process."""
        from sandbox_mcp.daemon_client import RemoteManager

        try:
            async with RemoteManager(Settings(daemon_socket=self.daemon.socket, daemon_group=self.daemon.group)) as m:
                for ws in (await m.list()).workspaces:
                    await m.destroy(ws.name)
        except SandboxError as exc:
            print(f"cleanup through the daemon failed ({exc}); cleaning in process")
            await InProcess().clean(settings)

    def cli(self, settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
        return cli_as(self.user, self.daemon, *args, timeout=120)


Deployment = InProcess | ThroughDaemon


@pytest.fixture(scope="module", params=["in-process", "daemon"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """How the tests reach the server: in this process, or through the daemon as an unprivileged user.

    One daemon serves the whole module (it keeps running between tests; each test cleans up).
    """
    if request.param == "in-process":
        yield InProcess()
        return
    reason = e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    accounts = request.getfixturevalue("accounts")
    settings = e2e_settings(tmp_path_factory.mktemp("daemon") / "state")
    store = DebianRoot(settings, ImageStore(settings.image_dir))
    if not store.exists(store.key(())):
        pytest.skip("the root image is not cached; ./scripts/test builds it before entering the test namespace")
    with running_daemon(settings, accounts.group) as daemon:
        yield ThroughDaemon(daemon, accounts.alice)


@pytest.fixture
def settings(settings: Settings, deployment: Deployment) -> Settings:
    """The server side's settings: conftest's per-test ones in process, else the daemon's."""
    return deployment.settings if deployment.settings is not None else settings


@pytest.fixture
async def mcp_session(deployment: Deployment, settings: Settings):  # type: ignore[no-untyped-def]
    try:
        async with deployment.session(settings) as session:
            yield session
    finally:
        # Clean up apart from the session, so a failing test leaves nothing behind.
        await deployment.clean(settings)


def registry(settings: Settings) -> dict[str, WorkspaceRecord]:
    """The server's registry, read from the host (the tests run as root)."""
    return Registry(settings.registry_path).read_sync().workspaces


def console_copiers(name: str) -> list[str]:
    """PIDs of processes writing a console log of a workspace ``name`` (the copier nspawn's output goes to)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # The copier's shell and its head write the log (nspawn writes only into their pipe).
                if os.readlink(entry / "fd" / "1").endswith(f"/{name}/runtime/console.log"):
                    found.append(entry.name)
    return found


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
        "processes": procs.split() + console_copiers(name),
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

    # The boot's poll found sshd listening on a connection and the login went on on it: sshd saw that one,
    # not first a connection closed at once (which it logged as an error on every start).
    r = await s.call("exec", name="life", command="sudo -n journalctl -u ssh --no-pager -o cat")
    assert r["stdout"].count("Accepted publickey") == 1, r["stdout"]
    assert "Connection closed" not in r["stdout"] and "kex_exchange_identification" not in r["stdout"]

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
    assert r["hint"].startswith("timed out after 1.5 s (timeout_s)") and "start_process" in r["hint"], r["hint"]
    r = await s.call("exec", name="limits", command="pgrep -f 'sleep 30[01]' || echo none")
    assert r["hint"] is None  # a command that ended on its own has none
    assert r["stdout"].strip() == "none", "the timed-out command is still running"

    r = await s.call("exec", name="limits", command="head -c 5000000 /dev/zero | tr '\\0' x; echo tail >&2")
    assert r["truncated"] is True and r["exit_code"] == 0 and r["stderr"] == "tail\n"
    assert r["stdout_bytes"] == 5000000 and r["stdout"].startswith("x" * 1000) and r["stdout"].endswith("x" * 1000)
    assert 0 < len(r["stdout"]) < 5000000 - r["stdout_omitted"] + 1000 and r["stdout_path"]


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


class Hold:
    """Keeps a create from getting past a chosen point until let go, with what the host controls.

    The server's progress notification says a point is reached, but the server goes on while it
    travels; so the create is first made unable to go further: it waits for a lock this test
    holds, or for an SSH answer this test's firewall rule drops. Only then is it cancelled.
    """

    def __init__(self, settings: Settings, point: str) -> None:
        self.point = point
        self._firewall = settings.state_dir / ".server" / f"firewall-{settings.bridge}.lock"
        self._registry = Registry(settings.registry_path).lock_path
        self._subnet = str(settings.subnet)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Hold:
        if self.point == "waiting for SSH":  # the container boots, its sshd never answers
            rule = f"ip daddr {self._subnet} tcp dport 22 drop"
            _nft(f"table inet sbxtest_hold {{\n chain out {{\n type filter hook output priority 0;\n {rule}\n }}\n}}\n")
            self._stack.callback(_nft, "delete table inet sbxtest_hold")
        else:  # network.ensure() waits for its firewall lock, right after "setting up the network"
            self._stack.enter_context(file_lock(self._firewall))
        return self

    def seen(self, message: str) -> None:
        """The create reported ``message``: for the boot point, move the hold past the network."""
        if self.point == "booting the container" and message.startswith("setting up the network"):
            # The create waits for the firewall lock. Its next registry write comes once the
            # container runs (after "booting the container"): hold the registry, let the network go.
            registry_lock = contextlib.ExitStack()
            registry_lock.enter_context(file_lock(self._registry))
            self._stack.close()
            self._stack = registry_lock

    def release(self) -> None:
        self._stack.close()

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def _nft(script: str) -> None:
    subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)


@pytest.mark.parametrize(
    "point",
    [
        "setting up the network",  # nothing made yet for the boot
        "booting the container",  # nspawn runs and boots; the host has not waited for SSH yet
        "waiting for SSH",  # the container runs: before SSH answers
    ],
)
async def test_cancelled_create_leaves_nothing(
    deployment: Deployment, mcp_session: Session, settings: Settings, point: str
) -> None:
    """A client's cancel stops a create held at a chosen point, and the create undoes itself."""
    s = mcp_session
    seen: list[str] = []
    reached, returned = anyio.Event(), anyio.Event()
    with Hold(settings, point) as hold:

        async def progress(done: float, total: float | None, message: str | None) -> None:
            seen.append(message or "")
            hold.seen(message or "")
            if (message or "").startswith(point):
                reached.set()

        async with anyio.create_task_group() as tg:
            call = anyio.CancelScope()

            async def create() -> None:
                with call:
                    await s.client.call_tool("create_workspace", {"name": "cancel"}, progress_callback=progress)
                    raise AssertionError(f"the create finished despite the hold at {point!r}: {seen}")
                returned.set()

            tg.start_soon(create)
            with anyio.fail_after(HUNG_S):
                await reached.wait()
            call.cancel()
            if isinstance(deployment, ThroughDaemon):
                # The abandoned call sends notifications/cancelled before it returns; the daemon
                # reads messages in order, so once a later request is answered the cancel was applied.
                # (In process the tool runs inside the call: cancelling the call cancelled it.)
                with anyio.fail_after(HUNG_S):
                    await returned.wait()
                    await s.client.list_tools()  # (not ping: the daemon's SDK session answers it "not found")
            hold.release()  # the create, cancelled, can move again: to undo itself
    # The undo holds the name's lock, which the next call on the name waits for.
    assert "not found" in await s.error("start_workspace", name="cancel")
    assert "cancel" not in registry(settings)
    assert not (settings.state_dir / "cancel").exists()
    assert host_leftovers("cancel") == NOTHING_LEFT


async def test_reconcile_after_crash(deployment: Deployment, settings: Settings) -> None:
    """The container dies while no server runs; the next server finds it, cleans up and can start it again."""
    try:
        async with deployment.session(settings) as s:
            ws = await s.call("create_workspace", name="crash")
        state = NspawnState.model_validate(registry(settings)["crash"].runtime_state)
        assert state.process and state.leader
        await deployment.stop_server()
        try:
            os.kill(state.process.pid, signal.SIGKILL)  # the crash, while no server watches
            await wait_until(lambda: not process_alive(state.process.pid), "the killed nspawn to be gone")
            assert host_leftovers("crash")["netns"]  # the crashed run left its namespace behind
            leader = state.leader.pid
            assert process_alive(leader)  # and its container, orphaned
        finally:
            deployment.start_server()
        async with deployment.session(settings) as s:  # the server reconciled as it started
            record = registry(settings)["crash"]
            assert record.state == "stopped"
            assert NspawnState.model_validate(record.runtime_state).process is None
            assert host_leftovers("crash") == NOTHING_LEFT
            assert not process_alive(leader)
            again = await s.call("start_workspace", name="crash")
            assert again["state"] == "running" and again["ip"] == ws["ip"]
    finally:
        await deployment.clean(settings)
    assert host_leftovers("crash") == NOTHING_LEFT


def test_cli_for_people(deployment: Deployment, settings: Settings) -> None:
    """The CLI drives the same lifecycle; `ssh` uses the real OpenSSH client with the pinned key."""

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = deployment.cli(settings, *args)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    try:
        created = json.loads(cli("create", "clitest").stdout)
        assert created["state"] == "running"
        assert json.loads(cli("start", "clitest").stdout)["state"] == "running"  # already running: a no-op
        assert "clitest" in cli("ls").stdout
        r = cli("exec", "clitest", "echo hi; echo oops >&2; exit 7", check=False)
        assert (r.returncode, r.stdout, r.stderr) == (7, "hi\n", "oops\n")
        r = cli("exec", "-e", "GREETING=hi there", "clitest", 'printf "%s" "$GREETING" >&2')
        assert (r.stdout, r.stderr) == ("", "hi there")
        if shutil.which("ssh"):
            r = cli("ssh", "clitest", "hostname")
            assert r.stdout == "clitest\n"
        assert "Reached target" in cli("logs", "clitest", "-n", "500").stdout
        # A background server: started, waited for, reached through a published port, read, stopped.
        started = json.loads(cli("start-process", "clitest", "--id", "web", "-e", "WHO=people",
                                 "echo hello $WHO; exec python3 -m http.server 8000").stdout)
        assert started["process_id"] == "web"
        assert json.loads(cli("wait-process", "clitest", "web", "--until", "port:8000").stdout)["matched"]
        r = cli("wait-process", "clitest", "web", "--until", "output:never printed", "--timeout", "0.2", check=False)
        assert r.returncode == 1 and not json.loads(r.stdout)["matched"]
        assert [p["process_id"] for p in json.loads(cli("ps", "clitest").stdout)["processes"]] == ["web"]
        published = cli("publish", "clitest", "8000", check=False)
        if deployment.name == "daemon":  # the daemon keeps the listener; the test (root) may connect
            url = json.loads(published.stdout)["url"]
            with urllib.request.urlopen(url, timeout=30) as page:
                assert page.status == 200
            assert json.loads(cli("unpublish", "clitest", "8000").stdout)["published"] is False
        else:  # a one-shot CLI in process could not keep a listener: it says so and publishes nothing
            assert published.returncode == 2 and "does not forward ports" in published.stderr
        out = cli("output", "clitest", "web")
        assert out.stdout.startswith("hello people\n") and "[sandbox-mcp: next cursor" in out.stderr
        stopped = json.loads(cli("stop-process", "clitest", "web", "--grace", "2").stdout)
        assert stopped["running"] is False
        followed = cli("output", "clitest", "web", "--follow")  # ended: follow returns at once
        assert followed.stdout == out.stdout and "ended, signal TERM" in followed.stderr
        assert json.loads(cli("stop", "clitest").stdout)["state"] == "stopped"
        r = cli("exec", "clitest", "true", check=False)
        assert r.returncode == 2 and "start_workspace" in r.stderr
        r = cli("create", "Bad!", check=False)
        assert r.returncode == 2 and "invalid" in r.stderr
    finally:
        cli("rm", "clitest", check=False)
    assert host_leftovers("clitest") == NOTHING_LEFT
    assert json.loads(cli("ls", "--json").stdout)["workspaces"] == []
