# ruff: noqa: F811 - tests take test_incus_e2e's incusd fixture by name
"""One user against another, and root inside a workspace against the host user: tried for real.

Escapes through the MCP tools (in process): root inside a container or an Incus instance must not
leave a file on the host owned by any id but the workspace's owner (no setuid-root, no setgid
``disk``), and no local user but root and the workspace's owner may connect to a workspace.

Through the real daemon with real users (tests/deploy.py): a workspace's host files are its
owner's and closed to others, and the per-uid limits hold while two users race for them.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client

from sandbox_mcp import supervise
from sandbox_mcp.config import Settings
from sandbox_mcp.images import DebianRoot, ImageStore
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.runtimes.incus import SHARES_DIR
from sandbox_mcp.runtimes.incus import incusd as incus_daemon
from sandbox_mcp.server import build_server

from .conftest import destroy_all
from .deploy import Account, Accounts, Daemon, as_user, mcp_as, running_daemon
from .test_e2e import Session
from .test_incus_e2e import incusd  # noqa: F401 - the private incusd, a module fixture

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

STRANGER = 4242  # a host uid that is neither root nor any workspace's owner


@pytest.fixture
async def session(settings: Settings) -> AsyncIterator[Session]:
    try:
        async with Client(build_server(settings)) as client:
            yield Session(client)
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)


def foreign_files(host_dir: Path, uid: int, gid: int) -> list[tuple[str, int, int, str]]:
    """Files under ``host_dir`` owned by any uid or gid but the owner's (path, uid, gid, mode)."""
    out = []
    for path in [host_dir, *host_dir.rglob("*")]:
        st = path.lstat()
        if st.st_uid != uid or st.st_gid != gid:
            out.append((str(path.relative_to(host_dir)), st.st_uid, st.st_gid, oct(st.st_mode)))
    return out


async def test_container_share_maps_only_the_owner(session: Session, settings: Settings) -> None:
    """Finding 2: root inside chowned a file to any host uid/gid but 0 (setgid `disk` on the host)."""
    s = session
    ws = await s.call("create_workspace", name="mu1")
    host_dir = Path(ws["host_workspace_dir"])
    owner = host_dir.stat()
    # The agent's own files are the host owner's.
    r = await s.call("exec", name="mu1", command="cp /bin/bash db && touch by-agent && id -u")
    assert r["exit_code"] == 0, r
    # Root inside tries to hand them to other ids and to write its own: each must fail.
    attempts = ["chown 1000:6 db", "chown 0:0 db", "chgrp 6 db", "chown 4242 db", "cp /bin/bash rootbash",
                "install -m 4755 /bin/bash ./suid", "mkdir rootdir", "touch by-root"]  # fmt: skip
    for cmd in attempts:
        r = await s.call("exec", name="mu1", command=f"sudo -n sh -c '{cmd}'")
        assert r["exit_code"] != 0, (cmd, r)
    r = await s.call("exec", name="mu1", command="sudo -n chmod 2755 db; ls -ln db")
    assert foreign_files(host_dir, owner.st_uid, owner.st_gid) == []
    for entry in host_dir.rglob("*"):
        st = entry.lstat()
        assert not (st.st_mode & (stat.S_ISUID | stat.S_ISGID) and (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid))
    # What agents need still works: root's own root layer, and the agent's files.
    r = await s.call("exec", name="mu1", command="sudo -n touch /etc/fine && mkdir -p a/b && echo x > a/b/c && cat a/b/c")
    assert (r["exit_code"], r["stdout"]) == (0, "x\n"), r


async def test_other_local_users_cannot_reach_a_workspace(session: Session, settings: Settings) -> None:
    """Finding 3: any local user reached any workspace's services. Now only root and its owner do."""
    s = session
    ws = await s.call("create_workspace", name="mu2")
    r = await s.call("exec", name="mu2", command="setsid python3 -m http.server 8080 >/dev/null 2>&1 </dev/null & "
                                                 "for i in $(seq 100); do ss -ltn | grep -q :8080 && break; sleep 0.1; done")
    assert r["exit_code"] == 0, r
    probe = (f"import socket\ntry:\n socket.create_connection(('{ws['ip']}', 8080), timeout=3).close(); print('open')\n"
             "except OSError as exc:\n print('closed', exc)")

    def connect_as(uid: int) -> str:
        argv = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups", sys.executable, "-c", probe]
        return subprocess.run(argv if uid else argv[6:], capture_output=True, text=True, timeout=60).stdout.strip()

    owner = Path(ws["host_workspace_dir"]).stat().st_uid
    assert connect_as(0) == "open"  # the server
    assert connect_as(owner) == "open"  # the workspace's owner
    assert connect_as(STRANGER).startswith("closed"), "another local user reached the workspace's port"


# --- Incus ---------------------------------------------------------------------------------------




