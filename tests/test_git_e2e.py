"""A branch per workspace, end to end: real containers, the real MCP client, the CLI, and a hostile workspace.

Runs in both deployments of tests/test_e2e.py: in process (root; host repositories are root's) and
through the daemon as an unprivileged user (their repositories are theirs, and the daemon's git runs
as them). The hostile test plants in the workspace's clone everything that would run or read host
files if the host ran git in that directory, checks that nothing of it happened, and then proves the
plants were live by running git there on the host once, on purpose.
"""

# ruff: noqa: F811 - the tests take test_e2e's fixtures (deployment, mcp_session, settings) by name
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from sandbox_mcp.config import Settings

from .conftest import E2E_GIT_FETCH_MAX_BYTES
from .deploy import Account, as_user
from .test_e2e import (  # noqa: F401 - fixtures
    Deployment,
    Session,
    ThroughDaemon,
    deployment,
    mcp_session,
    registry,
    settings,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

_ENV = {"PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": "/nonexistent",
        "GIT_AUTHOR_NAME": "host user", "GIT_AUTHOR_EMAIL": "u@host", "GIT_COMMITTER_NAME": "host user",
        "GIT_COMMITTER_EMAIL": "u@host"}  # fmt: skip


def owner_of(deployment: Deployment) -> Account | None:
    return deployment.user if isinstance(deployment, ThroughDaemon) else None


def host_run(owner: Account | None, *argv: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    full = as_user(owner, *argv) if owner else list(argv)
    return subprocess.run(full, env=_ENV, cwd="/", capture_output=True, check=check, timeout=120)


def host_git(owner: Account | None, repo: Path, *args: str) -> str:
    return host_run(owner, "git", "-C", str(repo), *args).stdout.decode()


def make_host_repo(owner: Account | None, parent: Path, commits: int = 3) -> Path:
    """A repository with history on branch main, owned by ``owner`` (root in process)."""
    repo = parent / f"repo-{secrets.token_hex(3)}"
    repo.mkdir()
    if owner:
        os.chown(repo, owner.uid, owner.gid)
    host_git(owner, repo, "init", "-q", "-b", "main")
    for i in range(commits):
        host_run(owner, "sh", "-c", f"cd {repo} && printf 'line %s\\n' $(seq 0 {i}) > file.txt && echo {i} > f{i}.txt")
        host_git(owner, repo, "add", "-A")
        host_git(owner, repo, "commit", "-q", "-m", f"host commit {i}")
    return repo


def home_of(owner: Account | None, tmp_path: Path) -> Path:
    return owner.home if owner else tmp_path


async def sh(s: Session, name: str, command: str) -> str:
    r = await s.call("exec", name=name, command=command, timeout_s=300)
    assert r["exit_code"] == 0, r
    return r["stdout"]


async def test_clone_work_diff_fetch_merge(mcp_session: Session, deployment: Deployment, settings: Settings,
                                           tmp_path: Path) -> None:  # fmt: skip
    s = mcp_session
    owner = owner_of(deployment)
    repo = make_host_repo(owner, home_of(owner, tmp_path))
    base = host_git(owner, repo, "rev-parse", "HEAD~1").strip()

    ws = await s.call("create_workspace", name="gitrt", repo=str(repo), ref="HEAD~1")
    assert ws["repo"] == {"path": str(repo), "base": base, "branch": "sandbox/gitrt"}
    assert (await s.call("list_workspaces"))["workspaces"][0]["repo"]["base"] == base
    out = await sh(s, "gitrt", "git rev-parse HEAD; git symbolic-ref HEAD; git remote | wc -l; "
                               "git log --format=%s | head -5; git config --local --get-regexp 'url|credential|remote'"
                               " | wc -l; ls .git/hooks | grep -v '\\.sample$' | wc -l; cat f1.txt")  # fmt: skip
    assert out.split("\n")[:8] == [base, "refs/heads/sandbox/gitrt", "0", "host commit 1", "host commit 0", "0", "0",
                                   "1"]  # fmt: skip

    inside = await sh(s, "gitrt", "echo changed > f1.txt && git commit -qam 'inside 1' && echo new > new.txt && "
                                  "git add new.txt && git commit -qm 'inside 2' && git rev-parse HEAD && "
                                  "echo wip >> f0.txt && echo untracked > u.txt")  # fmt: skip
    head = inside.strip()

    diff = await s.call("workspace_diff", name="gitrt")
    assert (diff["base"], diff["head"], diff["commits"], diff["truncated"]) == (base, head, 2, False)
    assert {(f["path"], f["status"]) for f in diff["files"]} == {
        ("f1.txt", "modified"), ("new.txt", "added"), ("f0.txt", "modified"), ("u.txt", "added")}
    assert "+changed" in diff["patch"] and "+wip" in diff["patch"] and "+untracked" in diff["patch"]
    stat = await s.call("workspace_diff", name="gitrt", stat_only=True)
    assert stat["patch"] == "" and len(stat["files"]) == 4

    fetched = await s.call("fetch_workspace", name="gitrt")
    assert fetched == {"ref": "refs/heads/sandbox/gitrt", "head": head, "commits": 2, "repo": str(repo),
                       "committed": False}  # fmt: skip
    ids_inside = (await sh(s, "gitrt", f"git rev-list {base}..HEAD")).split()
    assert host_git(owner, repo, "rev-list", f"{base}..sandbox/gitrt").split() == ids_inside
    assert host_git(owner, repo, "symbolic-ref", "--short", "HEAD").strip() == "main"
    assert "u.txt" not in host_git(owner, repo, "status", "--porcelain")  # only the branch came, nothing else

    # The CLI: diff, then merge --no-ff into the host's current branch, as the user (their own identity).
    if owner:
        host_run(owner, "git", "config", "--file", str(owner.home / ".gitconfig"), "user.name", "Repo Owner")
        host_run(owner, "git", "config", "--file", str(owner.home / ".gitconfig"), "user.email", "owner@host")
    r = deployment.cli(settings, "git", "gitrt", "diff", "--stat")
    assert r.returncode == 0 and "modified\tf1.txt" in r.stdout, r.stderr
    main_before = host_git(owner, repo, "rev-parse", "main").strip()
    r = deployment.cli(settings, "git", "gitrt", "merge")
    assert r.returncode == 0, r.stderr
    parents = host_git(owner, repo, "rev-list", "--parents", "-n1", "main").split()[1:]
    assert parents == [main_before, head]
    if owner:
        assert host_git(owner, repo, "log", "-1", "--format=%an <%ae>", "main").strip() == "Repo Owner <owner@host>"
    assert (repo / "new.txt").read_text() == "new\n"

    # A conflict is reported (exit 1, the file named) and left for the user to resolve.
    await sh(s, "gitrt", "echo workspace side > file.txt && git commit -qam 'inside 3'")
    host_run(owner, "sh", "-c", f"cd {repo} && echo host side > file.txt")
    host_git(owner, repo, "commit", "-qam", "host side")
    r = deployment.cli(settings, "git", "gitrt", "merge")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "conflicts in: file.txt" in r.stderr and "git merge --abort" in r.stderr
    assert "UU file.txt" in host_git(owner, repo, "status", "--porcelain")
    host_git(owner, repo, "merge", "--abort")

    # include_uncommitted: the leftovers are committed inside first, then fetched.
    fetched = await s.call("fetch_workspace", name="gitrt", include_uncommitted=True)
    assert fetched["committed"] is True and fetched["commits"] == 4
    assert host_git(owner, repo, "show", "sandbox/gitrt:u.txt") == "untracked\n"


async def test_hostile_workspace_gains_nothing(mcp_session: Session, deployment: Deployment, settings: Settings,
                                               tmp_path: Path) -> None:  # fmt: skip
    s = mcp_session
    owner = owner_of(deployment)
    repo = make_host_repo(owner, home_of(owner, tmp_path))
    # On the host: where a planted command would leave its mark (anyone may write there), a file the
    # workspace must not read, and another repository's object it must not get.
    marks = Path(tempfile.mkdtemp(prefix="sbx-marks-"))
    os.chmod(marks, 0o1777)
    secret_text = f"host secret {secrets.token_hex(8)}\n"
    secret_file = marks.parent / f"sbx-secret-{secrets.token_hex(4)}"
    secret_file.write_text(secret_text)
    secret_repo = Path(tempfile.mkdtemp(prefix="sbx-secret-repo-"))
    subprocess.run(["git", "init", "-q", str(secret_repo)], check=True, env=_ENV)
    secret_blob = subprocess.run(["git", "-C", str(secret_repo), "hash-object", "-w", "--stdin"], input=secret_text,
                                 text=True, capture_output=True, check=True, env=_ENV).stdout.strip()  # fmt: skip
    try:
        ws = await s.call("create_workspace", name="gitbad", repo=str(repo))
        plant = f"""set -e
M={marks}
sudo mkdir -p $M && sudo chmod 1777 $M   # inside: so the plants succeed if they run in here
mkdir -p .git/evil
for h in post-checkout post-merge pre-commit post-commit reference-transaction post-index-change pre-auto-gc \
         pre-merge-commit post-rewrite fsmonitor-watchman push-to-checkout; do
  printf '#!/bin/sh\\ntouch {marks}/hook-%s\\n' $h > .git/hooks/$h; chmod +x .git/hooks/$h
  printf '#!/bin/sh\\ntouch {marks}/hookspath-%s\\n' $h > .git/evil/$h; chmod +x .git/evil/$h
done
git config core.hooksPath "$PWD/.git/evil"
git config core.fsmonitor "touch {marks}/fsmonitor; true"
git config uploadpack.packObjectsHook "touch {marks}/packobjectshook;"
git config core.sshCommand "touch {marks}/sshcommand"
git config diff.external "touch {marks}/diffexternal"
git config filter.evil.smudge "touch {marks}/smudge"
echo 'big filter=evil' > .gitattributes
ln -s {secret_file} secretlink
ln -s /etc/shadow shadowlink
git add -A && git commit -qm 'plants' && git rev-parse HEAD
"""
        head = (await sh(s, "gitbad", plant)).split()[-1]
        inside_marks = await sh(s, "gitbad", f"ls {marks}")
        assert "hookspath-reference-transaction" in inside_marks  # the plants are live: they ran in there

        diff = await s.call("workspace_diff", name="gitbad")
        assert f"+{secret_file}" in diff["patch"] and secret_text.strip() not in diff["patch"]
        fetched = await s.call("fetch_workspace", name="gitbad")
        assert fetched["head"] == head
        r = deployment.cli(settings, "git", "gitbad", "merge")
        assert r.returncode == 0, r.stderr
        r = deployment.cli(settings, "git", "gitbad", "diff")
        assert r.returncode == 0, r.stderr

        assert sorted(os.listdir(marks)) == [], "a planted command ran on the host"
        assert host_git(owner, repo, "cat-file", "-p", "sandbox/gitbad:secretlink") == str(secret_file)
        assert os.readlink(repo / "secretlink") == str(secret_file)  # a link in the checkout, never its target
        objects = host_run(owner, "git", "-C", str(repo), "cat-file", "--batch-all-objects", "--batch").stdout
        assert secret_text.encode() not in objects and b"root:" not in objects

        # objects/info/alternates at a host repository: a commit naming the host's secret blob cannot be
        # fetched (it is not in the workspace), and the host repository never gets it.
        await sh(s, "gitbad", f"echo {secret_repo}/.git/objects > .git/objects/info/alternates && "
                              f"t=$(printf '100644 blob {secret_blob}\\tstolen\\n' | git mktree --missing) && "
                              "c=$(git commit-tree -p HEAD -m steal $t) && git update-ref refs/heads/sandbox/gitbad $c")
        error = await s.error("fetch_workspace", name="gitbad")
        assert "fetch" in error
        assert host_run(owner, "git", "-C", str(repo), "cat-file", "-e", secret_blob, check=False).returncode != 0
        assert host_git(owner, repo, "rev-parse", "sandbox/gitbad").strip() == head  # unchanged

        # A pack past the (lowered) bound stops with a clear error; nothing is written.
        await sh(s, "gitbad", f"git reset -q --hard {head} && head -c {E2E_GIT_FETCH_MAX_BYTES + (4 << 20)} "
                              "/dev/urandom > big && git add big && git commit -qm big")  # fmt: skip
        error = await s.error("fetch_workspace", name="gitbad")
        assert f"more than {E2E_GIT_FETCH_MAX_BYTES} bytes of git data" in error
        r = deployment.cli(settings, "git", "gitbad", "fetch")
        assert r.returncode == 2 and "git_fetch_max_bytes" in r.stderr
        assert host_git(owner, repo, "rev-parse", "sandbox/gitbad").strip() == head
        pack_dir = repo / ".git" / "objects" / "pack"
        assert [p.name for p in pack_dir.iterdir() if p.name.startswith("tmp_")] == []

        assert sorted(os.listdir(marks)) == [], "a planted command ran on the host"
        # Control: the plants were real. git run on the host in the workspace's directory (what this
        # feature replaces) runs the workspace's fsmonitor and reads the host's secret through alternates.
        host_dir = ws["host_workspace_dir"]
        subprocess.run(["git", "-c", "safe.directory=*", "-C", host_dir, "status", "--short"], env=_ENV,
                       capture_output=True, timeout=60)  # fmt: skip
        assert "fsmonitor" in os.listdir(marks)
        leaked = subprocess.run(["git", "-c", "safe.directory=*", "-C", host_dir, "cat-file", "-p", secret_blob],
                                env=_ENV, capture_output=True, text=True, timeout=60).stdout  # fmt: skip
        assert leaked == secret_text
    finally:
        shutil.rmtree(marks, ignore_errors=True)
        shutil.rmtree(secret_repo, ignore_errors=True)
        secret_file.unlink(missing_ok=True)


async def test_users_reach_only_their_own_repositories(mcp_session: Session, deployment: Deployment,
                                                       settings: Settings, accounts: object) -> None:  # fmt: skip
    if not isinstance(deployment, ThroughDaemon):
        pytest.skip("two users need the daemon")
    s = mcp_session
    alice, bob = deployment.user, accounts.bob  # type: ignore[attr-defined]
    # bob's private repository (his home is 0700): alice cannot clone it.
    private = make_host_repo(bob, bob.home, commits=1)
    error = await s.error("create_workspace", name="gitnope", repo=str(private))
    assert "you can read" in error or "permission denied" in error, error
    # bob's world-readable repository: still not alice's; git does not work in another user's repository.
    open_dir = Path(tempfile.mkdtemp(prefix="sbx-bob-open-"))
    try:
        os.chown(open_dir, bob.uid, bob.gid)
        os.chmod(open_dir, 0o755)
        public = make_host_repo(bob, open_dir, commits=1)
        host_run(bob, "chmod", "-R", "a+rX", str(public))
        error = await s.error("create_workspace", name="gitnope", repo=str(public))
        assert "belongs to another user" in error, error
        assert "gitnope" not in registry(settings)

        # alice's own repository, then the path swapped for bob's: the fetch (as alice) cannot write there.
        mine = make_host_repo(alice, alice.home, commits=1)
        await s.call("create_workspace", name="gitmine", repo=str(mine))
        await sh(s, "gitmine", "echo x > x && git add x && git commit -qm x")
        host_run(alice, "mv", str(mine), f"{mine}.orig")
        host_run(alice, "ln", "-s", str(public), str(mine))
        error = await s.error("fetch_workspace", name="gitmine")
        assert "cannot write" in error or "another user" in error, error
        refs = host_run(bob, "git", "-C", str(public), "for-each-ref", "--format=%(refname)").stdout.decode()
        assert refs.split() == ["refs/heads/main"]
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
