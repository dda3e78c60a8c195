"""install-claude: the JSON Claude Code reads, the `claude mcp` argv, the skills copy."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_mcp.claude_install import (
    SERVER_NAME,
    claude_mcp_add_argv,
    claude_mcp_remove_argv,
    default_server_command,
    install_claude,
    mcp_server_entry,
    skills_dir,
)
from sandbox_mcp.errors import CommandFailed, InvalidSpec

CMD = ["/opt/venv/bin/sandbox-mcp", "serve"]
ENTRY = {"type": "stdio", "command": "/opt/venv/bin/sandbox-mcp", "args": ["serve"], "env": {}}
OTHER = {"type": "stdio", "command": "npx", "args": ["-y", "other-mcp"], "env": {"TOKEN": "x"}}


@pytest.fixture
def skills_src(tmp_path: Path) -> Path:
    src = tmp_path / "src-skills"
    for name in ("alpha", "beta"):
        (src / name).mkdir(parents=True)
        (src / name / "SKILL.md").write_text(f"---\nname: {name}\ndescription: d\n---\n")
    (src / "beta" / "extra.md").write_text("more")
    (src / "not-a-skill").mkdir()  # no SKILL.md: not copied
    return src


def _install(scope, tmp_path: Path, skills_src: Path, **kw):
    kw.setdefault("project_dir", None)
    kw.setdefault("use_claude_cli", False)
    return install_claude(scope, home=tmp_path / "home", server_command=CMD, skills_src=skills_src, **kw)


# --- pure builders ---


@pytest.mark.parametrize(
    ("scope", "command", "argv"),
    [
        ("user", CMD, ["claude", "mcp", "add", "--scope", "user", "sandbox", "--", *CMD]),
        ("project", CMD, ["claude", "mcp", "add", "--scope", "project", "sandbox", "--", *CMD]),
        (
            "user",
            ["sudo", "-n", "/usr/local/bin/sandbox-mcp", "serve", "--log-level", "debug"],
            [
                "claude", "mcp", "add", "--scope", "user", "sandbox", "--",
                "sudo", "-n", "/usr/local/bin/sandbox-mcp", "serve", "--log-level", "debug",
            ],
        ),
    ],
)  # fmt: skip
def test_claude_mcp_add_argv(scope, command, argv):
    assert claude_mcp_add_argv(scope, command) == argv


def test_claude_mcp_remove_argv_and_custom_binary():
    assert claude_mcp_remove_argv("project") == ["claude", "mcp", "remove", "--scope", "project", "sandbox"]
    assert claude_mcp_add_argv("user", ["x"], claude="/b/claude", name="s2") == [
        "/b/claude", "mcp", "add", "--scope", "user", "s2", "--", "x",
    ]  # fmt: skip
    with pytest.raises(InvalidSpec):
        claude_mcp_add_argv("user", [])


def test_mcp_server_entry():
    assert mcp_server_entry(CMD) == ENTRY
    with pytest.raises(InvalidSpec):
        mcp_server_entry([])


@pytest.mark.parametrize(
    ("needs_root", "euid", "expected"),
    [
        (True, 0, ["/x/sandbox-mcp", "serve"]),
        (True, 1000, ["sudo", "-n", "/x/sandbox-mcp", "serve"]),
        (False, 1000, ["/x/sandbox-mcp", "serve"]),
    ],
)
def test_default_server_command_with_script(needs_root, euid, expected):
    assert default_server_command(needs_root=needs_root, euid=euid, script="/x/sandbox-mcp") == expected


def _server_command_from(python: Path, path: str) -> list[str]:
    """default_server_command() as computed by an interpreter at ``python`` with ``PATH=path``."""
    env = {"PATH": path, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    code = "import json; from sandbox_mcp.claude_install import default_server_command as d; " \
           "print(json.dumps(d(needs_root=False)))"
    out = subprocess.run([str(python), "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("where", ["beside the interpreter", "on PATH", "nowhere"])
def test_default_server_command_finds_the_console_script(tmp_path: Path, where: str):
    # An interpreter of its own (a symlink to this one) in a directory the test controls, so
    # every branch is taken for real: the script beside it, found on PATH, or neither.
    python = tmp_path / "venv" / "bin" / "python3"
    python.parent.mkdir(parents=True)
    python.symlink_to(os.path.realpath(sys.executable))
    on_path = tmp_path / "on-path"
    on_path.mkdir()
    if where == "beside the interpreter":
        expected = [str(_executable(python.parent / "sandbox-mcp")), "serve"]
        _executable(on_path / "sandbox-mcp")  # the one beside the interpreter wins
    elif where == "on PATH":
        expected = [str(_executable(on_path / "sandbox-mcp")), "serve"]
        (python.parent / "sandbox-mcp").mkdir()  # not a file: not taken
    else:
        expected = [str(python), "-m", "sandbox_mcp", "serve"]
    assert _server_command_from(python, str(on_path)) == expected


# --- user scope, written directly ---


def test_user_scope_fresh_home(tmp_path: Path, skills_src: Path):
    report = _install("user", tmp_path, skills_src)
    cfg = tmp_path / "home" / ".claude.json"
    assert json.loads(cfg.read_text()) == {"mcpServers": {"sandbox": ENTRY}}
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    dest = tmp_path / "home" / ".claude" / "skills"
    assert sorted(p.name for p in dest.iterdir()) == ["alpha", "beta"]
    assert (dest / "beta" / "extra.md").read_text() == "more"
    assert report.method == "config-file"
    assert report.config_file == str(cfg)
    assert report.files_written == [str(cfg)]
    assert report.skills_installed == [str(dest / "alpha"), str(dest / "beta")]
    assert report.server_name == SERVER_NAME and report.server_command == CMD
    assert not report.unchanged and not report.dry_run and report.commands == []


def test_user_scope_merges_and_keeps_other_servers(tmp_path: Path, skills_src: Path):
    home = tmp_path / "home"
    home.mkdir()
    cfg = home / ".claude.json"
    old_sandbox = {"type": "stdio", "command": "/old/sandbox-mcp", "args": ["serve"], "env": {}}
    cfg.write_text(
        json.dumps(
            {
                "numStartups": 3,
                "projects": {"/p": {"hasTrustDialogAccepted": True}},
                "mcpServers": {"other": OTHER, "sandbox": old_sandbox},
            }
        )
    )
    cfg.chmod(0o640)
    _install("user", tmp_path, skills_src)
    data = json.loads(cfg.read_text())
    assert data["numStartups"] == 3
    assert data["projects"] == {"/p": {"hasTrustDialogAccepted": True}}
    assert data["mcpServers"] == {"other": OTHER, "sandbox": ENTRY}
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o640  # the user's choice of mode survives


def test_user_scope_unchanged_entry_is_left_alone(tmp_path: Path, skills_src: Path):
    home = tmp_path / "home"
    home.mkdir()
    cfg = home / ".claude.json"
    cfg.write_text(json.dumps({"mcpServers": {"sandbox": ENTRY}}, indent=4))
    before = cfg.read_bytes(), cfg.stat().st_ino
    report = _install("user", tmp_path, skills_src)
    assert report.unchanged and report.files_written == []
    assert (cfg.read_bytes(), cfg.stat().st_ino) == before


def test_user_scope_with_claude_config_dir(tmp_path: Path, skills_src: Path):
    alt = tmp_path / "alt-claude"
    report = _install("user", tmp_path, skills_src, claude_config_dir=alt)
    assert json.loads((alt / ".claude.json").read_text())["mcpServers"]["sandbox"] == ENTRY
    assert (alt / "skills" / "alpha" / "SKILL.md").is_file()
    assert not (tmp_path / "home" / ".claude.json").exists()
    assert report.config_file == str(alt / ".claude.json")


def test_unparsable_config_is_refused_and_untouched(tmp_path: Path, skills_src: Path):
    home = tmp_path / "home"
    home.mkdir()
    (home / ".claude.json").write_text("{oops")
    with pytest.raises(InvalidSpec, match="not valid JSON"):
        _install("user", tmp_path, skills_src)
    assert (home / ".claude.json").read_text() == "{oops"
    (home / ".claude.json").write_text('{"mcpServers": []}')
    with pytest.raises(InvalidSpec, match="mcpServers"):
        _install("user", tmp_path, skills_src)


def test_dry_run_writes_nothing(tmp_path: Path, skills_src: Path):
    report = _install("user", tmp_path, skills_src, dry_run=True)
    assert not (tmp_path / "home").exists()
    assert report.dry_run and report.files_written == [str(tmp_path / "home" / ".claude.json")]
    assert len(report.skills_installed) == 2


def test_skills_replace_only_their_own_dirs(tmp_path: Path, skills_src: Path):
    dest = tmp_path / "home" / ".claude" / "skills"
    (dest / "alpha").mkdir(parents=True)
    (dest / "alpha" / "stale.md").write_text("old")
    (dest / "mine").mkdir()
    (dest / "mine" / "SKILL.md").write_text("the user's own skill")
    _install("user", tmp_path, skills_src)
    assert not (dest / "alpha" / "stale.md").exists()
    assert (dest / "alpha" / "SKILL.md").is_file()
    assert (dest / "mine" / "SKILL.md").read_text() == "the user's own skill"
    assert not (dest / "not-a-skill").exists()


# --- project scope ---


def test_project_scope(tmp_path: Path, skills_src: Path):
    project = tmp_path / "proj"
    (project / ".claude").mkdir(parents=True)
    (project / ".mcp.json").write_text(json.dumps({"mcpServers": {"other": OTHER}}))
    (project / ".claude" / "settings.local.json").write_text(
        json.dumps({"enabledMcpjsonServers": ["other"], "permissions": {"allow": ["Bash(ls:*)"]}})
    )
    report = _install("project", tmp_path, skills_src, project_dir=project)
    mcp = json.loads((project / ".mcp.json").read_text())
    assert mcp == {"mcpServers": {"other": OTHER, "sandbox": ENTRY}}
    local = json.loads((project / ".claude" / "settings.local.json").read_text())
    assert local == {"enabledMcpjsonServers": ["other", "sandbox"], "permissions": {"allow": ["Bash(ls:*)"]}}
    assert (project / ".claude" / "skills" / "beta" / "SKILL.md").is_file()
    assert not (tmp_path / "home").exists()  # nothing in HOME for project scope
    assert report.config_file == str(project / ".mcp.json")


def test_project_scope_fresh_and_modes(tmp_path: Path, skills_src: Path):
    project = tmp_path / "proj"
    project.mkdir()
    _install("project", tmp_path, skills_src, project_dir=project)
    mcp = project / ".mcp.json"
    assert json.loads(mcp.read_text()) == {"mcpServers": {"sandbox": ENTRY}}
    assert stat.S_IMODE(mcp.stat().st_mode) == 0o644  # meant to be committed and shared
    local = json.loads((project / ".claude" / "settings.local.json").read_text())
    assert local == {"enabledMcpjsonServers": ["sandbox"]}


def test_project_scope_needs_a_directory(tmp_path: Path, skills_src: Path):
    with pytest.raises(InvalidSpec):
        _install("project", tmp_path, skills_src)
    with pytest.raises(InvalidSpec):
        _install("project", tmp_path, skills_src, project_dir=tmp_path / "missing")


def test_bad_scope_and_empty_skills(tmp_path: Path, skills_src: Path):
    with pytest.raises(InvalidSpec):
        _install("global", tmp_path, skills_src)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InvalidSpec):
        _install("user", tmp_path, empty)


def test_bundled_skills_install(tmp_path: Path):
    report = install_claude(
        "user",
        project_dir=None,
        home=tmp_path,
        server_command=CMD,
        skills_src=skills_dir(),
        use_claude_cli=False,
    )
    names = {Path(p).name for p in report.skills_installed}
    assert {"create-workspace", "work-in-workspace"} <= names
    assert (tmp_path / ".claude" / "skills" / "create-workspace" / "SKILL.md").is_file()


# --- through a `claude` binary: a stand-in that records how it was called ---


def _fake_claude(tmp_path: Path, exit_code: int = 0) -> Path:
    log = tmp_path / "claude-calls.jsonl"
    fake = tmp_path / "bin" / "claude"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(json.dumps({'argv': sys.argv[1:], 'cwd': os.getcwd(), 'home': os.environ.get('HOME'),\n"
        "                        'ccd': os.environ.get('CLAUDE_CONFIG_DIR')}) + '\\n')\n"
        f"sys.stderr.write('boom\\n'); sys.exit({exit_code})\n"
    )
    fake.chmod(0o755)
    return fake


def _calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "claude-calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_cli_is_preferred_when_found_on_path(tmp_path: Path, skills_src: Path):
    fake = _fake_claude(tmp_path)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "CLAUDE_CONFIG_DIR": "/should/not/leak"}
    report = _install("user", tmp_path, skills_src, use_claude_cli=True, env=env)
    assert report.method == "claude-cli"
    add = [str(fake), "mcp", "add", "--scope", "user", "sandbox", "--", *CMD]
    assert report.commands == [add]
    assert _calls(tmp_path) == [{"argv": add[1:], "cwd": "/", "home": str(tmp_path / "home"), "ccd": None}]
    assert (tmp_path / "home" / ".claude" / "skills" / "alpha" / "SKILL.md").is_file()


def test_cli_removes_a_different_entry_first_and_runs_in_the_project(tmp_path: Path, skills_src: Path):
    fake = _fake_claude(tmp_path)
    project = tmp_path / "proj"
    project.mkdir()
    (project / ".mcp.json").write_text(json.dumps({"mcpServers": {"sandbox": {"command": "/old"}}}))
    report = _install(
        "project", tmp_path, skills_src, project_dir=project, use_claude_cli=True, claude_bin=str(fake)
    )
    assert [c["argv"][:2] for c in _calls(tmp_path)] == [["mcp", "remove"], ["mcp", "add"]]
    assert report.commands[0] == [str(fake), "mcp", "remove", "--scope", "project", "sandbox"]
    assert all(c["cwd"] == str(project) for c in _calls(tmp_path))


def test_cli_failure_is_reported_with_evidence(tmp_path: Path, skills_src: Path):
    fake = _fake_claude(tmp_path, exit_code=3)
    with pytest.raises(CommandFailed) as err:
        _install("user", tmp_path, skills_src, use_claude_cli=True, claude_bin=str(fake))
    assert err.value.exit_status == 3 and "boom" in str(err.value)


def test_cli_dry_run_runs_nothing(tmp_path: Path, skills_src: Path):
    fake = _fake_claude(tmp_path)
    report = _install("user", tmp_path, skills_src, use_claude_cli=True, claude_bin=str(fake), dry_run=True)
    assert report.commands and _calls(tmp_path) == []
    assert not (tmp_path / "home").exists()


def test_sudo_command_gets_a_note(tmp_path: Path, skills_src: Path):
    report = install_claude(
        "user",
        project_dir=None,
        home=tmp_path,
        server_command=["sudo", "-n", *CMD],
        skills_src=skills_src,
        use_claude_cli=False,
    )
    assert any("sudo" in n for n in report.notes)
    assert json.loads((tmp_path / ".claude.json").read_text())["mcpServers"]["sandbox"]["command"] == "sudo"


def test_report_serialises(tmp_path: Path, skills_src: Path):
    report = _install("user", tmp_path, skills_src)
    assert json.loads(report.model_dump_json())["scope"] == "user"
    assert os.path.isabs(report.config_file)
