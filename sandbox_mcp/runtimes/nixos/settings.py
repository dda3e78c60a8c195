"""The nixos runtime's settings: ``[runtimes.nixos]`` (old name: the ``[nixos]`` table, ``SANDBOX_MCP_NIXOS_*``,
which the NixOS module's daemon unit sets)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..base import RuntimeSettings

__all__ = ["NixosSettings"]


class NixosSettings(RuntimeSettings):
    """How the server drives a NixOS host (``mode = "nixos"``)."""

    section = "nixos"

    flake: str | None = Field(
        default=None,
        description="Flake directory holding the host configuration, e.g. /etc/nixos",
    )
    host: str | None = Field(default=None, description="nixosConfigurations attribute, e.g. 'fry'")
    escalation: Literal["doas", "sudo", "none"] = Field(
        default="sudo", description="How to run nixos-rebuild and systemctl as root"
    )
    registry_file: Path | None = Field(
        default=None,
        description="JSON file the module reads via sandboxed-workspace.registryFile; "
        "default <flake>/sandboxed-workspaces.json",
    )
    workspace_config_dir: Path | None = Field(
        default=None,
        description="Where per-workspace .nix files are written; default <flake>/workspaces",
    )
    rebuild_timeout_s: float = Field(default=3600, gt=0)
