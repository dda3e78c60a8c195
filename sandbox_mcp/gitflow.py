"""A branch per workspace: clone a host repository in, see what changed, bring the work back.

The rule everything here follows: **the host never runs git against the directory the workspace
controls.** That directory's ``.git/config`` (``core.fsmonitor``, ``core.hooksPath``), its hooks,
``objects/info/alternates`` and symlinks would run or read things as whoever runs git there. So:

* **clone** (create_workspace ``repo=``): the user's own git packs the history of ``ref`` on the host
  (:mod:`hostgit`: as that user, clean config); the pack goes over the SSH exec channel into
  ``git index-pack`` inside, which sets up branch ``sandbox/NAME`` at that commit. Nothing else comes
  along: no remotes, no config, no hooks, no credentials.
* **diff** (workspace_diff): git runs inside; its output comes back bounded and is parsed as
  untrusted text.
* **fetch** (fetch_workspace): ``git upload-pack`` runs inside; the host's ``git fetch`` (as the
  repository's user, hooks off, fsck on) speaks to it through the ``ext::`` transport, whose command
  is :mod:`sandbox_mcp.git_remote` relaying a socket this module holds. The server copies the bytes
  between that socket and the SSH channel and stops past ``git_fetch_max_bytes``. The host's git sees
  a stream of objects, which it checks, never a directory.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import socket
import stat
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import anyio
import anyio.abc
from anyio.abc import Process

from . import git_remote
from .config import Settings
from .errors import AccessDenied, BackendError, CommandFailed, InvalidSpec, InvalidState, SandboxError, clip
from .hostgit import HostUser, open_git, remove_stale_packs, run_git
from .models import DiffFile, FetchResult, RepoInfo, WorkspaceDiff
from .ssh import SSHPool, SSHTarget

if TYPE_CHECKING:
    from .ssh.stream import RemoteStream

__all__ = [
    "BRANCH_PREFIX",
    "branch_for",
    "clone_into",
    "clone_script",
    "commit_all_script",
    "diff_script",
    "ext_url",
    "relay_command",
    "fetch_argv",
    "fetch_from",
    "parse_diff",
    "workspace_diff",
]

BRANCH_PREFIX = "sandbox/"
_CHUNK = 64 * 1024
_SHA_RE = re.compile(r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")
_MAX_FILES = 10_000
_STATUS = {"A": "added", "M": "modified", "D": "deleted", "T": "type-changed", "U": "unmerged"}
# The identity of commits made inside (the agent's, not the host user's: no host data goes in).
_AGENT_NAME = "sandbox agent"


def branch_for(name: str) -> str:
    """The branch of workspace ``name``, inside it and in the host repository."""
    return f"{BRANCH_PREFIX}{name}"


def _check_sha(value: str, what: str) -> str:
    if not _SHA_RE.match(value):
        raise InvalidSpec(f"{what} {value!r} is not a full commit id")
    return value


# --- inside the workspace: scripts (its git, its business) ---


def clone_script(name: str, base: str) -> str:
    """The shell script that turns the (empty) workspace directory into a clone from a pack on stdin."""
    branch = shlex.quote(branch_for(name))
    base = _check_sha(base, "base")
    email = shlex.quote(f"agent@{name}.sandbox.invalid")
    return "\n".join([
        "set -e",
        'if [ -n "$(ls -A)" ]; then echo "the workspace directory is not empty (kept data?)" >&2; exit 3; fi',
        f"git init -q -b {branch} .",
        "git index-pack --stdin >/dev/null",
        f"git update-ref refs/heads/{branch} {base}",
        f"git config user.name {shlex.quote(_AGENT_NAME)}",
        f"git config user.email {email}",
        "git reset -q --hard",
    ])  # fmt: skip


def commit_all_script(name: str) -> str:
    """Commit everything uncommitted on the workspace's branch (nothing when it is clean); prints the head."""
    branch = shlex.quote(branch_for(name))
    return "\n".join([
        "set -e",
        f'[ "$(git symbolic-ref -q HEAD)" = refs/heads/{branch} ] || '
        f'{{ echo "HEAD is not on branch "{branch}"; check it out to fetch uncommitted work" >&2; exit 3; }}',
        "git add -A",
        "if ! git diff --cached --quiet; then git commit -q --no-verify -m 'Uncommitted work from the sandbox'; "
        "echo committed; fi",
    ])  # fmt: skip


