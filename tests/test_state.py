"""The registry: atomic replacement, the cross-process lock, and settings loading."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from sandbox_mcp.config import load_settings
from sandbox_mcp.errors import BackendError, InvalidSpec
from sandbox_mcp.models import WorkspaceRecord
from sandbox_mcp.registry import Registry, RegistryData
from sandbox_mcp.runtimes.nixos.settings import NixosSettings

from .points import HUNG_S, wait_until_sync


def record(name: str, ip: str = "192.168.83.10") -> WorkspaceRecord:
    return WorkspaceRecord(name=name, runtime="nspawn", ip=ip, mac="02:00:00:00:00:01", cid=101, user="agent")


def _add_many(path: str, prefix: str, n: int) -> None:
    reg = Registry(Path(path))
    for i in range(n):
        with reg.transaction_sync() as data:
            data.workspaces[f"{prefix}{i}"] = record(f"{prefix}{i}")


def test_concurrent_writers_in_separate_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_many, args=(str(path), p, 25)) for p in ("a", "b", "c", "d")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(HUNG_S)
        assert p.exitcode == 0
    names = set(Registry(path).read_sync().workspaces)
    assert names == {f"{p}{i}" for p in "abcd" for i in range(25)}


def _hold_lock(path: str, holding: Any, release: Any) -> None:
    reg = Registry(Path(path))
    with reg.transaction_sync() as data:
        holding.set()
        release.wait(HUNG_S)
        data.workspaces["holder"] = record("holder")


def _blocked_on(lock_file: Path) -> int:
    """How many flock waiters /proc/locks shows on ``lock_file`` (the kernel's word, not a guess)."""
    inode = f":{lock_file.stat().st_ino} "
    return sum(1 for line in Path("/proc/locks").read_text().splitlines() if "->" in line and inode in line)


def test_the_lock_excludes_other_processes(tmp_path: Path) -> None:
    path = tmp_path / "registry.json"
    ctx = multiprocessing.get_context("fork")
    holding, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_lock, args=(str(path), holding, release))
    p.start()
    try:
        assert holding.wait(HUNG_S)
        seen: list[RegistryData] = []
        reader = threading.Thread(target=lambda: seen.append(Registry(path).read_sync()))
        reader.start()
        # The reader is queued on the lock while the writer holds it ...
        wait_until_sync(lambda: _blocked_on(Registry(path).lock_path) == 1, "the reader to wait for the lock")
        assert not seen
        release.set()
        reader.join(HUNG_S)
        # ... and so reads the writer's change, not the file before it.
        assert "holder" in seen[0].workspaces
    finally:
        release.set()
        p.join(HUNG_S)
    assert p.exitcode == 0


def test_a_failed_transaction_writes_nothing_and_leaves_no_temp_files(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.json")
    with reg.transaction_sync() as data:
        data.workspaces["one"] = record("one")
    before = reg.path.read_bytes()
    with pytest.raises(RuntimeError), reg.transaction_sync() as data:
        data.workspaces["two"] = record("two")
        raise RuntimeError("boom")
    assert reg.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json", "registry.json.lock"]


def test_corrupt_registry_is_reported_not_overwritten(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "registry.json")
    reg.path.write_text('{"workspaces": {"x": {"name": 5}}}')
    with pytest.raises(BackendError, match="corrupt"):
        reg.read_sync()
    assert reg.path.read_text() == '{"workspaces": {"x": {"name": 5}}}'


def test_default_paths_are_expanded(tmp_path: Path) -> None:
    s = load_settings({}, tmp_path / "none.toml")
    assert s.state_dir == Path.home() / "sandboxed" and s.state_dir.is_absolute()
    assert s.registry_path == Path.home() / "sandboxed" / "registry.json"


def test_settings_from_env_and_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('bridge = "br-file"\nuser = "dev"\n[nixos]\nhost = "fry"\n')
    s = load_settings({"SANDBOX_MCP_BRIDGE": "br-env", "SANDBOX_MCP_NIXOS_ESCALATION": "doas",
                       "SANDBOX_MCP_STATE_DIR": "~/x"}, cfg)
    nixos = NixosSettings.of(s)  # the [nixos] table and SANDBOX_MCP_NIXOS_* are [runtimes.nixos]'s old names
    assert (s.bridge, s.user, nixos.host, nixos.escalation) == ("br-env", "dev", "fry", "doas")
    assert s.state_dir == Path(os.path.expanduser("~/x"))
    assert str(s.host_ip) == "192.168.83.1"
    with pytest.raises(InvalidSpec, match="bridge"):
        load_settings({"SANDBOX_MCP_BRIDGE": "way-too-long-bridge-name"}, tmp_path / "none.toml")
    with pytest.raises(InvalidSpec, match="too small"):
        load_settings({"SANDBOX_MCP_SUBNET": "10.0.0.0/30"}, tmp_path / "none.toml")
    with pytest.raises(InvalidSpec, match="not valid TOML"):
        (tmp_path / "bad.toml").write_text("= =")
        load_settings({}, tmp_path / "bad.toml")
