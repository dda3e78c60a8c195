"""Every failure reaches the agent as a ToolError that says why, through a real MCP client session.

The first tests need no container (they fail before anything is created); the boot-timeout test
boots a real container (end-to-end, inside the namespace ./scripts/test makes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp import Client
from mcp.server.mcpserver.exceptions import ToolError

from sandbox_mcp.config import Settings
from sandbox_mcp.errors import BackendError, InvalidSpec, WorkspaceNotFound
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.paths import WorkspacePaths
from sandbox_mcp.server import build_server
from sandbox_mcp.ssh import ensure_client_key, write_authorized_keys
from sandbox_mcp.tools.base import tool_errors as _tool_errors
from tests.conftest import destroy_all

pytestmark = pytest.mark.anyio

MIB = 1 << 20


@pytest.fixture
def unit_settings(tmp_path: Path) -> Settings:
    # A bridge name no test creates: nothing here touches the network.
    return Settings(mode="direct", state_dir=tmp_path / "state", image_dir=tmp_path / "img", bridge="sbxu-br",
                    hosts_file=tmp_path / "hosts")


def _text(result: object) -> str:
    return " ".join(getattr(c, "text", "") for c in result.content)  # type: ignore[attr-defined]


async def test_unknown_names_leave_no_lock_file(unit_settings: Settings) -> None:
    async with Client(build_server(unit_settings)) as client:
        for tool in ("start_workspace", "stop_workspace", "destroy_workspace"):
            r = await client.call_tool(tool, {"name": "ghost"})
            assert r.is_error and "workspace 'ghost' not found; call list_workspaces" in _text(r), tool
    locks = unit_settings.state_dir / ".locks"
    assert not (locks / "ghost.lock").exists()
    # The manager's own callers (the CLI) are not behind the tools' schema: a bad name is refused
    # before any path is built from it.
    async with WorkspaceManager(unit_settings) as m:
        for op in (m.start, m.stop, m.destroy):
            with pytest.raises(InvalidSpec, match="workspace name"):
                await op("../../escape")
            with pytest.raises(WorkspaceNotFound):
                await op("ghost")
    assert not locks.exists() or list(locks.iterdir()) == []
    assert not (unit_settings.state_dir.parent / "escape.lock").exists()


async def test_long_inputs_are_not_echoed_whole(unit_settings: Settings) -> None:
    async with Client(build_server(unit_settings)) as client:
        for args in ({"packages": ["p" * MIB]}, {"ip": "1" * MIB}):
            r = await client.call_tool("create_workspace", {"name": "longin", **args})
            text = _text(r)
            assert r.is_error and len(text) < 1000, (args.keys(), len(text))
            assert f"{MIB} characters in all" in text
    async with WorkspaceManager(unit_settings) as m:
        with pytest.raises(WorkspaceNotFound) as info:
            await m.status("n" * MIB)
        assert len(str(info.value)) < 1000
        with pytest.raises(InvalidSpec) as info2:
            await m.start("n" * MIB)
        assert len(str(info2.value)) < 1000


async def test_exception_groups_are_unwrapped_into_their_reasons() -> None:
    async def fails() -> None:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [
            InvalidSpec("path must not be empty"),
            ExceptionGroup("nested", [BackendError("nspawn exited with status 1")]),
        ])  # fmt: skip

    with pytest.raises(ToolError) as info:
        await _tool_errors(fails)()
    assert str(info.value) == "path must not be empty; nspawn exited with status 1"

    async def crashes() -> None:
        raise ExceptionGroup("unhandled errors in a TaskGroup", [KeyError("leader")])

    with pytest.raises(ToolError, match=r"^internal error \(KeyError\); the server log has the details$"):
        await _tool_errors(crashes)()


async def test_boot_timeout_says_why(settings: Settings, tmp_path: Path) -> None:
    # SSH that can never let us in: the workspace's authorized_keys holds a stranger's key, so every
    # login attempt is refused until the boot timeout runs out, however fast the machine is. (The
    # timeout leaves the container itself ample time to start: the runtime waits for it with the
    # same setting.)
    timeout_s = 10.0
    patient = settings.model_copy(update={"boot_timeout_s": timeout_s})
    stranger = ensure_client_key(tmp_path / "stranger")
    try:
        async with Client(build_server(patient)) as client:
            r = await client.call_tool("create_workspace", {"name": "bt2", "start": False})
            assert not r.is_error, _text(r)
            write_authorized_keys(WorkspacePaths.of(settings.state_dir, "bt2").authorized_keys, [stranger])
            r = await client.call_tool("start_workspace", {"name": "bt2"})
            text = _text(r)
            assert r.is_error
            # (the SDK puts "Error executing tool NAME: " in front of every tool error's message)
            assert text.startswith(
                f"Error executing tool start_workspace: workspace 'bt2' did not answer over SSH within the boot "
                f"timeout of {timeout_s:g} s (boot_timeout_s; raise it with SANDBOX_MCP_BOOT_TIMEOUT_S"
            ), text
            # (the last attempt's error is the refusal, or a timeout when the deadline cut it short)
            assert "last error:" in text and "workspace_logs" in text and "TaskGroup" not in text, text
            status = (await client.call_tool("workspace_status", {"name": "bt2"})).structured_content
            assert status is not None and status["state"] == "stopped"
            assert "boot timeout" in status["last_error"]
            assert not (await client.call_tool("workspace_logs", {"name": "bt2"})).is_error

        # A timeout nothing can meet, on create: whichever wait runs out first, the agent reads why.
        async with Client(build_server(settings.model_copy(update={"boot_timeout_s": 0.001}))) as client:
            r = await client.call_tool("create_workspace", {"name": "bt1"})
            text = _text(r)
            assert r.is_error and "workspace_logs" in text and "TaskGroup" not in text, text
            assert text != "Error executing tool create_workspace"
            names = [w["name"] for w in (await client.call_tool("list_workspaces", {})).structured_content["workspaces"]]
            assert "bt1" not in names  # the failed create was undone
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)
