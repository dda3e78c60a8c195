"""gitflow and hostgit: the pure parts exactly, and the protocol for real against a loopback sshd.

The loopback sshd (tests/test_ssh.py's) stands in for a workspace: its "workspace directory" is a
temp dir, and git runs there over the same SSH stream the manager uses. What only a real workspace
shows (a container's uid, a hostile workspace whose commands cannot reach the host) is in
tests/test_git_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from sandbox_mcp import gitflow, hostgit
from sandbox_mcp.config import Settings
from sandbox_mcp.errors import AccessDenied, InvalidSpec, InvalidState
from sandbox_mcp.models import RepoInfo
from sandbox_mcp.ssh import SSHPool, SSHTarget

from .points import wait_until
from .test_ssh import AGENT, Sshd, _start_sshd

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def git(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    full = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "PATH": os.environ["PATH"],
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t", **(env or {})}  # fmt: skip
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=full).stdout  # fmt: skip


def make_repo(path: Path, commits: int = 3) -> Path:
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    for i in range(commits):
        (path / "file.txt").write_text("".join(f"line {j}\n" for j in range(i + 1)))
        (path / f"f{i}.txt").write_text(f"{i}\n")
        git(path, "add", "-A")
        git(path, "commit", "-q", "-m", f"commit {i}")
    return path


# --- pure ---


@pytest.mark.parametrize("ref", ["HEAD", "main", "v1.2", "HEAD~2", "feature/x-1", "v1^{commit}", "main@{1}",
                                 "0123abcd" * 5])  # fmt: skip
def test_refs_accepted(ref: str) -> None:
    assert hostgit.validate_ref(ref) == ref


@pytest.mark.parametrize("ref", ["", "-x", "--upload-pack=touch /tmp/x", "a b", "a\nb", "a..b", "a;b", "$(id)",
                                 "x" * 300, None, 5])  # fmt: skip
def test_refs_refused(ref: object) -> None:
    with pytest.raises(InvalidSpec, match="not a revision"):
        hostgit.validate_ref(ref)


def test_repo_paths() -> None:
    assert hostgit.validate_repo_path("/home/a/./src//p/") == "/home/a/src/p"
    for bad in ("relative/path", "~/p", "", "/a\nb", "/a\0b", None):
        with pytest.raises(InvalidSpec):
            hostgit.validate_repo_path(bad)


def test_clean_git_env_carries_nothing_of_the_server() -> None:
    env = hostgit.git_env()
    assert env["GIT_CONFIG_NOSYSTEM"] == "1" and env["GIT_CONFIG_GLOBAL"] == "/dev/null"
    assert env["HOME"] == "/nonexistent"
    assert not {k for k in env if k.startswith("SSH_") or k in ("GIT_DIR", "GIT_SSH_COMMAND", "LD_PRELOAD")}
    assert "core.hooksPath=/dev/null" in hostgit.SAFE_CONFIG and "protocol.allow=never" in hostgit.SAFE_CONFIG


def test_fetch_argv_exact() -> None:
    url = gitflow.ext_url(7, "/usr/bin/python3", "/opt/s/sandbox_mcp/git_remote.py")
    assert url == "ext::/usr/bin/python3 -I /opt/s/sandbox_mcp/git_remote.py 7"
    assert gitflow.fetch_argv("/r", "sandbox/ws", url) == [
        "-C", "/r", "-c", "protocol.ext.allow=always", "-c", "fetch.fsckObjects=true", "-c", "transfer.fsckObjects=true",
        "-c", "fetch.unpackLimit=1", "-c", "fetch.writeCommitGraph=false", "-c", "fetch.recurseSubmodules=false",
        "-c", "fetch.uriProtocols=", "fetch", "--quiet", "--no-tags", "--no-recurse-submodules",
        "--no-write-fetch-head", "--no-auto-maintenance", "--no-show-forced-updates", url,
        "+refs/heads/sandbox/ws:refs/heads/sandbox/ws",
    ]  # fmt: skip
    with pytest.raises(InvalidSpec):
        gitflow.ext_url(3, "/opt/my python/bin/python3", "/s.py")
    with pytest.raises(InvalidSpec):
        gitflow.ext_url(3, "/usr/bin/python3", "/a%b/s.py")


def test_the_relay_is_runnable_by_anyone() -> None:
    python, script = gitflow.relay_command()
    if os.geteuid() == 0:  # as nobody, from a child (so no capability of root's is left to reach it)
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
                            f"{python} -I {script} x; echo $?"], capture_output=True, text=True)  # fmt: skip
        assert r.stdout.strip() == "2" and "usage" in r.stderr, r


BASE = "a" * 40


def test_parse_diff() -> None:
    b = "--sbx-x--"
    out = (f"{'b' * 40}\n{b}\n2\n{b}\n:100644 100644 {'1' * 40} {'2' * 40} M\0a.txt\0"
           f":000000 100644 {'0' * 40} {'3' * 40} A\0bin\0\n{b}\n3\t1\ta.txt\0-\t-\tbin\0\n{b}\n"
           "diff --git a/a.txt b/a.txt\n")  # fmt: skip
    d = gitflow.parse_diff(out, b, BASE, 1000, cut=False)
    assert (d.head, d.commits, d.truncated) == ("b" * 40, 2, False)
    assert [(f.path, f.status, f.added, f.deleted) for f in d.files] == [
        ("a.txt", "modified", 3, 1), ("bin", "added", None, None)]
    assert d.patch == "diff --git a/a.txt b/a.txt\n"
    cut = gitflow.parse_diff(out.replace("diff --git", "x" * 2000), b, BASE, 1000, cut=False)
    assert cut.truncated and len(cut.patch) == 1000


@pytest.mark.parametrize("out", ["", "garbage", "\0\0\0", "x\n--sbx-x--\n" + "\t" * 100000,
                                 "HEAD\n--sbx-x--\n99999999999999999999\n--sbx-x--\n\0:\0:\0\n--sbx-x--\n\t\t\0"])
def test_parse_diff_takes_anything_without_crashing(out: str) -> None:
    try:
        d = gitflow.parse_diff(out, "--sbx-x--", BASE, 1000, cut=False)
    except Exception as exc:  # only our own error, never a crash
        assert type(exc).__name__ == "BackendError"
    else:
        assert d.head is None and d.commits == 0


# --- for real, over a loopback sshd ---


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = _start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def pool() -> AsyncIterator[SSHPool]:
    p = SSHPool(exec_agent=True, agent_path=AGENT)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(mode="direct", state_dir=tmp_path / "state", git_fetch_max_bytes=8 << 20)


ME = hostgit.host_user(os.geteuid())


async def cloned(pool: SSHPool, sshd: Sshd, tmp_path: Path, settings: Settings) -> tuple[Path, Path, SSHTarget,
                                                                                         RepoInfo]:
    host = make_repo(tmp_path / "host")
    ws = tmp_path / "ws"
    ws.mkdir()
    target = sshd.target(ws)
    resolved = await hostgit.resolve_repo(ME, str(host / "."), "HEAD")
    assert resolved.path == str(host)
    await gitflow.clone_into(pool, target, "ws", ME, resolved.path, resolved.base, settings)
    return host, ws, target, RepoInfo(path=resolved.path, base=resolved.base, branch="sandbox/ws")


async def test_clone_diff_fetch_round_trip(pool: SSHPool, sshd: Sshd, tmp_path: Path, settings: Settings) -> None:
    host, ws, target, repo = await cloned(pool, sshd, tmp_path, settings)
    assert git(ws, "rev-parse", "HEAD").strip() == repo.base
    assert git(ws, "symbolic-ref", "HEAD").strip() == "refs/heads/sandbox/ws"
    assert git(ws, "log", "--format=%s").split("\n")[:3] == ["commit 2", "commit 1", "commit 0"]
    assert git(ws, "remote").strip() == "" and not list((ws / ".git" / "hooks").glob("*[!e]"))
    assert (ws / "file.txt").read_text() == "line 0\nline 1\nline 2\n"

    empty = await gitflow.workspace_diff(pool, target, repo, settings)
    assert (empty.files, empty.patch, empty.commits, empty.head) == ([], "", 0, repo.base)

    (ws / "file.txt").write_text("line 0\nchanged\n")
    git(ws, "commit", "-q", "-am", "inside 1")
    (ws / "new.txt").write_text("untracked\n")  # uncommitted, untracked
    (ws / "f0.txt").unlink()
    d = await gitflow.workspace_diff(pool, target, repo, settings)
    assert d.commits == 1 and d.head == git(ws, "rev-parse", "HEAD").strip()
    assert {(f.path, f.status, f.added, f.deleted) for f in d.files} == {
        ("file.txt", "modified", 1, 2), ("new.txt", "added", 1, 0), ("f0.txt", "deleted", 0, 1)}
    assert "+changed" in d.patch and "+untracked" in d.patch and not d.truncated
    assert git(ws, "status", "--porcelain").count("??") == 1, "the workspace's own index was touched"
    stat = await gitflow.workspace_diff(pool, target, repo, settings, stat_only=True)
    assert stat.patch == "" and len(stat.files) == 3

    fetched = await gitflow.fetch_from(pool, target, "ws", ME, repo, settings)
    assert fetched.ref == "refs/heads/sandbox/ws" and fetched.commits == 1 and not fetched.committed
    assert fetched.head == git(ws, "rev-parse", "HEAD").strip() == git(host, "rev-parse", "sandbox/ws").strip()
    assert git(host, "rev-parse", "main").strip() == repo.base  # nothing else moved

    fetched = await gitflow.fetch_from(pool, target, "ws", ME, repo, settings, include_uncommitted=True)
    assert fetched.committed and fetched.commits == 2
    assert git(host, "show", "sandbox/ws:new.txt") == "untracked\n"

    # merge: --no-ff into the current branch; then a conflict is reported, not hidden
    head = await hostgit.merge_branch(ME, str(host), "sandbox/ws")
    assert git(host, "rev-list", "--parents", "-n1", "HEAD").split()[1:] == [repo.base, fetched.head]
    assert head == git(host, "rev-parse", "HEAD").strip()
    (ws / "file.txt").write_text("workspace side\n")
    git(ws, "commit", "-q", "-am", "ws side")
    (host / "file.txt").write_text("host side\n")
    git(host, "commit", "-q", "-am", "host side")
    await gitflow.fetch_from(pool, target, "ws", ME, repo, settings)
    with pytest.raises(hostgit.MergeConflict, match="conflicts in: file.txt.*git merge --abort"):
        await hostgit.merge_branch(ME, str(host), "sandbox/ws")
    assert "UU file.txt" in git(host, "status", "--porcelain")


async def test_squash_apply_stages_one_change(pool: SSHPool, sshd: Sshd, tmp_path: Path, settings: Settings) -> None:
    host, ws, target, repo = await cloned(pool, sshd, tmp_path, settings)
    for i in range(3):
        (ws / f"n{i}").write_text(f"{i}\n")
        git(ws, "add", "-A")
        git(ws, "commit", "-q", "-m", f"n{i}")
    await gitflow.fetch_from(pool, target, "ws", ME, repo, settings)
    stat = await hostgit.merge_branch(ME, str(host), "sandbox/ws", squash=True)
    assert "3 files changed" in stat
    assert git(host, "rev-parse", "HEAD").strip() == repo.base  # nothing committed: staged for the user
    assert sorted(git(host, "diff", "--cached", "--name-only").split()) == ["n0", "n1", "n2"]


async def test_fetch_stops_at_the_size_bound(pool: SSHPool, sshd: Sshd, tmp_path: Path, settings: Settings) -> None:
    host, ws, target, repo = await cloned(pool, sshd, tmp_path, settings)
    (ws / "big").write_bytes(os.urandom(12 << 20))  # incompressible, past the 8 MiB bound
    git(ws, "add", "big")
    git(ws, "commit", "-q", "-m", "big")
    with pytest.raises(InvalidSpec, match="more than 8388608 bytes of git data"):
        await gitflow.fetch_from(pool, target, "ws", ME, repo, settings)
    assert subprocess.run(["git", "-C", str(host), "rev-parse", "-q", "--verify", "sandbox/ws"],
                          capture_output=True).returncode == 1  # fmt: skip
    leftovers = list((host / ".git" / "objects" / "pack").glob("tmp_*"))
    assert leftovers == [], leftovers


async def test_fetch_errors_say_what_to_do(pool: SSHPool, sshd: Sshd, tmp_path: Path, settings: Settings) -> None:
    host, ws, target, repo = await cloned(pool, sshd, tmp_path, settings)
    git(ws, "checkout", "-q", "-b", "other")
    git(ws, "branch", "-q", "-D", "sandbox/ws")
    with pytest.raises(InvalidState, match="has no branch 'sandbox/ws'"):
        await gitflow.fetch_from(pool, target, "ws", ME, repo, settings)
    with pytest.raises(InvalidState, match="HEAD is not on branch"):
        await gitflow.fetch_from(pool, target, "ws", ME, repo, settings, include_uncommitted=True)


async def test_resolve_repo_refuses(tmp_path: Path) -> None:
    host = make_repo(tmp_path / "host", commits=1)
    with pytest.raises(InvalidSpec, match="names no commit"):
        await hostgit.resolve_repo(ME, str(host), "nosuchbranch")
    with pytest.raises(InvalidSpec, match="not a git repository"):
        await hostgit.resolve_repo(ME, str(tmp_path), "HEAD")
    with pytest.raises(InvalidSpec, match="not a git repository"):
        await hostgit.resolve_repo(ME, str(tmp_path / "missing"), "HEAD")
    if os.geteuid() == 0:  # as nobody: not theirs to read
        nobody = hostgit.host_user(65534)
        with pytest.raises((AccessDenied, InvalidSpec)):
            await hostgit.resolve_repo(nobody, str(host), "HEAD")


def _relays() -> list[int]:
    """PIDs of ext:: relays (git_remote.py) running on this host."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"git_remote.py" in (proc / "cmdline").read_bytes():
                    out.append(int(proc.name))
            except OSError:
                pass
    return out


