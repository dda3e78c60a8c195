"""asyncssh's and the socket layer's exceptions, translated into :mod:`sandbox_mcp.errors`.

Every message names the workspace and says what to do next; user input in it is clipped.
"""

from __future__ import annotations

import posixpath
import shlex

import asyncssh

from ..errors import CommandTimeout, InvalidSpec, SSHError, clip
from .agent import AgentFault
from .commands import SSHTarget
from .keys import host_key_fingerprint

__all__ = [
    "CONN_ERRORS",
    "agent_error",
    "connect_error",
    "describe",
    "file_error",
    "host_key_mismatch",
    "is_conn_error",
    "lost_error",
    "sftp_timeout_error",
]

# Errors that mean the connection (or, for the SFTP ones, the SFTP channel) is gone, as opposed
# to a refused request.
CONN_ERRORS: tuple[type[BaseException], ...] = (
    asyncssh.ConnectionLost,
    asyncssh.DisconnectError,
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    OSError,
    TimeoutError,
)


def describe(exc: BaseException) -> str:
    """A short text for an exception, for the end of an error message."""
    if isinstance(exc, asyncssh.DisconnectError):
        return f"{type(exc).__name__}: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def is_conn_error(exc: BaseException) -> bool:
    """True when ``exc`` means the connection or channel broke (not that a request was refused)."""
    return isinstance(exc, CONN_ERRORS)


def host_key_mismatch(target: SSHTarget, exc: BaseException) -> SSHError:
    """The error for a host key other than the pinned one."""
    try:
        pinned = host_key_fingerprint(target.host_key_path)
    except SSHError:
        pinned = "?"
    return SSHError(
        f"the SSH host key of {target.host}:{target.port} does not match the pinned key of workspace "
        f"{target.key!r} ({pinned}, {target.host_key_path}); the address may belong to another machine, "
        f"or the workspace's sshd is not using the key generated for it. Restart the workspace "
        f"(stop_workspace, start_workspace); do not trust the new key blindly ({describe(exc)})"
    )


def connect_error(target: SSHTarget, exc: BaseException) -> SSHError:
    """The error for a connection attempt that failed with ``exc``."""
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return host_key_mismatch(target, exc)
    if isinstance(exc, asyncssh.PermissionDenied):
        return SSHError(
            f"SSH login to {target.where} (workspace {target.key!r}) was refused: the server's client key "
            f"{target.client_key_path} is not in the workspace user's authorized_keys ({describe(exc)})"
        )
    return SSHError(
        f"cannot reach SSH on {target.where} (workspace {target.key!r}): {describe(exc)}; "
        f"is the workspace running? (workspace_status)"
    )


def lost_error(target: SSHTarget, what: str, exc: BaseException) -> SSHError:
    """The error for a connection that broke during ``what``."""
    return SSHError(f"SSH connection to workspace {target.key!r} ({target.where}) broke during {what}: "
                    f"{describe(exc)}")


def file_error(target: SSHTarget, path: str, exc: asyncssh.SFTPError, doing: str) -> InvalidSpec:
    """The error for an SFTP request on ``path`` that the server refused (no such file, permission, ...)."""
    shown = clip(path)
    parent = clip(posixpath.dirname(path) or "/")
    if isinstance(exc, asyncssh.SFTPNoSuchFile | asyncssh.SFTPNoSuchPath):
        msg = f"{shown}: no such file or directory; call list_dir on {parent} to see what exists"
    elif isinstance(exc, asyncssh.SFTPPermissionDenied):
        msg = (f"{shown}: permission denied for user {target.user}; use exec with sudo/doas "
               f"(for example `sudo cat {clip(shlex.quote(path))}`) or pick a path the user owns")
    elif isinstance(exc, asyncssh.SFTPFileIsADirectory):
        msg = f"{shown} is a directory; call list_dir for directories"
    elif isinstance(exc, asyncssh.SFTPNotADirectory):
        msg = f"a component of {shown} is not a directory; call list_dir on {parent}"
    elif isinstance(exc, asyncssh.SFTPNoSpaceOnFilesystem | asyncssh.SFTPQuotaExceeded):
        msg = f"{shown}: no space left in the workspace; delete files (exec `df -h`, `du`) and retry"
    else:
        msg = f"{shown}: {clip(exc.reason or type(exc).__name__)}"
    return InvalidSpec(f"cannot {doing} {msg}")


def agent_error(target: SSHTarget, exc: BaseException) -> SSHError:
    """The error for an exec agent that broke the protocol (AgentFault) or exited mid-command (AgentGone)."""
    if isinstance(exc, AgentFault):
        return SSHError(
            f"the exec agent in workspace {target.key!r} broke the protocol: {exc}. The SSH connection was "
            f"dropped; the command's outcome is unknown. If this repeats, restart the workspace "
            f"(stop_workspace, start_workspace)"
        )
    return SSHError(f"the exec agent in workspace {target.key!r} exited during a command (its outcome is "
                    f"unknown): {clip(str(exc))}")


def sftp_timeout_error(target: SSHTarget, what: str, path: str, timeout_s: float) -> CommandTimeout:
    """The error for an SFTP call that did not finish in time (its channel has been replaced)."""
    return CommandTimeout(
        f"SFTP {what} of {clip(path)} in workspace {target.key!r} did not finish within {timeout_s:g} s (a "
        f"special file or a hung filesystem?); that SFTP channel was closed and the next file call opens a "
        f"new one. Look at the path with exec (ls -l)"
    )
