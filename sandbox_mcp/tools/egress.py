"""A workspace's network policy at run time: set_egress (see :mod:`sandbox_mcp.egress`)."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from ..egress import Egress
from ..models import Name, Workspace
from .base import ToolContext, tool, workspaces

__all__ = ["register"]


def register(mcp: MCPServer) -> None:
    """Add this module's tools to ``mcp``."""

    @tool(mcp, title="Set a workspace's network access", idempotent=True)
    async def set_egress(
        ctx: ToolContext,
        name: Name,
        egress: Annotated[
            Egress,
            Field(
                description="'none' (reaches nothing), 'internet' (NAT to the outside, never private ranges or the "
                "host), or a list of domain names it may reach: exact ('pypi.org') or '*.' wildcards "
                "('*.githubusercontent.com': every name below it, not the name itself)",
                examples=["none", "internet", ["pypi.org", "files.pythonhosted.org"]],
            ),
        ],
    ) -> Workspace:
        """Change what a workspace may reach on the network, at once: no restart, its processes and files stay.

        With a domain list the workspace's DNS goes to the host's resolver, which answers only for the listed
        names (and CNAME chains that end in listed names); every other name is NXDOMAIN, and every address
        not handed out by it (for the record's TTL) is unreachable, whatever the protocol. Private ranges,
        link-local and the host stay closed whatever the list says. Narrowing the policy cuts the workspace's
        open connections; adding names to a list keeps them. A stopped workspace gets the policy at its next
        start. Returns the workspace with its new egress.

        A CDN alias: when 'pypi.org' answers with a CNAME to 'x.fastly.net', add '*.fastly.net' too (the
        chain must end in a listed name). Errors: NAT off on the host -> only 'none' works here, ask the user;
        a malformed name -> the message says which.
        """
        return await workspaces(ctx).set_egress(name, egress)
