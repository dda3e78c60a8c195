"""Seeding a workspace's Claude Code config on the host, and the claude-sandboxed wrapper run for real."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from sandbox_mcp import claude_workspace
from sandbox_mcp.claude_workspace import (
    CLAUDE_JSON,
    CLAUDE_WRAPPER,
    CREDENTIALS_JSON,
    SETTINGS_JSON,
    environment_lines,
    host_credentials_file,
    seed_claude_config,
)
from sandbox_mcp.errors import InvalidSpec

WS = "/home/agent/workspace"
IS_ROOT = os.geteuid() == 0
# As root the files go to a foreign uid, as the manager does; otherwise to ourselves.
UID, GID = (1000, 1000) if IS_ROOT else (os.getuid(), os.getgid())


def _seed(config_dir: Path, **kw) -> Path:
    return seed_claude_config(config_dir, workspace_dir_inside=WS, uid=UID, gid=GID, **kw)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_seed_writes_onboarding_trust_and_bypass(tmp_path: Path):
    cfg = tmp_path / "ws1" / "claude-config"
    assert _seed(cfg) == cfg
    data = _load(cfg / CLAUDE_JSON)
    assert data["hasCompletedOnboarding"] is True
    assert data["bypassPermissionsModeAccepted"] is True
    project = data["projects"][WS]
    assert project["hasTrustDialogAccepted"] is True
    assert project["hasCompletedProjectOnboarding"] is True
    assert project["projectOnboardingSeenCount"] >= 1
    settings = _load(cfg / SETTINGS_JSON)
    assert settings["permissions"]["defaultMode"] == "bypassPermissions"
    assert settings["skipDangerousModePermissionPrompt"] is True
    assert not (cfg / CREDENTIALS_JSON).exists()


def test_ownership_and_modes(tmp_path: Path):
    cfg = tmp_path / "claude-config"
    _seed(cfg)
    st = cfg.stat()
    assert stat.S_IMODE(st.st_mode) == 0o700
    assert (st.st_uid, st.st_gid) == (UID, GID)
    for name in (CLAUDE_JSON, SETTINGS_JSON):
        st = (cfg / name).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600, name
        assert (st.st_uid, st.st_gid) == (UID, GID), name
    # No temporary files are left behind.
    assert sorted(p.name for p in cfg.iterdir()) == [CLAUDE_JSON, SETTINGS_JSON]


def test_existing_dir_gets_mode_and_owner_fixed(tmp_path: Path):
    cfg = tmp_path / "claude-config"
    cfg.mkdir(mode=0o755)
    _seed(cfg)
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o700
    assert (cfg.stat().st_uid, cfg.stat().st_gid) == (UID, GID)


def test_merges_with_existing_state(tmp_path: Path):
    cfg = tmp_path / "claude-config"
    cfg.mkdir()
    (cfg / CLAUDE_JSON).write_text(
        json.dumps(
            {
                "numStartups": 7,
                "userID": "abc",
                "hasCompletedOnboarding": False,
                "mcpServers": {"x": {"command": "y"}},
                "projects": {
                    "/home/agent/workspace/repo": {"allowedTools": ["Bash"], "hasTrustDialogAccepted": True},
                    WS: {"history": [{"display": "hi"}], "hasTrustDialogAccepted": False},
                },
            }
        )
    )
    (cfg / SETTINGS_JSON).write_text(
        json.dumps({"model": "opus", "permissions": {"allow": ["Bash(ls:*)"], "defaultMode": "default"}})
    )
    _seed(cfg)
    data = _load(cfg / CLAUDE_JSON)
    assert data["numStartups"] == 7 and data["userID"] == "abc"
    assert data["mcpServers"] == {"x": {"command": "y"}}
    assert data["hasCompletedOnboarding"] is True
    repo = data["projects"]["/home/agent/workspace/repo"]
    assert repo == {"allowedTools": ["Bash"], "hasTrustDialogAccepted": True}
    assert data["projects"][WS]["history"] == [{"display": "hi"}]
    assert data["projects"][WS]["hasTrustDialogAccepted"] is True
    settings = _load(cfg / SETTINGS_JSON)
    assert settings["model"] == "opus"
    assert settings["permissions"] == {"allow": ["Bash(ls:*)"], "defaultMode": "bypassPermissions"}


def test_idempotent(tmp_path: Path):
    cfg = tmp_path / "claude-config"
    _seed(cfg)
    first = {p.name: p.read_bytes() for p in cfg.iterdir()}
    _seed(cfg)
    assert {p.name: p.read_bytes() for p in cfg.iterdir()} == first


def test_extra_trusted_dirs(tmp_path: Path):
    cfg = tmp_path / "claude-config"
    _seed(cfg, trusted_dirs=["/home/agent", "/home/agent/workspace/"])
    assert set(_load(cfg / CLAUDE_JSON)["projects"]) == {WS, "/home/agent"}


def test_corrupt_file_is_moved_aside_not_lost(tmp_path: Path):
    cfg = tmp_path / "claude-config"
    cfg.mkdir()
    (cfg / CLAUDE_JSON).write_text("{not json")
    (cfg / SETTINGS_JSON).write_text("[1, 2]")
    _seed(cfg)
    assert _load(cfg / CLAUDE_JSON)["hasCompletedOnboarding"] is True
    aside = sorted(p.name for p in cfg.glob("*.corrupt-*"))
    assert len(aside) == 2
    assert (cfg / next(a for a in aside if a.startswith(CLAUDE_JSON))).read_text() == "{not json"


def test_symlink_planted_by_the_workspace_is_not_followed(tmp_path: Path):
    # The workspace user can write this directory; the host must not read or write through a link.
    target = tmp_path / "host-secret"
    target.write_text('{"secret": 1}')
    cfg = tmp_path / "claude-config"
    cfg.mkdir()
    (cfg / CLAUDE_JSON).symlink_to(target)
    _seed(cfg)
    assert target.read_text() == '{"secret": 1}'
    assert not (cfg / CLAUDE_JSON).is_symlink()
    assert "secret" not in _load(cfg / CLAUDE_JSON)


def test_config_dir_symlink_refused(tmp_path: Path):
    real = tmp_path / "elsewhere"
    real.mkdir()
    link = tmp_path / "claude-config"
    link.symlink_to(real)
    with pytest.raises(InvalidSpec):
        _seed(link)


def test_relative_workspace_dir_refused(tmp_path: Path):
    with pytest.raises(InvalidSpec):
        seed_claude_config(tmp_path / "c", workspace_dir_inside="workspace", uid=UID, gid=GID)
    assert not (tmp_path / "c").exists()


def test_credentials_not_copied_unless_asked(tmp_path: Path):
    home_claude = tmp_path / "home" / ".claude"
    home_claude.mkdir(parents=True)
    (home_claude / CREDENTIALS_JSON).write_text('{"claudeAiOauth": {"accessToken": "t"}}')
    cfg = tmp_path / "claude-config"
    _seed(cfg)
    assert not (cfg / CREDENTIALS_JSON).exists()


@pytest.mark.parametrize("give", ["file", "dir"])
def test_credentials_copied_when_asked(tmp_path: Path, give: str):
    home_claude = tmp_path / "home" / ".claude"
    home_claude.mkdir(parents=True)
    src = home_claude / CREDENTIALS_JSON
    src.write_text('{"claudeAiOauth": {"accessToken": "t"}}')
    src.chmod(0o600)
    cfg = tmp_path / "claude-config"
    _seed(cfg, copy_credentials_from=src if give == "file" else home_claude)
    copied = cfg / CREDENTIALS_JSON
    assert copied.read_text() == src.read_text()
    assert stat.S_IMODE(copied.stat().st_mode) == 0o600
    assert (copied.stat().st_uid, copied.stat().st_gid) == (UID, GID)


def test_missing_credentials_is_an_error_that_says_what_to_do(tmp_path: Path):
    with pytest.raises(InvalidSpec, match="copy_claude_credentials"):
        _seed(tmp_path / "cfg", copy_credentials_from=tmp_path / "nope" / CREDENTIALS_JSON)
    assert not (tmp_path / "cfg").exists()


def test_user_credentials_survive_a_reseed(tmp_path: Path):
    cfg = tmp_path / "claude-config"
    _seed(cfg)
    (cfg / CREDENTIALS_JSON).write_text("logged in inside")
    _seed(cfg)
    assert (cfg / CREDENTIALS_JSON).read_text() == "logged in inside"


def test_environment_lines_and_paths():
    assert environment_lines("agent") == ["CLAUDE_CONFIG_DIR=/home/agent/claude-config"]
    assert environment_lines("bob") == ["CLAUDE_CONFIG_DIR=/home/bob/claude-config"]
    assert claude_workspace.workspace_dir_inside("agent") == WS


def test_host_credentials_file(tmp_path: Path):
    assert host_credentials_file(tmp_path, {}) == tmp_path / ".claude" / CREDENTIALS_JSON
    env = {"CLAUDE_CONFIG_DIR": "/x/cfg"}
    assert host_credentials_file(tmp_path, env) == Path("/x/cfg") / CREDENTIALS_JSON


# --- the wrapper, run by a real /bin/sh against a stand-in `claude` that prints its arguments ---


def _install_wrapper(tmp_path: Path, name: str = "claude-sandboxed") -> Path:
    bindir = tmp_path / "wrapbin"
    bindir.mkdir(exist_ok=True)
    wrapper = bindir / name
    wrapper.write_text(CLAUDE_WRAPPER)
    wrapper.chmod(0o755)
    return wrapper


def _fake_claude(tmp_path: Path) -> Path:
    bindir = tmp_path / "realbin"
    bindir.mkdir()
    fake = bindir / "claude"
    fake.write_text('#!/bin/sh\necho "CFG=${CLAUDE_CONFIG_DIR-}"\nfor a in "$@"; do echo "ARG=$a"; done\n')
    fake.chmod(0o755)
    return bindir


def _run(wrapper: Path, args: list[str], path: str, home: Path, env_extra: dict | None = None):
    env = {"PATH": path, "HOME": str(home), **(env_extra or {})}
    return subprocess.run([str(wrapper), *args], env=env, capture_output=True, text=True, timeout=10)


def test_wrapper_adds_skip_permissions(tmp_path: Path):
    wrapper = _install_wrapper(tmp_path)
    realbin = _fake_claude(tmp_path)
    home = tmp_path / "home"
    (home / "claude-config").mkdir(parents=True)
    out = _run(wrapper, ["-p", "hello world"], f"{wrapper.parent}:{realbin}:/usr/bin:/bin", home)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        f"CFG={home}/claude-config",
        "ARG=--dangerously-skip-permissions",
        "ARG=-p",
        "ARG=hello world",
    ]


def test_wrapper_keeps_an_explicit_config_dir_and_passes_subcommands(tmp_path: Path):
    wrapper = _install_wrapper(tmp_path)
    realbin = _fake_claude(tmp_path)
    out = _run(wrapper, ["mcp", "list"], f"{realbin}:/usr/bin:/bin", tmp_path, {"CLAUDE_CONFIG_DIR": "/cfg"})
    assert out.stdout.splitlines() == ["CFG=/cfg", "ARG=mcp", "ARG=list"]


def test_wrapper_named_claude_does_not_run_itself(tmp_path: Path):
    # Installed as `claude` first on PATH, it must find the real one further on.
    wrapper = _install_wrapper(tmp_path, name="claude")
    realbin = _fake_claude(tmp_path)
    out = _run(wrapper, ["x"], f"{wrapper.parent}:{realbin}:/usr/bin:/bin", tmp_path)
    assert out.returncode == 0, out.stderr
    assert "ARG=--dangerously-skip-permissions" in out.stdout.splitlines()


def test_wrapper_without_claude_says_so(tmp_path: Path):
    wrapper = _install_wrapper(tmp_path, name="claude")
    out = _run(wrapper, [], f"{wrapper.parent}:/nonexistent", tmp_path / "nohome")
    assert out.returncode == 127
    assert "not installed" in out.stderr


def test_profile_snippet_is_valid_sh(tmp_path: Path):
    snippet = tmp_path / "s.sh"
    snippet.write_text(claude_workspace.CLAUDE_PROFILE_SNIPPET)
    assert subprocess.run(["sh", "-n", str(snippet)], capture_output=True).returncode == 0
    assert subprocess.run(["sh", "-n", "-c", CLAUDE_WRAPPER], capture_output=True).returncode == 0
