"""What a long-running server puts back between calls when it goes missing under running workspaces: our
firewall tables, each bridge's egress resolver and the secrets proxy.

The resolver and the proxy each run under a supervisor of their own that restarts a dead worker at once; a
supervisor found dead (killed by hand, or by the OOM killer) was started again only by the next start or
admit on the host, so until then every workspace with a domain list resolved nothing and every secret went
unanswered. Our nftables tables go with ``nft flush ruleset`` (Debian's ``nftables.service`` runs it on every
restart) or a firewall service reloading, and ``nft flush table`` empties them; either way every running
workspace reaches the host's services and the other workspaces, until the next start. The server (and the daemon) look every
:data:`CHECK_INTERVAL_S`; the CLI's short-lived managers leave it to them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

import anyio

from ..errors import SandboxError
from ..hostnet import HostNetwork
from ..secrets.service import SecretsService

__all__ = ["CHECK_INTERVAL_S", "revive_host_services", "watch_host_services"]

log = logging.getLogger(__name__)

# A look costs a few file reads and one listing of our tables; what went is back within this (plus its
# start: ~0.2 s for a process, a few ms per workspace for the tables).
CHECK_INTERVAL_S = 5.0

RestoreFirewall = Callable[[], Awaitable[list[str]]]


async def revive_host_services(networks: Iterable[HostNetwork], secrets: SecretsService,
                               restore_firewall: RestoreFirewall | None = None) -> list[str]:
    """Put back whatever running workspaces need and is gone; what was put back, by name.

    ``restore_firewall`` (the manager's) loads our firewall tables again if they went missing and admits the
    running workspaces anew, returning their names. Never raises: what will not come back is logged, and
    tried again at the next look.
    """
    revived: list[str] = []
    if restore_firewall is not None:
        try:
            admitted = await restore_firewall()
        except Exception as exc:  # the loop must outlive any one failure
            _failed("the firewall tables", exc)
        else:
            if admitted:
                revived.append("the firewall tables")
                log.warning("the firewall tables were gone, emptied or short of ports: loaded again where needed, "
                            "and %s admitted anew", ", ".join(admitted))
    services = [(f"the egress resolver of {n.bridge}", n.revive) for n in networks]
    services.append(("the secrets proxy", secrets.revive))
    for what, revive in services:
        try:
            if await revive():
                revived.append(what)
                log.warning("%s was found dead and is running again", what)
        except Exception as exc:  # a full disk, a taken port: tried again at the next look
            _failed(what, exc)
    return revived


def _failed(what: str, exc: Exception) -> None:
    log.warning("%s could not be put back: %s", what, exc, exc_info=not isinstance(exc, (OSError, SandboxError)))


async def watch_host_services(networks: Iterable[HostNetwork], secrets: SecretsService,
                              restore_firewall: RestoreFirewall | None = None,
                              interval_s: float = CHECK_INTERVAL_S) -> None:
    """Until cancelled: every ``interval_s``, :func:`revive_host_services`."""
    networks = list(networks)
    while True:
        await anyio.sleep(interval_s)
        await revive_host_services(networks, secrets, restore_firewall)
