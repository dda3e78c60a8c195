"""What the server tells the proxy, as files: one server-wide config, one file per workspace address.

``<state>/.server/secrets-proxy/`` (root's, 0700): ``proxy.json`` (where to listen, its bounds),
``clients/<ip>.json`` (the workspace at that address: its secrets' placeholders and settings, never a
value), ``process.json`` (the running proxy, for the next server), ``proxy.log``. The proxy reads a
client file when a request from that address comes (cached while unchanged), so a workspace is added or
removed by writing or deleting its file: no reload, no protocol between the two.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ..fsutil import atomic_write
from .settings import SecretSpec, SecretsProxySettings

__all__ = ["ClientFile", "ClientSecret", "ProxyConfig", "ProxyPaths"]


class ProxyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str
    settings: SecretsProxySettings
    log_max_bytes: int = 16 << 20


class ClientSecret(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    placeholder: str
    spec: SecretSpec


class ClientFile(BaseModel):
    """One workspace as the proxy knows it."""

    model_config = ConfigDict(extra="forbid")

    workspace: str
    secrets: list[ClientSecret]

    @property
    def hosts(self) -> set[str]:
        """Every host the workspace has an endpoint for."""
        return {h for s in self.secrets for h in s.spec.hosts}


class ProxyPaths:
    """The proxy's files under a server's state dir."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @classmethod
    def of(cls, state_dir: Path) -> ProxyPaths:
        """The proxy's files of the server with ``state_dir``."""
        return cls(Path(state_dir) / ".server" / "secrets-proxy")

    @property
    def config(self) -> Path:
        return self.root / "proxy.json"

    @property
    def clients(self) -> Path:
        return self.root / "clients"

    @property
    def process(self) -> Path:
        return self.root / "process.json"

    @property
    def log(self) -> Path:
        return self.root / "proxy.log"

    def client(self, ip: str) -> Path:
        return self.clients / f"{ipaddress.IPv4Address(ip)}.json"

    def make(self) -> None:
        """Create the directories, root's alone (the client files name where secrets come from)."""
        for d in (self.root, self.clients):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)

    def write_client(self, ip: str, client: ClientFile) -> None:
        atomic_write(self.client(ip), client.model_dump_json().encode(), mode=0o600)

    def remove_client(self, ip: str) -> None:
        self.client(ip).unlink(missing_ok=True)

    def client_ips(self) -> list[str]:
        try:
            return [p.name[: -len(".json")] for p in self.clients.iterdir() if p.name.endswith(".json")]
        except FileNotFoundError:
            return []
