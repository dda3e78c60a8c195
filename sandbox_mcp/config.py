"""Settings: defaults that work out of the box, a TOML file, and environment variables.

Precedence, lowest first: the defaults below, the TOML file
(``$SANDBOX_MCP_CONFIG`` or ``~/.config/sandbox-mcp/config.toml``), then
environment variables ``SANDBOX_MCP_<FIELD>`` (``SANDBOX_MCP_NIXOS_<FIELD>``
for the ``[nixos]`` table).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import InvalidSpec
from .models import MAX_CPUS, MIN_MEMORY_MIB, VM_MIN_MEMORY_MIB
from .secrets.settings import SECRET_NAME_PATTERN, SecretSpec, SecretsProxySettings

__all__ = ["IncusSettings", "NixosSettings", "Settings", "load_settings"]

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


class IncusSettings(BaseModel):
    """Where ``type="incus"`` workspaces run: the local daemon (default) or a remote server/cluster."""

    model_config = ConfigDict(extra="forbid")

    url: str | None = Field(
        default=None,
        pattern=r"^https://[A-Za-z0-9.:\[\]-]+(:[0-9]{1,5})?/?$",
        description="A remote Incus server or cluster, e.g. https://incus.example:8443; empty: the local unix socket",
    )
    socket: Path = Field(
        default=Path("/var/lib/incus/unix.socket"), description="The local daemon's unix socket (url unset)"
    )
    client_cert: Path | None = Field(default=None, description="PEM client certificate the remote trusts")
    client_key: Path | None = Field(default=None, description="PEM key of client_cert")
    server_cert: Path | None = Field(
        default=None, description="PEM certificate of the remote server, pinned: no other is accepted"
    )
    project: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
    storage_pool: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    network: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$",
        description="A managed Incus network for the NIC (remote servers); empty: bridge to 'bridge' by name",
    )
    operation_timeout_s: float = Field(default=300, gt=0, description="How long to wait for an Incus operation")

    @model_validator(mode="after")
    def _remote_needs_certs(self) -> IncusSettings:
        if self.url and not (self.client_cert and self.client_key and self.server_cert):
            raise ValueError("incus.url needs incus.client_cert, incus.client_key and incus.server_cert")
        return self


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
    cpus: float = Field(default=2.0, gt=0, le=MAX_CPUS, description="Default CPUs of a new workspace")
    memory_mib: int = Field(default=2048, ge=MIN_MEMORY_MIB, description="Default memory of a new workspace, MiB")
    tasks_max: int = Field(default=4096, ge=64, description="Processes + threads one workspace may run")
    root_layer_mib: int = Field(
        default=4096, ge=64, description="Size bound of a container's writable root layer (a tmpfs, so at most half "
        "the workspace's memory_mib) and of an Incus instance's root disk, MiB"
    )
    console_log_mib: int = Field(
        default=16, ge=1, description="Size bound of a workspace's console log: its first MiB are kept, the rest "
        "is dropped by a copier process (containers and VMs alike); nothing limits the workspace for it"
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
    cgroups: Literal["auto", "systemd", "direct"] = Field(
        default="auto",
        description="Who makes a container's cgroup: 'systemd' starts it in a delegated transient scope (needs "
        "systemd as PID 1), 'direct' has the server write the cgroup tree itself, 'auto' picks systemd where "
        "/run/systemd/system exists",
    )
    exec_output_cap: int = Field(
        default=1 << 20, ge=1024, description="Most bytes kept per stream per exec (its head and tail); the result "
        "budget usually keeps less"
    )
    exec_save_mib: int = Field(
        default=64, ge=0, le=1 << 14, description="An exec stream cut to fit a result is saved whole in the "
        "workspace (.sandbox-mcp/exec/) up to this many MiB; 0 saves nothing"
    )
    process_output_cap: int = Field(
        default=1 << 20,
        ge=64 << 10,
        le=64 << 20,
        description="Bytes of output (both streams) kept per process started with start_process, inside the "
        "workspace; older output is dropped first. The workspace's disk holds twice this per process",
    )
    read_limit_max: int = Field(default=4 << 20, ge=1024, description="Largest read_file limit")
    result_budget_bytes: int = Field(
        default=60_000, ge=8192, le=64 << 20, description="Largest tool result on the wire (its JSON-RPC message, "
        "structured and text copies together): longer output is cut, saying how to get the rest. The default "
        "keeps Claude Code's limit (25,000 tokens, MAX_MCP_OUTPUT_TOKENS) far off"
    )
    write_max: int = Field(default=64 << 20, ge=1024, description="Largest write_file payload (decoded)")
    git_fetch_max_bytes: int = Field(
        default=2 << 30, ge=1024,
        description="Largest git pack fetch_workspace (and `sandbox-mcp git NAME fetch`) accepts from a workspace, "
        "bytes; past it the fetch stops and nothing is written to the host repository's refs",
    )
    git_patch_max_bytes: int = Field(
        default=256 << 10, ge=1024, description="Largest patch workspace_diff returns (the rest is cut, truncated=true)"
    )
    git_timeout_s: float = Field(
        default=600, gt=0, description="How long one clone into, or fetch from, a workspace may take, seconds"
    )
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
    vm_memory_mib: int = Field(default=2048, ge=VM_MIN_MEMORY_MIB, le=1 << 20, description="Memory of a direct-mode VM")
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
    egress_max_connections: int = Field(
        default=512, ge=1, le=1 << 20,
        description="Connections one workspace with egress may have open at once (new ones past it are dropped), "
        "so one workspace cannot fill the host's connection tracking table",
    )
    uid_max_workspaces: int = Field(
        default=10, ge=1, description="Workspaces one user may have at once through the daemon (root: no limit)"
    )
    uid_max_cpus: float | None = Field(
        default=None, gt=0,
        description="Sum of the cpus of one user's workspaces through the daemon; default: 4 x the host's CPUs",
    )
    uid_max_memory_mib: int | None = Field(
        default=None, ge=128,
        description="Sum of the memory_mib of one user's workspaces through the daemon; default: twice the host's "
        "memory (memory limits are caps, not reservations)",
    )
    uid_max_connections: int = Field(
        default=16, ge=1, description="Connections one user may hold open to the daemon at once (root: no limit)"
    )
    uid_max_calls: int = Field(
        default=32, ge=1, description="Tool calls one user may have running in the daemon at once (root: no limit)"
    )
    daemon_line_kib: int = Field(
        default=1024, ge=64, le=1 << 20,
        description="Bytes of one message the daemon buffers per connection without a large-message slot (KiB). "
        "Longer ones (a big write_file) wait for one of daemon_large_messages slots, one per user at a time",
    )
    daemon_large_messages: int = Field(
        default=2, ge=1, le=64,
        description="Messages longer than daemon_line_kib the daemon receives at once (each up to the largest "
        "write_file payload), so its memory stays bounded whatever its clients send",
    )
    image_variants_max: int = Field(
        default=24, ge=1,
        description="Package sets with a cached image of their own; a create asking for a new one past this is "
        "refused until an administrator prunes (`sandbox-mcp image prune`)",
    )
    http_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the HTTP transport requires; unset: one generated into "
        "<state>/.server/http-token on first start (needed explicitly for a non-loopback --host)",
    )
    daemon_socket: Path = Field(
        default=Path("/run/sandbox-mcp/daemon.sock"),
        description="Unix socket of the root daemon (`sandbox-mcp daemon`); serve and the CLI use it when it exists",
    )
    use_daemon: bool = Field(
        default=True, description="serve and the CLI go through the daemon when its socket exists (refusing settings "
        "it would ignore); false (or --no-daemon) works in process, as root"
    )
    daemon_group: str = Field(
        default="sandbox-mcp",
        pattern=r"^[a-z_][a-z0-9_-]{0,31}$",
        description="Group whose members may use the daemon's socket (besides root)",
    )
    runtime_for_type: dict[str, str] = Field(
        default_factory=dict,
        description="Which runtime serves a workspace type where more than one of this mode claims it, e.g. "
        "{vm = \"qemu\"} (a TOML table; in the environment, JSON). Two runtimes claiming a type without it "
        "stop the server at start-up",
    )
    secrets: dict[str, SecretSpec] = Field(
        default_factory=dict,
        description="Secrets workspaces may use without reading them ([secrets.NAME] tables; in the environment, "
        "SANDBOX_MCP_SECRETS as JSON): see sandbox_mcp.secrets.settings.SecretSpec and the README's Secrets section",
    )
    secrets_proxy: SecretsProxySettings = Field(default_factory=SecretsProxySettings)
    nixos: NixosSettings = Field(default_factory=NixosSettings)
    incus: IncusSettings = Field(default_factory=IncusSettings)

    @field_validator("http_token", mode="before")
    @classmethod
    def _token_or_none(cls, v: object) -> object:
        return None if v in ("", None) else v

    @field_validator("http_token")
    @classmethod
    def _strong_token(cls, v: SecretStr | None) -> SecretStr | None:
        # A header value: printable ASCII without spaces, and long enough not to be guessed.
        if v is not None:
            token = v.get_secret_value()
            if len(token) < 16 or not all(33 <= ord(c) < 127 for c in token):
                raise ValueError("http_token must be at least 16 printable ASCII characters without spaces")
        return v

    @field_validator("runtime_for_type", mode="before")
    @classmethod
    def _json_table(cls, v: object) -> object:
        if isinstance(v, str):  # from the environment
            try:
                return json.loads(v) if v.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"runtime_for_type must be a JSON object such as {{\"vm\": \"qemu\"}}: {exc}") from exc
        return v

    @field_validator("secrets", mode="before")
    @classmethod
    def _secrets_json(cls, v: object) -> object:
        if isinstance(v, str):  # from the environment
            try:
                return json.loads(v) if v.strip() else {}
            except json.JSONDecodeError as exc:
                raise ValueError(f"secrets must be a JSON object of secret tables: {exc}") from exc
        return v

    @field_validator("secrets")
    @classmethod
    def _secret_names(cls, v: dict[str, SecretSpec]) -> dict[str, SecretSpec]:
        bad = [n for n in v if not re.fullmatch(SECRET_NAME_PATTERN, n)]
        if bad:
            raise ValueError(f"secret names must match {SECRET_NAME_PATTERN}: {bad}")
        return v

    @field_validator("state_dir", "image_dir", "daemon_socket")
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


_TABLES = ("nixos", "incus", "secrets_proxy")  # [table] in the TOML file, SANDBOX_MCP_<TABLE>_<FIELD> in the environment


def _env_overrides(env: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    tables: dict[str, dict[str, object]] = {t: {} for t in _TABLES}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        field = key[len(ENV_PREFIX) :].lower()
        table = next((t for t in _TABLES if field.startswith(t + "_")), None)
        if table is not None:
            tables[table][field[len(table) + 1 :]] = value
        elif field in Settings.model_fields and field not in _TABLES:
            out[field] = value
    out.update({t: v for t, v in tables.items() if v})
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
    for table in _TABLES:
        merged = {**dict(data.get(table, {}) or {}), **dict(overrides.pop(table, {}) or {})}  # type: ignore[arg-type]
        if merged:
            data[table] = merged
    data.update(overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise InvalidSpec(f"invalid sandbox-mcp settings ({path} / {ENV_PREFIX}* variables): {exc}") from exc
