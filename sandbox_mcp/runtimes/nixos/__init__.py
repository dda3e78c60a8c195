"""The nixos runtime: declare the workspace to the NixOS module, rebuild, drive its systemd unit.

The module (``nix/``) reads a JSON registry with ``lib.importJSON`` and merges its workspaces
with the declared ones. Adding a workspace means: add it to the registry, write its
``<name>.nix`` template (once; people may edit it), let git know both files when the flake is
a git repository, and run ``nixos-rebuild switch`` through the configured escalation. Values
from the user only ever reach Nix as JSON data, never as Nix code.

Two locks beside the registry: ``<registry>.lock`` is held only while the registry is read and
written (milliseconds), ``<registry>.rebuild.lock`` while a rebuild runs (minutes), so other
creates and destroys record their change meanwhile instead of waiting for the whole rebuild. A
failed rebuild takes back its own change: byte for byte when nobody changed the registry since,
else that workspace's entry alone. A rebuild of a git flake applies the working tree, so it is
refused while tracked files other than the registry and the workspaces' ``.nix`` files have
uncommitted changes: a create never applies someone's half-done edit of the host.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio

from ... import hostcmd
from ...config import Settings
from ...errors import BackendError, CommandFailed, CommandTimeout, Conflict, InvalidSpec
from ...fsutil import async_file_lock, atomic_write
from ...identity import host_identity
from ...models import MIN_MEMORY_MIB, VM_MIN_MEMORY_MIB, RuntimeDetail, WorkspaceRecord, WorkspaceType
from ...naming import validate_ip, validate_name, validate_packages
from ..base import Mode, NetworkNeeds, PackageFlavour, Progress, Runtime, RuntimeContext, no_progress
from . import commands
from .settings import NixosSettings

__all__ = [
    "CONTAINER_NAME_MAX",
    "NAME_PREFIX",
    "REGISTRY_VERSION",
    "SHOW_PROPERTIES",
    "WORKSPACE_TEMPLATE",
    "NixosRuntime",
    "nixos_mode_available",
    "parse_unit_show",
    "unit_for",
]

REGISTRY_VERSION = 1
# The module's containers and VMs are `sbx-NAME` (nix/modules/lib.nix: namePrefix), so a workspace
# never merges into a container or VM the administrator declared.
NAME_PREFIX = "sbx-"
# nixpkgs' private-network containers allow 11 characters (the host's veth is "vb-" + the name,
# which the network policy filters by name), prefix included.
CONTAINER_NAME_MAX = 11 - len(NAME_PREFIX)
SHOW_PROPERTIES = ("LoadState", "ActiveState", "SubState", "MainPID", "ActiveEnterTimestampMonotonic")
_QUERY_TIMEOUT_S = 30.0
_GIT_TIMEOUT_S = 60.0
_LOCK_POLL_S = 0.2
_OUTPUT_TAIL_LINES = 40  # CommandFailed quotes the last 15 of them
_KEY_RE = re.compile(r"^(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( [^\r\n]*)?$")

# The same for every workspace: nothing from the request is written into Nix code, and an
# unedited file is recognisable (destroy removes it, an edited one stays).
WORKSPACE_TEMPLATE = """\
# Extra NixOS configuration for one sandbox-mcp workspace (the file name is the workspace's name).
#
# sandbox-mcp writes this file once, when the workspace is created, and never overwrites it:
# edit it freely and rebuild (nixos-rebuild switch) to apply your changes.
#
# - The workspace name becomes the hostname; the user, network, SSH and the workspace
#   directory come from the sandboxed-workspace module.
# - Packages requested through sandbox-mcp live in the registry (sandboxed-workspaces.json),
#   not here; add more of your own below.
{ config, lib, pkgs, ... }:
{
  # environment.systemPackages = [ pkgs.htop ];
}
"""

_UNIT_PATTERNS: dict[str, str] = {
    "container": "container@" + NAME_PREFIX + "{}",
    "vm": "microvm@" + NAME_PREFIX + "{}",
    "incus": "incus-workspace-{}",
}


def unit_for(type_: WorkspaceType, name: str) -> str:
    """The systemd unit the module declares for a workspace: ``container@sbx-NAME``,
    ``microvm@sbx-NAME`` or ``incus-workspace-NAME``.

    Raises:
        InvalidSpec: an unknown type or an invalid name.
    """
    if type_ not in _UNIT_PATTERNS:
        raise InvalidSpec(f"workspace type {type_!r} is not one of {sorted(_UNIT_PATTERNS)}")
    return _UNIT_PATTERNS[type_].format(validate_name(name))


def parse_unit_show(text: str, now_monotonic_s: float) -> RuntimeDetail:
    """Read ``systemctl show -p …`` output (``Key=Value`` lines) into a :class:`RuntimeDetail`.

    ``now_monotonic_s`` is ``time.monotonic()`` (CLOCK_MONOTONIC, the clock systemd's
    ``…TimestampMonotonic`` values count in microseconds). Never raises on odd input: a
    missing or malformed value is left out.
    """
    props: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            props[key.strip()] = value.strip()
    active = props.get("ActiveState") or "unknown"
    sub = props.get("SubState")
    running = active in ("active", "reloading")
    pid = _positive_int(props.get("MainPID"))
    since_us = _positive_int(props.get("ActiveEnterTimestampMonotonic"))
    uptime = max(0.0, now_monotonic_s - since_us / 1e6) if running and since_us else None
    detail = None
    if props.get("LoadState") == "not-found":
        detail = "the unit does not exist: the workspace is not in the running NixOS configuration; rebuild"
    return RuntimeDetail(
        runtime="nixos",
        running=running,
        pid=pid if running else None,
        unit_state=f"{active} ({sub})" if sub else active,
        uptime_s=uptime,
        detail=detail,
    )


def _positive_int(value: str | None) -> int | None:
    try:
        n = int(value or "")
    except ValueError:
        return None
    return n if n > 0 else None


def nixos_mode_available(settings: Settings, root: Path = Path("/")) -> bool:
    """True on a NixOS host (``/etc/NIXOS`` or ``/run/current-system``) whose flake and host are configured.

    ``mode = "auto"`` picks the nixos runtime when this holds. ``root`` is for tests.
    """
    on_nixos = (root / "etc/NIXOS").exists() or (root / "run/current-system").exists()
    cfg = NixosSettings.of(settings)
    return on_nixos and bool(cfg.flake) and bool(cfg.host)


def _git_root(path: Path) -> Path | None:
    """The work tree holding ``path``, found as Nix finds it: the nearest parent with ``.git``."""
    for p in (path, *path.parents):
        if (p / ".git").exists():
            return p
    return None


def _tail(lines: Sequence[str], n: int = _OUTPUT_TAIL_LINES) -> str:
    return "\n".join(lines[-n:])


_ABSENT: Any = object()


def _current(spec: Any) -> Any:
    """A registry entry in the current format: older servers wrote no ``egress`` (the module's
    default is ``none``) and named a module for VMs, which the module now refuses (it would
    configure the host)."""
    if not isinstance(spec, dict):
        return spec
    spec = {**spec, "egress": spec.get("egress", "none")}
    if spec.get("type") == "vm":
        spec["config"] = None
    return spec


class _Snapshot:
    """The registry and per-workspace file as they were before a change, to put back on failure."""

    def __init__(self, registry: Path, registry_bytes: bytes | None, registry_mode: int) -> None:
        self.registry = registry
        self.registry_bytes = registry_bytes
        self.registry_mode = registry_mode
        self.created: list[Path] = []  # files this change created; removed on restore
        self.written: bytes | None = None  # the registry as this change wrote it
        # The one entry this change made or removed: its name, what it was and what it became.
        self.name = ""
        self.before: Any = _ABSENT
        self.after: Any = _ABSENT


class NixosRuntime(Runtime):
    """Workspaces declared to the ``sandboxed-workspace`` NixOS module and run by its systemd units.

    ``client_public_key`` is the server's SSH client public key (one ``authorized_keys``
    line); it is put into the registry's ``authorizedKeys`` so the server can log in.
    ``command_prefix`` is prepended to every systemctl/journalctl/nixos-rebuild command
    (not git): tests point it at a recording stand-in script; normally it is empty.
    """

    name: ClassVar[str] = "nixos"
    types: ClassVar[frozenset[WorkspaceType]] = frozenset({"container", "vm", "incus"})
    modes: ClassVar[frozenset[Mode]] = frozenset({"nixos"})
    package_flavour: ClassVar[PackageFlavour] = "nix"
    Config = NixosSettings
    config: NixosSettings

    @classmethod
    def claims_host(cls, settings: Settings) -> bool:
        return nixos_mode_available(settings)

    def network_needs(self, type_: WorkspaceType) -> NetworkNeeds:
        """The module gives every workspace its address and the MAC derived from its name, and a microVM the
        derived vsock CID too (``nix/modules/lib.nix``): the manager checks them against the others'."""
        return NetworkNeeds(address=True, mac=True, vsock_cid=type_ == "vm")

    def __init__(self, ctx: RuntimeContext, *, command_prefix: Sequence[str] = ()) -> None:
        """Check the nixos settings and the key; nothing is touched on disk yet.

        Raises:
            InvalidSpec: [runtimes.nixos] flake or host is not set, the flake is not an absolute
                directory path, the host is not a plain attribute name, or the key is not a
                single public key line.
        """
        super().__init__(ctx)
        client_public_key = ctx.client_public_key
        cfg = self.config
        if not cfg.flake or not cfg.host:
            raise InvalidSpec(
                "nixos mode needs the flake directory and the host attribute: set flake and host in "
                "[runtimes.nixos] (old names nixos.flake and nixos.host; SANDBOX_MCP_NIXOS_FLAKE=/etc/nixos "
                "SANDBOX_MCP_NIXOS_HOST=<nixosConfigurations name>)"
            )
        flake = Path(cfg.flake).expanduser()
        if not flake.is_absolute():
            raise InvalidSpec(f"[runtimes.nixos] flake must be an absolute directory path, got {cfg.flake!r}")
        key = client_public_key.strip() if isinstance(client_public_key, str) else ""
        if not _KEY_RE.fullmatch(key):
            raise InvalidSpec(
                "client_public_key must be one OpenSSH public key line ('ssh-ed25519 AAAA... comment')"
            )
        self.flake = flake
        self.client_public_key = key
        self.command_prefix = [str(a) for a in command_prefix]
        registry = cfg.registry_file or flake / "sandboxed-workspaces.json"
        self.registry_path = registry.expanduser().absolute()
        self.config_dir = (cfg.workspace_config_dir or flake / "workspaces").expanduser().absolute()
        # Fail early on a bad host attribute rather than after writing the registry.
        commands.nixos_rebuild_argv(self.flake, cfg.host, cfg.escalation)

    # ---- the commands, as data --------------------------------------------------------------

    def rebuild_argv(self) -> list[str]:
        """The rebuild this runtime runs (after the command prefix)."""
        cfg = self.config
        assert cfg.host is not None
        return self.command_prefix + commands.nixos_rebuild_argv(self.flake, cfg.host, cfg.escalation)

    def systemctl_argv(self, action: str, record: WorkspaceRecord) -> list[str]:
        return self.command_prefix + hostcmd.systemctl_argv(
            action, unit_for(record.type, record.name), self.config.escalation
        )

    def status_argv(self, record: WorkspaceRecord) -> list[str]:
        unit = unit_for(record.type, record.name)
        return self.command_prefix + hostcmd.systemctl_show_argv(unit, SHOW_PROPERTIES)

    def logs_argv(self, record: WorkspaceRecord, lines: int) -> list[str]:
        return self.command_prefix + hostcmd.journalctl_argv(unit_for(record.type, record.name), lines)

    def workspace_file(self, name: str) -> Path:
        return self.config_dir / f"{validate_name(name)}.nix"

    def min_memory_mib(self, type_: WorkspaceType) -> int:
        """A VM boots its own kernel: less than this does not come up."""
        return VM_MIN_MEMORY_MIB if type_ == "vm" else MIN_MEMORY_MIB

    def validate(self, record: WorkspaceRecord) -> None:
        """Refuse what the module would refuse (e.g. a container name over 7 characters). Pure."""
        self.registry_entry(record)

    def registry_entry(self, record: WorkspaceRecord) -> dict[str, Any]:
        """The registry value for one workspace, in the module's fixed format.

        Raises:
            InvalidSpec: the name, type, IP or a package attribute path is invalid (nothing changed).
        """
        validate_name(record.name)
        if record.type not in self.types:
            raise InvalidSpec(f"workspace type {record.type!r} is not one of {sorted(self.types)}")
        if record.type == "container" and len(record.name) > CONTAINER_NAME_MAX:
            raise InvalidSpec(
                f"workspace name {record.name!r} is {len(record.name)} characters; container workspaces "
                f"allow at most {CONTAINER_NAME_MAX} in nixos mode (the NixOS container is "
                f"{NAME_PREFIX}NAME, and nixpkgs' private-network containers allow 11): pick a shorter name, "
                f"or type 'vm' or 'incus'"
            )
        validate_ip(record.ip, self.settings.subnet)
        if isinstance(record.egress, list):
            raise InvalidSpec(
                "egress by domain list is not available in nixos mode: the NixOS module renders a fixed "
                "policy at rebuild and runs no egress resolver. Use egress='internet' (where the host's module "
                "has NAT on) or 'none', or a direct-mode server"
            )
        # egress is data the module enforces per workspace (its network policy is direct mode's); a host
        # whose module has NAT off refuses "internet" at evaluation, and the rebuild's failure says so.
        limits = record.limits
        # The workspace's owner through the daemon (direct mode's host_identity): the module makes its
        # shares theirs, 0700, and maps exactly them to the workspace user. None: the module's user.uid.
        owner = host_identity(self.settings, record) if record.owner_uid not in (None, 0) else (None, None)
        return {
            "type": record.type,
            "ip": record.ip,
            "egress": record.egress,
            "packages": validate_packages(record.packages, "nix"),
            "autoStart": False,  # the server starts units itself
            # A VM's module would also configure what microvm.nix runs on the host as root: the
            # registry (which this server's user writes) names modules for containers and Incus only.
            "config": None if record.type == "vm" else os.path.relpath(
                self.workspace_file(record.name), self.registry_path.parent
            ),
            # The module's options are whole CPUs (a VM's vCPUs; a container's CPUQuota, 100 % each).
            "cpus": math.ceil(limits.cpus) if limits else None,
            "memoryMiB": limits.memory_mib if limits else None,
            "tasks": limits.tasks if limits else None,
            "ownerUid": owner[0],
            "ownerGid": owner[1],
            "hostKey": None,  # the module's setup unit makes the host key; the server pins what it made
        }

    def assign(self, record: WorkspaceRecord, others: list[WorkspaceRecord]) -> WorkspaceRecord:
        """The isolation the module gives each type: microVMs, and containers with ``privateUsers``."""
        isolation = "microvm" if record.type == "vm" else "unprivileged-container"
        return record.model_copy(update={"isolation": isolation})

    # ---- the registry -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, progress: Progress | None = None, *, rebuild: bool = False) -> AsyncIterator[None]:
        """Hold ``<registry>.lock`` (reading and writing the registry) or, with ``rebuild``,
        ``<registry>.rebuild.lock`` (one rebuild at a time); flock, so a lock dies with its holder."""
        suffix = ".rebuild.lock" if rebuild else ".lock"
        lock_path = self.registry_path.with_name(self.registry_path.name + suffix)
        what = "rebuild" if rebuild else "change to the NixOS registry"

        async def told() -> None:
            if progress is not None:
                await progress(f"waiting for another {what} to finish", None)

        try:
            with anyio.fail_after(self.config.rebuild_timeout_s):
                lock = async_file_lock(lock_path, on_wait=told)
                await lock.__aenter__()
        except TimeoutError as exc:
            raise CommandTimeout(f"the lock {lock_path} stayed taken; is another rebuild stuck?") from exc
        except OSError as exc:
            raise BackendError(
                f"cannot open the lock {lock_path}: {exc}; the server's user must be able to write "
                f"to {self.registry_path.parent}"
            ) from exc
        try:
            yield
        finally:
            await lock.__aexit__(None, None, None)

    def _read_registry(self) -> tuple[dict[str, Any], _Snapshot]:
        path = self.registry_path
        try:
            raw: bytes | None = path.read_bytes()
            mode = path.stat().st_mode & 0o7777
        except FileNotFoundError:
            raw, mode = None, 0o644
        except OSError as exc:
            raise BackendError(f"cannot read the registry {path}: {exc}") from exc
        snap = _Snapshot(path, raw, mode)
        if raw is None:
            return {"version": REGISTRY_VERSION, "authorizedKeys": [], "workspaces": {}}, snap
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BackendError(f"the registry {path} is not valid JSON ({exc}); fix or remove it") from exc
        if not isinstance(data, dict) or data.get("version") != REGISTRY_VERSION:
            raise BackendError(
                f"the registry {path} is not a version-{REGISTRY_VERSION} sandbox-mcp registry; "
                f"fix it or move it away"
            )
        keys, workspaces = data.get("authorizedKeys", []), data.get("workspaces", {})
        if not isinstance(keys, list) or not isinstance(workspaces, dict):
            raise BackendError(f"the registry {path} has a malformed authorizedKeys or workspaces; fix it")
        data.setdefault("authorizedKeys", [])
        data.setdefault("workspaces", {})
        return data, snap

    def _write_registry(self, data: dict[str, Any], snap: _Snapshot) -> None:
        # Each write brings older entries to the current format (_current).
        data["workspaces"] = {k: _current(v) for k, v in data["workspaces"].items()}
        ordered = {
            "version": REGISTRY_VERSION,
            "authorizedKeys": data["authorizedKeys"],
            "workspaces": dict(sorted(data["workspaces"].items())),
            **{k: v for k, v in data.items() if k not in ("version", "authorizedKeys", "workspaces")},
        }
        try:
            text = json.dumps(ordered, indent=2) + "\n"
            atomic_write(self.registry_path, text.encode(), mode=snap.registry_mode)
        except OSError as exc:
            raise BackendError(f"cannot write the registry {self.registry_path}: {exc}") from exc
        snap.written = text.encode()
        if snap.registry_bytes is None:
            snap.created.append(self.registry_path)

    def _write_template(self, name: str, snap: _Snapshot) -> Path:
        path = self.workspace_file(name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "x") as f:  # "x": never overwrite what a person may have edited
                f.write(WORKSPACE_TEMPLATE)
            snap.created.append(path)
        except FileExistsError:
            pass
        except OSError as exc:
            raise BackendError(f"cannot write {path}: {exc}") from exc
        return path

    async def _restore(self, snap: _Snapshot) -> None:
        """Put the registry back byte for byte and remove the files this change created."""
        if snap.registry_bytes is not None:
            atomic_write(snap.registry, snap.registry_bytes, mode=snap.registry_mode)
        removed = []
        for path in snap.created:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            removed.append(path)
        await self._git_forget(removed)

    def _git_files(self, files: Sequence[Path]) -> tuple[Path | None, list[Path]]:
        root = _git_root(self.flake)
        if root is None:
            return None, []
        return root, [f for f in files if f.is_relative_to(root)]

    async def _git_intent_to_add(self, files: Sequence[Path]) -> None:
        root, inside = self._git_files(files)
        if root is None or not inside:
            return
        try:
            await hostcmd.run(commands.git_intent_to_add_argv(self.flake, inside), timeout_s=_GIT_TIMEOUT_S)
        except CommandFailed as exc:
            raise CommandFailed(
                exc.argv,
                exc.exit_status,
                exc.stderr,
                hint=f"the flake {self.flake} is a git repository and nixos-rebuild only sees files "
                f"git knows; "
                f"the server's user must be able to run git there",
            ) from exc

    async def _git_forget(self, files: Sequence[Path]) -> None:
        root, inside = self._git_files(files)
        if root is not None and inside:
            argv = commands.git_forget_argv(self.flake, inside)
            await hostcmd.run(argv, timeout_s=_GIT_TIMEOUT_S, check=False)

    def _is_ours(self, root: Path, relative: str) -> bool:
        """Is this flake file one the server manages: the registry or a workspace's ``.nix`` file?"""
        path = (root / relative).absolute()
        return path == self.registry_path or (path.parent == self.config_dir and path.suffix == ".nix")

    async def _refuse_unrelated_changes(self) -> None:
        """Refuse to rebuild a git flake whose tracked files have uncommitted changes of someone else's.

        nixos-rebuild applies a git flake's working tree: without this, a create would switch the
        host to whatever half-done edit of its configuration lies there.

        Raises:
            Conflict: such changes, named.
            CommandFailed / BackendError: git could not be asked.
        """
        root = _git_root(self.flake)
        if root is None:
            return
        done = await hostcmd.run(commands.git_status_argv(root), timeout_s=_GIT_TIMEOUT_S)
        fields = done.stdout.split("\0")
        changed, i = [], 0
        while i < len(fields):
            entry = fields[i]
            i += 1
            if len(entry) < 4:
                continue
            changed.append(entry[3:])
            if entry[0] in "RC":  # a rename or copy names its source next
                changed.append(fields[i])
                i += 1
        foreign = sorted({f for f in changed if not self._is_ours(root, f)})
        if foreign:
            shown = ", ".join(foreign[:8]) + (" …" if len(foreign) > 8 else "")
            raise Conflict(
                f"the flake {root} has uncommitted changes to {shown}; a rebuild would apply them to the "
                f"host along with the workspace. Commit or stash them (git -C {root} stash), then try again"
            )

    async def _rebuild(self, progress: Progress, what: str) -> None:
        """One rebuild at a time, with the registry free meanwhile; raises with the output's tail."""
        argv = self.rebuild_argv()
        output: list[str] = []

        async def on_line(line: str) -> None:
            output.append(line)
            del output[:-_OUTPUT_TAIL_LINES]
            await progress(line, None)

        async with self._locked(progress, rebuild=True):
            await self._refuse_unrelated_changes()
            await progress(f"{what}: running {' '.join(argv)}", None)
            try:
                await hostcmd.run(argv, timeout_s=self.config.rebuild_timeout_s, on_line=on_line)
            except CommandFailed as exc:
                raise CommandFailed(
                    exc.argv,
                    exc.exit_status,
                    _tail(output) or exc.stderr,
                    hint=f"the previous configuration was restored ({self.registry_path}); "
                    f"fix the cause above and try again",
                ) from exc

    async def _undo(self, snap: _Snapshot) -> None:
        """Take back one change whose rebuild failed; what others changed meanwhile stays."""
        async with self._locked():
            try:
                current: bytes | None = self.registry_path.read_bytes()
            except FileNotFoundError:
                current = None
            if current == snap.written:
                await self._restore(snap)  # nobody changed it since: byte for byte
                return
            data, now = self._read_registry()
            workspaces = data["workspaces"]
            if workspaces.get(snap.name, _ABSENT) == snap.after:  # still what this change made it
                if snap.before is _ABSENT:
                    workspaces.pop(snap.name, None)
                else:
                    workspaces[snap.name] = snap.before
                self._write_registry(data, now)
            snap.created = [p for p in snap.created if p != self.registry_path]
            snap.registry_bytes = None  # the registry itself is done
            await self._restore(snap)

    async def _rebuild_or_undo(self, snap: _Snapshot, progress: Progress, what: str) -> None:
        """Rebuild; on any failure (timeout, cancellation too) take this change back, then raise."""
        try:
            await self._rebuild(progress, what)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._undo(snap)
            raise

    # ---- Runtime ----------------------------------------------------------------------------

    async def prepare(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        """Add the workspace to the registry, write its ``.nix`` file if absent (not for a VM), and rebuild.

        Raises:
            InvalidSpec: invalid name/type/IP/packages, or a container name over 7 characters
                (its NixOS container sbx-NAME would pass 11); nothing is changed on disk.
            Conflict: the registry already holds this name with other settings, or its IP; or the
                flake has someone's uncommitted changes a rebuild would apply (nothing changed).
            CommandFailed: the rebuild failed; the previous registry was restored and the
                message ends with the rebuild's output.
            CommandTimeout: the rebuild took longer than nixos.rebuild_timeout_s (registry restored).
            BackendError: files could not be written, or a program is missing.
        """
        entry = self.registry_entry(record)
        await self._refuse_unrelated_changes()  # before anything is written
        async with self._locked(progress):
            data, snap = self._read_registry()
            workspaces: dict[str, Any] = data["workspaces"]
            existing = workspaces.get(record.name)
            existing = _current(existing)
            if existing is not None and existing != entry:
                raise Conflict(
                    f"the NixOS registry {self.registry_path} already declares a workspace {record.name!r} "
                    f"with other settings; destroy_workspace it or remove it from the registry"
                )
            for other, spec in workspaces.items():
                if other != record.name and isinstance(spec, dict) and spec.get("ip") == record.ip:
                    raise Conflict(f"IP {record.ip} is already used by {other!r} in {self.registry_path}")
            snap.name, snap.before, snap.after = record.name, workspaces.get(record.name, _ABSENT), entry
            workspaces[record.name] = entry
            if self.client_public_key not in data["authorizedKeys"]:
                data["authorizedKeys"].append(self.client_public_key)
            try:
                self._write_registry(data, snap)
                files = [self.registry_path]
                if entry["config"] is not None:
                    files.append(self._write_template(record.name, snap))
                await self._git_intent_to_add(files)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._restore(snap)
                raise
        # The registry is free again: other changes go in while this one rebuilds.
        await self._rebuild_or_undo(snap, progress, f"declaring workspace {record.name!r}")
        await progress(f"workspace {record.name!r} is declared in the NixOS configuration", 1.0)
        return record

    async def start(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        """``systemctl start`` the workspace's unit (escalated).

        Raises:
            CommandFailed: the unit failed to start (see workspace_logs).
            CommandTimeout: it did not start within boot_timeout_s.
        """
        argv = self.systemctl_argv("start", record)
        await progress(f"starting {unit_for(record.type, record.name)}", None)
        try:
            await hostcmd.run(argv, timeout_s=self.settings.boot_timeout_s)
        except CommandFailed as exc:
            raise CommandFailed(
                exc.argv, exc.exit_status, exc.stderr, hint="call workspace_logs to see why the unit failed"
            ) from exc
        return record

    async def stop(self, record: WorkspaceRecord, *, force: bool = False) -> None:
        """``systemctl stop`` the unit (escalated), ``force`` or not: the unit's own stop timeout
        applies. A unit that is not loaded counts as stopped.

        Raises:
            CommandFailed: systemctl failed for another reason.
            CommandTimeout: the unit did not stop in time.
        """
        argv = self.systemctl_argv("stop", record)
        # systemd enforces the unit's own stop timeout (and kills); this only bounds a wedged systemctl.
        done = await hostcmd.run(argv, timeout_s=max(60.0, self.settings.stop_timeout_s * 3), check=False)
        # 5: "Unit … not loaded" — it is gone already, which is what stop wants.
        if done.returncode not in (0, 5):
            raise CommandFailed(argv, done.returncode, done.stderr or done.stdout)

    async def destroy(self, record: WorkspaceRecord) -> None:
        """Remove the workspace from the registry and rebuild; an unedited ``.nix`` file is removed too.

        A ``.nix`` file someone edited stays. Idempotent.

        Raises:
            CommandFailed: the rebuild failed; the previous registry was restored.
            CommandTimeout: the rebuild took too long (registry restored).
            BackendError: files could not be written, or a program is missing.
            Conflict: the flake has someone's uncommitted changes a rebuild would apply (nothing changed).
        """
        await self._refuse_unrelated_changes()
        async with self._locked():
            data, snap = self._read_registry()
            declared = record.name in data["workspaces"]
            if declared:
                snap.name, snap.before = record.name, data["workspaces"].pop(record.name)
                try:
                    self._write_registry(data, snap)
                except BaseException:
                    with anyio.CancelScope(shield=True):
                        await self._restore(snap)
                    raise
        if declared:
            await self._rebuild_or_undo(snap, no_progress, f"removing workspace {record.name!r}")
        async with self._locked():
            ws_file = self.workspace_file(record.name)
            try:
                pristine = ws_file.read_text() == WORKSPACE_TEMPLATE
            except (FileNotFoundError, UnicodeDecodeError):
                pristine = False
            if pristine:
                ws_file.unlink()
                await self._git_forget([ws_file])

    async def status(self, record: WorkspaceRecord) -> RuntimeDetail:
        """The unit's state from ``systemctl show``.

        Raises:
            CommandFailed / CommandTimeout: systemctl could not be asked.
        """
        unit = unit_for(record.type, record.name)
        done = await hostcmd.run(self.status_argv(record), timeout_s=_QUERY_TIMEOUT_S)
        detail = parse_unit_show(done.stdout, time.monotonic())
        return detail.model_copy(update={"unit": unit})

    async def logs(self, record: WorkspaceRecord, lines: int) -> str:
        """The unit's journal tail (``journalctl -u UNIT -n LINES``).

        Raises:
            InvalidSpec: ``lines`` outside 1..100000.
            CommandFailed / CommandTimeout: journalctl failed.
        """
        done = await hostcmd.run(self.logs_argv(record, lines), timeout_s=_QUERY_TIMEOUT_S)
        if not done.stdout.strip() and done.stderr.strip():
            # e.g. "No journal files were opened due to insufficient permissions."
            hint = "(add the server's user to the systemd-journal group to read unit logs)"
            return f"{done.stderr.strip()}\n{hint}"
        return done.stdout
