"""The ownership rules: whose workspace record and whose kept directory a host user may touch.

Below the manager and the provisioning of a workspace's directories, which both apply them;
:class:`~sandbox_mcp.owners.OwnedManager` is one user's view built on them.
"""

from __future__ import annotations

from pathlib import Path

from .errors import Conflict, WorkspaceNotFound
from .fsutil import atomic_write
from .models import WorkspaceRecord

__all__ = ["claim_dir", "owned"]

_OWNER_FILE = ".owner-uid"  # in <state>/<name>/ (root's): whose workspace the directory holds


def owned(record: WorkspaceRecord, owner_uid: int | None) -> WorkspaceRecord:
    """``record``, if ``owner_uid`` may see it (None: anyone may, as root).

    The manager checks the record it acts on, under the workspace's lock where the operation takes
    it, so a workspace destroyed and re-created by another user in between is never acted on.

    A warm pool's unclaimed slot is nobody's workspace: no one may see it.

    Raises:
        WorkspaceNotFound: it belongs to another user (indistinguishable from a missing one), or is a pool slot.
    """
    if record.pooled or (owner_uid is not None and record.owner_uid != owner_uid):
        raise WorkspaceNotFound(record.name)
    return record


def claim_dir(root: Path, name: str, owner_uid: int | None) -> None:
    """Mark ``root`` (a workspace's host directory) as ``owner_uid``'s, unless it is another user's.

    A workspace destroyed with keep_data leaves its directory (project files, host key) for the
    next create of that name: that must be its owner's (or root's), never another user's.

    Raises:
        Conflict: ``root`` holds another user's kept data.
    """
    marker = root / _OWNER_FILE
    try:
        previous: int | None = int(marker.read_text())
    except (FileNotFoundError, ValueError):
        previous = None  # new, or kept before owners were recorded
    if previous is not None and owner_uid not in (0, previous):
        raise Conflict(
            f"the data another user kept from an earlier workspace {name!r} is still on this host; "
            "pick another name (or ask an administrator to remove it)"
        )
    if owner_uid is not None and owner_uid != previous:
        atomic_write(marker, str(owner_uid), mode=0o644)
