"""git on the host, run as the user whose repository it is: never as root, with a clean configuration.

The server (root, in the daemon) works in users' repositories for create_workspace(repo=...),
fetch_workspace and ``sandbox-mcp git``. Every such git runs as the calling user (the daemon's
peer; as root, the repository's owner), so it reads and writes exactly what that user may: a
repository they cannot read cannot be cloned, one they cannot write cannot be fetched into. Root
never opens a path in it; even ``git -C`` changes directory as the user (``subprocess``'s ``cwd``
would do it before dropping privileges).

The environment is clean: no system or global git configuration (``GIT_CONFIG_NOSYSTEM``,
``GIT_CONFIG_GLOBAL=/dev/null``, ``HOME`` pointing nowhere), hooks off (``core.hooksPath=/dev/null``),
no fsmonitor, no transport but what a call allows (``protocol.allow=never``). Only the repository's
own config is read, which is its owner's.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from anyio.abc import Process

from .errors import (
    AccessDenied,
    CommandFailed,
    CommandTimeout,
    InvalidSpec,
    InvalidState,
    SandboxError,
    clip_repr,
)

__all__ = [
    "SAFE_CONFIG",
    "CompletedGit",
    "HostUser",
    "MergeConflict",
    "ResolvedRepo",
    "git_env",
    "host_user",
    "merge_branch",
    "open_git",
    "resolve_repo",
    "remove_stale_packs",
    "run_git",
    "run_uid",
    "validate_ref",
    "validate_repo_path",
]

# `-c` options every host git gets: no hooks, no fsmonitor, no transport, no background work.
SAFE_CONFIG: tuple[str, ...] = (
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "protocol.allow=never",
    "-c", "gc.auto=0",
    "-c", "maintenance.auto=false",
    "-c", "submodule.recurse=false",
)  # fmt: skip
_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_OUTPUT_CAP = 1 << 20
_TERM_GRACE_S = 2.0
# What a ref argument may be: a name or a revision expression (HEAD~2, v1.0^{commit}, main@{1}),
# never an option and never whitespace or control characters.
_REF_RE = re.compile(r"^[A-Za-z0-9_.@/^~{}+:-]{1,256}$")


@dataclass(frozen=True)
class HostUser:
    """Who a host git runs as: uid, primary gid and supplementary groups (from the password database)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/nonexistent"

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()


