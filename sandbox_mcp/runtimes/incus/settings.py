"""The Incus runtime's settings: ``[runtimes.incus]`` (old name: the ``[incus]`` table,
``SANDBOX_MCP_INCUS_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from ..base import RuntimeSettings

__all__ = ["IncusSettings"]


class IncusSettings(RuntimeSettings):
    """Where ``type="incus"`` workspaces run: the local daemon (default) or a remote server/cluster."""

    section = "incus"

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
            raise ValueError("url needs client_cert, client_key and server_cert (a remote server is reached over "
                             "TLS with a client certificate and a pinned server certificate)")
        return self
