"""The runtime seam: runtimes found by name and mode, their own typed state, old registries still load;
which runtime serves a type; and a runtime with a type of its own added from outside sandbox_mcp."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.errors import InvalidSpec
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import CreateSpec, RuntimeDetail, WorkspaceRecord
from sandbox_mcp.naming import mac_for
from sandbox_mcp.registry import Registry
from sandbox_mcp.runtimes import (
    Endpoint,
    NetworkNeeds,
    Runtime,
    RuntimeContext,
    RuntimeState,
    build_runtimes,
    register,
    resolve_mode,
    runtime_class,
    runtime_names,
    type_table,
)
from sandbox_mcp.runtimes.nspawn import NspawnRuntime, NspawnState


class _ToyState(RuntimeState):
    instance: str | None = None


class _Toy(Runtime):
    """A registered plug-in runtime (nothing runs; only the seam is under test here)."""

    name = "toy"
    types: ClassVar = frozenset({"incus"})
    modes: ClassVar = frozenset({"direct"})
    State = _ToyState

    async def prepare(self, record, progress):  # type: ignore[no-untyped-def]
        return self.with_state(record, _ToyState(instance=f"toy-{record.name}"))

    async def start(self, record, progress):  # type: ignore[no-untyped-def]
        return record

    async def stop(self, record, *, force=False):  # type: ignore[no-untyped-def]
        return None

    async def destroy(self, record):  # type: ignore[no-untyped-def]
        return None

    async def status(self, record):  # type: ignore[no-untyped-def]
        return RuntimeDetail(runtime=self.name, running=False)

    async def logs(self, record, lines):  # type: ignore[no-untyped-def]
        return ""


class _Bare(_Toy):
    """A runtime without a bridge: its workspaces are reached through a port of this host's loopback."""

    name = "bare"

    def endpoint(self, record):  # type: ignore[no-untyped-def]
        return Endpoint("127.0.0.1", 2222)


def _ctx(tmp_path: Path, **kw: object) -> RuntimeContext:
    return RuntimeContext.for_settings(Settings(state_dir=tmp_path, image_dir=tmp_path / "img", **kw), "")


def test_runtimes_are_found_by_mode_and_name(tmp_path: Path) -> None:
    assert {"nspawn", "nixos"} <= set(runtime_names())
    direct = build_runtimes("direct", _ctx(tmp_path))
    assert "nspawn" in direct and "nixos" not in direct
    assert all("direct" in r.modes for r in direct.values())
    with pytest.raises(InvalidSpec, match="no runtime named 'nope'"):
        runtime_class("nope")
    assert resolve_mode(Settings(state_dir=tmp_path, mode="direct")) == "direct"


def test_a_registered_runtime_joins_its_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox_mcp.runtimes as registry

    monkeypatch.setattr(registry, "_registered", {})
    register("toy", _Toy)
    runtimes = build_runtimes("direct", _ctx(tmp_path))
    assert isinstance(runtimes["toy"], _Toy) and isinstance(runtimes["nspawn"], NspawnRuntime)


@pytest.mark.anyio
async def test_runtime_state_is_typed_and_private_to_its_runtime(tmp_path: Path) -> None:
    toy = _Toy(_ctx(tmp_path))
    record = WorkspaceRecord(name="a", runtime="toy", ip="192.168.83.10", mac="02:00:00:00:00:01", cid=3, user="agent")
    record = await toy.prepare(record, None)  # type: ignore[arg-type]
    assert record.runtime_state == {"instance": "toy-a"}
    assert toy.state(record).instance == "toy-a"
    assert toy.endpoint(record) == ("192.168.83.10", 22)


def test_an_old_registry_still_loads(tmp_path: Path) -> None:
    """Before runtime_state, nspawn's PIDs and image sat on the record itself."""
    (tmp_path / "registry.json").write_text(
        '{"version": 1, "workspaces": {"old": {"name": "old", "type": "container", "state": "running",'
        ' "runtime": "nspawn", "ip": "192.168.83.10", "mac": "02:00:00:00:00:01", "cid": 3, "user": "agent",'
        ' "image": "bookworm-base-abc", "pid": 4242, "pid_start_time": 99, "leader_pid": 4243,'
        ' "leader_start_time": 100}}}'
    )
    record = Registry(tmp_path / "registry.json").read_sync().workspaces["old"]
    state = NspawnState.model_validate(record.runtime_state)
    assert state.image == "bookworm-base-abc"
    assert state.process is not None and (state.process.pid, state.process.start_time) == (4242, 99)
    assert state.leader is not None and (state.leader.pid, state.leader.start_time) == (4243, 100)
    runtime = NspawnRuntime(_ctx(tmp_path))
    stopped = runtime.mark_stopped(record)
    assert runtime.state(stopped).process is None and runtime.state(stopped).image == "bookworm-base-abc"


def test_two_runtimes_claiming_a_type_need_the_setting_that_picks_one(tmp_path: Path) -> None:
    runtimes = build_runtimes("direct", _ctx(tmp_path))
    toy = _Toy(_ctx(tmp_path))
    both = {**runtimes, "toy": toy}
    with pytest.raises(InvalidSpec, match=r"runtimes incus, toy all realise type 'incus'; .*runtime_for_type"):
        type_table(both, {})
    assert type_table(both, {"incus": "toy"})["incus"] is toy
    assert type_table(both, {"incus": "incus"})["incus"] is runtimes["incus"]
    assert type_table(runtimes, {})["container"] is runtimes["nspawn"]  # one claim each: no setting needed
    with pytest.raises(InvalidSpec, match="names 'qemu' for type 'container'"):
        type_table(runtimes, {"container": "qemu"})
    with pytest.raises(InvalidSpec, match="type 'box', which no runtime"):
        type_table(runtimes, {"box": "nspawn"})