async def test_a_cancelled_fetch_leaves_nothing(pool: SSHPool, sshd: Sshd, tmp_path: Path, settings: Settings) -> None:
    host, ws, target, repo = await cloned(pool, sshd, tmp_path, settings)
    (ws / "big").write_bytes(os.urandom(6 << 20))
    git(ws, "add", "big")
    git(ws, "commit", "-q", "-m", "big")
    before = set(_relays())
    async with anyio.create_task_group() as tg:
        tg.start_soon(gitflow.fetch_from, pool, target, "ws", ME, repo, settings)
        await wait_until(lambda: bool(set(_relays()) - before), "the ext:: relay to start")  # cancelled mid-fetch
        tg.cancel_scope.cancel()
    await wait_until(lambda: not set(_relays()) - before, "the relay to end")
    assert [p.name for p in (host / ".git" / "objects" / "pack").iterdir() if p.name.startswith("tmp_")] == []
    # and the next fetch works
    fetched = await gitflow.fetch_from(pool, target, "ws", ME, repo, settings)
    assert fetched.head == git(ws, "rev-parse", "HEAD").strip()


async def test_a_bare_repository(pool: SSHPool, sshd: Sshd, tmp_path: Path, settings: Settings) -> None:
    make_repo(tmp_path / "src", commits=2)
    bare = tmp_path / "bare.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(tmp_path / "src"), str(bare)], check=True,
                   env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"})  # fmt: skip
    resolved = await hostgit.resolve_repo(ME, str(bare), "main")
    assert resolved.path == str(bare)
    ws = tmp_path / "ws"
    ws.mkdir()
    target = sshd.target(ws)
    await gitflow.clone_into(pool, target, "ws", ME, resolved.path, resolved.base, settings)
    (ws / "n").write_text("n\n")
    git(ws, "add", "n")
    git(ws, "commit", "-q", "-m", "n")
    repo = RepoInfo(path=resolved.path, base=resolved.base, branch="sandbox/ws")
    fetched = await gitflow.fetch_from(pool, target, "ws", ME, repo, settings)
    assert fetched.commits == 1 and git(bare, "rev-parse", "sandbox/ws").strip() == fetched.head
