"""Published ports: a workspace port on the host's loopback, served by this process while it runs."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from ..errors import Conflict, InvalidSpec, SandboxError
from ..models import PortUnpublished, PublishedPort, WorkspaceRecord
from ..naming import validate_name
from ..ownership import owned
from ..ports import LOOPBACK

if TYPE_CHECKING:
    from . import WorkspaceManager as _Manager
else:
    _Manager = object

__all__ = ["PortOps"]

log = logging.getLogger("sandbox_mcp.manager")  # one logger for the manager, as before the split


def _check_port(what: str, port: int, low: int) -> None:
    if isinstance(port, bool) or not isinstance(port, int) or not low <= port <= 65535:
        raise InvalidSpec(f"{what} must be a number from {low} to 65535, got {port!r}")


class PortOps(_Manager):
    """publish_port, unpublish_port, and putting them back after a restart."""

    def _allowed_uids(self, record: WorkspaceRecord) -> frozenset[int]:
        """Who may connect to its published ports: its owner (this process's user if none) and root."""
        return frozenset({0, record.owner_uid if record.owner_uid is not None else os.geteuid()})

    async def _restore_ports(self) -> None:
        """Listen again on the published ports of running workspaces (after a server restart).

        A host port that cannot be had again is dropped from the record: whoever holds it now (another
        local user, perhaps) must not be taken for the workspace by its owner.
        """
        data = await self.registry.read()
        for record in data.workspaces.values():
            if record.state != "running" or not record.ports or record.runtime not in self.runtimes:
                continue
            host = self._runtime_of(record).endpoint(record)[0]
            lost = []
            for p in record.ports:
                try:
                    await self.ports.publish(record.name, p.port, p.host_port, host, self._allowed_uids(record))
                except SandboxError as exc:
                    lost.append(p.port)
                    log.warning("%s: port %d is no longer published: host port %d: %s", record.name, p.port,
                                p.host_port, exc)  # fmt: skip
            if lost:
                async with self._locked(record.name):
                    current = await self.registry.get(record.name)
                    current.ports = [p for p in current.ports if p.port not in lost]
                    await self.registry.put(current)

    async def publish_port(
        self, name: str, port: int, host_port: int | None = None, *, owner_uid: int | None = None
    ) -> PublishedPort:
        """Make ``port`` of a running workspace reachable on the host's loopback (127.0.0.1:host_port).

        Only the workspace's owner and root may connect. Publishing a published port again returns
        it as it is. Raises:
            InvalidSpec: a port outside 1-65535, a host_port outside 1024-65535.
            Conflict: host_port is in use, or the port is published on another host port.
            WorkspaceNotFound, InvalidState (not running), BackendError (this process serves no ports).
        """
        validate_name(name)
        _check_port("port", port, 1)
        if host_port is not None:
            _check_port("host_port", host_port, 1024)
        await self._check_exists(name)
        async with self._locked(name):
            record = (await self._running(name, owner_uid)).model_copy(deep=True)  # changed below
            for p in record.ports:
                if p.port == port and self.ports.host_port(name, port) == p.host_port:
                    if host_port not in (None, p.host_port):
                        raise Conflict(
                            f"port {port} of {name!r} is already published on host port {p.host_port}; "
                            "unpublish_port it first to move it"
                        )
                    return p
            host = self._runtime_of(record).endpoint(record)[0]
            bound = await self.ports.publish(name, port, host_port or 0, host, self._allowed_uids(record))
            published = PublishedPort(port=port, host=LOOPBACK, host_port=bound, url=f"http://{LOOPBACK}:{bound}")
            try:
                record.ports = [p for p in record.ports if p.port != port] + [published]
                await self.registry.put(record)
            except BaseException:
                await self.ports.unpublish(name, port)
                raise
        return published

    async def unpublish_port(self, name: str, port: int, *, owner_uid: int | None = None) -> PortUnpublished:
        """Close the host side of a published port (and its open connections). Idempotent.

        Raises:
            InvalidSpec (a port outside 1-65535), WorkspaceNotFound.
        """
        validate_name(name)
        _check_port("port", port, 1)
        await self._check_exists(name)
        async with self._locked(name):
            record = owned(await self.registry.get(name), owner_uid)
            await self.ports.unpublish(name, port)
            if any(p.port == port for p in record.ports):
                record.ports = [p for p in record.ports if p.port != port]
                await self.registry.put(record)
        return PortUnpublished(port=port, published=False)