def host_user(uid: int) -> HostUser:
    """The account of ``uid`` (its groups too); an account without a passwd entry gets gid = uid, no groups."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        return HostUser(uid, uid)
    try:
        groups = tuple(g for g in os.getgrouplist(entry.pw_name, entry.pw_gid) if g != entry.pw_gid)
    except OSError:
        groups = ()
    home = entry.pw_dir or "/nonexistent"
    if uid == os.geteuid():  # the CLI as this user: their HOME is where their git config is
        home = os.environ.get("HOME") or home
    return HostUser(uid, entry.pw_gid, groups, home)


def run_uid(caller_uid: int | None, repo_path: str) -> int:
    """Whose git works in ``repo_path``: the caller's, or, for root (None or 0), the repository owner's.

    Root asks on its own behalf, so root may look at the path; a non-root caller's uid is used as is.
    """
    if caller_uid:
        return caller_uid
    try:
        return os.stat(repo_path).st_uid
    except OSError as exc:
        raise InvalidSpec(f"repo {clip_repr(repo_path)}: {exc.strerror}; give the path of a git repository") from exc


def validate_repo_path(path: object) -> str:
    """``path`` as a normalised absolute path, checked as text only (the user's git looks at it).

    Raises:
        InvalidSpec: not an absolute path, or holding NUL, newlines or control characters.
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidSpec(f"repo must be an absolute path on the host, got {clip_repr(path)}")
    if len(path) > 4096 or any(ord(c) < 32 or c == "\x7f" for c in path):
        raise InvalidSpec(f"repo {clip_repr(path)} holds control characters or is too long; give a plain path")
    return os.path.normpath(path)


def validate_ref(ref: object) -> str:
    """``ref`` if it can only be a revision (a name or an expression such as ``HEAD~2``), never an option.

    Raises:
        InvalidSpec: anything else.
    """
    if not isinstance(ref, str) or not _REF_RE.match(ref) or ref.startswith("-") or ".." in ref:
        raise InvalidSpec(
            f"ref {clip_repr(ref)} is not a revision: give a branch, tag or commit such as 'HEAD', 'main' or 'v1.2'"
        )
    return ref


def git_env(extra: dict[str, str] | None = None, user_home: str | None = None) -> dict[str, str]:
    """The whole environment of a host git: nothing of the server's, no configuration but the repository's.

    ``user_home``: the user's own global configuration too (only to ask for their name for a merge commit).
    """
    if user_home is not None:
        return {"PATH": _PATH, "HOME": user_home, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
                "LC_ALL": "C", **(extra or {})}  # fmt: skip
    return {
        "PATH": _PATH,
        "HOME": "/nonexistent",
        "XDG_CONFIG_HOME": "/nonexistent",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "/bin/false",
        "GIT_OPTIONAL_LOCKS": "0",
        "LC_ALL": "C",
        **(extra or {}),
    }


def _credentials(user: HostUser) -> dict[str, object]:
    """``open_process`` keywords that drop to ``user`` in the child (nothing if we already are them).

    Raises:
        AccessDenied: we are neither ``user`` nor root.
    """
    if user.is_current:
        return {}
    if os.geteuid() != 0:
        raise AccessDenied(f"cannot run git as uid {user.uid} from uid {os.geteuid()}")
    return {"user": user.uid, "group": user.gid, "extra_groups": list(user.groups)}


@dataclass(frozen=True)
class CompletedGit:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


async def _terminate(process: Process) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        with anyio.move_on_after(_TERM_GRACE_S):
            await process.wait()
        if process.returncode is not None:
            return


@asynccontextmanager
async def open_git(
    user: HostUser,
    args: Sequence[str],
    *,
    stdin: int | None = subprocess.DEVNULL,
    stdout: int | None = subprocess.PIPE,
    pass_fds: Sequence[int] = (),
    env: dict[str, str] | None = None,
    user_config: bool = False,
) -> AsyncIterator[Process]:
    """``git SAFE_CONFIG ARGS`` as ``user`` in its own process group; killed (the group) if still running at the end.

    Raises:
        AccessDenied: the server cannot act as ``user``.
    """
    argv = ["git", *SAFE_CONFIG, *args]
    process = await anyio.open_process(
        argv, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, cwd="/",
        env=git_env(env, user.home if user_config else None),
        start_new_session=True, pass_fds=pass_fds, **_credentials(user),  # type: ignore[arg-type]
    )  # fmt: skip
    try:
        yield process
    finally:
        with anyio.CancelScope(shield=True):
            if process.returncode is None:
                await _terminate(process)
            await process.aclose()


async def _read_capped(stream: anyio.abc.ByteReceiveStream | None, cap: int, into: bytearray) -> None:
    if stream is None:
        return
    async for chunk in stream:
        room = cap - len(into)
        if room > 0:
            into += chunk[:room]


async def run_git(
    user: HostUser,
    args: Sequence[str],
    *,
    timeout_s: float = 120,
    check: bool = True,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    user_config: bool = False,
) -> CompletedGit:
    """Run ``git SAFE_CONFIG ARGS`` as ``user`` and collect its output (each stream up to 1 MiB).

    Raises:
        CommandFailed: it exited non-zero and ``check`` is true.
        CommandTimeout: it ran longer than ``timeout_s`` (it was killed).
        AccessDenied: the server cannot act as ``user``.
    """
    out, err = bytearray(), bytearray()
    async with open_git(user, args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                        env=env, user_config=user_config) as process:  # fmt: skip
        with anyio.move_on_after(timeout_s) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_read_capped, process.stdout, _OUTPUT_CAP, out)
                tg.start_soon(_read_capped, process.stderr, _OUTPUT_CAP, err)
                if input is not None and process.stdin is not None:
                    async with process.stdin:
                        try:
                            await process.stdin.send(input)
                        except (anyio.BrokenResourceError, OSError):
                            pass
            await process.wait()
    if scope.cancelled_caught:
        raise CommandTimeout(f"git {' '.join(args[:4])} did not finish within {timeout_s:g} s and was killed")
    assert process.returncode is not None
    done = CompletedGit(("git", *args), process.returncode, out.decode("utf-8", "replace"),
                        err.decode("utf-8", "replace"))  # fmt: skip
    if check and done.returncode != 0:
        raise CommandFailed(list(done.argv), done.returncode, done.stderr or done.stdout)
    return done


