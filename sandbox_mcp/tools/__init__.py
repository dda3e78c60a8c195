"""The MCP tools, grouped by concern; :func:`register` adds them all to a server, in the contract's order.

Each module has a ``register(mcp)``: ``lifecycle`` (create, start, stop, destroy, list, status),
``exec``, ``files`` (read, write, list a directory), ``logs``, ``git`` (a workspace's branch: diff, fetch),
``snapshots`` (pause, snapshot, restore, fork), ``processes`` (start_process and its siblings), ``ports``
(publish_port, unpublish_port), ``egress`` (set_egress). A new concern is a new module listed in ``GROUPS``; :mod:`.base` has
what every tool shares.
"""

from __future__ import annotations

from mcp.server.mcpserver import MCPServer

from . import egress, exec, files, git, lifecycle, logs, ports, processes, snapshots

__all__ = ["GROUPS", "register"]

GROUPS = (lifecycle, exec, files, logs, git, snapshots, processes, ports, egress)


def register(mcp: MCPServer) -> None:
    """Add every tool of the contract to ``mcp``."""
    for group in GROUPS:
        group.register(mcp)
