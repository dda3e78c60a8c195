# ruff: noqa: F811 - the test takes test_incus_e2e's and secrets_flow's fixtures by name
"""Secrets in a local Incus container: the same story as a container's (tests/secrets_flow.py), through the
host's proxy on the bridge the instance is attached to."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client

from sandbox_mcp.config import Settings
from sandbox_mcp.server import build_server

from .internet import Internet
from .secrets_flow import net, secrets_flow, values, with_secrets  # noqa: F401 - fixtures
from .test_incus_e2e import firewall_retired, incusd, local_settings  # noqa: F401 - fixtures

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_secrets_in_incus(local_settings: Settings, tmp_path: Path, net: Internet, values: dict[str, str]) -> None:
    s = with_secrets(local_settings, tmp_path, net)
    async with Client(build_server(s)) as client:
        await secrets_flow(client, s, net, values, "secinc", "incus")