async def test_incus_share_maps_only_the_owner(incusd: incus_daemon.PrivateIncusd, settings: Settings) -> None:
    """Finding 1: `shift: true` let root inside write a setuid-root program into the host's workspace dir."""
    settings = settings.model_copy(update={"boot_timeout_s": 90}).with_runtime("incus", socket=incusd.socket)
    try:
        async with Client(build_server(settings)) as client:
            s = Session(client)
            ws = await s.call("create_workspace", name="mu3", type="incus")
            host_dir = Path(ws["host_workspace_dir"])
            owner = host_dir.stat()
            r = await s.call("exec", name="mu3", command="cp /bin/bash db && touch by-agent")
            assert r["exit_code"] == 0, r
            for cmd in ("install -m 4755 /bin/bash ./rootbash", "touch by-root", "chown 0:0 db", "chown 1000:6 db"):
                r = await s.call("exec", name="mu3", command=f"sudo -n sh -c '{cmd}'")
                assert r["exit_code"] != 0, (cmd, r)
            assert foreign_files(host_dir, owner.st_uid, owner.st_gid) == []
            assert (host_dir / "by-agent").stat().st_uid == settings.user_uid
            r = await s.call("exec", name="mu3", command="sudo -n touch /etc/fine && mkdir -p a/b && echo x > a/b/c && cat a/b/c")
            assert (r["exit_code"], r["stdout"]) == (0, "x\n"), r
            await s.call("destroy_workspace", name="mu3")
            # Its own share points only: /run is the host's, and other runs may have Incus shares there now.
            assert not (SHARES_DIR / supervise.workspace_tag(settings.state_dir, "mu3")).exists(), \
                "a share mount point was left"
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)


# --- the daemon, with real users ----------------------------------------------------------------

BRIDGE = "sbxm-br"
SUBNET = "192.168.91.0/24"


