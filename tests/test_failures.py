"""Failure paths of direct mode, end to end: what a broken boot and an interrupted create leave behind.

A workspace whose container dies while booting must fail its start with the boot log's tail,
keep that as ``last_error``, and leave no process, link or namespace; a create interrupted by
a server that went away is reported at the next start-up, so the agent knows to destroy it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sandbox_mcp import claude_workspace
from sandbox_mcp.config import Settings
from sandbox_mcp.errors import BackendError, CommandTimeout
from sandbox_mcp.fsutil import file_lock
from sandbox_mcp.images import DebianRoot, ImageStore
from sandbox_mcp.images.debootstrap import IMAGE_RECIPE_VERSION
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import CreateSpec, WorkspaceRecord
from sandbox_mcp.naming import cid_for, mac_for
from sandbox_mcp.registry import Registry

from .conftest import destroy_all
from .test_e2e import NOTHING_LEFT, host_leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

# An init that boots as far as the test lets it, then gives up: the container dies after
# nspawn is running (so the manager is already waiting for SSH), at the moment the test picks.
BROKEN_INIT = """#!/bin/sh
echo "broken-init: up, waiting for the test"
while [ ! -e {go} ]; do sleep 0.05; done
echo "broken-init: giving up"
exit 3
"""


def _copy_with_libraries(program: str, root: Path) -> None:
    """Copy ``program`` and the shared libraries ``ldd`` names into ``root`` at the same paths."""
    files = [program]
    for line in subprocess.run(["ldd", program], capture_output=True, text=True, check=True).stdout.splitlines():
        files += [word for word in line.split() if word.startswith("/")]
    for f in files:
        dest = root / f.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(f), dest)


def _broken_root(user: str):  # type: ignore[no-untyped-def]
    go = f"{claude_workspace.workspace_dir_inside(user)}/go"

    async def build(root: Path) -> None:
        for program in ("/bin/sh", "/bin/sleep"):
            _copy_with_libraries(program, root)
        (root / "etc").mkdir(exist_ok=True)
        (root / "etc" / "os-release").write_text('ID=broken\nNAME="a root whose init gives up"\n')
        init = root / "sbin" / "init"
        init.parent.mkdir(parents=True, exist_ok=True)
        init.write_text(BROKEN_INIT.format(go=go))
        init.chmod(0o755)

    return build


@pytest.fixture
async def broken_settings(settings: Settings, tmp_path: Path) -> Settings:
    """Settings with a private image dir whose base root boots into an init that gives up."""
    if not shutil.which("ldd"):
        pytest.skip("ldd is not installed (Debian package libc-bin)")
    s = settings.model_copy(update={"image_dir": tmp_path / "images"})
    store = ImageStore(s.image_dir)
    key = DebianRoot(s, store).key(())
    await store.ensure(key, _broken_root(s.user), {"recipe": DebianRoot.RECIPE, "version": IMAGE_RECIPE_VERSION,
                                                   "packages": []})
    return s


async def test_a_container_that_dies_while_booting_fails_the_start_with_its_log(broken_settings: Settings) -> None:
    async with WorkspaceManager(broken_settings) as m:
        try:
            ws = await m.create(CreateSpec(name="boom", start=False))
            go = Path(ws.host_workspace_dir) / "go"

            async def progress(message: str, fraction: float | None = None) -> None:
                if message.startswith("waiting for SSH"):
                    go.touch()  # nspawn runs: now let its init give up

            with pytest.raises(BackendError, match="'boom' exited while booting") as info:
                await m.start("boom", progress=progress)
            assert "broken-init: giving up" in str(info.value)  # the log's tail, for the agent
            assert go.exists()

            record = await m.registry.get("boom")
            assert record.state == "stopped"
            assert record.last_error and "exited while booting" in record.last_error
            assert "broken-init: giving up" in record.last_error
            status = await m.status("boom")
            assert status.last_error == record.last_error and status.runtime.running is False
            assert "broken-init: giving up" in (await m.logs("boom", 20)).log
            assert host_leftovers("boom") == NOTHING_LEFT
        finally:
            await destroy_all(m)
    assert host_leftovers("boom") == NOTHING_LEFT


async def test_a_boot_that_never_answers_ssh_times_out_with_advice(broken_settings: Settings) -> None:
    # The init never gives up (the test never says 'go'): only the boot timeout ends the start.
    # The agent must get the timeout itself (a SandboxError whose message says what to do), not
    # an error wrapped by the task group that watches the boot.
    async with WorkspaceManager(broken_settings.model_copy(update={"boot_timeout_s": 1})) as m:
        try:
            await m.create(CreateSpec(name="mute", start=False))
            with pytest.raises(CommandTimeout, match=r"(?s)did not answer within 1 s.*workspace_logs"):
                await m.start("mute")
            record = await m.registry.get("mute")
            assert record.state == "stopped" and "did not answer" in (record.last_error or "")
            assert host_leftovers("mute") == NOTHING_LEFT
        finally:
            await destroy_all(m)


def _creating_record(name: str, settings: Settings, ip: str) -> WorkspaceRecord:
    """The record a server writes first on create, as a server that died right after left it."""
    return WorkspaceRecord(name=name, type="container", state="creating", runtime="nspawn", ip=ip,
                           mac=mac_for(name), cid=cid_for(name), user=settings.user)


async def test_an_interrupted_create_is_reported_at_start_up(settings: Settings) -> None:
    registry = Registry(settings.registry_path)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    await registry.put(_creating_record("halfway", settings, "192.168.83.50"))
    await registry.put(_creating_record("busy", settings, "192.168.83.51"))
    lock = settings.state_dir / ".locks" / "busy.lock"
    with file_lock(lock):  # another live process is still creating 'busy'
        async with WorkspaceManager(settings) as m:
            try:
                halfway = await m.registry.get("halfway")
                assert halfway.state == "error"
                assert halfway.last_error and halfway.last_error.startswith("creation was interrupted")
                assert "destroy_workspace" in halfway.last_error
                listed = {w.name: w for w in (await m.list()).workspaces}
                assert listed["halfway"].last_error == halfway.last_error
                busy = await m.registry.get("busy")
                assert (busy.state, busy.last_error) == ("creating", None)  # left to its creator
                assert (await m.destroy("halfway")).destroyed
                assert "halfway" not in (await m.registry.read()).workspaces
            finally:
                await registry.remove("busy")
                await destroy_all(m)
    assert host_leftovers("halfway") == NOTHING_LEFT
