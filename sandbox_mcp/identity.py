"""Whose a workspace is on the host: the uid and gid its shared files belong to.

One answer used by every place that gives the host owner something: the workspace dir and the
Claude config are made theirs (:mod:`.provision`), the shares map exactly that identity to the
workspace user inside (containers, VMs, Incus), and the firewall lets that uid (besides root)
connect to the workspace (:mod:`.hostnet.firewall`).
"""

from __future__ import annotations

import pwd

from .config import Settings
from .models import WorkspaceRecord

__all__ = ["host_identity"]


def host_identity(settings: Settings, record: WorkspaceRecord) -> tuple[int, int]:
    """The host uid and gid a workspace's files belong to: its owner's (their primary group), or, for a
    workspace without one (the server in process, or root through the daemon), ``user_uid``'s.

    The shares map exactly this identity to the workspace user, so what the agent writes is the
    owner's, and only the owner (besides root) may connect to the workspace (see the firewall).
    """
    uid = record.owner_uid
    if uid in (None, 0):
        return settings.user_uid, settings.user_uid
    try:
        return uid, pwd.getpwuid(uid).pw_gid
    except KeyError:  # a uid without a passwd entry (a container's, a removed user's): a group of its own id
        return uid, uid
