"""Settings: defaults that work out of the box, a TOML file, and environment variables.

Precedence, lowest first: the defaults below, the TOML file
(``$SANDBOX_MCP_CONFIG`` or ``~/.config/sandbox-mcp/config.toml``), then
environment variables ``SANDBOX_MCP_<FIELD>`` (``SANDBOX_MCP_NIXOS_<FIELD>``
for the ``[nixos]`` table).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import InvalidSpec

__all__ = ["NixosSettings", "Settings", "load_settings"]

ENV_PREFIX = "SANDBOX_MCP_"
DEFAULT_CONFIG_FILE = Path("~/.config/sandbox-mcp/config.toml")


class NixosSettings(BaseModel):
    """How the server drives a NixOS host (``mode = "nixos"``)."""

    model_config = ConfigDict(extra="forbid")

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


class Settings(BaseModel):
    """Everything the server can be told. Every field has a default that works."""

    model_config = ConfigDict(extra="forbid", validate_default=True)  # defaults get expanded too

    mode: Literal["auto", "direct", "nixos"] = Field(
        default="auto",
        description="'direct' runs systemd-nspawn itself; 'nixos' writes the module's registry and rebuilds; "
        "'auto' picks nixos on a NixOS host whose flake and host are configured, else direct",
    )
    state_dir: Path = Field(default=Path("~/sandboxed"), description="Per-workspace state and the registry")
    image_dir: Path = Field(
        default=Path("/var/cache/sandbox-mcp/images"), description="Cached root images (direct mode)"
    )
    bridge: str = Field(default="sandbox-br", pattern=r"^[A-Za-z0-9_.-]{1,15}$")
    subnet: ipaddress.IPv4Network = Field(default=ipaddress.IPv4Network("192.168.83.0/24"))
    user: str = Field(default="agent", pattern=r"^[a-z_][a-z0-9_-]{0,31}$", description="The workspace user")
    user_uid: int = Field(default=1000, ge=1000, le=60000)
    debian_suite: str | None = Field(
        default=None, pattern=r"^[a-z]+$", description="Debian suite of the root image; default: the host's"
    )
    debian_mirror: str | None = Field(
        default=None, description="Debian mirror for debootstrap; default: the host's apt source"
    )
    cpus: float = Field(default=2.0, gt=0, le=1024, description="Default CPUs of a new workspace")
    memory_mib: int = Field(default=2048, ge=128, description="Default memory of a new workspace, MiB")
    tasks_max: int = Field(default=4096, ge=64, description="Processes + threads one workspace may run")
    root_layer_mib: int = Field(
        default=4096, ge=64, description="Size bound of a container's writable root layer (a tmpfs), MiB"
    )
    console_log_mib: int = Field(
        default=16, ge=1, description="Size bound of a container's console log; a flood past it stops the container"
    )
    private_users: bool = Field(
        default=True,
        description="Run containers in a user namespace (root inside is an unprivileged uid on the host); "
        "false asks for privileged containers, which also needs allow_privileged",
    )
    allow_privileged: bool = Field(
        default=False,
        description="Allow privileged containers (root inside is root on the host) where user-namespaced ones "
        "cannot run or private_users is false",
    )
    exec_output_cap: int = Field(default=1 << 20, ge=1024, description="Bytes kept per stream per exec")
    read_limit_max: int = Field(default=4 << 20, ge=1024, description="Largest read_file limit")
    write_max: int = Field(default=64 << 20, ge=1024, description="Largest write_file payload (decoded)")
    boot_timeout_s: float = Field(default=90, gt=0, description="How long to wait for SSH after boot")
    stop_timeout_s: float = Field(
        default=3,
        gt=0,
        description="How long a workspace gets to power off cleanly before it is killed. Its root is thrown "
        "away and the workspace dir is on the host, so a kill loses nothing that was written",
    )
    vm_cpus: int = Field(
        default_factory=lambda: max(1, min(os.cpu_count() or 1, 8)),
        ge=1, le=64, description="vCPUs of a direct-mode VM (type 'vm'); default: the host's CPUs, at most 8",
    )
    vm_memory_mib: int = Field(default=2048, ge=256, le=1 << 20, description="Memory of a direct-mode VM")
    vm_disk_gib: int = Field(
        default=8, ge=2, le=1024, description="Size of a VM's root disk, which bounds its throw-away writable layer"
    )
    vm_accelerator: Literal["auto", "kvm", "tcg"] = Field(
        default="auto",
        description="How VMs run: 'kvm' (hardware), 'tcg' (software emulation, slow) or 'auto' (KVM when a probe "
        "shows it boots a guest, else TCG)",
    )
    nat: bool = Field(
        default=False,
        description="Give direct-mode workspaces outbound access: IP forwarding plus an nftables masquerade "
        "table for the subnet (host-wide changes, hence opt-in)",
    )
    hosts_file: Path | None = Field(
        default=Path("/etc/hosts"),
        description="Where 'workspace-NAME' host names are kept (direct mode); empty to leave it alone",
    )
    copy_claude_credentials: bool = Field(
        default=False, description="Copy the host user's Claude credentials into new workspaces"
    )
    nixos: NixosSettings = Field(default_factory=NixosSettings)

    @field_validator("state_dir", "image_dir")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("hosts_file", mode="before")
    @classmethod
    def _optional_path(cls, v: object) -> object:
        return None if v in ("", "none", None) else v

    @model_validator(mode="after")
    def _subnet_has_room(self) -> Settings:
        if self.subnet.num_addresses < 16:
            raise ValueError(f"subnet {self.subnet} is too small; use a /28 or larger")
        return self

    @property
    def host_ip(self) -> ipaddress.IPv4Address:
        """The host's address on the bridge: the subnet's first host address."""
        return self.subnet.network_address + 1

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.json"


def _env_overrides(env: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    nixos: dict[str, object] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        field = key[len(ENV_PREFIX) :].lower()
        if field.startswith("nixos_"):
            nixos[field[len("nixos_") :]] = value
        elif field in Settings.model_fields and field != "nixos":
            out[field] = value
    if nixos:
        out["nixos"] = nixos
    return out


def load_settings(env: Mapping[str, str] | None = None, config_file: Path | None = None) -> Settings:
    """Build the settings from the TOML file and the environment.

    Raises:
        InvalidSpec: the file or a variable holds a value that fails validation
            (the message names it).
    """
    env = os.environ if env is None else env
    path = config_file or Path(env.get(ENV_PREFIX + "CONFIG", str(DEFAULT_CONFIG_FILE))).expanduser()
    data: dict[str, object] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidSpec(f"config file {path} is not valid TOML: {exc}") from exc
    overrides = _env_overrides(env)
    nixos = {**dict(data.get("nixos", {}) or {}), **dict(overrides.pop("nixos", {}) or {})}  # type: ignore[arg-type]
    data.update(overrides)
    if nixos:
        data["nixos"] = nixos
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise InvalidSpec(f"invalid sandbox-mcp settings ({path} / {ENV_PREFIX}* variables): {exc}") from exc
