"""Settings: defaults that work out of the box, a TOML file, and environment variables.

Precedence, lowest first: the defaults below, the TOML file
(``$SANDBOX_MCP_CONFIG`` or ``~/.config/sandbox-mcp/config.toml``), then
environment variables ``SANDBOX_MCP_<FIELD>``.

Each runtime has a section of its own, ``[runtimes.NAME]`` in the file and
``SANDBOX_MCP_RUNTIMES_<NAME>_<FIELD>`` in the environment, which that runtime's settings model
(``Runtime.Config``) validates when the runtimes are built: the server's start. Settings that moved
into a section keep their old names (:data:`MOVED`: ``vm_cpus``, ``[incus]``, ``SANDBOX_MCP_NIXOS_FLAKE``,
...), read into the section they moved to.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

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
from .models import MAX_CPUS, MIN_MEMORY_MIB
from .secrets.settings import SECRET_NAME_PATTERN, SecretSpec, SecretsProxySettings

__all__ = ["MOVED", "MOVED_TABLES", "Settings", "load_settings", "moved_name", "upstream_addresses"]

ENV_PREFIX = "SANDBOX_MCP_"
DEFAULT_CONFIG_FILE = Path("~/.config/sandbox-mcp/config.toml")

# Settings that moved into a runtime's section, by their old (flat) name: still read from the file, the
# environment and keywords, into the section they moved to. old name -> (runtime, field).
MOVED: dict[str, tuple[str, str]] = {
    "private_users": ("nspawn", "private_users"),
    "allow_privileged": ("nspawn", "allow_privileged"),
    "cgroups": ("nspawn", "cgroups"),
    "vm_cpus": ("qemu", "cpus"),
    "vm_memory_mib": ("qemu", "memory_mib"),
    "vm_disk_gib": ("qemu", "disk_gib"),
    "vm_accelerator": ("qemu", "accelerator"),
}
# Tables that became a runtime's section: [nixos] is [runtimes.nixos], SANDBOX_MCP_NIXOS_FLAKE its flake.
MOVED_TABLES: dict[str, str] = {"nixos": "nixos", "incus": "incus"}


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
    agent_files: Literal["owner", "own-uid"] = Field(
        default="owner", description="Whose the agent's files in the workspace dir are on the host: the owner's "
        "(`owner`: everything that trusts your files trusts them, git included), or a uid of the workspace's own "
        "that the owner reads and writes through ACLs and the owner's git refuses (`own-uid`, with a root server; "
        "files the owner then makes there are read-only and undeletable for the agent)",
    )
    host_disk_mib: int | None = Field(
        default=None, ge=32, description="Host disk one workspace may fill (its workspace dir, Claude config, a VM's "
        "root layer, snapshots), MiB: its state directory becomes a loop-mounted ext4 image of that size "
        "(the server must be root). Default: no bound (they share the state dir's file system)",
    )
    console_log_mib: int = Field(
        default=16, ge=1, description="Size bound of a workspace's console log: its first MiB are kept, the rest "
        "is dropped by a copier process (containers and VMs alike); nothing limits the workspace for it"
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
    pool_size: int = Field(
        default=0, ge=0, le=32,
        description="Warm pool: booted, unclaimed containers of the default spec that a long-running server (serve, "
        "the daemon) keeps ready, so a create_workspace of that spec is a claim of tens of ms, not a boot. Each one "
        "costs an idle container's memory (about 14 MiB). 0 (the default) keeps none",
    )
    stop_timeout_s: float = Field(
        default=3,
        gt=0,
        description="How long a workspace gets to power off cleanly before it is killed. Its root is thrown "
        "away and the workspace dir is on the host, so a kill loses nothing that was written",
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
    egress_dns_upstreams: list[str] = Field(
        default_factory=list,
        description="Where the egress resolver (workspaces with a domain list) asks: IPv4 addresses, 'ADDR' or "
        "'ADDR:PORT' (environment: comma-separated). Empty: the host's nameservers from /etc/resolv.conf",
        examples=[["192.0.2.53", "198.51.100.53:5353"]],
    )
    egress_dns_port: int = Field(
        default=53, ge=1, le=65535,
        description="The port the egress resolver listens on, on the bridge's host address (workspaces' DNS to "
        "any address on port 53 is redirected there); another port where something else holds 53 on it",
    )
    egress_ttl_min_s: int = Field(
        default=5, ge=1, le=86400,
        description="Shortest time an address a workspace's domain list resolved to stays allowed (seconds; "
        "longer than the record's TTL when the TTL is shorter)",
    )
    egress_ttl_max_s: int = Field(
        default=3600, ge=1, le=604800,
        description="Longest time such an address stays allowed without being resolved again (seconds); the "
        "TTLs the workspace sees are cut to it",
    )
    egress_dns_rate: float = Field(
        default=50.0, gt=0, le=100000,
        description="DNS queries per second one workspace may send the egress resolver (bursts of twice that); "
        "past it the answer is REFUSED",
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
    uid_max_snapshot_mib: int | None = Field(
        default=None, ge=0,
        description="Host disk one owner's snapshots may take, all their workspaces together (MiB, each snapshot "
        "counted at its full size, clones too); a snapshot that would pass it is refused and removed. Default: "
        "half the size of the filesystem holding the state dir. Applies to every owner, root too",
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
    runtimes: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Each runtime's own section, [runtimes.NAME] (in the environment "
        "SANDBOX_MCP_RUNTIMES_NAME_FIELD), validated by that runtime's settings model when the runtimes are built",
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

    @model_validator(mode="before")
    @classmethod
    def _moved_into_sections(cls, data: Any) -> Any:
        return _fold_moved(data) if isinstance(data, dict) else data

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Settings:
        """As pydantic's (no validation), with the old names of :data:`MOVED` and :data:`MOVED_TABLES` put
        into their runtime's section, field by field, as the file and the environment have them."""
        if update and any(k in MOVED or k in MOVED_TABLES for k in update):
            moved = _fold_moved({k: v for k, v in update.items() if k in MOVED or k in MOVED_TABLES})["runtimes"]
            sections = {**self.runtimes, **dict(update.get("runtimes", {}))}
            for name, section in moved.items():
                sections[name] = {**sections.get(name, {}), **section}
            update = {**{k: v for k, v in update.items() if k not in MOVED and k not in MOVED_TABLES},
                      "runtimes": sections}  # fmt: skip
        return super().model_copy(update=update, deep=deep)

    def with_runtime(self, name: str, **values: Any) -> Settings:
        """A copy with ``values`` set in runtime ``name``'s section (checked when that runtime reads it)."""
        section = {**self.runtimes.get(name, {}), **values}
        return self.model_copy(update={"runtimes": {**self.runtimes, name: section}})

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

    @field_validator("egress_dns_upstreams", mode="before")
    @classmethod
    def _upstream_list(cls, v: object) -> object:
        if isinstance(v, str):  # from the environment
            v = [p for p in v.replace(",", " ").split() if p]
        if isinstance(v, list):
            for item in v:
                _split_upstream(str(item))
        return v

    @model_validator(mode="after")
    def _ttl_bounds(self) -> Settings:
        if self.egress_ttl_min_s > self.egress_ttl_max_s:
            raise ValueError(f"egress_ttl_min_s ({self.egress_ttl_min_s}) is above egress_ttl_max_s "
                             f"({self.egress_ttl_max_s})")
        return self

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


