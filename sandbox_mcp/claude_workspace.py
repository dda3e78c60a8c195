"""The per-workspace Claude Code configuration: seeded on the host, used inside the workspace.

``<state>/<name>/claude-config`` is mounted at ``/home/<user>/claude-config`` and the
workspace user's ``CLAUDE_CONFIG_DIR`` points at it, so Claude Code inside the workspace
reads its state from there and starts without onboarding, without the trust dialog and
without permission prompts. The workspace is disposable; that is what makes skipping
the prompts acceptable.

What the keys mean (Claude Code does not document ``.claude.json``; these are the keys it
reads and writes itself, as observed by others):

- With ``CLAUDE_CONFIG_DIR`` set, Claude Code keeps ``.claude.json`` *inside* that directory
  (not in ``$HOME``), next to ``settings.json`` and ``.credentials.json``
  (anthropics/claude-code#24479; yarikleto/claude-profile#15 traces it on 2.1.220).
- ``hasCompletedOnboarding: true`` skips the first-run theme/login screens
  (tingly-dev/tingly-box#116, ding113/claude-code-hub#617).
- ``projects["<dir>"].hasTrustDialogAccepted: true`` is the record the trust dialog writes;
  it must sit under ``projects`` (OpenRouterLabs/spawn#2220; anthropics/claude-code#52501
  calls it the precedent for pre-accepting trust). Trust of an ancestor suppresses the
  dialog for subdirectories (anthropics/claude-code#72896).
- ``hasCompletedProjectOnboarding`` with ``projectOnboardingSeenCount`` > 0: a completed
  project onboarding with a zero count wedges the trust state (anthropics/claude-code#79973).
- ``bypassPermissionsModeAccepted: true`` pre-accepts the ``--dangerously-skip-permissions``
  disclaimer; without it 2.1.x downgrades the flag to the default mode when nobody can
  answer the dialog (seen in several launchers' source; anthropics/claude-code#52501).
- ``settings.json``: ``permissions.defaultMode = "bypassPermissions"`` makes every session
  start without prompts, and top-level ``skipDangerousModePermissionPrompt: true`` is what
  Claude Code writes when the bypass warning is accepted (anthropics/claude-code#26233,
  #25503).
- Host credentials live in ``~/.claude/.credentials.json`` on Linux (or in
  ``$CLAUDE_CONFIG_DIR``); they are copied only when the user turns that on.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import BackendError, InvalidSpec
from .fsutil import atomic_write

__all__ = [
    "CLAUDE_JSON",
    "CLAUDE_PROFILE_SNIPPET",
    "CLAUDE_PROFILE_SNIPPET_PATH",
    "CLAUDE_WRAPPER",
    "CLAUDE_WRAPPER_PATH",
    "CREDENTIALS_JSON",
    "SETTINGS_JSON",
    "claude_config_dir_inside",
    "environment_lines",
    "host_credentials_file",
    "seed_claude_config",
    "seed_environment",
    "workspace_dir_inside",
]

CLAUDE_JSON = ".claude.json"
SETTINGS_JSON = "settings.json"
CREDENTIALS_JSON = ".credentials.json"

CLAUDE_WRAPPER_PATH = "/usr/local/bin/claude-sandboxed"
CLAUDE_PROFILE_SNIPPET_PATH = "/etc/profile.d/claude-sandboxed.sh"

# Installed by the image builders as CLAUDE_WRAPPER_PATH (mode 0755). It finds the real
# `claude` (on PATH, or where the npm and native installers put it) and runs it with
# --dangerously-skip-permissions, so a session never stops on a permission prompt even when
# a project's own settings ask for another mode. Management subcommands pass through
# untouched. It never finds itself: it skips any candidate that is the wrapper.
CLAUDE_WRAPPER = r"""#!/bin/sh
# claude-sandboxed: run Claude Code without permission prompts. This machine is a disposable
# sandbox-mcp workspace; only the workspace directory survives a restart.
self=$(readlink -f "$0" 2>/dev/null || echo "$0")
real=""
IFS_SAVED=$IFS
IFS=:
for dir in $PATH "$HOME/.local/bin" "$HOME/.claude/local" /usr/local/bin /usr/bin; do
    IFS=$IFS_SAVED
    cand="$dir/claude"
    [ -n "$dir" ] && [ -x "$cand" ] && [ ! -d "$cand" ] || continue
    [ "$(readlink -f "$cand" 2>/dev/null || echo "$cand")" = "$self" ] && continue
    real=$cand
    break
done
IFS=$IFS_SAVED
if [ -z "$real" ]; then
    echo "claude-sandboxed: Claude Code is not installed in this workspace (no 'claude' on PATH)." >&2
    echo "Install Claude Code inside the workspace first (this needs network access)." >&2
    exit 127
