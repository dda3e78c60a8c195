"""The exception family of sandbox-mcp.

Every error the package raises on purpose is a :class:`SandboxError`. Foreign
exceptions (asyncssh, pyroute2, subprocess, OS errors) are translated at the
layer where they arise, keeping the cause (``raise ... from exc``). The MCP
server turns a ``SandboxError`` into a ``ToolError`` whose message is the
error's ``str()``, so every message here is written for the agent that reads
it: what went wrong and what to do next.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AccessDenied",
    "BackendError",
    "CommandFailed",
    "CommandTimeout",
    "Conflict",
    "InvalidSpec",
    "InvalidState",
    "SandboxError",
    "SSHError",
    "Unsupported",
    "WorkspaceExists",
    "WorkspaceNotFound",
    "clip",
    "clip_repr",
]

# How much of a user's input an error message echoes back: enough to recognise it.
ECHO_LIMIT = 200


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to about ``limit`` characters, with a note of its full length when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters in all)"


def clip_repr(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters (a 1 MiB input is not echoed).

    The repr of a long string is built from its head only, so the cost does not grow with it.
    """
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'} in all)"
    return clip(repr(value), limit)


class SandboxError(Exception):
    """Root of every error sandbox-mcp raises deliberately."""


class InvalidSpec(SandboxError, ValueError):
    """Bad input: a name, IP, path, package or option that fails validation.

    Raised before anything is changed on the host.
    """


class WorkspaceNotFound(SandboxError, LookupError):
    """No workspace of that name is registered."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"workspace {clip_repr(name)} not found; call list_workspaces to see the existing workspaces"
        )


class WorkspaceExists(SandboxError):
    """A workspace of that name is already registered."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"workspace {name!r} already exists; use it (start_workspace), pick another name, "
            f"or destroy_workspace it first"
        )


class Conflict(SandboxError):
    """A resource the request asks for is taken (an IP address, a MAC, a vsock CID)."""


class AccessDenied(SandboxError, PermissionError):
    """The caller may not use the daemon (not root, not in its group)."""


class InvalidState(SandboxError):
    """The workspace is not in a state that allows the operation (e.g. exec on a stopped workspace)."""


class Unsupported(InvalidState):
    """The workspace's runtime cannot do that (e.g. pause in nixos mode); the message names what can."""


class BackendError(SandboxError):
    """The runtime (nspawn, qemu, incus, nixos-rebuild, netlink) failed."""


class CommandFailed(BackendError):
    """A host command exited non-zero.

    Keeps the evidence: the argv, the exit status and the tail of stderr.
    """

    def __init__(self, argv: Sequence[str], exit_status: int, stderr: str = "", hint: str = "") -> None:
        self.argv = tuple(argv)
        self.exit_status = exit_status
        self.stderr = stderr
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        msg = f"{argv[0] if argv else 'command'} exited with status {exit_status}"
        if tail:
            msg += f":\n{tail}"
        if hint:
            msg += f"\n{hint}"
        super().__init__(msg)


class CommandTimeout(BackendError, TimeoutError):
    """A host command or a wait (boot, SSH) took longer than allowed.

    Also a :class:`TimeoutError`, so generic timeout handlers catch it.
    """


class SSHError(BackendError):
    """The workspace's SSH server could not be reached or refused us."""
