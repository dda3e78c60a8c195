"""The state directory cannot be turned against the root server: no symlink followed, no FIFO read, .server private."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sandbox_mcp import claude_workspace
from sandbox_mcp.config import Settings
from sandbox_mcp.errors import InvalidSpec
from sandbox_mcp.fsutil import own_dir as _own_dir
from sandbox_mcp.manager import WorkspaceManager

pytestmark = pytest.mark.anyio


async def test_server_dir_is_private_even_if_it_existed_open(tmp_path: Path) -> None:
    server = tmp_path / "state" / ".server"
    server.mkdir(parents=True, mode=0o777)
    server.chmod(0o777)
    async with WorkspaceManager(Settings(state_dir=tmp_path / "state", mode="direct", hosts_file=None)):
        pass
    assert stat.S_IMODE(server.stat().st_mode) == 0o700


def test_a_planted_symlink_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "etc-like"
    target.mkdir()
    before = target.stat()
    planted = tmp_path / "workspace"
    planted.symlink_to(target)
    with pytest.raises(InvalidSpec, match="symlink"):
        _own_dir(planted, 4242, 4242, None)
    after = target.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)


def test_own_dir_sets_owner_and_mode(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    _own_dir(d, 4242, 4243, 0o750)
    st = d.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4243, 0o750)


def test_seeding_refuses_a_fifo_instead_of_hanging(tmp_path: Path) -> None:
    config = tmp_path / "claude-config"
    config.mkdir()
    os.mkfifo(config / claude_workspace.CLAUDE_JSON)  # planted by the workspace user
    with pytest.raises(InvalidSpec, match="not a regular file"):
        claude_workspace.seed_claude_config(config, workspace_dir_inside="/home/agent/workspace", uid=os.getuid(),
                                      gid=os.getgid())


def test_seeding_moves_a_huge_file_aside_unread(tmp_path: Path) -> None:
    config = tmp_path / "claude-config"
    config.mkdir()
    huge = config / claude_workspace.SETTINGS_JSON
    with open(huge, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB that would be read whole before
    claude_workspace.seed_claude_config(config, workspace_dir_inside="/home/agent/workspace", uid=os.getuid(),
                                  gid=os.getgid())
    assert huge.stat().st_size < 4096  # written afresh
    assert any(p.name.startswith(f"{claude_workspace.SETTINGS_JSON}.corrupt-") for p in config.iterdir())
