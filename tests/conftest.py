"""Shared fixtures for the end-to-end tests against real systemd-nspawn containers.

The e2e tests need root, systemd-nspawn and a cached root image; they run inside the
private network + mount namespace that ``scripts/test`` makes (so the bridge, veths and
containers exist only there and no test traffic can reach another address). Without
that, they skip and say why.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.images import DebianRoot, ImageStore

TEST_BRIDGE = "sbxt-br"
E2E_GIT_FETCH_MAX_BYTES = 4 << 20


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def e2e_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "end-to-end tests need root (they boot systemd-nspawn containers)"
    for tool in ("systemd-nspawn", "debootstrap"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt-get install systemd-container debootstrap)"
    if os.environ.get("SANDBOX_MCP_TEST_ISOLATED") != "1":
        return "end-to-end tests run only inside the private network namespace made by ./scripts/test"
    return None


def e2e_settings(state_dir: Path) -> Settings:
    image_dir = Path(os.environ.get("SANDBOX_MCP_IMAGE_DIR", "/var/cache/sandbox-mcp/images"))
    # git_fetch_max_bytes: lowered so a test can send a pack past it without writing gigabytes.
    return Settings(mode="direct", state_dir=state_dir, image_dir=image_dir, bridge=TEST_BRIDGE, boot_timeout_s=60,
                    hosts_file=state_dir.parent / "hosts",  # never the host's /etc/hosts
                    git_fetch_max_bytes=E2E_GIT_FETCH_MAX_BYTES)


@pytest.fixture
def settings(tmp_path: Path) -> Iterator[Settings]:
    """Settings for one e2e test: its own state dir, the shared image cache, the test bridge."""
    reason = e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    s = e2e_settings(tmp_path / "state")
    store = DebianRoot(s, ImageStore(s.image_dir))
    if not store.exists(store.key(())):
        pytest.skip("the root image is not cached; ./scripts/test builds it before entering the test namespace")
    yield s


@pytest.fixture
async def manager(settings: Settings) -> AsyncIterator[object]:
    """An opened WorkspaceManager whose workspaces are all destroyed at teardown, even if the test failed."""
    from sandbox_mcp.manager import WorkspaceManager

    m = WorkspaceManager(settings)
    await m.open()
    try:
        yield m
    finally:
        await destroy_all(m)
        await m.close()


async def destroy_all(m: object) -> None:
    from sandbox_mcp.manager import WorkspaceManager

    assert isinstance(m, WorkspaceManager)
    for ws, record in (await m.registry.read()).workspaces.items():
        if record.pooled:  # a warm pool's slot: its manager destroys it on exit
            continue
        try:
            await m.destroy(ws)
        except Exception as exc:  # keep cleaning the others
            print(f"cleanup of {ws} failed: {exc}")


@pytest.fixture(scope="session")
def accounts() -> Iterator[object]:
    """Throw-away users for the daemon tests (tests/deploy.py): two in a fresh group, one outside it.

    Made once per run, removed at its end (also when tests fail).
    """
    from .deploy import make_accounts, missing_account_tools

    reason = e2e_skip_reason() or missing_account_tools()
    if reason:
        pytest.skip(reason)
    with make_accounts() as made:
        yield made
