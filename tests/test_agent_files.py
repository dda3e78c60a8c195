# ruff: noqa: F811 - tests take test_incus_e2e's incusd fixture by name
"""The agent's files on the host are a uid of their own (sandbox_mcp/agentfiles.py), tried for real.

The agent plants what would run as the host user in a directory they own (a git fsmonitor hook);
the owner's git refuses the repository instead. The owner still reads and edits the agent's files,
the agent the owner's; nobody else gets in; a setuid bit gives a uid that owns nothing else; a
fork's files are its own uid's. One container (and one fork) for all of it.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest
from mcp import Client

from sandbox_mcp import agentfiles
from sandbox_mcp.config import Settings
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import WorkspaceRecord
from sandbox_mcp.naming import AGENT_GID, agent_uid_for, cid_for, mac_for
from sandbox_mcp.runtimes.incus import incusd as incus_daemon
from sandbox_mcp.server import build_server

from .conftest import destroy_all
from .test_e2e import Session
from .test_incus_e2e import incusd  # noqa: F401 - the private incusd, a module fixture

pytestmark = [pytest.mark.anyio]
NOBODY = 65534


def as_uid(uid: int, *argv: str, home: Path) -> subprocess.CompletedProcess[str]:
    """``argv`` as host uid ``uid`` (its own group, no others), as a login of theirs would run it."""
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "env", f"HOME={home}",
                           "GIT_CONFIG_NOSYSTEM=1", *argv], capture_output=True, text=True, timeout=60, check=False)


def acl_users(path: Path, name: str = "system.posix_acl_access") -> dict[int, int]:
    """The named-user entries of ``path``'s ACL: uid -> permission bits."""
    raw = os.getxattr(path, name)
    entries = [struct.unpack_from("<HHI", raw, 4 + 8 * i) for i in range((len(raw) - 4) // 8)]
    return {uid: perm for tag, perm, uid in entries if tag == 0x02}


@pytest.fixture
async def session(settings: Settings):  # type: ignore[no-untyped-def]
    """A server giving the agent's files their own uid, its state dir where the host user can walk to
    (not under pytest's 0700 temp root, which other runs may reset): yields it and its settings."""
    root = Path(tempfile.mkdtemp(prefix="sbx-af-", dir="/var/tmp"))
    root.chmod(0o755)
    own = settings.model_copy(update={"agent_files": "own-uid", "state_dir": root / "state",
                                      "hosts_file": root / "hosts"})
    try:
        async with Client(build_server(own)) as client:
            yield Session(client), own
    finally:
        async with WorkspaceManager(own) as m:
            await destroy_all(m)
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.e2e
async def test_the_owners_git_refuses_the_agents_repository(session: tuple[Session, Settings]) -> None:
    s, settings = session
    owner = settings.user_uid
    home = settings.state_dir.parent / "home"  # the owner's HOME for git
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    ws = await s.call("create_workspace", name="af")
    host_dir, agent = Path(ws["host_workspace_dir"]), agent_uid_for("af")
    st = host_dir.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (agent, AGENT_GID, 0o770)
    assert acl_users(host_dir) == {owner: 7} and acl_users(host_dir, "system.posix_acl_default") == {owner: 7}

    # The agent plants a hook that git would run as whoever runs `git status` there.
    marker = home / "hook-ran"
    r = await s.call("exec", name="af", command=(
        f"git init -q && git config core.fsmonitor 'touch {marker} #' && echo hi > notes.txt && git add . && "
        "git -c user.name=a -c user.email=a@b commit -qm one && echo ok"))
    assert r["stdout"].strip() == "ok", r
    assert (host_dir / "notes.txt").stat().st_uid == agent

    # The owner's git refuses it (another uid's repository) and runs nothing of it.
    done = as_uid(owner, "git", "-C", str(host_dir), "status", home=home)
    assert done.returncode != 0 and "dubious ownership" in done.stderr, (done.stdout, done.stderr)
    assert not marker.exists()

    # The owner reads and edits the agent's files (which stay the agent's, so it goes on editing them).
    assert as_uid(owner, "cat", str(host_dir / "notes.txt"), home=home).stdout == "hi\n"
    assert as_uid(owner, "sh", "-c", f"echo owner >> {host_dir}/notes.txt", home=home).returncode == 0
    assert (host_dir / "notes.txt").stat().st_uid == agent
    # The price (why this is not the default): a file the owner makes there is theirs, and the kernel
    # refuses writing, replacing or deleting it through the share, where its owner has no id.
    saved = as_uid(owner, "sh", "-c", f"echo mine > {host_dir}/by-owner.txt", home=home)
    assert saved.returncode == 0, saved.stderr
    r = await s.call("exec", name="af", command="cat notes.txt by-owner.txt; echo agent >> by-owner.txt; "
                                                 "echo rc=$?; rm -f by-owner.txt; echo rc=$?; echo more >> notes.txt")
    assert r["stdout"] == "hi\nowner\nmine\nrc=2\nrc=1\n", r
    assert (host_dir / "by-owner.txt").read_text() == "mine\n" and (host_dir / "by-owner.txt").stat().st_uid == owner

    # Nobody else reads anything there.
    other = as_uid(NOBODY, "cat", str(host_dir / "notes.txt"), home=home)
    assert other.returncode != 0 and "Permission denied" in other.stderr
    assert as_uid(NOBODY, "ls", str(host_dir), home=home).returncode != 0

    # A setuid bit the agent sets gives the agent's uid (which owns only this workspace's files),
    # never the owner's, whoever runs it.
    r = await s.call("exec", name="af", command="cp /usr/bin/id ./ownid && sudo -n chmod 4755 ownid && echo ok")
    assert r["stdout"].strip() == "ok", r
    planted = (host_dir / "ownid").stat()
    assert planted.st_uid == agent and planted.st_mode & stat.S_ISUID
    fd = os.open(host_dir / "ownid", os.O_RDONLY)
    try:  # by descriptor: nobody could not walk there
        done = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                               f"/proc/self/fd/{fd}", "-u"], pass_fds=(fd,), capture_output=True, text=True,
                              timeout=30, check=False)  # fmt: skip
    finally:
        os.close(fd)
    assert done.stdout.strip() in (str(agent), str(NOBODY)) and done.stdout.strip() != str(owner), done

    # A fork's files are its own uid's, none the source's; its owner still reads them.
    await s.call("fork_workspace", name="af", new_name="ag")
    fork_dir = settings.state_dir / "ag" / "workspace"
    uids = {os.lstat(os.path.join(d, f)).st_uid for d, dirs, files in os.walk(fork_dir) for f in (*dirs, *files)}
    assert agent not in uids and agent_uid_for("ag") in uids, uids
    assert as_uid(owner, "cat", str(fork_dir / "notes.txt"), home=home).stdout == "hi\nowner\nmore\n"
    r = await s.call("exec", name="ag", command="echo fork >> notes.txt && cat by-owner.txt")
    assert r["stdout"] == "mine\n", r


