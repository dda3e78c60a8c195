"""The host commands only nixos mode runs: ``nixos-rebuild``, and git calls that keep the flake's index
in step with the files the runtime writes. Pure argv builders, run through :func:`sandbox_mcp.hostcmd.run`."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ...errors import InvalidSpec
from ...hostcmd import Escalation, escalate

__all__ = ["git_forget_argv", "git_intent_to_add_argv", "git_status_argv", "nixos_rebuild_argv"]

_REBUILD_ACTIONS = frozenset({"switch", "boot", "test", "build", "dry-build"})
# nixosConfigurations attribute: a host name, kept strict so it is never more than one attribute.
_HOST_ATTR_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,62}$")


def nixos_rebuild_argv(
    flake: str | Path, host: str, escalation: Escalation, action: str = "switch"
) -> list[str]:
    """``nixos-rebuild <action> --flake <flake>#<host>``, escalated.

    Raises:
        InvalidSpec: a host attribute that is not a plain name, a flake reference that is
            empty, starts with '-', or holds '#' or a control character, or an unknown action.
    """
    if action not in _REBUILD_ACTIONS:
        raise InvalidSpec(f"nixos-rebuild action {action!r} is not one of {sorted(_REBUILD_ACTIONS)}")
    if not isinstance(host, str) or not _HOST_ATTR_RE.match(host):
        raise InvalidSpec(
            f"nixos.host {host!r} is not a valid nixosConfigurations attribute; "
            f"use the host's name, e.g. 'fry'"
        )
    ref = str(flake)
    if not ref or ref.startswith("-") or "#" in ref or any(ord(c) < 32 for c in ref):
        raise InvalidSpec(
            f"nixos.flake {ref!r} is not a usable flake reference; use a directory like /etc/nixos"
        )
    return escalate(["nixos-rebuild", action, "--flake", f"{ref}#{host}"], escalation)


def git_intent_to_add_argv(repo: str | Path, files: Sequence[str | Path]) -> list[str]:
    """``git -C <repo> add --intent-to-add -- <files>``: makes new files visible to ``nix`` flakes.

    Raises:
        InvalidSpec: no files given.
    """
    if not files:
        raise InvalidSpec("git add needs at least one file")
    return ["git", "-C", str(repo), "add", "--intent-to-add", "--", *map(str, files)]


def git_forget_argv(repo: str | Path, files: Sequence[str | Path]) -> list[str]:
    """``git -C <repo> rm --cached --quiet --ignore-unmatch -- <files>``: unlists removed files.

    A file git knows but that is gone from disk breaks flake evaluation in older Nix.

    Raises:
        InvalidSpec: no files given.
    """
    if not files:
        raise InvalidSpec("git rm needs at least one file")
    return ["git", "-C", str(repo), "rm", "--cached", "--quiet", "--ignore-unmatch", "--", *map(str, files)]


def git_status_argv(repo: str | Path) -> list[str]:
    """``git -C <repo> status --porcelain=v1 -z --untracked-files=no``: the tracked files with uncommitted
    changes, which a flake rebuild would apply (untracked files are invisible to flakes)."""
    return ["git", "-C", str(repo), "status", "--porcelain=v1", "-z", "--untracked-files=no"]