@pytest.mark.anyio
async def test_the_manager_refuses_to_start_with_an_undecided_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox_mcp.runtimes as registry

    monkeypatch.setattr(registry, "_registered", {})
    register("toy", _Toy)
    settings = Settings(mode="direct", state_dir=tmp_path / "state", image_dir=tmp_path / "img")
    with pytest.raises(InvalidSpec, match="all realise type 'incus'"):
        await WorkspaceManager(settings).open()
    assert not (tmp_path / "state" / "registry.json").exists()  # refused before the registry was touched
    chosen = settings.model_copy(update={"runtime_for_type": {"incus": "toy"}})
    assert Settings.model_validate({**settings.model_dump(), "runtime_for_type": '{"incus": "toy"}'}).runtime_for_type \
        == {"incus": "toy"}  # the environment's spelling: JSON
    m = WorkspaceManager(chosen)
    await m.open()
    try:
        assert m._runtime_for_type("incus") is m.runtimes["toy"]
    finally:
        await m.close()


@pytest.mark.anyio
async def test_a_workspace_gets_only_the_network_its_runtime_asks_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime without a bridge asks for nothing: no address, MAC or CID; a container an address and a MAC."""
    import sandbox_mcp.runtimes as registry

    monkeypatch.setattr(registry, "_registered", {})
    register("bare", _Bare)
    settings = Settings(mode="direct", state_dir=tmp_path / "state", image_dir=tmp_path / "img", hosts_file="",
                        runtime_for_type={"incus": "bare"})  # fmt: skip
    async with WorkspaceManager(settings) as m:
        assert m.runtimes["nspawn"].network_needs("container") == NetworkNeeds(address=True, mac=True)
        assert m.runtimes["qemu"].network_needs("vm") == NetworkNeeds(address=True, mac=True)
        ws = await m.create(CreateSpec(name="bare", type="incus", start=False))
        assert (ws.type, ws.state, ws.ip, ws.ssh.host, ws.ssh.port) == ("incus", "stopped", None, "127.0.0.1", 2222)
        record = await m.registry.get("bare")
        assert (record.runtime, record.ip, record.mac, record.cid) == ("bare", None, None, None)
        with pytest.raises(InvalidSpec, match="'incus' workspaces get no address on the workspace subnet"):
            await m.create(CreateSpec(name="bare2", type="incus", start=False, ip="192.168.83.50"))
        assert "bare2" not in (await m.registry.read()).workspaces
        container = m._register(CreateSpec(name="c1"), [], set(), m.runtimes["nspawn"])
        assert (container.ip, container.mac, container.cid) == ("192.168.83.10", mac_for("c1"), None)
        await m.registry.remove("c1")
        assert (await m.destroy("bare")).destroyed
    ctx = RuntimeContext.for_settings(Settings(state_dir=tmp_path, nixos={"flake": str(tmp_path), "host": "h"}),
                                      "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFzz me@laptop")
    nixos = build_runtimes("nixos", ctx)["nixos"]
    assert nixos.network_needs("vm") == NetworkNeeds(address=True, mac=True, vsock_cid=True)  # microvm.nix's vsock
    assert nixos.network_needs("container") == NetworkNeeds(address=True, mac=True)


@pytest.mark.anyio
async def test_a_runtime_with_a_type_of_its_own_runs_through_the_mcp_client(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tests/box_runtime adds type "box" from outside sandbox_mcp: create -> exec -> destroy, for real."""
    from mcp import Client

    import sandbox_mcp.runtimes as registry
    from sandbox_mcp.server import build_server

    from .box_runtime import BoxRuntime
    from .conftest import destroy_all

    monkeypatch.setattr(registry, "_registered", {})
    register("boxes", BoxRuntime)
    assert registry.known_types() == ["container", "vm", "incus", "box"]
    async with Client(build_server(settings)) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["create_workspace"].input_schema["properties"]["type"]["enum"] == registry.known_types()
        try:
            created = await client.call_tool("create_workspace", {"name": "box1", "type": "box"})
            assert not created.is_error, created.content
            ws = created.structured_content
            assert (ws["type"], ws["state"]) == ("box", "running")
            ran = (await client.call_tool("exec", {"name": "box1", "command": "hostname; id -un"})).structured_content
            assert (ran["exit_code"], ran["stdout"]) == (0, f"box1\n{settings.user}\n")
            status = (await client.call_tool("workspace_status", {"name": "box1"})).structured_content
            assert status["runtime"]["runtime"] == "boxes" and status["runtime"]["running"]
            gone = (await client.call_tool("destroy_workspace", {"name": "box1"})).structured_content
            assert gone == {"name": "box1", "destroyed": True, "kept_data": False}
            assert (await client.call_tool("list_workspaces", {})).structured_content["workspaces"] == []  # type: ignore[index]
        finally:
            m = WorkspaceManager(settings, {"boxes": BoxRuntime(RuntimeContext.for_settings(settings, ""))})
            await m.open()
            await destroy_all(m)
            await m.close()