def test_kept_data_of_the_owner_stays_the_owners(tmp_path: Path) -> None:
    """A workspace dir the owner owns (kept from before) keeps that: its files would be unreachable inside."""
    if os.geteuid() != 0:
        pytest.skip("needs root: the agent's uid is given only by a root server")
    settings = Settings(mode="direct", state_dir=tmp_path / "state", agent_files="own-uid")
    record = WorkspaceRecord(name="kd", type="container", state="creating", runtime="nspawn", ip="192.168.83.10",
                             mac=mac_for("kd"), cid=cid_for("kd"), user="agent")  # fmt: skip
    kept = tmp_path / "kept"
    kept.mkdir()
    os.chown(kept, settings.user_uid, settings.user_uid)
    assert agentfiles.files_identity(settings, record, kept) == (settings.user_uid, settings.user_uid)
    assert agentfiles.files_identity(settings, record, tmp_path / "new") == (agent_uid_for("kd"), AGENT_GID)
    owner_only = Settings(mode="direct", state_dir=tmp_path / "state")  # the default
    assert agentfiles.files_identity(owner_only, record, tmp_path / "new") == (settings.user_uid, settings.user_uid)
    nixos = record.model_copy(update={"runtime": "nixos"})  # the module's setup unit owns those shares
    assert agentfiles.files_identity(settings, nixos, tmp_path / "new") == (settings.user_uid, settings.user_uid)




@pytest.mark.e2e
async def test_an_incus_share_maps_the_agents_own_uid(incusd: incus_daemon.PrivateIncusd,
                                                      session: tuple[Session, Settings]) -> None:
    """Incus maps the share's owner on disk like the other types: the agent's uid, and nothing else."""
    _, own = session
    own = own.model_copy(update={"boot_timeout_s": 90}).with_runtime("incus", socket=incusd.socket)
    home = own.state_dir.parent / "home"
    home.mkdir(mode=0o777)
    home.chmod(0o777)
    try:
        async with Client(build_server(own)) as client:
            s = Session(client)
            ws = await s.call("create_workspace", name="ai", type="incus")
            host_dir, agent = Path(ws["host_workspace_dir"]), agent_uid_for("ai")
            r = await s.call("exec", name="ai", command="git init -q && echo hi > f && sudo -n touch by-root; "
                                                         "ls -n f | cut -d' ' -f3-4")
            assert r["stdout"].split() == ["1000", "1000"], r  # the workspace user's, inside
            assert (host_dir / "f").stat().st_uid == agent and (host_dir / "f").stat().st_gid == AGENT_GID
            assert not (host_dir / "by-root").exists()  # root inside has no id on the share
            owner = own.user_uid
            assert as_uid(owner, "cat", str(host_dir / "f"), home=home).stdout == "hi\n"
            done = as_uid(owner, "git", "-C", str(host_dir), "status", home=home)
            assert done.returncode != 0 and "dubious ownership" in done.stderr, done.stderr
    finally:
        async with WorkspaceManager(own) as m:
            await destroy_all(m)
