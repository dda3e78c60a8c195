"""Where a workspace's state lives on the host (``<state>/<name>/...``), and fixed paths inside it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["AGENT_LISTEN_PATH", "EXEC_AGENT_PATH", "WorkspacePaths"]

# Where image recipes install sandbox_mcp/exec_agent.py. Absolute: starting the agent involves no
# PATH lookup in the workspace user's environment.
EXEC_AGENT_PATH = "/usr/local/libexec/sandbox-mcp/exec-agent"
# Where the agent an image starts at boot waits for the server's first connection (exec_agent.LISTEN_PATH).
AGENT_LISTEN_PATH = "/run/sandbox-mcp-agent/agent.sock"


@dataclass(frozen=True)
class WorkspacePaths:
    """The host-side directories of one workspace.

    ``workspace``, ``ssh_host_keys`` and ``claude_config`` are the persistent,
    user-visible parts; ``runtime`` holds what a runtime regenerates (console log).
    """

    root: Path

    @classmethod
    def of(cls, state_dir: Path, name: str) -> WorkspacePaths:
        return cls(state_dir / name)

    @property
    def workspace(self) -> Path:
        return self.root / "workspace"

    @property
    def ssh_host_keys(self) -> Path:
        return self.root / "ssh-host-keys"

    @property
    def host_key(self) -> Path:
        return self.ssh_host_keys / "ssh_host_ed25519_key"

    @property
    def authorized_keys(self) -> Path:
        return self.ssh_host_keys / "authorized_keys"

    @property
    def claude_config(self) -> Path:
        return self.root / "claude-config"

    @property
    def root_layer(self) -> Path:
        """The writable root a start begins from, when a restore or fork left one (else the image's clean root)."""
        return self.root / "root-layer"

    @property
    def snapshots(self) -> Path:
        return self.root / "snapshots"

    @property
    def runtime(self) -> Path:
        return self.root / "runtime"

    @property
    def console_log(self) -> Path:
        return self.runtime / "console.log"
