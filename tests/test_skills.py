"""The bundled skills: valid frontmatter, only real tool names, JSON examples that fit the contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from sandbox_mcp import models
from sandbox_mcp.claude_install import skills_dir
from sandbox_mcp.config import MOVED, Settings
from sandbox_mcp.runtimes import runtime_class, runtime_names

from .contract import arguments, tool_schemas

SKILLS = Path(__file__).resolve().parent.parent / "skills"

# The contract as the server serves it (tests/contract.py): tool -> (required, optional arguments).
CONTRACT: dict[str, tuple[set[str], set[str]]] = {tool: arguments(tool) for tool in tool_schemas()}

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
    models.Limits,
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
    models.RepoInfo,
    models.WorkspaceDiff,
    models.DiffFile,
    models.FetchResult,
    models.SnapshotInfo,
    models.SnapshotList,
):
    _FIELD_NAMES |= set(_model.model_fields)
_FIELD_NAMES |= set(Settings.model_fields) | set(MOVED)  # settings, and the old names of runtimes' ones
_FIELD_NAMES |= {f for n in runtime_names() for f in runtime_class(n).Config.model_fields}  # [runtimes.NAME]

_SNAKE = re.compile(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`")
_FENCE_OPEN = re.compile(r"^([ \t]*)```(\w*)[ \t]*$")


def fences(text: str) -> list[tuple[str, str]]:
    """Every fenced block as (language, body), at any indent (list items indent theirs), dedented."""
    out: list[tuple[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE_OPEN.match(lines[i])
        if not m:
            i += 1
            continue
        indent, lang = m.groups()
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i]
            assert not line.strip() or line.startswith(indent), f"fence body less indented than its fence: {line!r}"
            body.append(line[len(indent):])
            i += 1
        assert i < len(lines), f"unclosed fence ({lang})"
        out.append((lang, "\n".join(body) + "\n"))
        i += 1
    return out


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
    blocks = [body for lang, body in fences(path.read_text()) if lang == "json"]
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
            # Values too: types, enums, patterns and bounds as the server's schema states them.
            jsonschema.validate(args, tool_schemas()[tool])


def test_fences_are_found_at_any_indent():
    text = "1. Call it:\n   ```json\n   {\"a\": 1}\n   ```\n\n```nix\nx\n```\n"
    assert fences(text) == [("json", '{"a": 1}\n'), ("nix", "x\n")]
    # The old top-level-only pattern missed the indented one; every indented JSON block counts now.
    indented = [p for p in _skill_files() if re.search(r"^[ \t]+```json", p.read_text(), re.M)]
    assert indented, "the skills have indented examples (this test guards that they are read)"


def test_every_tool_is_documented_somewhere():
    text = "".join(p.read_text() for p in _skill_files())
    missing = [tool for tool in CONTRACT if f"`{tool}`" not in text and f'"{tool}"' not in text]
    assert not missing


def test_frontmatter_parser_rejects_bad_input():
    with pytest.raises(AssertionError):
        _frontmatter("name: x\n")
    assert _frontmatter("---\nname: a\ndescription: >-\n  one\n  two\n---\nbody")["description"] == "one two"
