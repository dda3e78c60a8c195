"""Whether ``serve`` and the CLI go through the daemon, and never with settings it would ignore.

Through the daemon, the daemon's own settings decide where workspaces live and how (state dir,
bridge, subnet, mode, limits, result budget, ...); those given to ``serve`` or the CLI would be
silently ignored. So when any of them was given explicitly (an ``SANDBOX_MCP_*`` variable or a
key in the config file) and a daemon socket exists, this refuses, naming the socket and the
settings, and how to run in process instead (``--no-daemon`` or ``SANDBOX_MCP_USE_DAEMON=false``,
as root). Only the settings that say how to reach the daemon belong to its clients.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
from pathlib import Path

from .config import ENV_PREFIX, Settings
from .errors import AccessDenied, BackendError, InvalidState, SandboxError

__all__ = [
    "CLIENT_FIELDS",
    "connect_error",
    "daemon_socket_present",
    "ignored_settings",
    "use_daemon",
    "where_serve_goes",
]

# Settings a client of the daemon uses itself; every other one is the daemon's to decide.
CLIENT_FIELDS = frozenset({"daemon_socket", "daemon_group", "use_daemon", "http_token"})


def daemon_socket_present(settings: Settings) -> bool:
    """True when something is at the daemon socket path (whether it answers is for connect to say)."""
    try:
        return settings.daemon_socket.is_socket()
    except OSError:
        return False


def ignored_settings(settings: Settings) -> list[str]:
    """The settings given explicitly (environment or config file) that a daemon would ignore, as
    their ``SANDBOX_MCP_*`` names."""
    named = [ENV_PREFIX + f.upper() for f in settings.model_fields_set - CLIENT_FIELDS - {"runtimes"}]
    named += [f"{ENV_PREFIX}RUNTIMES_{name.upper()}_{field.upper()}"
              for name, section in settings.runtimes.items() for field in section]  # fmt: skip
    return sorted(named)


def use_daemon(settings: Settings) -> bool:
    """Whether to go through the daemon: when its socket exists and ``use_daemon`` is on; else root
    works in process.

    Raises:
        InvalidState: a daemon is there but settings it would ignore were given (the message names
            them, the socket, and how to run in process); or no daemon and not root.
    """
    if settings.use_daemon and daemon_socket_present(settings):
        ignored = ignored_settings(settings)
        if ignored:
            raise InvalidState(
                f"a sandbox-mcp daemon is at {settings.daemon_socket}, and through it its own settings apply, "
                f"so {', '.join(ignored)} (set here, in the environment or the config file) would be ignored. "
                "Unset them to use the daemon, or work in process with them (as root): pass --no-daemon or set "
                "SANDBOX_MCP_USE_DAEMON=false"
            )
        return True
    if os.geteuid() == 0:
        return False
    if not settings.use_daemon:
        raise InvalidState("SANDBOX_MCP_USE_DAEMON=false (or --no-daemon) works in process, which needs root")
    raise InvalidState(
        f"no sandbox-mcp daemon at {settings.daemon_socket}, and without it this needs root. Start the daemon "
        "(`sudo systemctl start sandbox-mcp`, or `sudo scripts/serve --daemon`), or set SANDBOX_MCP_DAEMON_SOCKET"
    )


def where_serve_goes(settings: Settings) -> str:
    """One line saying where ``serve`` would send its calls (for doctor and serve's stderr)."""
    if not settings.use_daemon:
        return "in process (use_daemon is off): this user's settings apply; needs root"
    if daemon_socket_present(settings):
        return f"through the daemon at {settings.daemon_socket}: the daemon's settings apply"
    return f"in process (no daemon at {settings.daemon_socket}): this user's settings apply; needs root"


def connect_error(path: Path, exc: OSError, group: str) -> SandboxError:
    """The error (with what to do) for a failed connect to the daemon socket.

    The group named is the socket's own (what the kernel checked), ``group`` only if that is unknown.
    """
    if isinstance(exc, PermissionError) or exc.errno in (errno.EACCES, errno.EPERM):
        with contextlib.suppress(OSError, KeyError):
            group = grp.getgrgid(path.stat().st_gid).gr_name
        return AccessDenied(
            f"permission denied on the sandbox-mcp daemon socket {path}: only root and members of group "
            f"{group!r} may use it. Ask an administrator to run `usermod -aG {group} <your user>`, then log in again"
        )
    return BackendError(
        f"cannot reach the sandbox-mcp daemon at {path} ({exc.strerror or exc}); start it "
        "(`sudo systemctl start sandbox-mcp`, or `sudo scripts/serve --daemon`) and call again"
    )
