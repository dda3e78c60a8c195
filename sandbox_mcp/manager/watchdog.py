"""The host services a long-running server keeps alive between calls: each bridge's egress resolver and the
secrets proxy.

Each runs under a supervisor of its own that restarts its worker at once. A supervisor found dead (killed by
hand, or by the OOM killer) was started again only by the next start or admit on the host, so until then
every workspace with a domain list resolved nothing and every secret went unanswered. The server (and the
daemon) look every :data:`CHECK_INTERVAL_S` instead; the CLI's short-lived managers leave it to them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import anyio

from ..errors import SandboxError
from ..hostnet import HostNetwork
from ..secrets.service import SecretsService

__all__ = ["CHECK_INTERVAL_S", "revive_host_services", "watch_host_services"]

log = logging.getLogger(__name__)

# A look costs a few file reads; a dead service is back within this (plus its start, ~0.2 s).
CHECK_INTERVAL_S = 5.0


async def revive_host_services(networks: Iterable[HostNetwork], secrets: SecretsService) -> list[str]:
    """Start again whichever service a workspace needs and is not running; what was started, by name.

    Never raises: a service that will not start is logged, and tried again at the next look.
    """
    revived: list[str] = []
    checks = [(f"the egress resolver of {n.bridge}", n.revive) for n in networks]
    checks.append(("the secrets proxy", secrets.revive))
    for what, revive in checks:
        try:
            if await revive():
                revived.append(what)
                log.warning("%s was found dead and is running again", what)
        except Exception as exc:  # the loop must outlive any one failure (a full disk, a taken port)
            log.warning("%s is down and did not start again: %s", what, exc,
                        exc_info=not isinstance(exc, (OSError, SandboxError)))
    return revived


async def watch_host_services(networks: Iterable[HostNetwork], secrets: SecretsService,
                              interval_s: float = CHECK_INTERVAL_S) -> None:
    """Until cancelled: every ``interval_s``, :func:`revive_host_services`."""
    networks = list(networks)
    while True:
        await anyio.sleep(interval_s)
        await revive_host_services(networks, secrets)
