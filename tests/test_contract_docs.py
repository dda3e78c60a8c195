"""README's tool table and the CLI's arguments against the tool schemas the server really serves.

The contract is read from the server (tests/contract.py), so a new tool or argument that the README
or the CLI does not know fails here, and so does a stale description of what a type needs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from sandbox_mcp.cli import build_parser
from sandbox_mcp.models import CreateSpec
from sandbox_mcp.runtimes import runtime_class, runtime_names

from .contract import tool_schemas

README = Path(__file__).resolve().parent.parent / "README.md"

# tool -> (CLI subcommand, {tool argument: the CLI's dest for it}). Every argument of a mapped tool
# must be here: a new one needs a flag (or an entry saying why not, in CLI_WITHOUT).
CLI: dict[str, tuple[str, dict[str, str]]] = {
    # create's flags are made from CreateSpec (one dest per field); test_workspaces_protocol holds that.
    "create_workspace": ("create", {f: f for f in CreateSpec.model_fields}),
    "start_workspace": ("start", {"name": "name"}),
    "stop_workspace": ("stop", {"name": "name"}),
    "destroy_workspace": ("rm", {"name": "name", "keep_data": "keep_data"}),
    "list_workspaces": ("ls", {"offset": "offset", "limit": "limit"}),
    "workspace_status": ("status", {"name": "name"}),
    "exec": ("exec", {"name": "name", "command": "command", "cwd": "cwd", "env": "env", "timeout_s": "timeout",
                      "stdin": "stdin"}),
    "workspace_logs": ("logs", {"name": "name", "lines": "lines"}),
    # `sandbox-mcp git NAME diff|fetch` (merge and apply: fetch, then git on the host, CLI only)
    "workspace_diff": ("git", {"name": "name", "stat_only": "stat"}),
    "fetch_workspace": ("git", {"name": "name", "include_uncommitted": "include_uncommitted"}),
    "pause_workspace": ("pause", {"name": "name"}),
    "resume_workspace": ("resume", {"name": "name"}),
    "snapshot_workspace": ("snapshot", {"name": "name", "snapshot": "snapshot", "memory": "memory"}),
    "list_snapshots": ("snapshots", {"name": "name"}),
    "restore_workspace": ("restore", {"name": "name", "snapshot": "snapshot"}),
    "delete_snapshot": ("rm-snapshot", {"name": "name", "snapshot": "snapshot"}),
    "fork_workspace": ("fork", {"name": "name", "new_name": "new_name", "snapshot": "snapshot"}),
    "set_egress": ("egress", {"name": "name", "egress": "egress"}),
    "start_process": ("start-process", {"name": "name", "command": "command", "cwd": "cwd", "env": "env",
                                        "process_id": "process_id"}),
    "process_output": ("output", {"name": "name", "process_id": "process_id", "cursor": "cursor", "wait_s": "wait",
                                  "max_bytes": "max_bytes"}),
    "wait_process": ("wait-process", {"name": "name", "process_id": "process_id", "until": "until",
                                      "timeout_s": "timeout", "cursor": "cursor"}),
    "stop_process": ("stop-process", {"name": "name", "process_id": "process_id", "signal": "signal",
                                      "grace_s": "grace_s"}),
    "list_processes": ("ps", {"name": "name"}),
    # A published port lives in the process that listens: the daemon's CLI asks the daemon; a one-shot
    # CLI in process says it cannot keep one.
    "publish_port": ("publish", {"name": "name", "port": "port", "host_port": "host_port"}),
    "unpublish_port": ("unpublish", {"name": "name", "port": "port"}),
}
# Tools people reach another way: the file tools through `sandbox-mcp ssh NAME` (or scp with the
# pinned key), not a subcommand each.
CLI_WITHOUT = {"read_file", "write_file", "list_dir"}


def _table_rows() -> dict[str, str]:
    """README's "The tools" table: tool name -> the row's text (a row may name several tools)."""
    text = README.read_text()
    section = text[text.index("## The tools"):]
    section = section[: section.index("\n## ", 1)]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first, _, rest = line[2:].partition(" | ")
        for tool in re.findall(r"`([a-z_]+)`", first):
            rows[tool] = rest
    return rows


def test_readme_lists_every_tool_and_only_real_ones():
    rows = _table_rows()
    assert set(rows) == set(tool_schemas()), "README's tool table and the served tools differ"


@pytest.mark.parametrize("tool", sorted(tool_schemas()))
def test_readme_names_every_argument(tool: str):
    row = _table_rows()[tool]
    named = set(re.findall(r"`([a-z_]+)`", row))
    args = set(tool_schemas()[tool].get("properties", {})) - {"name", "path", "command", "content"}
    missing = args - named
    assert not missing, f"README's row for {tool} does not name {sorted(missing)}"


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_tool_has_a_cli_command_or_a_reason():
    assert set(CLI) | CLI_WITHOUT == set(tool_schemas())
    assert not set(CLI) & CLI_WITHOUT


@pytest.mark.parametrize("tool", sorted(CLI))
def test_cli_takes_every_argument(tool: str):
    command, mapping = CLI[tool]
    schema = tool_schemas()[tool]
    props = schema.get("properties", {})
    assert set(mapping) == set(props), f"`sandbox-mcp {command}` maps {sorted(mapping)}, the tool has {sorted(props)}"
    actions = {a.dest: a for a in _subparsers()[command]._actions}
    for arg, dest in mapping.items():
        assert dest in actions, f"`sandbox-mcp {command}` has no argument for {tool}'s {arg!r}"
        enum = props[arg].get("enum")
        if enum:  # the same choices, not a stale copy
            assert sorted(actions[dest].choices) == sorted(enum), (tool, arg)


def test_every_type_the_tool_offers_is_served_in_direct_mode():
    """What create_workspace's `type` offers and says matches the runtimes: a type that direct mode
    serves must not be described as needing NixOS (the stale "vm or incus (NixOS hosts only)")."""
    prop = tool_schemas()["create_workspace"]["properties"]["type"]
    served = {t for name in runtime_names() if "direct" in (cls := runtime_class(name)).modes for t in cls.types}
    assert set(prop["enum"]) <= served
    description = prop["description"]
    for t in prop["enum"]:
        assert f"'{t}'" in description, f"type description does not explain {t!r}"
    assert "NixOS" not in description, "every type works in direct mode; the description must not say otherwise"