def diff_script(base: str, boundary: str, patch_max: int, stat_only: bool) -> str:
    """The script for workspace_diff: base against the working tree (untracked files too), in sections.

    A private copy of the index takes ``git add -A`` so the workspace's own index is untouched.
    Sections, each ended by ``boundary``: HEAD, the commit count, ``--raw -z``, ``--numstat -z``,
    the patch (cut at ``patch_max`` + 1 bytes, so the reader knows it was cut).
    """
    base = _check_sha(base, "base")
    flags = "--no-renames --no-ext-diff --no-textconv --no-color"
    b = shlex.quote(boundary)
    lines = [
        "set -e",
        'idx=$(mktemp "${TMPDIR:-/tmp}/sbx-index.XXXXXX")',
        "trap 'rm -f -- \"$idx\"' EXIT",
        'cp -- "$(git rev-parse --git-path index)" "$idx" 2>/dev/null || rm -f -- "$idx"',
        'export GIT_INDEX_FILE="$idx"',
        "git add -A",
        "git rev-parse -q --verify HEAD || true",
        f"printf '%s\\n' {b}",
        f"git rev-list --count {base}..HEAD 2>/dev/null || echo 0",
        f"printf '%s\\n' {b}",
        f"git diff --cached {flags} --raw -z {base}",
        f"printf '\\n%s\\n' {b}",
        f"git diff --cached {flags} --numstat -z {base}",
        f"printf '\\n%s\\n' {b}",
    ]
    if not stat_only:
        lines.append(f"git diff --cached {flags} {base} | head -c {patch_max + 1}")
    return "\n".join(lines)


def parse_diff(out: str, boundary: str, base: str, patch_max: int, cut: bool) -> WorkspaceDiff:
    """Read what :func:`diff_script` printed (the workspace's words: nothing is trusted, all is bounded).

    ``cut``: the exec output itself was truncated.

    Raises:
        BackendError: the output does not have the sections the script prints.
    """
    head, found, rest = out.partition(f"{boundary}\n")
    if not found:
        raise BackendError(
            "workspace_diff could not read git's output in the workspace (is git installed and the workspace "
            f"directory still a clone?): {clip(out, 300)!r}"
        )
    head = head.strip()
    # HEAD, then: the commit count, --raw -z, --numstat -z, the patch (missing ones: the output was cut)
    sections = rest.split(f"\n{boundary}\n", 3) + ["", "", "", ""]
    count_text, raw, numstat, patch = sections[0].strip(), sections[1], sections[2], sections[3]
    truncated = cut or rest.count(f"\n{boundary}\n") < 3

    statuses: dict[str, str] = {}
    fields = raw.split("\0")
    for header, path in zip(fields[0::2], fields[1::2], strict=False):
        header = header.strip()
        if not header.startswith(":") or not path:
            continue
        letter = header.rsplit(" ", 1)[-1][:1]
        statuses[path] = _STATUS.get(letter, "modified")

    files: list[DiffFile] = []
    for entry in numstat.split("\0"):
        added, tab1, rest_ = entry.lstrip("\n").partition("\t")
        deleted, tab2, path = rest_.partition("\t")
        if not (tab1 and tab2 and path):
            continue
        if len(files) >= _MAX_FILES:
            truncated = True
            break
        files.append(DiffFile(
            path=path[:4096],
            status=statuses.get(path, "modified"),  # type: ignore[arg-type]
            added=int(added) if added.isdigit() else None,
            deleted=int(deleted) if deleted.isdigit() else None,
        ))  # fmt: skip
    if len(patch.encode()) > patch_max:
        patch = patch.encode()[:patch_max].decode("utf-8", "ignore")
        truncated = True
    return WorkspaceDiff(
        base=base,
        head=head if _SHA_RE.match(head) else None,
        commits=int(count_text) if count_text.isdigit() and len(count_text) < 10 else 0,
        files=files,
        patch=patch,
        truncated=truncated,
    )