fi
if [ -z "${CLAUDE_CONFIG_DIR-}" ] && [ -d "$HOME/claude-config" ]; then
    CLAUDE_CONFIG_DIR=$HOME/claude-config
    export CLAUDE_CONFIG_DIR
fi
case "${1-}" in
    mcp|config|doctor|update|install|migrate-installer|setup-token|plugin|auth|--version|-v|--help|-h)
        exec "$real" "$@" ;;
esac
exec "$real" --dangerously-skip-permissions "$@"
"""

# Installed by the image builders as CLAUDE_PROFILE_SNIPPET_PATH: interactive login shells
# get `claude` = the wrapper. Non-interactive exec is covered by settings.json
# (permissions.defaultMode) because aliases do not apply there.
CLAUDE_PROFILE_SNIPPET = f"""# sandbox-mcp: Claude Code in this workspace runs without permission prompts.
if [ -x {CLAUDE_WRAPPER_PATH} ]; then
    alias claude={CLAUDE_WRAPPER_PATH}
fi
"""


def workspace_dir_inside(user: str) -> str:
    """The workspace directory as the workspace sees it: ``/home/<user>/workspace``."""
    return f"/home/{user}/workspace"


def claude_config_dir_inside(user: str) -> str:
    """Where ``<state>/<name>/claude-config`` is mounted inside: ``/home/<user>/claude-config``."""
    return f"/home/{user}/claude-config"


def environment_lines(user: str) -> list[str]:
    """Lines for the workspace's ``/etc/environment`` (read by pam_env for SSH sessions)."""
    return [f"CLAUDE_CONFIG_DIR={claude_config_dir_inside(user)}"]


def host_credentials_file(home: Path, env: Mapping[str, str] | None = None) -> Path:
    """Where Claude Code keeps the host user's credentials on Linux.

    ``$CLAUDE_CONFIG_DIR/.credentials.json`` when that variable is set, else
    ``<home>/.claude/.credentials.json``. The file may not exist (not logged in, or a
    keychain in use).
    """
    env = os.environ if env is None else env
    base = env.get("CLAUDE_CONFIG_DIR")
    return (Path(base).expanduser() if base else home / ".claude") / CREDENTIALS_JSON


def _claude_json_defaults(trusted: Iterable[str]) -> dict[str, Any]:
    # Keys we set on every seed; everything else in an existing file is left alone.
    return {
        "hasCompletedOnboarding": True,
        "bypassPermissionsModeAccepted": True,
        "projects": {
            d: {
                "hasTrustDialogAccepted": True,
                "hasCompletedProjectOnboarding": True,
                "projectOnboardingSeenCount": 1,
            }
            for d in trusted
        },
    }


