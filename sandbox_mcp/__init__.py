"""sandbox-mcp: disposable, isolated workspaces for AI coding agents, over MCP."""

from .config import Settings, load_settings
from .errors import (
    BackendError,
    CommandFailed,
    CommandTimeout,
    Conflict,
    InvalidSpec,
    InvalidState,
    SandboxError,
    SSHError,
    WorkspaceExists,
    WorkspaceNotFound,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "CommandFailed",
    "CommandTimeout",
    "Conflict",
    "InvalidSpec",
    "InvalidState",
    "SSHError",
    "SandboxError",
    "Settings",
    "WorkspaceExists",
    "WorkspaceNotFound",
    "__version__",
    "load_settings",
]
