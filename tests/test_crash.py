"""A server killed (SIGKILL) at any moment of create, start, stop or destroy leaks nothing.

Each test runs the real server (`python -m sandbox_mcp serve`, stdio) under a real MCP client,
kills it when it reaches a moment (a progress message it sends, or a state it writes to the
registry: events, not delays), starts a new server, and checks: the workspace is gone, or
`stopped`/`error`; `destroy_workspace` then leaves no process, link, namespace, mount or file.
Whatever the exact instant the kill lands, those must hold, so nothing here bets on timing.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from sandbox_mcp import supervise
from sandbox_mcp.config import Settings

from .test_e2e import NOTHING_LEFT, host_leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

_UPPER_BOUND_S = 120  # only stops a hung test; never reached when things work


def _params(settings: Settings, marker: str) -> StdioServerParameters:
    env = {
        **os.environ,
        "SANDBOX_MCP_STATE_DIR": str(settings.state_dir),
        "SANDBOX_MCP_IMAGE_DIR": str(settings.image_dir),
        "SANDBOX_MCP_BRIDGE": settings.bridge,
        "SANDBOX_MCP_MODE": "direct",
        "SANDBOX_MCP_CONFIG": "/nonexistent",
        "SANDBOX_MCP_HOSTS_FILE": str(settings.hosts_file),
        "SANDBOX_MCP_BOOT_TIMEOUT_S": "60",
        "SBX_TEST_SERVER": marker,  # how the test finds the server's PID
    }
    return StdioServerParameters(command=sys.executable, args=["-m", "sandbox_mcp", "serve"], env=env)


def _server_pid(marker: str) -> int:
    needle = f"SBX_TEST_SERVER={marker}".encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0"):
                    return int(entry.name)
    raise AssertionError("the server process was not found")


def _registry_state(settings: Settings, name: str) -> str | None:
    try:
        data = json.loads(settings.registry_path.read_text())
    except (OSError, ValueError):
        return None
    ws = data.get("workspaces", {}).get(name)
    return ws["state"] if ws else None


async def _call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, args)
    assert not result.is_error, f"{tool} failed: {result.content}"
    return result.structured_content  # type: ignore[return-value]


async def _kill_during(
    settings: Settings,
    tool: str,
    args: dict[str, Any],
    *,
    at_progress: str | None = None,
    at_state: Callable[[str | None], bool] | None = None,
    before: Callable[[Client], Awaitable[None]] | None = None,
) -> None:
    """Run ``tool`` on a fresh server and SIGKILL the server at the moment given."""
    marker = secrets.token_hex(8)
    killed = anyio.Event()

    def kill() -> None:
        if not killed.is_set():
            killed.set()
            os.kill(_server_pid(marker), signal.SIGKILL)

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        if at_progress is not None and message and at_progress in message:
            kill()

    with anyio.fail_after(_UPPER_BOUND_S):
        with contextlib.suppress(Exception):  # the killed server breaks the session: expected
            async with Client(_params(settings, marker)) as client:
                if before is not None:
                    await before(client)
                async with anyio.create_task_group() as tg:

                    async def watch_state(reached: Callable[[str | None], bool]) -> None:
                        # The registry file is the server's own record of where it is: poll it.
                        for _ in range(_UPPER_BOUND_S * 500):
                            if reached(_registry_state(settings, args["name"])):
                                kill()
                                return
                            await anyio.sleep(0.002)

                    if at_state is not None:
                        tg.start_soon(watch_state, at_state)
                    await client.call_tool(tool, args, progress_callback=on_progress)
                    tg.cancel_scope.cancel()
    assert killed.is_set(), f"the moment never came during {tool}"


async def _workspace_running(client: Client, name: str) -> None:
    """Create ``name``, or start it if it is there (the stop/destroy tests may need a second try)."""
    listed = {w["name"] for w in (await _call(client, "list_workspaces"))["workspaces"]}
    if name in listed:
        await _call(client, "start_workspace", name=name)
    else:
        await _call(client, "create_workspace", name=name)


async def _restart_and_check(settings: Settings, name: str) -> dict[str, Any]:
    """A new server: the workspace is gone or stopped/error; destroying it leaves nothing behind."""
    tag = supervise.workspace_tag(settings.state_dir, name)
    with anyio.fail_after(_UPPER_BOUND_S):
        async with Client(_params(settings, secrets.token_hex(8))) as client:
            listed = {w["name"]: w for w in (await _call(client, "list_workspaces"))["workspaces"]}
            found = listed.get(name)
            if found is not None:
                assert found["state"] in ("stopped", "error"), found
                assert supervise.tagged(tag) == [], "a process of a workspace reported not running"
                assert (await _call(client, "destroy_workspace", name=name))["destroyed"]
    assert supervise.tagged(tag) == []
    assert host_leftovers(name) == NOTHING_LEFT
    assert not (settings.state_dir / name).exists()
    assert not (settings.state_dir / ".locks" / f"{name}.lock").exists()
    return {"reported": found["state"] if found else "gone", "last_error": found and found.get("last_error")}


@pytest.mark.parametrize("moment", ["booting the container", "waiting for SSH"])
async def test_killed_during_create(settings: Settings, moment: str) -> None:
    await _kill_during(settings, "create_workspace", {"name": "crc"}, at_progress=moment)
    print(await _restart_and_check(settings, "crc"))


async def test_killed_during_start(settings: Settings) -> None:
    async def create_stopped(client: Client) -> None:
        await _call(client, "create_workspace", name="crs", start=False)

    await _kill_during(settings, "start_workspace", {"name": "crs"}, at_progress="booting the container",
                       before=create_stopped)
    print(await _restart_and_check(settings, "crs"))


@pytest.mark.parametrize("tool", ["stop_workspace", "destroy_workspace"])
async def test_killed_during_stop_or_destroy(settings: Settings, tool: str) -> None:
    async def running(client: Client) -> None:
        await _workspace_running(client, "crx")

    # The registry is polled while the call runs; on a starved machine a whole stop can slip between
    # two polls, so the moment gets a few chances. Each try is a complete, valid run.
    for attempt in range(3):
        try:
            await _kill_during(settings, tool, {"name": "crx"}, at_state=lambda s: s != "running", before=running)
            break
        except AssertionError as exc:
            if "the moment never came" not in str(exc) or attempt == 2:
                raise
    print(await _restart_and_check(settings, "crx"))
