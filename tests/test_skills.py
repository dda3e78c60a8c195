"""The bundled skills: valid frontmatter, only real tool names, JSON examples that fit the contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sandbox_mcp import models
from sandbox_mcp.claude_setup import skills_dir
from sandbox_mcp.config import NixosSettings, Settings

SKILLS = Path(__file__).resolve().parent.parent / "skills"

# The MCP tool contract from DESIGN.md: tool -> (required arguments, optional arguments).
CONTRACT: dict[str, tuple[set[str], set[str]]] = {
    "create_workspace": ({"name"}, {"type", "packages", "ip", "start"}),
    "start_workspace": ({"name"}, set()),
    "stop_workspace": ({"name"}, set()),
    "destroy_workspace": ({"name"}, {"keep_data"}),
    "list_workspaces": (set(), set()),
    "workspace_status": ({"name"}, set()),
    "exec": ({"name", "command"}, {"cwd", "env", "timeout_s", "stdin"}),
    "read_file": ({"name", "path"}, {"offset", "limit"}),
    "write_file": ({"name", "path", "content"}, {"encoding", "append", "mode"}),
    "list_dir": ({"name", "path"}, set()),
    "workspace_logs": ({"name"}, {"lines"}),
    "start_process": ({"name", "command"}, {"cwd", "env", "process_id"}),
    "process_output": ({"name", "process_id"}, {"cursor", "wait_s", "max_bytes"}),
    "wait_process": ({"name", "process_id"}, {"until", "timeout_s", "cursor"}),
    "stop_process": ({"name", "process_id"}, {"signal", "grace_s"}),
    "list_processes": ({"name"}, set()),
    "publish_port": ({"name", "port"}, {"host_port"}),
    "unpublish_port": ({"name", "port"}, set()),
}

# snake_case words a skill may put in backticks without being a tool: arguments and result
# fields of the contract, and settings names.
_FIELD_NAMES = {a for req, opt in CONTRACT.values() for a in req | opt}
for _model in (
    models.Workspace,
    models.WorkspaceStatus,
    models.RuntimeDetail,
    models.SSHInfo,
    models.Timings,
    models.ExecResult,
    models.FileContent,
    models.WriteResult,
    models.DirEntry,
    models.DestroyResult,
    models.LogsResult,
    models.ProcessStarted,
    models.ProcessInfo,
    models.ProcessOutput,
    models.ProcessWait,
    models.PublishedPort,
):
    _FIELD_NAMES |= set(_model.model_fields)
_FIELD_NAMES |= set(Settings.model_fields) | set(NixosSettings.model_fields)

_SNAKE = re.compile(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`")
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _skill_files() -> list[Path]:
    return sorted(SKILLS.glob("*/SKILL.md"))


def _frontmatter(text: str) -> dict[str, str]:
    """Parse the simple YAML frontmatter the skills use: ``key: value`` and folded ``>-`` blocks."""
    assert text.startswith("---\n"), "SKILL.md must start with '---' frontmatter"
    end = text.index("\n---\n", 4)
    out: dict[str, str] = {}
    key = None
    for line in text[4:end].splitlines():
        if line.startswith((" ", "\t")) and key:
            out[key] = (out[key] + " " + line.strip()).strip()
            continue
        key, _, value = line.partition(":")
        key = key.strip()
        value = value.strip()
        out[key] = "" if value in (">", ">-", "|", "|-") else value.strip("'\"")
    return out


def test_there_are_skills_and_skills_dir_finds_them():
    names = {p.parent.name for p in _skill_files()}
    assert {"create-workspace", "work-in-workspace"} <= names
    assert skills_dir() == SKILLS


@pytest.mark.parametrize("path", _skill_files(), ids=lambda p: p.parent.name)
def test_frontmatter(path: Path):
    meta = _frontmatter(path.read_text())
    assert meta.get("name") == path.parent.name
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", meta["name"]) and len(meta["name"]) <= 64
    description = meta.get("description", "")
    # Claude Code shows only the description before loading a skill: it must say what and when.
    assert 100 <= len(description) <= 1024, len(description)
    assert "Use when" in description


@pytest.mark.parametrize("path", _skill_files(), ids=lambda p: p.parent.name)
def test_only_contract_tools_are_named(path: Path):
    text = path.read_text()
    unknown = sorted({w for w in _SNAKE.findall(text) if w not in CONTRACT and w not in _FIELD_NAMES})
    assert not unknown, f"{path}: backticked names that are neither tools nor contract fields: {unknown}"
    # Tools named in the description must exist too (it is plain text there).
    description = _frontmatter(text)["description"]
    for word in re.findall(r"\b[a-z]+_[a-z_]+\b", description):
        assert word in CONTRACT, f"{path}: description names unknown tool {word!r}"


@pytest.mark.parametrize("path", _skill_files(), ids=lambda p: p.parent.name)
def test_json_blocks_parse_and_calls_fit_the_contract(path: Path):
    blocks = [body for lang, body in _FENCE.findall(path.read_text()) if lang == "json"]
    assert blocks, f"{path} has no JSON examples"
    for body in blocks:
        data = json.loads(body)
        if isinstance(data, dict) and "tool" in data:
            tool, args = data["tool"], data["arguments"]
            assert tool in CONTRACT, f"unknown tool {tool!r} in {body}"
            required, optional = CONTRACT[tool]
            assert required <= set(args), f"{tool} example lacks {required - set(args)}"
            extra = set(args) - required - optional
            assert not extra, f"{tool} example has unknown arguments {extra}"


def test_every_tool_is_documented_somewhere():
    text = "".join(p.read_text() for p in _skill_files())
    missing = [tool for tool in CONTRACT if f"`{tool}`" not in text and f'"{tool}"' not in text]
    assert not missing


def test_frontmatter_parser_rejects_bad_input():
    with pytest.raises(AssertionError):
        _frontmatter("name: x\n")
    assert _frontmatter("---\nname: a\ndescription: >-\n  one\n  two\n---\nbody")["description"] == "one two"