@dataclass(frozen=True)
class ResolvedRepo:
    path: str  # the top level of the work tree (a bare repository: its git dir)
    base: str  # the full commit id ``ref`` named


def _repo_error(path: str, stderr: str) -> InvalidSpec | AccessDenied:
    """What a failed look at a user's repository means, in words that say what to do."""
    text = stderr.strip()
    if "dubious ownership" in text:
        return AccessDenied(
            f"repo {path} belongs to another user, and git does not work in other users' repositories "
            "(safe.directory); clone it into a repository of your own and pass that"
        )
    if "Permission denied" in text:
        return AccessDenied(f"repo {path}: permission denied; you can only use repositories you can read")
    if "not a git repository" in text or "No such file or directory" in text or "cannot change to" in text:
        return InvalidSpec(f"repo {path} is not a git repository you can read; give the path of one (git init)")
    return InvalidSpec(f"repo {path}: git says: {text[-500:]}")


async def resolve_repo(user: HostUser, path: str, ref: str) -> ResolvedRepo:
    """Look at ``path`` and ``ref`` as ``user``: the repository's top level and the commit ``ref`` names.

    Raises:
        InvalidSpec: not a git repository, or ``ref`` names no commit in it.
        AccessDenied: ``user`` may not read it (permissions, or another user's repository).
    """
    path, ref = validate_repo_path(path), validate_ref(ref)
    where = await run_git(user, ["-C", path, "rev-parse", "--is-bare-repository", "--absolute-git-dir"],
                          check=False, timeout_s=30)  # fmt: skip
    if where.returncode != 0:
        raise _repo_error(path, where.stderr)
    bare, git_dir = (where.stdout.splitlines() + ["", ""])[:2]
    top = git_dir
    if bare != "true":
        shown = await run_git(user, ["-C", path, "rev-parse", "--show-toplevel"], check=False, timeout_s=30)
        if shown.returncode != 0:
            raise _repo_error(path, shown.stderr)
        top = shown.stdout.strip()
    base = await run_git(user, ["-C", top, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}"],
                         check=False, timeout_s=30)  # fmt: skip
    commit = base.stdout.strip()
    if base.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
        raise InvalidSpec(f"ref {ref!r} names no commit in {top}; give a branch, tag or commit of it")
    return ResolvedRepo(top, commit)


class MergeConflict(SandboxError):
    """A merge (or squash) of a workspace's branch stopped on conflicts; the repository is left mid-merge."""

    def __init__(self, message: str, files: Sequence[str]) -> None:
        super().__init__(message)
        self.files = tuple(files)


_IDENT_RE = re.compile(r"^(?P<name>.*?) <(?P<email>[^<>]*)> \d+ [+-]\d{4}$")


async def _identity(user: HostUser, repo_path: str) -> dict[str, str]:
    """The user's own name and email (their global config too) for the merge commit, as GIT_* variables."""
    found = await run_git(user, ["-C", repo_path, "var", "GIT_COMMITTER_IDENT"], check=False, user_config=True)
    m = _IDENT_RE.match(found.stdout.strip())
    if found.returncode != 0 or m is None:
        return {}
    name, email = m.group("name"), m.group("email")
    return {"GIT_AUTHOR_NAME": name, "GIT_AUTHOR_EMAIL": email, "GIT_COMMITTER_NAME": name,
            "GIT_COMMITTER_EMAIL": email}  # fmt: skip