def _split_upstream(text: str) -> tuple[ipaddress.IPv4Address, int]:
    """'ADDR' or 'ADDR:PORT' as (address, port); ValueError otherwise."""
    host, _, port = text.partition(":")
    try:
        address = ipaddress.IPv4Address(host)
        number = int(port) if port else 53
    except ValueError:
        raise ValueError(f"egress DNS upstream {text!r} is not 'ADDR' or 'ADDR:PORT' (an IPv4 address)") from None
    if not 1 <= number <= 65535:
        raise ValueError(f"egress DNS upstream {text!r} has a port out of range")
    return address, number


def upstream_addresses(settings: Settings) -> list[tuple[ipaddress.IPv4Address, int]]:
    """The egress resolver's upstreams: the setting, else the host's nameservers (loopback ones too: the
    resolver runs on the host), never the resolver itself."""
    if settings.egress_dns_upstreams:
        found = [_split_upstream(u) for u in settings.egress_dns_upstreams]
    else:
        found = []
        with contextlib.suppress(OSError):
            for line in Path("/etc/resolv.conf").read_text().splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        found.append((ipaddress.IPv4Address(parts[1]), 53))
    return [(a, p) for a, p in found if not (a == settings.host_ip and p == settings.egress_dns_port)]


def moved_name(runtime: str, field: str) -> str | None:
    """The old name of runtime ``runtime``'s ``field``, where it had one (for messages)."""
    for old, where in MOVED.items():
        if where == (runtime, field):
            return old
    table = next((t for t, r in MOVED_TABLES.items() if r == runtime), None)
    return f"{table}.{field}" if table else None


