"""The workspace lifecycle: create → start → stop → destroy, and everything done inside a running one.

The MCP tools and the CLI are thin layers over :class:`WorkspaceManager`. It owns
the registry, the SSH pool and the runtimes; it validates input before anything
changes, serialises operations on one workspace (across processes too), and
undoes a create or start that fails or is cancelled. One class, one part per module:

- :mod:`.core`: set-up, the registry's locks, the view tools return, SSH targets, the reconcile;
- :mod:`.lifecycle`: create (a boot, or a claim from the warm pool), start, stop, destroy, status;
- :mod:`.inside`: exec and the file tools;
- :mod:`.processes`: background processes;
- :mod:`.ports`: published ports;
- :mod:`.git`: a branch per workspace (diff, fetch);
- :mod:`.snapshots`: pause, snapshots, restores, forks;
- :mod:`.watchdog`: what running workspaces need put back when it goes (our firewall tables, the egress
  resolver, the secrets proxy).
"""

from __future__ import annotations

from .core import ManagerCore
from .git import GitOps
from .inside import InsideOps, parse_mode
from .lifecycle import LifecycleOps
from .ports import PortOps
from .processes import ProcessOps
from .snapshots import SnapshotOps

__all__ = ["WorkspaceManager", "parse_mode"]


class WorkspaceManager(LifecycleOps, InsideOps, ProcessOps, PortOps, GitOps, SnapshotOps, ManagerCore):
    """One per server process. Use as ``async with WorkspaceManager(settings) as m:``.

    The runtimes come from the registry in :mod:`sandbox_mcp.runtimes`, those of the configured
    mode; ``runtimes`` replaces them (tests pass a fake or a prepared one).
    """
