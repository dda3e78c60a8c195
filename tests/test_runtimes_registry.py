"""The runtime seam: runtimes found by name and mode, their own typed state, old registries still load."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.errors import InvalidSpec
from sandbox_mcp.models import RuntimeDetail, WorkspaceRecord
from sandbox_mcp.runtimes import (
    Runtime,
    RuntimeContext,
    RuntimeState,
    build_runtimes,
    register,
    resolve_mode,
    runtime_class,
    runtime_names,
)
from sandbox_mcp.runtimes.nspawn import NspawnRuntime, NspawnState
from sandbox_mcp.state import Registry


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