async def merge_branch(user: HostUser, repo_path: str, branch: str, *, squash: bool = False) -> str:
    """Merge ``refs/heads/BRANCH`` into the current branch of ``repo_path`` as ``user``: ``--no-ff`` (a merge
    commit), or with ``squash`` as one staged change left for the user to commit. Hooks off, clean config.

    Returns the current branch's new head (merge) or the staged change's ``--stat`` (squash).

    Raises:
        MergeConflict: conflicts; the repository is left mid-merge, the message names the files and the way out.
        InvalidState: HEAD is not on a branch, or is the workspace's branch itself.
        BackendError: git refused (e.g. local changes the merge would overwrite): its words.
    """
    if not branch.startswith("sandbox/"):
        raise InvalidSpec(f"{branch!r} is not a workspace branch")
    current = await run_git(user, ["-C", repo_path, "symbolic-ref", "-q", "--short", "HEAD"], check=False)
    into = current.stdout.strip()
    if current.returncode != 0 or not into:
        raise InvalidState(f"{repo_path} is not on a branch (detached HEAD); check out the branch to merge into")
    if into == branch:
        raise InvalidState(f"{repo_path} has {branch} checked out; check out the branch to merge into first")
    ref = f"refs/heads/{branch}"
    if squash:
        args = ["-C", repo_path, "merge", "--squash", "--no-edit", ref]
    else:
        args = ["-C", repo_path, "merge", "--no-ff", "--no-edit", "-m", f"Merge {branch} into {into}", ref]
    done = await run_git(user, args, check=False, env=await _identity(user, repo_path), timeout_s=600)
    if done.returncode != 0:
        unmerged = await run_git(user, ["-C", repo_path, "diff", "--name-only", "--diff-filter=U", "-z"], check=False)
        files = [f for f in unmerged.stdout.split("\0") if f]
        if files:
            way_out = "git merge --abort" if not squash else "git reset --merge"
            raise MergeConflict(
                f"{'squashing' if squash else 'merging'} {branch} into {into} in {repo_path} stopped on conflicts in: "
                f"{', '.join(files[:50])}{' ...' if len(files) > 50 else ''}. Resolve them and commit, or undo "
                f"with `{way_out}`",
                files,
            )
        raise CommandFailed(list(done.argv), done.returncode, done.stderr or done.stdout)
    if squash:
        stat = await run_git(user, ["-C", repo_path, "diff", "--cached", "--stat"], check=False)
        return stat.stdout
    head = await run_git(user, ["-C", repo_path, "rev-parse", "HEAD"])
    return head.stdout.strip()


async def remove_stale_packs(user: HostUser, repo_path: str, since: float) -> None:
    """Delete the temporary pack a stopped fetch left in ``repo_path`` (git keeps ``tmp_pack_*`` on failure).

    Only ``tmp_pack_*`` files modified since ``since`` (epoch seconds), as ``user``. Best effort.
    """
    where = await run_git(user, ["-C", repo_path, "rev-parse", "--path-format=absolute", "--git-path",
                                 "objects/pack"], check=False)  # fmt: skip
    pack_dir = where.stdout.strip()
    if where.returncode != 0 or not pack_dir.startswith("/"):
        return
    argv = ["find", pack_dir, "-maxdepth", "1", "-type", "f", "-name", "tmp_pack_*", "-newermt", f"@{int(since) - 1}",
            "-delete"]  # fmt: skip
    process = await anyio.open_process(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, cwd="/", env=git_env(),
                                       start_new_session=True, **_credentials(user))  # type: ignore[arg-type]
    async with process:
        with anyio.move_on_after(60):
            await process.wait()
