"""The git section of ``sandbox-mcp bench`` (``--git also|only|no``): a branch per workspace, timed.

- create → first exec with ``repo=`` (a repository of ``--git-files`` files, 10,000 by default)
  against a plain create → first exec, interleaved run by run; and, for scale, a plain
  ``git clone --no-local`` of the same repository on the host;
- fetch_workspace of ``--git-commits`` new commits (100 by default) against a host-local
  ``git fetch`` of the same commits from a clone on the host (no workspace, no SSH).

Through the MCP tools in process, in the benchmark's private namespace and state dir.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from ..config import Settings

__all__ = ["format_git", "run_git_bench"]

_ENV = {"PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "HOME": "/nonexistent",
        "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@host", "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@host"}  # fmt: skip


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], env=_ENV, check=True, capture_output=True,
                          text=True).stdout  # fmt: skip


def make_repo(path: Path, files: int) -> Path:
    """A repository of ``files`` small text files in 100 directories, two commits."""
    path.mkdir(parents=True)
    _git(path, "init", "-q", "-b", "main")
    for i in range(files):
        d = path / f"d{i % 100:02d}"
        d.mkdir(exist_ok=True)
        (d / f"f{i}.txt").write_text(f"file {i}\n" + "x" * (i % 200) + "\n")
    _git(path, "add", "-A")
    _git(path, "commit", "-q", "-m", "many files")
    (path / "README").write_text("bench\n")
    _git(path, "add", "README")
    _git(path, "commit", "-q", "-m", "readme")
    return path


async def run_git_bench(call: Any, settings: Settings, runs: int, files: int, commits: int) -> dict[str, dict[str, float]]:
    """The figures; ``call(tool, **args)`` is an MCP tool call returning the structured result."""
    work = Path(tempfile.mkdtemp(prefix="sandbox-mcp-bench-git-"))
    out: dict[str, dict[str, float]] = {}
    try:
        repo = make_repo(work / "repo", files)
        plain, cloned, host_clone = [], [], []
        for i in range(runs):
            t0 = time.monotonic()
            await call("create_workspace", name=f"gplain{i}")
            await call("exec", name=f"gplain{i}", command="true")
            plain.append(time.monotonic() - t0)
            t0 = time.monotonic()
            await call("create_workspace", name=f"grepo{i}", repo=str(repo))
            await call("exec", name=f"grepo{i}", command="true")
            cloned.append(time.monotonic() - t0)
            t0 = time.monotonic()
            await anyio.run_process(["git", "clone", "-q", "--no-local", str(repo), str(work / f"clone{i}")],
                                    env=_ENV)  # fmt: skip
            host_clone.append(time.monotonic() - t0)
            await call("destroy_workspace", name=f"gplain{i}")
            if i:
                await call("destroy_workspace", name=f"grepo{i}")
        out["create_with_repo_s"] = {"files": float(files), "repo_p50": statistics.median(cloned),
                                     "plain_p50": statistics.median(plain), "host_clone_p50": statistics.median(host_clone),
                                     "runs": float(runs)}  # fmt: skip

        # fetch_workspace of N new commits, against a host-local fetch of the same commits.
        script = (f"for i in $(seq 1 {commits}); do echo $i >> d00/f0.txt && echo $i > n$i.txt && git add -A && "
                  "git commit -q -m c$i; done")
        r = await call("exec", name="grepo0", command=script, timeout_s=600)
        if r["exit_code"] != 0:
            raise RuntimeError(f"committing in the workspace failed: {r['stderr']}")
        t0 = time.monotonic()
        fetched = await call("fetch_workspace", name="grepo0")
        fetch_s = time.monotonic() - t0
        if fetched["commits"] != commits:
            raise RuntimeError(f"fetched {fetched['commits']} commits, expected {commits}")
        # baseline: the same commits made in a host clone, fetched by the host's git from that clone
        src = work / "clone0"
        await anyio.run_process(["sh", "-c", f"cd {src} && " + script], env=_ENV)
        t0 = time.monotonic()
        await anyio.run_process(["git", "-C", str(repo), "fetch", "-q", "--no-tags", str(src),
                                 "+refs/heads/main:refs/heads/host-fetch"], env=_ENV)  # fmt: skip
        local_s = time.monotonic() - t0
        out["fetch_workspace_s"] = {"commits": float(commits), "tool": fetch_s, "host_local_fetch": local_s}
        await call("destroy_workspace", name="grepo0")
    finally:
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(work, ignore_errors=True))
    return out


def format_git(results: dict[str, dict[str, float]]) -> str:
    c, f = results["create_with_repo_s"], results["fetch_workspace_s"]
    return "\n".join([
        f"create -> first exec with repo= ({c['files']:.0f} files): p50 {c['repo_p50']:.3f} s "
        f"({c['runs']:.0f} runs, interleaved)",
        f"  baseline, plain create -> first exec: p50 {c['plain_p50']:.3f} s; the clone adds "
        f"{c['repo_p50'] - c['plain_p50']:.3f} s (ratio {c['repo_p50'] / c['plain_p50']:.2f}x); "
        f"a host git clone --no-local of it: p50 {c['host_clone_p50']:.3f} s",
        f"fetch_workspace of {f['commits']:.0f} new commits: {f['tool']:.3f} s",
        f"  baseline, host-local git fetch of the same commits: {f['host_local_fetch']:.3f} s; "
        f"ratio {f['tool'] / f['host_local_fetch']:.1f}x",
    ])  # fmt: skip