async def workspace_diff(
    pool: SSHPool, target: SSHTarget, repo: RepoInfo, settings: Settings, stat_only: bool = False
) -> WorkspaceDiff:
    """What changed in the workspace since ``repo.base``, computed inside it.

    Raises:
        BackendError: git failed inside (the message has its stderr).
        SSHError: the workspace cannot be reached.
    """
    boundary = f"--sbx-{secrets.token_hex(12)}--"
    script = diff_script(repo.base, boundary, settings.git_patch_max_bytes, stat_only)
    result = await pool.exec(target, script, timeout_s=settings.git_timeout_s,
                             output_cap=settings.git_patch_max_bytes + (4 << 20))  # fmt: skip
    if result.exit_code != 0:
        raise BackendError(f"git diff failed in the workspace (exit {result.exit_code}): {clip(result.stderr, 2000)}")
    return parse_diff(result.stdout, boundary, repo.base, settings.git_patch_max_bytes, result.truncated)


# --- clone: the host's pack into the workspace ---


async def clone_into(
    pool: SSHPool, target: SSHTarget, name: str, user: HostUser, repo_path: str, base: str, settings: Settings
) -> None:
    """Make the workspace directory a clone of ``repo_path`` at ``base`` on branch ``sandbox/NAME``.

    The pack is made by ``user``'s git on the host and streamed into ``git index-pack`` inside.

    Raises:
        BackendError: packing on the host or indexing inside failed (the message says which, with stderr).
        SSHError: the workspace cannot be reached.
    """
    script = clone_script(name, base)
    args = ["-C", repo_path, "pack-objects", "--revs", "--stdout", "--delta-base-offset", "-q"]
    packer_err = bytearray()
    broken = False
    async with pool.stream(target, script, timeout_s=settings.git_timeout_s) as remote:
        async with open_git(user, args, stdin=subprocess.PIPE) as packer:
            assert packer.stdin is not None and packer.stdout is not None and packer.stderr is not None

            async def collect(stream: anyio.abc.ByteReceiveStream) -> None:
                async for chunk in stream:
                    if len(packer_err) < 64 * 1024:
                        packer_err.extend(chunk)

            with anyio.fail_after(settings.git_timeout_s):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(collect, packer.stderr)
                    await packer.stdin.send(f"{base}\n".encode())
                    await packer.stdin.aclose()
                    try:
                        async for chunk in packer.stdout:
                            await remote.send(chunk)
                    except BrokenPipeError:
                        broken = True  # index-pack gave up: its stderr says why
                    remote.send_eof()
                    await packer.wait()
                status = await remote.wait()
    if packer.returncode != 0:
        raise BackendError(f"git pack-objects in {repo_path} failed: "
                           f"{clip(packer_err.decode('utf-8', 'replace'), 2000)}")  # fmt: skip
    if status != 0 or broken:
        raise BackendError(
            f"cloning into workspace {name!r} failed inside (exit {status}): {clip(remote.stderr_tail, 2000)}"
        )


# --- fetch: the workspace's branch into the host repository, over the exec channel ---


def _world_usable(path: str, bit: int) -> bool:
    """Whether any user may reach ``path`` (every directory on the way o+x) and use it (``bit`` for others)."""
    real = os.path.realpath(path)
    parts = real.split("/")
    for i in range(2, len(parts)):
        try:
            if not os.stat("/".join(parts[:i])).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
    try:
        return bool(os.stat(real).st_mode & bit)
    except OSError:
        return False