@pytest.fixture(scope="module")
def daemon(accounts: Accounts) -> Iterator[Daemon]:
    image_dir = Path(os.environ.get("SANDBOX_MCP_IMAGE_DIR", "/var/cache/sandbox-mcp/images"))
    # Not under pytest's 0700 temp dir: the owners must walk to their workspace dirs, as on a real host.
    root = Path(tempfile.mkdtemp(prefix="sbx-mu-", dir="/var/tmp"))
    root.chmod(0o755)
    settings = Settings(mode="direct", state_dir=root / "state", image_dir=image_dir, bridge=BRIDGE, subnet=SUBNET,
                        hosts_file=root / "hosts", boot_timeout_s=60)  # fmt: skip
    store = DebianRoot(settings, ImageStore(settings.image_dir))
    if not store.exists(store.key(())):
        pytest.skip("the root image is not cached; ./scripts/test builds it before entering the test namespace")
    try:
        with running_daemon(settings, accounts.group) as d:
            yield d
    finally:
        subprocess.run(["ip", "link", "del", BRIDGE], check=False, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


async def call(client: Client, tool: str, daemon: Daemon, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, f"{tool} failed: {result.content}\ndaemon log:\n{daemon.tail()}"
    assert isinstance(result.structured_content, dict)
    return result.structured_content


async def error(client: Client, tool: str, **args: Any) -> str:
    result = await client.call_tool(tool, args)
    assert result.is_error, f"{tool} unexpectedly succeeded: {result.structured_content}"
    return " ".join(getattr(c, "text", "") for c in result.content)


def as_can(user: Account, *argv: str) -> bool:
    return subprocess.run(as_user(user, *argv), capture_output=True, timeout=60).returncode == 0


async def test_host_files_belong_to_their_owner(daemon: Daemon, accounts: Accounts) -> None:
    """Finding 4: every workspace's host files belonged to one global uid, under 0755 directories."""
    alice, bob = accounts.alice, accounts.bob
    async with mcp_as(alice, daemon) as client:
        ws = await call(client, "create_workspace", daemon, name="muown")
        try:
            host_dir = Path(ws["host_workspace_dir"])
            r = await call(client, "exec", daemon, name="muown", command="echo mine > notes.txt; id -u")
            assert r["exit_code"] == 0
            state = daemon.settings.state_dir
            assert stat.S_IMODE(state.stat().st_mode) == 0o711
            assert stat.S_IMODE((state / "muown").stat().st_mode) == 0o711
            st = host_dir.stat()
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (alice.uid, alice.gid, 0o700)
            assert (host_dir / "notes.txt").stat().st_uid == alice.uid
            claude = state / "muown" / "claude-config"
            assert claude.stat().st_uid == alice.uid and stat.S_IMODE(claude.stat().st_mode) == 0o700
            # Alice reaches her files on the host; bob can neither list the state root nor read hers.
            assert as_can(alice, "cat", str(host_dir / "notes.txt"))
            assert not as_can(bob, "cat", str(host_dir / "notes.txt"))
            assert not as_can(bob, "ls", str(host_dir))
            assert not as_can(bob, "ls", str(state))
        finally:
            await call(client, "destroy_workspace", daemon, name="muown")


async def test_per_uid_workspace_limit_while_two_users_race(daemon: Daemon, accounts: Accounts) -> None:
    """Finding 5: no per-user limit on workspaces. Alice gets 10 (the default) and a clear refusal for
    the 11th while bob, racing her, still gets his."""
    alice, bob = accounts.alice, accounts.bob
    limit = getattr(daemon.settings, "uid_max_workspaces", 10)
    outcomes: dict[str, list[str]] = {"alice": [], "bob": []}
    async with mcp_as(alice, daemon) as a, mcp_as(bob, daemon) as b:
        try:

            async def make(client: Client, who: str, name: str) -> None:
                # Small ones: the count is what this checks, not the CPU and memory sums (checked below).
                result = await client.call_tool("create_workspace", {"name": name, "start": False, "cpus": 0.1,
                                                                     "memory_mib": 128})
                text = " ".join(getattr(c, "text", "") for c in result.content)
                outcomes[who].append("error: " + text if result.is_error else "ok")

            async with anyio.create_task_group() as tg:
                for i in range(limit + 1):
                    tg.start_soon(make, a, "alice", f"mua{i}")
                for i in range(3):
                    tg.start_soon(make, b, "bob", f"mub{i}")
            assert outcomes["bob"] == ["ok"] * 3, outcomes
            assert outcomes["alice"].count("ok") == limit, outcomes
            refusals = [o for o in outcomes["alice"] if o != "ok"]
            print(f"\nthe workspace past the limit: {refusals}")
            assert len(refusals) == 1 and f"{limit} workspaces" in refusals[0] and "destroy" in refusals[0], (
                refusals, daemon.tail(60))
            # Her totals too: one more CPU-heavy or memory-heavy workspace than she may have is refused.
            await call(a, "destroy_workspace", daemon, name="mua0")
            text = await error(a, "create_workspace", name="mubig", start=False, memory_mib=4 << 20)
            assert "memory_mib" in text, text
        finally:
            names = [w["name"] for w in (await call(a, "list_workspaces", daemon))["workspaces"]]
            names += [w["name"] for w in (await call(b, "list_workspaces", daemon))["workspaces"]]
            for name in names:
                client = a if name.startswith("mua") or name == "mubig" else b
                await client.call_tool("destroy_workspace", {"name": name})


async def test_per_uid_connection_limit(daemon: Daemon, accounts: Accounts) -> None:
    """Finding 5: unlimited connections per uid. The one past the limit is refused with the reason."""
    limit = getattr(daemon.settings, "uid_max_connections", 16)
    script = f"""
import json, socket, sys
conns = []
for i in range({limit} + 1):
    s = socket.socket(socket.AF_UNIX)
    s.connect({str(daemon.socket)!r})
    conns.append(s)
init = {{"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {{"protocolVersion": "2025-06-18",
        "capabilities": {{}}, "clientInfo": {{"name": "t", "version": "0"}}}}}}
last = conns[-1]
last.sendall(json.dumps(init).encode() + b"\\n")
last.settimeout(30)
print(last.makefile().readline().strip())
"""
    r = subprocess.run(as_user(accounts.alice, sys.executable, "-c", script), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert "error" in reply and f"{limit} connections" in reply["error"]["message"], reply


def _rss_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            fields[line.split(":")[0]] = int(line.split()[1])
    return fields


FLOOD_CONNECTIONS, FLOOD_BYTES = 64, 100 << 20


async def test_daemon_memory_stays_bounded_under_a_flood_of_huge_lines(daemon: Daemon, accounts: Accounts) -> None:
    """Finding 5: the daemon kept up to 128 MiB per connection line, with unlimited connections. 64
    connections (root's: not held to the per-uid connection limit) each send an unterminated 100 MiB
    line; the daemon's peak memory must stay bounded and it must still serve afterwards."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    before = _rss_kib(pid)
    head = b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "write_file", "arguments": {"content": "'
    chunk = b"x" * (1 << 20)
    sent: list[int] = []

    async def flood() -> None:
        stream = await anyio.connect_unix(str(daemon.socket))
        total = 0
        try:
            await stream.send(head)
            while total < FLOOD_BYTES:  # bounded: 100 sends at most
                with anyio.move_on_after(5):  # a daemon that stops reading stalls us: that connection is done
                    await stream.send(chunk)
                    total += len(chunk)
                    continue
                break
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the daemon hung up on us (a message past the bound)
        finally:
            sent.append(total)
            await anyio.sleep(2)  # hold the connection (and whatever the daemon buffered) a moment
            await stream.aclose()

    async with anyio.create_task_group() as tg:
        for _ in range(FLOOD_CONNECTIONS):
            tg.start_soon(flood)
    after = _rss_kib(pid)
    print(f"\ndaemon memory: RSS {before['VmRSS'] >> 10} MiB before, peak {after['VmHWM'] >> 10} MiB during "
          f"{FLOOD_CONNECTIONS} connections sending up to {FLOOD_BYTES >> 20} MiB each without a newline "
          f"({sum(sent) >> 20} MiB sent in all); RSS {after['VmRSS'] >> 10} MiB after")
    assert after["VmHWM"] < 1 << 20, f"the daemon's peak memory reached {after['VmHWM'] >> 10} MiB"
    async with mcp_as(accounts.alice, daemon) as client:  # it still serves
        assert (await call(client, "list_workspaces", daemon))["workspaces"] == []
