"""A runtime from outside sandbox_mcp that brings a workspace type of its own, ``"box"``.

It is what tests/test_runtimes_registry.py adds to prove that a new runtime, with a new type,
needs no edit inside sandbox_mcp: its class, registered under its name (here by
``sandbox_mcp.runtimes.register``; a separate distribution would use the
``sandbox_mcp.runtimes`` entry-point group). It boots its boxes the nspawn way (it is a subclass),
so the test can drive a real one through the MCP client.
"""

from __future__ import annotations

from typing import ClassVar

from sandbox_mcp.runtimes.nspawn import NspawnRuntime

__all__ = ["BoxRuntime"]


class BoxRuntime(NspawnRuntime):
    """Workspaces of type ``"box"``: nspawn containers under another name."""

    name = "boxes"
    types: ClassVar = frozenset({"box"})