def relay_command() -> tuple[str, str]:
    """(python, script) for the ext:: relay, both usable by whichever user the host git runs as.

    The relay (:mod:`git_remote`) is stdlib only, so any python3 runs it: the server's own where every
    user can run it (a system or Nix store path), else the system's ``/usr/bin/python3`` (a venv under
    a private home is not reachable by the user the git runs as).
    """
    script = os.path.abspath(git_remote.__file__)
    python = sys.executable
    if not _world_usable(python, stat.S_IXOTH):
        for candidate in ("/usr/bin/python3", "/bin/python3"):
            if _world_usable(candidate, stat.S_IXOTH):
                python = candidate
                break
    return python, script


def ext_url(fd: int, python: str, script: str) -> str:
    """The ``ext::`` URL whose command relays git's protocol to inherited socket ``fd`` (:mod:`git_remote`)."""
    for path in (python, script):
        if not re.fullmatch(r"/[A-Za-z0-9_./+-]+", path):
            raise InvalidSpec(f"the path {path!r} cannot go in an ext:: URL (spaces or '%'); install sandbox-mcp "
                              "under a plain path")  # fmt: skip
    return f"ext::{python} -I {script} {int(fd)}"


def fetch_argv(repo_path: str, branch: str, url: str) -> list[str]:
    """The host's ``git fetch`` (after :data:`hostgit.SAFE_CONFIG`): ext:: allowed for this call only,
    every object checked, no tags, no submodules, nothing run afterwards."""
    ref = f"refs/heads/{branch}"
    return [
        "-C", repo_path,
        "-c", "protocol.ext.allow=always",
        "-c", "fetch.fsckObjects=true",
        "-c", "transfer.fsckObjects=true",
        "-c", "fetch.unpackLimit=1",  # always one pack file (index-pack), never loose objects as they come
        "-c", "fetch.writeCommitGraph=false",
        "-c", "fetch.recurseSubmodules=false",
        "-c", "fetch.uriProtocols=",
        "fetch", "--quiet", "--no-tags", "--no-recurse-submodules", "--no-write-fetch-head",
        "--no-auto-maintenance", "--no-show-forced-updates",
        url, f"+{ref}:{ref}",
    ]  # fmt: skip


class _PackTooLarge(Exception):
    pass


async def _relay(local: anyio.abc.SocketStream, remote: RemoteStream, fetcher: Process, limit: int) -> bytes:
    """Copy git's protocol both ways until the host's git exits; its stderr (the first 64 KiB) is returned.

    Raises:
        _PackTooLarge: the workspace sent more than ``limit`` bytes.
    """
    err = bytearray()
    stderr_done = anyio.Event()

    async def to_workspace() -> None:  # the host's requests (wants, haves): the host's own words
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            async for chunk in local:
                await remote.send(chunk)
        remote.send_eof()

    async def to_host() -> None:  # the workspace's answer: counted, and cut at the bound
        received = 0
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            while chunk := await remote.receive():
                received += len(chunk)
                if received > limit:
                    raise _PackTooLarge
                await local.send(chunk)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            await local.send_eof()  # the answer ended (or broke): git must see its end, not wait for more

    async def collect() -> None:
        assert fetcher.stderr is not None
        try:
            async for chunk in fetcher.stderr:
                if len(err) < 64 * 1024:
                    err.extend(chunk)
        finally:
            stderr_done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(collect)
        tg.start_soon(to_workspace)
        tg.start_soon(to_host)
        await fetcher.wait()
        with anyio.move_on_after(5):
            await stderr_done.wait()
        tg.cancel_scope.cancel()
    return bytes(err)


async def _commit_uncommitted(pool: SSHPool, target: SSHTarget, name: str, settings: Settings) -> bool:
    """Commit what is uncommitted on the workspace's branch, inside; whether there was anything."""
    result = await pool.exec(target, commit_all_script(name), timeout_s=settings.git_timeout_s)
    if result.exit_code == 3:
        raise InvalidState(clip(result.stderr.strip(), 500))
    if result.exit_code != 0:
        raise BackendError(f"committing in workspace {name!r} failed: {clip(result.stderr, 2000)}")
    return "committed" in result.stdout


