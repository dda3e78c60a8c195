"""The lifecycle manager in nixos mode, through the MCP-facing manager API.

nixos-rebuild and systemctl cannot run here: the runtime's command prefix points them at a
stand-in script that records each argv and fails when told to. Everything else is real: the
manager's registry, the module's JSON registry and per-workspace file, host keys, locks.
"""

from __future__ import annotations

import json
import stat
import sys
from pathlib import Path

import pytest

from sandbox_mcp import ssh
from sandbox_mcp.config import Settings
from sandbox_mcp.errors import CommandFailed, InvalidSpec
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import CreateSpec
from sandbox_mcp.runtimes import RuntimeContext
from sandbox_mcp.runtimes.nixos import NixosRuntime
from sandbox_mcp.runtimes.nixos.settings import NixosSettings

pytestmark = pytest.mark.anyio

STAND_IN = """#!{python}
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["STAND_IN_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
if "nixos-rebuild" in argv:
    print("building the system configuration...")
    if os.path.exists(os.environ["STAND_IN_FAIL"]):
        print("error: attribute 'nope' missing", file=sys.stderr)
        sys.exit(1)
if "show" in argv:
    print("ActiveState=inactive\\nSubState=dead\\nMainPID=0\\nActiveEnterTimestampMonotonic=0")
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    script = tmp_path / "stand-in"
    script.write_text(STAND_IN.format(python=sys.executable))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("STAND_IN_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("STAND_IN_FAIL", str(tmp_path / "fail"))
    (tmp_path / "flake").mkdir()
    return {"script": script, "log": tmp_path / "calls.jsonl", "fail": tmp_path / "fail", "root": tmp_path}


def calls(env: dict[str, Path]) -> list[list[str]]:
    if not env["log"].exists():
        return []
    return [json.loads(line) for line in env["log"].read_text().splitlines()]


async def open_manager(env: dict[str, Path]) -> WorkspaceManager:
    root = env["root"]
    settings = Settings(
        mode="nixos",
        state_dir=root / "state",
        nixos=NixosSettings(flake=str(root / "flake"), host="fry", escalation="doas"),
    )
    key = ssh.ensure_client_key(settings.state_dir / ".server" / "client_ed25519_key")
    runtime = NixosRuntime(RuntimeContext.for_settings(settings, key), command_prefix=[str(env["script"])])
    manager = WorkspaceManager(settings, runtimes={"nixos": runtime})
    await manager.open()
    return manager


async def test_create_declares_rebuilds_and_destroy_undoes(env: dict[str, Path]) -> None:
    m = await open_manager(env)
    try:
        ws = await m.create(CreateSpec(name="web", type="vm", packages=["ripgrep", "python3Packages.requests"], start=False))
        assert (ws.state, ws.type) == ("stopped", "vm")
        registry = json.loads((env["root"] / "flake" / "sandboxed-workspaces.json").read_text())
        entry = registry["workspaces"]["web"]
        # A VM's module would configure the host: the registry carries data only.
        assert (entry["type"], entry["ip"], entry["config"], entry["egress"]) == ("vm", ws.ip, None, "none")
        assert entry["packages"] == ["python3Packages.requests", "ripgrep"]
        assert registry["authorizedKeys"] == [m.client_public_key.strip()]
        assert not (env["root"] / "flake" / "workspaces" / "web.nix").exists()
        assert calls(env) == [["doas", "-n", "nixos-rebuild", "switch", "--flake", f"{env['root']}/flake#fry"]]
        # The pinned host key and the seeded Claude config exist before the module's setup unit runs.
        state = env["root"] / "state" / "web"
        assert (state / "ssh-host-keys" / "ssh_host_ed25519_key").exists()
        assert ws.ssh.host_key_fingerprint == ssh.host_key_fingerprint(state / "ssh-host-keys" / "ssh_host_ed25519_key")
        assert (state / "claude-config" / ".claude.json").exists()

        status = await m.status("web")
        assert status.runtime.unit == "microvm@sbx-web" and status.runtime.running is False

        await m.destroy("web")
        registry = json.loads((env["root"] / "flake" / "sandboxed-workspaces.json").read_text())
        assert registry["workspaces"] == {}
        assert calls(env)[-1][2:4] == ["nixos-rebuild", "switch"]
        assert not state.exists()
    finally:
        await m.close()


async def test_a_failed_rebuild_restores_everything(env: dict[str, Path]) -> None:
    m = await open_manager(env)
    try:
        await m.create(CreateSpec(name="keep", start=False))
        registry_file = env["root"] / "flake" / "sandboxed-workspaces.json"
        before = registry_file.read_bytes()
        env["fail"].touch()
        with pytest.raises(CommandFailed, match="attribute 'nope' missing") as info:
            await m.create(CreateSpec(name="broken", start=False))
        assert "restored" in str(info.value)
        assert registry_file.read_bytes() == before
        assert not (env["root"] / "flake" / "workspaces" / "broken.nix").exists()
        assert [w.name for w in (await m.list()).workspaces] == ["keep"]
        assert not (env["root"] / "state" / "broken").exists()
    finally:
        await m.close()


async def test_container_names_are_limited_to_7_characters_in_nixos_mode(env: dict[str, Path]) -> None:
    m = await open_manager(env)
    try:
        # The NixOS container is sbx-NAME, and nixpkgs' private-network containers allow 11 characters.
        with pytest.raises(InvalidSpec, match=r"'eight-ch' is 8 characters; container workspaces allow at most 7"):
            await m.create(CreateSpec(name="eight-ch", start=False))
        assert calls(env) == []  # nothing was rebuilt
        assert (await m.list()).workspaces == []
        assert not (env["root"] / "state" / "eight-ch").exists()
        assert not (env["root"] / "flake" / "sandboxed-workspaces.json").exists()
        # The limit is the containers': 7 characters pass, and so does a 12-character VM.
        await m.create(CreateSpec(name="seven-c", start=False))
        await m.create(CreateSpec(name="twelve-chars", type="vm", start=False))
        assert [w.name for w in (await m.list()).workspaces] == ["seven-c", "twelve-chars"]
    finally:
        await m.close()


async def test_what_the_module_cannot_honour_is_refused_before_anything_changes(env: dict[str, Path]) -> None:
    """A VM below the VM minimum does not boot: refused, the minimum the same one the settings use
    (models.VM_MIN_MEMORY_MIB). egress is the module's to enforce: it goes into the registry."""
    m = await open_manager(env)
    try:
        await m.create(CreateSpec(name="out", egress="internet", start=False))
        registry = json.loads((env["root"] / "flake" / "sandboxed-workspaces.json").read_text())
        assert registry["workspaces"]["out"]["egress"] == "internet"
        await m.destroy("out")
        with pytest.raises(InvalidSpec, match="between 256 and 4194304 for a 'vm' workspace, got 128"):
            await m.create(CreateSpec(name="tiny", type="vm", memory_mib=128, start=False))
        await m.create(CreateSpec(name="small", memory_mib=128, start=False))  # a container may be that small
        assert calls(env) != [] and [w.name for w in (await m.list()).workspaces] == ["small"]
        assert not (env["root"] / "state" / "tiny").exists()
    finally:
        await m.close()