_SETTINGS_DEFAULTS: dict[str, Any] = {
    "permissions": {"defaultMode": "bypassPermissions"},
    "skipDangerousModePermissionPrompt": True,
}


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merge ``overlay`` into a copy of ``base``: overlay wins on leaves, other keys survive."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """Read a JSON object without following a symlink at ``path``.

    Returns None when the file is missing. A file that is not a JSON object is moved aside
    (``<name>.corrupt-<time>``) and None is returned, so seeding never clobbers it unseen.
    A symlink is treated like a corrupt file: the workspace user owns this directory and
    must not make the host read or write elsewhere through it.
    """
    try:
        # O_NONBLOCK: opening a FIFO the workspace user planted here must not hang the server.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise BackendError(f"cannot read {path}: {exc}") from exc
        _move_aside(path)
        return None
    with os.fdopen(fd, "rb") as fh:
        kind = stat.S_IFMT(os.fstat(fh.fileno()).st_mode)
        if kind != stat.S_IFREG:
            raise InvalidSpec(
                f"{path} is not a regular file (a FIFO, socket or device); remove it from the workspace's "
                f"claude-config directory and try again"
            )
        raw = fh.read(_MAX_CONFIG_BYTES + 1)
    if len(raw) > _MAX_CONFIG_BYTES:
        _move_aside(path)  # too large to be ours: kept for the user, never read whole
        return None
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        _move_aside(path)
        return None
    return data


_MAX_CONFIG_BYTES = 1 << 20  # a Claude Code config file is a few KiB


def _move_aside(path: Path) -> None:
    os.replace(path, path.with_name(f"{path.name}.corrupt-{int(time.time())}"))


def _write_private(path: Path, data: bytes, uid: int, gid: int, mode: int = 0o600) -> None:
    """Atomically replace ``path`` with ``data``, owned uid:gid with ``mode``; a symlink there is replaced."""
    atomic_write(path, data, mode=mode, owner=(uid, gid))


def _dump(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=False) + "\n").encode()


def _prepare_dir(config_dir: Path, uid: int, gid: int) -> None:
    try:
        config_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise InvalidSpec(f"{config_dir} exists and is not a directory; remove it") from exc
    st = os.lstat(config_dir)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise InvalidSpec(
            f"{config_dir} is a symlink or not a directory; remove it and create the workspace again"
        )
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(config_dir, uid, gid, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(config_dir, 0o700)


def seed_claude_config(
    config_dir: Path,
    *,
    workspace_dir_inside: str,
    uid: int,
    gid: int,
    copy_credentials_from: Path | None = None,
    trusted_dirs: Iterable[str] = (),
) -> Path:
    """Create or update a workspace's Claude Code config directory on the host. Idempotent.

    Creates ``config_dir`` (mode 0700, owned ``uid:gid``) and merges into it:

    - ``.claude.json``: onboarding completed, the bypass-permissions disclaimer accepted, and
      ``workspace_dir_inside`` (plus ``trusted_dirs``) trusted. Existing content survives:
      only those keys are set.
    - ``settings.json``: ``permissions.defaultMode = "bypassPermissions"`` and
      ``skipDangerousModePermissionPrompt``; other settings survive.
    - ``.credentials.json``: copied from ``copy_credentials_from`` (the file, or a directory
      holding it) only when that is given; otherwise an existing file is left alone (the user
      may have logged in inside the workspace).

    Every file is written atomically, mode 0600, owned ``uid:gid``. A file that is not a JSON
    object, or a symlink, is moved aside as ``<name>.corrupt-<time>`` and written afresh.

    Returns ``config_dir``.

    Raises:
        InvalidSpec: ``workspace_dir_inside`` is not absolute, ``config_dir`` is a symlink or
            not a directory, or ``copy_credentials_from`` names no credentials file.
        BackendError: a file could not be read.
        OSError: the directory or a file could not be written (disk full, permissions).
    """
    if not workspace_dir_inside.startswith("/"):
        raise InvalidSpec(f"workspace_dir_inside must be an absolute path, got {workspace_dir_inside!r}")
    trusted = [workspace_dir_inside.rstrip("/") or "/"]
    trusted += [d.rstrip("/") for d in trusted_dirs if d.rstrip("/") not in trusted]
    if any(not d.startswith("/") for d in trusted):
        raise InvalidSpec(f"trusted directories must be absolute paths, got {trusted!r}")

    credentials: bytes | None = None
    if copy_credentials_from is not None:
        src = Path(copy_credentials_from).expanduser()
        if src.is_dir():
            src = src / CREDENTIALS_JSON
        if not src.is_file():
            raise InvalidSpec(
                f"no Claude credentials at {src}: log in with 'claude' on the host first, "
                f"or turn copy_claude_credentials off (SANDBOX_MCP_COPY_CLAUDE_CREDENTIALS=false)"
            )
        credentials = src.read_bytes()

    _prepare_dir(config_dir, uid, gid)

    claude_json = config_dir / CLAUDE_JSON
    existing = _read_json_object(claude_json) or {}
    _write_private(claude_json, _dump(_merge(existing, _claude_json_defaults(trusted))), uid, gid)

    settings = config_dir / SETTINGS_JSON
    existing = _read_json_object(settings) or {}
    _write_private(settings, _dump(_merge(existing, _SETTINGS_DEFAULTS)), uid, gid)

    if credentials is not None:
        _write_private(config_dir / CREDENTIALS_JSON, credentials, uid, gid)
    return config_dir


def seed_environment(config_dir: Path, env: Mapping[str, str], *, uid: int, gid: int) -> None:
    """Give Claude Code inside the workspace ``env`` (its secrets' placeholders and base URLs). Idempotent.

    ``settings.json``'s ``env`` gets the variables (Claude Code applies them to its own process, so they
    hold even where a session lacks /etc/environment). Where ``ANTHROPIC_API_KEY`` is among them,
    ``.claude.json``'s ``customApiKeyResponses.approved`` gets its last 20 characters: what Claude Code
    records when a user accepts a key from the environment, so it does not ask. Only placeholders come
    here, never a value (see sandbox_mcp.secrets).

    Raises:
        InvalidSpec, BackendError, OSError: as :func:`seed_claude_config`.
    """
    if not env:
        return
    _prepare_dir(config_dir, uid, gid)
    settings = config_dir / SETTINGS_JSON
    existing = _read_json_object(settings) or {}
    _write_private(settings, _dump(_merge(existing, {"env": dict(env)})), uid, gid)
    key = env.get("ANTHROPIC_API_KEY")
    if key:
        claude_json = config_dir / CLAUDE_JSON
        existing = _read_json_object(claude_json) or {}
        responses = existing.get("customApiKeyResponses")
        responses = dict(responses) if isinstance(responses, dict) else {}
        approved = [a for a in responses.get("approved", []) if isinstance(a, str)]
        if key[-20:] not in approved:
            approved.append(key[-20:])
        responses["approved"] = approved[-20:]
        responses.setdefault("rejected", [])
        _write_private(claude_json, _dump({**existing, "customApiKeyResponses": responses}), uid, gid)