async def fetch_from(
    pool: SSHPool,
    target: SSHTarget,
    name: str,
    user: HostUser,
    repo: RepoInfo,
    settings: Settings,
    *,
    include_uncommitted: bool = False,
) -> FetchResult:
    """Bring the workspace's branch into ``repo.path`` as ``refs/heads/sandbox/NAME`` (same commit ids).

    ``git upload-pack`` runs inside; ``user``'s git fetch on the host talks to it through the ext:: relay
    and a socket pair whose other end :func:`_relay` copies to and from the SSH channel.

    Raises:
        InvalidSpec: the workspace sent more than ``git_fetch_max_bytes`` (nothing was written).
        InvalidState: the workspace has no such branch, or (include_uncommitted) is on another branch.
        BackendError: git failed on either side (the message has its words), or it took too long.
        AccessDenied: the user may not write to the repository.
    """
    committed = await _commit_uncommitted(pool, target, name, settings) if include_uncommitted else False
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    started = time.time()
    failure: SandboxError | None = None
    try:
        async with pool.stream(target, "exec git upload-pack .", timeout_s=settings.git_timeout_s) as remote:
            url = ext_url(theirs.fileno(), *relay_command())
            async with open_git(user, fetch_argv(repo.path, repo.branch, url),
                                stdout=subprocess.DEVNULL, pass_fds=[theirs.fileno()]) as fetcher:  # fmt: skip
                theirs.close()  # git (and the relay it starts) hold it now
                local = await anyio.abc.SocketStream.from_socket(ours)
                try:
                    with anyio.fail_after(settings.git_timeout_s):
                        stderr = await _relay(local, remote, fetcher, settings.git_fetch_max_bytes)
                except* _PackTooLarge:
                    failure = InvalidSpec(
                        f"workspace {name!r} sent more than {settings.git_fetch_max_bytes} bytes of git data (the "
                        "git_fetch_max_bytes bound); the fetch was stopped and nothing was written to the host "
                        "repository. Drop large files from the branch's history inside the workspace, or ask the "
                        "server's operator to raise SANDBOX_MCP_GIT_FETCH_MAX_BYTES"
                    )
                except* TimeoutError:
                    failure = BackendError(
                        f"fetching from workspace {name!r} took longer than {settings.git_timeout_s:g} s "
                        "(git_timeout_s); it was stopped and nothing was written"
                    )
                finally:
                    await local.aclose()
        if failure is None and fetcher.returncode != 0:
            failure = _fetch_error(name, repo, stderr.decode("utf-8", "replace"))
    except BaseException:  # cancelled (the client went away): git is killed, its partial pack goes too
        with anyio.CancelScope(shield=True):
            await remove_stale_packs(user, repo.path, started)
        raise
    finally:
        ours.close()
        theirs.close()
    if failure is not None:
        await remove_stale_packs(user, repo.path, started)  # git leaves its partial pack behind
        raise failure
    return await _fetched(user, repo, committed)


def _fetch_error(name: str, repo: RepoInfo, stderr: str) -> SandboxError:
    tail = clip(stderr.strip(), 2000)
    if "couldn't find remote ref" in stderr:
        return InvalidState(f"workspace {name!r} has no branch {repo.branch!r}; commit your work on it inside")
    if "Permission denied" in stderr or "dubious ownership" in stderr or "insufficient permission" in stderr:
        return AccessDenied(f"cannot write to {repo.path}: {tail}")
    return BackendError(f"git fetch from workspace {name!r} into {repo.path} failed: {tail}")


async def _fetched(user: HostUser, repo: RepoInfo, committed: bool) -> FetchResult:
    ref = f"refs/heads/{repo.branch}"
    try:
        head = (await run_git(user, ["-C", repo.path, "rev-parse", "--verify", "--end-of-options", ref])).stdout.strip()
        count = await run_git(user, ["-C", repo.path, "rev-list", "--count", f"{repo.base}..{head}"])
    except CommandFailed as exc:
        raise BackendError(f"the fetch into {repo.path} finished but {ref} cannot be read: {exc}") from exc
    return FetchResult(ref=ref, head=head, commits=int(count.stdout.strip() or 0), repo=repo.path,
                       committed=committed)  # fmt: skip
