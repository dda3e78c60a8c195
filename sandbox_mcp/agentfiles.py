"""Whose the agent's files are on the host: a uid of the workspace's own, readable and writable by its owner.

The workspace dir and the Claude config hold what the agent writes, running code nobody reviewed.
Were those files the owner's, everything on the host that trusts the owner's files would trust
them: ``git status`` there runs the ``core.fsmonitor`` or hooks the agent planted, as the owner.
So (``agent_files = "own-uid"``, the default for a root server) they belong to a uid of the
workspace's own (:func:`sandbox_mcp.naming.agent_uid_for`) and one group every workspace's files
share (``AGENT_GID``, no one's group). Every runtime's share maps the directory's owner on disk to
the workspace user, so that uid is the agent inside, whatever the type. Git refuses a repository
another uid owns (``safe.directory``), so the owner's git runs nothing of the agent's; a setuid bit
the agent sets makes a program setuid to that uid, which owns nothing but this workspace's files.

The owner keeps reading and editing them through POSIX ACLs on the two directories: a named entry
for the owner (and one for the agents' group, so that the agent can change what the owner saves
there) in the access ACL and in the default ACL every new file and directory inherits. With a
default ACL the kernel ignores the umask, so a file made with mode 0666 is the owner's to write
(0644-made ones to read): the agent may take the owner's access away from its own files (it owns
them), which hides them but gains it nothing. Nobody else on the host gets anything: no ``other``
access at the top, and the agents' group has none there either.

Data kept from before (a workspace dir the owner owns) stays as it was: its files are the owner's,
and changing the top would leave them unreachable inside.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

from .config import Settings
from .fsutil import own_dir
from .identity import host_identity
from .models import WorkspaceRecord
from .naming import AGENT_GID, agent_uid_for

__all__ = ["acl_xattr", "adopt", "files_identity", "own_uid", "prepare_share"]

# linux/posix_acl_xattr.h: a version header, then (tag u16, perm u16, id u32) entries sorted by tag, id.
_VERSION = 2
_USER_OBJ, _USER, _GROUP_OBJ, _GROUP, _MASK, _OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_NO_ID = 0xFFFFFFFF
_ACCESS, _DEFAULT = "system.posix_acl_access", "system.posix_acl_default"


def own_uid(settings: Settings, record: WorkspaceRecord) -> bool:
    """Whether ``record``'s files get a uid of their own: asked for, and a server that can chown (root)
    and makes the shares itself (not the NixOS module's, whose setup unit owns them)."""
    return settings.agent_files == "own-uid" and os.geteuid() == 0 and record.runtime != "nixos"


def files_identity(settings: Settings, record: WorkspaceRecord, workspace_dir: Path | None = None) -> tuple[int, int]:
    """The host uid and gid of the agent's files in ``record``'s shares: its own uid and the agents'
    group, or the owner's (:func:`sandbox_mcp.identity.host_identity`) where the setting, the server
    or kept data (``workspace_dir`` already the owner's) says so."""
    owner = host_identity(settings, record)
    if not own_uid(settings, record):
        return owner
    if workspace_dir is not None:
        try:
            if os.lstat(workspace_dir).st_uid == owner[0]:
                return owner  # kept from before: its files are the owner's
        except FileNotFoundError:
            pass
    return agent_uid_for(record.name), AGENT_GID


def acl_xattr(entries: Iterable[tuple[int, int, int]]) -> bytes:
    """The kernel's binary form of an ACL from (tag, perms, id) entries (sorted here)."""
    body = b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in sorted(entries))
    return struct.pack("<I", _VERSION) + body


def prepare_share(path: Path, agent: tuple[int, int], owner_uid: int) -> None:
    """Make ``path`` (the workspace dir, the Claude config) the agent's, with the owner's ACLs.

    ``agent`` is :func:`files_identity`'s answer: when it is the owner's own uid, the directory is
    simply theirs, 0700. Otherwise it is ``agent``'s, mode 0770 with the owner's named entry as the
    group class, and every new entry under it inherits the owner's and the agents' group's access.
    Blocking; root only.

    Raises:
        InvalidSpec: a symlink or a non-directory sits at ``path``.
    """
    uid, gid = agent
    if uid == owner_uid:
        own_dir(path, uid, gid, 0o700)
        return
    own_dir(path, uid, gid, None)
    rwx, rx = 7, 5
    access = [(_USER_OBJ, rwx, _NO_ID), (_USER, rwx, owner_uid), (_GROUP_OBJ, 0, _NO_ID),
              (_MASK, rwx, _NO_ID), (_OTHER, 0, _NO_ID)]  # fmt: skip
    default = [(_USER_OBJ, rwx, _NO_ID), (_USER, rwx, owner_uid), (_GROUP_OBJ, rwx, _NO_ID),
               (_GROUP, rwx, AGENT_GID), (_MASK, rwx, _NO_ID), (_OTHER, rx, _NO_ID)]  # fmt: skip
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:  # by descriptor: own_dir checked it is a directory, and a swap since cannot redirect this
        os.setxattr(fd, _ACCESS, acl_xattr(access))
        os.setxattr(fd, _DEFAULT, acl_xattr(default))
    finally:
        os.close(fd)


def adopt(trees: Iterable[Path], old_uid: int, new_uid: int) -> int:
    """Give a fork's copied files (``trees``) its own uid: entries of ``old_uid`` become ``new_uid``'s
    (the group and the owner's ACL entries are the same for both). Returns the entries changed. Blocking."""
    from .snapshots import shift_owners

    return shift_owners(trees, old_uid, new_uid, 1)
