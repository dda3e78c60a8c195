"""The three ways to reach workspaces keep the same methods: OwnedManager and RemoteManager match the
Workspaces Protocol exactly; WorkspaceManager has each of them with one keyword more, ``owner_uid``."""

from __future__ import annotations

import inspect

import pytest

from sandbox_mcp.daemon_client import RemoteManager
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.owners import OwnedManager
from sandbox_mcp.workspaces import Workspaces

METHODS = sorted(
    name for name, fn in vars(Workspaces).items() if inspect.iscoroutinefunction(fn) and not name.startswith("_")
)


def _params(cls: type, method: str) -> list[tuple[str, object, object, str]]:
    """(name, kind, default, annotation text) of each parameter; annotations are strings here (PEP 563)."""
    sig = inspect.signature(getattr(cls, method))
    return [(p.name, p.kind, p.default, str(p.annotation)) for p in sig.parameters.values()]


def test_the_protocol_has_every_operation() -> None:
    assert METHODS == ["create", "delete_snapshot", "destroy", "exec", "fork", "git_diff", "git_fetch",
                       "list", "list_dir", "list_processes", "list_snapshots", "logs", "pause",
                       "process_output", "publish_port", "read_file", "restore", "resume", "set_egress", "snapshot",
                       "ssh_target", "start", "start_process", "status", "stop", "stop_process",
                       "unpublish_port", "wait_process", "write_file"]  # fmt: skip


@pytest.mark.parametrize("cls", [OwnedManager, RemoteManager])
@pytest.mark.parametrize("method", METHODS)
def test_views_match_the_protocol(cls: type, method: str) -> None:
    assert _params(cls, method) == _params(Workspaces, method)
    assert inspect.signature(getattr(cls, method)).return_annotation == inspect.signature(
        getattr(Workspaces, method)
    ).return_annotation


@pytest.mark.parametrize("method", METHODS)
def test_the_manager_has_the_same_and_owner_uid(method: str) -> None:
    params = _params(WorkspaceManager, method)
    owner = [p for p in params if p[0] == "owner_uid"]
    assert owner == [("owner_uid", inspect.Parameter.KEYWORD_ONLY, None, "int | None")]
    assert [p for p in params if p[0] != "owner_uid"] == _params(Workspaces, method)


def test_create_tool_cli_and_spec_agree() -> None:
    """create_workspace's parameters and `sandbox-mcp create`'s arguments are CreateSpec's fields, one each:
    a field added to CreateSpec reaches the agent and the CLI, and nothing else may be added beside it."""
    import argparse

    import anyio

    from sandbox_mcp.cli import build_parser, create_spec
    from sandbox_mcp.models import CreateSpec
    from sandbox_mcp.server import build_server, schema_without_titles

    tools = anyio.run(build_server().list_tools)
    schema = next(t for t in tools if t.name == "create_workspace").input_schema
    spec_schema = schema_without_titles(CreateSpec.model_json_schema())  # as listed to clients
    assert list(schema["properties"]) == list(CreateSpec.model_fields)
    # The same, but that the tool offers only the types some runtime realises.
    tool_type = schema["properties"].pop("type")
    assert tool_type == {**spec_schema["properties"].pop("type"), "enum": ["container", "vm", "incus"]}
    assert schema["properties"] == spec_schema["properties"]
    assert schema["required"] == spec_schema["required"] == ["name"]

    parser = build_parser()
    create = next(a for a in parser._subparsers._actions if isinstance(a, argparse._SubParsersAction)).choices["create"]
    dests = [a.dest for a in create._actions if a.dest != "help"]
    assert sorted(dests) == sorted(CreateSpec.model_fields)
    every = ["create", "w1", "--type", "vm", "-p", "jq", "--ip", "10.1.0.9", "--no-start", "--egress", "internet",
             "--cpus", "0.5", "--memory-mib", "300"]
    assert create_spec(parser.parse_args(every)) == CreateSpec(
        name="w1", type="vm", packages=["jq"], ip="10.1.0.9", start=False, egress="internet", cpus=0.5, memory_mib=300
    )
    assert create_spec(parser.parse_args(["create", "w1"])) == CreateSpec(name="w1")
