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
from sandbox_mcp.server import _tool_errors, build_server
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


async def test_boot_timeout_says_why(settings: Settings) -> None:
    # A timeout no boot can meet: SSH cannot answer within a millisecond of the container's start.
    tiny = settings.model_copy(update={"boot_timeout_s": 0.001})
    try:
        async with Client(build_server(tiny)) as client:
            r = await client.call_tool("create_workspace", {"name": "bt1"})
            text = _text(r)
            assert r.is_error
            # (the SDK puts "Error executing tool NAME: " in front of every tool error's message)
            assert text.startswith(
                "Error executing tool create_workspace: workspace 'bt1' did not answer over SSH within the boot "
                "timeout of 0.001 s"
            ), text
            assert "TaskGroup" not in text
            assert "SANDBOX_MCP_BOOT_TIMEOUT_S" in text and "workspace_logs" in text
            assert (await client.call_tool("list_workspaces", {})).structured_content == {"workspaces": []}

            r = await client.call_tool("create_workspace", {"name": "bt2", "start": False})
            assert not r.is_error, _text(r)
            r = await client.call_tool("start_workspace", {"name": "bt2"})
            assert r.is_error and "boot timeout of 0.001 s" in _text(r)
            status = (await client.call_tool("workspace_status", {"name": "bt2"})).structured_content
            assert status is not None and status["state"] == "stopped"
            assert "boot timeout" in status["last_error"]
            r = await client.call_tool("workspace_logs", {"name": "bt2"})
            assert not r.is_error
    finally:
        async with WorkspaceManager(settings) as m:
            await destroy_all(m)
