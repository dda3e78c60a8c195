"""The MCP surface through a real in-process client session: tools, schemas, annotations, errors.

These need no container: every call here fails validation before anything is created (which
is also what they check), so they run anywhere; the e2e tests cover the happy paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcp import Client
from mcp.server.mcpserver import MCPServer

import sandbox_mcp
from sandbox_mcp.config import Settings
from sandbox_mcp.server import build_server, schema_without_titles

pytestmark = pytest.mark.anyio

CONTRACT = {
    "create_workspace": {"name", "type", "packages", "ip", "start", "egress", "cpus", "memory_mib", "repo", "ref",
                         "secrets"},
    "start_workspace": {"name"},
    "stop_workspace": {"name"},
    "destroy_workspace": {"name", "keep_data"},
    "list_workspaces": {"offset", "limit"},
    "workspace_status": {"name"},
    "exec": {"name", "command", "cwd", "env", "timeout_s", "stdin"},
    "read_file": {"name", "path", "offset", "limit"},
    "write_file": {"name", "path", "content", "encoding", "append", "mode"},
    "list_dir": {"name", "path", "offset", "limit"},
    "workspace_logs": {"name", "lines"},
    "start_process": {"name", "command", "cwd", "env", "process_id"},
    "process_output": {"name", "process_id", "cursor", "wait_s", "max_bytes"},
    "wait_process": {"name", "process_id", "until", "timeout_s", "cursor"},
    "stop_process": {"name", "process_id", "signal", "grace_s"},
    "list_processes": {"name"},
    "publish_port": {"name", "port", "host_port"},
    "unpublish_port": {"name", "port"},
    "workspace_diff": {"name", "stat_only"},
    "fetch_workspace": {"name", "include_uncommitted"},
    "pause_workspace": {"name"},
    "resume_workspace": {"name"},
    "snapshot_workspace": {"name", "snapshot", "memory"},
    "list_snapshots": {"name"},
    "restore_workspace": {"name", "snapshot"},
    "delete_snapshot": {"name", "snapshot"},
    "fork_workspace": {"name", "new_name", "snapshot"},
    "set_egress": {"name", "egress"},
}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # A bridge name no test creates: nothing here touches the network.
    return Settings(mode="direct", state_dir=tmp_path / "state", image_dir=tmp_path / "img", bridge="sbxu-br",
                    hosts_file=tmp_path / "hosts")


async def test_tools_match_the_contract(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == set(CONTRACT)
    for name, args in CONTRACT.items():
        tool = tools[name]
        assert set(tool.input_schema.get("properties", {})) == args, name  # flat arguments
        assert tool.output_schema, f"{name} has no structured output"
        assert tool.description and len(tool.description) > 60, name
        # Sent with every request: no indentation kept from the source's docstrings.
        lines = tool.description.splitlines()
        assert not any(line.startswith((" ", "\t")) for line in lines), (name, tool.description)
        assert tool.annotations is not None and tool.annotations.open_world_hint is False
    read_only = {n for n, t in tools.items() if t.annotations.read_only_hint}
    assert read_only == {"list_workspaces", "workspace_status", "read_file", "list_dir", "workspace_logs",
                         "process_output", "wait_process", "list_processes", "workspace_diff", "list_snapshots"}
    # restore_workspace replaces the workspace's files with the snapshot's: destructive too; stop_process ends one.
    assert {n for n, t in tools.items() if t.annotations.destructive_hint} == {
        "destroy_workspace", "restore_workspace", "delete_snapshot", "stop_process"}
    assert tools["create_workspace"].input_schema["required"] == ["name"]
    assert tools["exec"].input_schema["properties"]["timeout_s"]["default"] == 120


async def test_mistakes_are_tool_errors_that_say_what_to_do(settings: Settings) -> None:
    settings = settings.with_runtime("incus", socket=settings.state_dir / "no-incusd.socket")
    async with Client(build_server(settings)) as client:

        async def error(tool: str, **args: object) -> str:
            r = await client.call_tool(tool, args)
            assert r.is_error
            text = " ".join(getattr(c, "text", "") for c in r.content)
            assert "Traceback" not in text
            return text

        assert "list_workspaces" in await error("start_workspace", name="ghost")
        assert "list_workspaces" in await error("read_file", name="ghost", path="x")
        assert "pattern" in await error("create_workspace", name="Bad_Name")
        assert "outside the workspace subnet" in await error("create_workspace", name="a", ip="10.1.2.3")
        # No Incus daemon there: refused before anything is built, saying what to check.
        assert "is incusd running" in await error("create_workspace", name="a", type="incus")
        assert "cpus must be between 0.05 and" in await error("create_workspace", name="a", cpus=0)
        assert "memory_mib must be" in await error("create_workspace", name="a", memory_mib=64)
        # Egress: one clear message per mistake, before anything is made.
        assert "is an address, not a domain name" in await error("create_workspace", name="a", egress=["10.0.0.1"])
        assert "empty list" in await error("create_workspace", name="a", egress=[])
        assert "twice" in await error("set_egress", name="a", egress=["a.org", "A.org."])
        assert "list_workspaces" in await error("set_egress", name="ghost", egress=["pypi.org"])
        assert "needs outbound NAT" in await error("create_workspace", name="a", egress=["pypi.org"])
        # A repository is checked before anything is made: a path, a ref that can only be a revision.
        assert "absolute path" in await error("create_workspace", name="a", repo="relative/dir")
        assert "pattern" in await error("create_workspace", name="a", repo="/tmp", ref="--upload-pack=x")
        assert "not a git repository" in await error("create_workspace", name="a", repo=str(settings.state_dir))
        assert "needs start=true" in await error("create_workspace", name="a", repo="/tmp", start=False)
        assert "list_workspaces" in await error("workspace_diff", name="ghost")
        assert "list_workspaces" in await error("fetch_workspace", name="ghost")
        assert "pattern" in await error("write_file", name="a", path="x", content="", mode="999")
        # Processes and ports: bad input is refused before any workspace is looked at.
        assert "does not compile" in await error("wait_process", name="ghost", process_id="p", until="output:(")
        assert "port must be a number from 1 to 65535" in await error("wait_process", name="a", process_id="p",
                                                                       until="port:70000")  # fmt: skip
        assert "'exit', 'port:N' or 'output:REGEX'" in await error("wait_process", name="a", process_id="p",
                                                                    until="soon")  # fmt: skip
        assert "pattern" in await error("process_output", name="a", process_id="../x")
        assert "less than or equal to 65535" in await error("publish_port", name="a", port=70000)
        assert "greater than or equal to 1" in await error("publish_port", name="a", port=0)
        assert "greater than or equal to 1024" in await error("publish_port", name="a", port=80, host_port=80)
        assert "list_workspaces" in await error("start_process", name="ghost", command="sleep 1")
        assert "list_workspaces" in await error("publish_port", name="ghost", port=8000)
        assert "list_workspaces" in await error("list_processes", name="ghost")
        r = await client.call_tool("list_workspaces", {})
        assert r.structured_content["workspaces"] == []  # type: ignore[index]
    # Nothing was created by any of it.
    workspace_dirs = [p for p in settings.state_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert workspace_dirs == []


def _titles(schema: object, path: str = "") -> list[str]:
    """Where ``schema`` has a string ``title`` (outside defaults and examples)."""
    if isinstance(schema, list):
        return [hit for i, item in enumerate(schema) for hit in _titles(item, f"{path}[{i}]")]
    if not isinstance(schema, dict):
        return []
    hits = [path] if isinstance(schema.get("title"), str) else []
    for key, value in schema.items():
        if key not in ("default", "examples", "const", "enum"):
            hits += _titles(value, f"{path}/{key}")
    return hits


async def test_input_schemas_are_listed_without_generated_titles(settings: Settings) -> None:
    server = build_server(settings)
    as_generated = {t.name: t.input_schema for t in await MCPServer.list_tools(server)}
    assert sum(len(_titles(schema)) for schema in as_generated.values()) > 100  # pydantic's, one per property
    async with Client(server) as client:
        listed = {t.name: t for t in (await client.list_tools()).tools}
    assert set(listed) == set(as_generated)
    for name, tool in listed.items():
        assert _titles(tool.input_schema) == [], name
        assert tool.input_schema == schema_without_titles(as_generated[name]), name  # nothing else changed
        assert tool.title or tool.annotations.title, name  # the tool's own title is not a schema's
    sent = sum(len(json.dumps(t.input_schema)) for t in listed.values())
    assert sent < 0.92 * sum(len(json.dumps(s)) for s in as_generated.values())
    # The arguments are still checked against the full models.
    async with Client(server) as client:
        result = await client.call_tool("exec", {"name": "UPPER", "command": "true"})
    assert result.is_error and "name" in result.content[0].text


def test_schema_without_titles_keeps_a_property_called_title_and_data() -> None:
    schema = {
        "title": "Args", "type": "object",
        "properties": {
            "title": {"title": "Title", "type": "string", "default": "x"},
            "meta": {"title": "Meta", "type": "object", "default": {"title": "kept"}, "examples": [{"title": "kept"}]},
        },
        "$defs": {"Inner": {"title": "Inner", "anyOf": [{"title": "A", "type": "string"}, {"type": "null"}]}},
    }  # fmt: skip
    assert schema_without_titles(schema) == {
        "type": "object",
        "properties": {
            "title": {"type": "string", "default": "x"},
            "meta": {"type": "object", "default": {"title": "kept"}, "examples": [{"title": "kept"}]},
        },
        "$defs": {"Inner": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
    }


async def test_rejected_arguments_say_which_what_and_what_the_field_is(settings: Settings) -> None:
    async with Client(build_server(settings)) as client:

        async def error(tool: str, **args: object) -> str:
            r = await client.call_tool(tool, args)
            assert r.is_error
            return " ".join(getattr(c, "text", "") for c in r.content)

        text = await error("create_workspace", name="Bad_Name")
        assert text == (
            "Error executing tool create_workspace: invalid arguments: name: String should match pattern "
            "'^[a-z][a-z0-9-]{0,11}$' (got 'Bad_Name'); name is: Workspace name: lowercase letters, digits and '-', "
            "starting with a letter, at most 12 chars. Correct them and call again."
        )
        assert "name: Field required; name is: Workspace name" in await error("create_workspace")
        # Two bad fields, each named; a long value shown in part; no pydantic model name, codes or links.
        text = await error("exec", name="a", command="", timeout_s="x" * 500)
        assert "command: String should have at least 1 character (got '')" in text
        assert f"timeout_s: Input should be a valid number, unable to parse string as a number (got '{'x' * 79}...)" in text
        assert "Arguments" not in text and "errors.pydantic.dev" not in text and "type=" not in text
        # Our own validators' words come through without pydantic's "Value error, ".
        text = await error("create_workspace", name="a", egress=["BAD!"])
        assert "egress: 'bad!' is not a domain name" in text and "Value error" not in text


def test_invalid_arguments_names_nested_places() -> None:
    from pydantic import BaseModel, ValidationError

    from sandbox_mcp.server import invalid_arguments

    class Args(BaseModel):
        ports: list[int]

    with pytest.raises(ValidationError) as caught:
        Args.model_validate({"ports": [1, "two"]})
    schema = {"properties": {"ports": {"description": "TCP ports"}}}
    assert invalid_arguments(caught.value, schema) == (
        "invalid arguments: ports[1]: Input should be a valid integer, unable to parse string as an integer "
        "(got 'two'); ports is: TCP ports. Correct them and call again."
    )
    assert invalid_arguments(caught.value, None).startswith("invalid arguments: ports[1]: Input should be")


def test_public_surface() -> None:
    assert set(sandbox_mcp.__all__) == {
        "BackendError", "CommandFailed", "CommandTimeout", "Conflict", "InvalidSpec", "InvalidState",
        "SSHError", "SandboxError", "Settings", "WorkspaceExists", "WorkspaceNotFound", "__version__",
        "load_settings",
    }  # fmt: skip
    for name in sandbox_mcp.__all__:
        assert hasattr(sandbox_mcp, name)


async def test_serve_over_stdio_as_a_subprocess(tmp_path: Path) -> None:
    """`sandbox-mcp serve` as Claude Code runs it: a child process speaking MCP on stdin/stdout."""
    import os
    import sys

    from mcp import StdioServerParameters

    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "sandbox_mcp", "serve"],
        env={**os.environ, "SANDBOX_MCP_STATE_DIR": str(tmp_path / "state"), "SANDBOX_MCP_BRIDGE": "sbxu-br",
             "SANDBOX_MCP_MODE": "direct", "SANDBOX_MCP_CONFIG": "/nonexistent", "SANDBOX_MCP_HOSTS_FILE": "",
             "SANDBOX_MCP_DAEMON_SOCKET": str(tmp_path / "no-daemon.sock")},  # in process, whatever runs here
    )
    async with Client(params) as client:
        assert {t.name for t in (await client.list_tools()).tools} == set(CONTRACT)
        r = await client.call_tool("workspace_status", {"name": "nope"})
        assert r.is_error and "not found" in r.content[0].text  # type: ignore[union-attr]
    assert (tmp_path / "state" / ".server" / "client_ed25519_key").exists()


async def test_an_error_wrapped_by_a_task_group_still_reaches_the_agent(settings: Settings) -> None:
    """A SandboxError raised inside a task group arrives as an ExceptionGroup; its message must survive."""
    import anyio

    from sandbox_mcp.errors import CommandTimeout
    from sandbox_mcp.tools.base import tool_errors as _tool_errors

    @_tool_errors
    async def waits() -> None:
        async with anyio.create_task_group() as tg:
            async def fail() -> None:
                raise CommandTimeout("SSH did not answer; look at workspace_logs")

            tg.start_soon(fail)

    from mcp.server.mcpserver.exceptions import ToolError

    with pytest.raises(ToolError, match="look at workspace_logs"):
        await waits()


def test_every_subpackage_is_packaged() -> None:
    """A non-editable install (the daemon's root-owned copy) must carry every sub-package."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(root).parts) for p in (root / "sandbox_mcp").rglob("__init__.py")
    }
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"