def _section(value: object, where: str) -> dict[str, Any]:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a table of settings, got {value!r}")
    return dict(value)


def _fold_moved(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with the settings of :data:`MOVED` and :data:`MOVED_TABLES` put into their runtime's section.

    Raises:
        ValueError: a setting given both by its old name and in its section (one source says it twice).
    """
    out = dict(data)
    raw = out.pop("runtimes", None) or {}
    sections = {name: _section(v, f"[runtimes.{name}]") for name, v in _section(raw, "runtimes").items()}

    def put(old: str, runtime: str, field: str, value: object) -> None:
        section = sections.setdefault(runtime, {})
        if field in section:
            raise ValueError(f"{old} is the old name of [runtimes.{runtime}] {field}; set only one of them")
        section[field] = value

    for old, (runtime, field) in MOVED.items():
        if old in out:
            put(old, runtime, field, out.pop(old))
    for table, runtime in MOVED_TABLES.items():
        if table in out:
            for field, value in _section(out.pop(table), f"[{table}]").items():
                put(f"{table}.{field}", runtime, field, value)
    if sections:
        out["runtimes"] = sections
    return out


_TABLES = ("secrets_proxy",)  # [table] in the TOML file, SANDBOX_MCP_<TABLE>_<FIELD> in the environment


def _env_overrides(env: Mapping[str, str]) -> dict[str, object]:
    """The settings the environment gives: ``SANDBOX_MCP_<FIELD>``, ``SANDBOX_MCP_RUNTIMES_<NAME>_<FIELD>``
    (NAME is the runtime's name, without ``_``), and the old names (``SANDBOX_MCP_VM_CPUS``,
    ``SANDBOX_MCP_<TABLE>_<FIELD>`` of :data:`MOVED_TABLES`)."""
    out: dict[str, object] = {}
    sections: dict[str, dict[str, object]] = {}
    tables: dict[str, dict[str, object]] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        field = key[len(ENV_PREFIX) :].lower()
        table = next((t for t in (*MOVED_TABLES, *_TABLES) if field.startswith(t + "_")), None)
        if field.startswith("runtimes_"):
            name, _, rest = field[len("runtimes_") :].partition("_")
            if name and rest:
                sections.setdefault(name, {})[rest] = value
        elif table is not None:
            tables.setdefault(table, {})[field[len(table) + 1 :]] = value
        elif field in Settings.model_fields or field in MOVED:
            out[field] = value
    out.update(tables)
    if sections:
        out["runtimes"] = sections
    return out


def load_settings(env: Mapping[str, str] | None = None, config_file: Path | None = None) -> Settings:
    """Build the settings from the TOML file and the environment.

    Runtime sections are merged field by field (the environment wins), and checked by their runtimes
    when those are built (:func:`sandbox_mcp.runtimes.check_settings`).

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
    try:
        data = _fold_moved(data)
        overrides = _fold_moved(_env_overrides(env))
    except ValueError as exc:
        raise InvalidSpec(f"invalid sandbox-mcp settings ({path} / {ENV_PREFIX}* variables): {exc}") from exc
    sections: dict[str, dict[str, Any]] = dict(data.pop("runtimes", {}))  # type: ignore[arg-type]
    for name, section in dict(overrides.pop("runtimes", {})).items():  # type: ignore[arg-type]
        sections[name] = {**sections.get(name, {}), **section}
    for table in _TABLES:  # merged field by field, the environment winning
        if table in overrides:
            overrides[table] = {**dict(data.get(table, {}) or {}), **dict(overrides[table])}  # type: ignore[arg-type]
    data.update(overrides)
    if sections:
        data["runtimes"] = sections
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise InvalidSpec(f"invalid sandbox-mcp settings ({path} / {ENV_PREFIX}* variables): {exc}") from exc
