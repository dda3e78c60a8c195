# ruff: noqa: F811 - the test takes test_qemu_e2e's and secrets_flow's fixtures by name
"""Secrets in a VM (``type="vm"``): the same story as a container's (tests/secrets_flow.py), through the
host's proxy on the bridge the VM's TAP is on. One boot, under TCG here."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client

from sandbox_mcp.config import Settings
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.server import build_server

from .conftest import destroy_all
from .internet import Internet
from .secrets_flow import net, secrets_flow, values, with_secrets  # noqa: F401 - fixtures
from .test_qemu_e2e import vm_settings  # noqa: F401 - fixtures

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.vm]


async def test_secrets_in_a_vm(vm_settings: Settings, tmp_path: Path, net: Internet, values: dict[str, str]) -> None:
    s = with_secrets(vm_settings, tmp_path, net)
    try:
        async with Client(build_server(s)) as client:
            await secrets_flow(client, s, net, values, "secvm", "vm")
    finally:
        async with WorkspaceManager(s) as m:
            await destroy_all(m)
