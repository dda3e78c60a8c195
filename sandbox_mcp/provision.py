"""A workspace's host side before it boots: its directories, pinned host key, authorized_keys, Claude config.

Everything here is on the host, under ``<state>/<name>/``, and survives stop (and destroy with
``keep_data``). The runtimes then share these directories with the workspace (see each runtime's mounts).
Blocking: the manager calls these from a worker thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

from . import agentfiles, claude_workspace, diskimage, ssh
from .config import Settings
from .fsutil import own_dir
from .identity import host_identity
from .models import WorkspaceRecord
from .ownership import claim_dir
from .paths import WorkspacePaths

__all__ = ["Provisioned", "prepare_state_dirs"]


class Provisioned(NamedTuple):
    """What provisioning made: the pinned host key and the host disk bound (None: none)."""

    fingerprint: str
    host_disk_mib: int | None


def prepare_state_dirs(settings: Settings, record: WorkspaceRecord, authorized: Sequence[str],
                       environment: Mapping[str, str] | None = None) -> Provisioned:
    """Make (or adopt, for kept data) the workspace's persistent directories and seed them.

    Root owns the workspace's own dirs: ``<state>/<name>`` 0711 (its owner passes through, nobody
    lists it), the host keys and runtime dirs 0755. The workspace dir and the Claude config hold the
    agent's files: a uid of the workspace's own, with ACLs for its owner
    (:func:`~sandbox_mcp.agentfiles.prepare_share`), or the owner's
    (:func:`~sandbox_mcp.identity.host_identity`) 0700; another local user reads nothing there, kept
    data included. The host key is made once and pinned; the Claude
    config is seeded as onboarding says, with the server's own Claude credentials only for a
    workspace without an owner (the daemon refuses ``copy_claude_credentials`` altogether: they
    would be root's). With ``limits.host_disk_mib`` (and a root server), ``<state>/<name>`` is first
    mounted from a disk image of that size (:mod:`sandbox_mcp.diskimage`), so all of this is on it; a
    kept image is mounted again whatever the settings say. ``environment`` (its secrets' placeholders, see
    sandbox_mcp.secrets) goes into that config too. Returns the host key's fingerprint and the bound applied.

    Raises:
        BackendError: the disk image cannot be made or mounted.
        Conflict: the directory is another user's kept data (see :func:`sandbox_mcp.ownership.claim_dir`).
        SSHError: the host key cannot be made.
        InvalidSpec: an ``authorized`` line is not one public key.
    """
    paths = WorkspacePaths.of(settings.state_dir, record.name)
    owner_uid = host_identity(settings, record)[0]
    paths.root.parent.mkdir(parents=True, exist_ok=True)
    # Not under the NixOS module: its units make and use these dirs at boot, before any server mounts.
    wanted = record.limits.host_disk_mib if record.limits is not None and record.runtime != "nixos" else None
    host_disk_mib = diskimage.ensure(settings.state_dir, record.name, wanted) if diskimage.unavailable() is None else None
    paths.root.mkdir(mode=0o711, parents=True, exist_ok=True)
    claim_dir(paths.root, record.name, record.owner_uid)  # kept data stays its owner's
    own_dir(paths.root, 0, 0, 0o711)
    for d in (paths.ssh_host_keys, paths.runtime):
        own_dir(d, 0, 0, 0o755)
    uid, gid = agentfiles.files_identity(settings, record, paths.workspace)
    agentfiles.prepare_share(paths.workspace, (uid, gid), owner_uid)
    fingerprint = ssh.ensure_host_key(paths.host_key)
    ssh.write_authorized_keys(paths.authorized_keys, authorized)
    credentials = claude_workspace.host_credentials_file(Path.home())
    claude_workspace.seed_claude_config(
        paths.claude_config,
        workspace_dir_inside=claude_workspace.workspace_dir_inside(record.user),
        uid=uid,
        gid=gid,
        copy_credentials_from=credentials if settings.copy_claude_credentials and record.owner_uid in (None, 0) else None,
    )
    claude_workspace.seed_environment(paths.claude_config, environment or {}, uid=uid, gid=gid)
    agentfiles.prepare_share(paths.claude_config, (uid, gid), owner_uid)  # after the seeding's 0700
    return Provisioned(fingerprint, host_disk_mib)

