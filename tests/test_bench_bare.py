"""The benchmark's baseline (:mod:`sandbox_mcp.bench.bare`): runtimes started bare until sshd's banner.

The bench itself is not run in CI; these run its baseline for real, so a figure it prints stands on a
boot that happened: the banner wait against loopback servers, and a burst of real containers.
"""

from __future__ import annotations

import time

import anyio
import pytest

from sandbox_mcp.bench.bare import bare_burst, wait_banner
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.models import CreateSpec

from .test_e2e import NOTHING_LEFT, host_leftovers

pytestmark = pytest.mark.anyio


async def test_wait_banner_wants_an_ssh_banner() -> None:
    async def greet(greeting: bytes, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await stream.send(greeting)
            await anyio.sleep(1.5)  # held open: only the banner's bytes may decide

    async with anyio.create_task_group() as tg:
        ssh = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        http = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        tg.start_soon(ssh.serve, lambda s: greet(b"SSH-2.0-OpenSSH_9.2\r\n", s))
        tg.start_soon(http.serve, lambda s: greet(b"HTTP/1.1 400 Bad\r\n", s))
        await wait_banner("127.0.0.1", time.monotonic() + 5, port=ssh.extra(anyio.abc.SocketAttribute.local_port))
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no sshd banner from 127.0.0.1"):
            await wait_banner("127.0.0.1", t0 + 0.5, port=http.extra(anyio.abc.SocketAttribute.local_port))
        tg.cancel_scope.cancel()
    closed = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = closed.extra(anyio.abc.SocketAttribute.local_port)
    await closed.aclose()  # refused from now on
    with pytest.raises(TimeoutError):
        await wait_banner("127.0.0.1", time.monotonic() + 0.3, port=port)


@pytest.mark.e2e
async def test_bare_burst_boots_them_all_and_stops_them_again(manager: WorkspaceManager) -> None:
    names = ["bare0", "bare1", "bare2"]
    for name in names:
        await manager.create(CreateSpec(name=name, start=False))
    async with bare_burst(manager, [*names, "unknown"], timeout_s=120) as burst:
        assert set(burst.errors) == {"unknown"} and "unknown" in burst.errors["unknown"]  # the rest boot regardless
        assert sorted(burst.answered) == names and burst.wall_s == max(burst.answered.values())
        for name in names:  # up meanwhile: nspawn running, sshd answering
            assert host_leftovers(name)["processes"]
            await wait_banner((await manager.registry.get(name)).ip, time.monotonic() + 5)
    for name in names:
        record = await manager.registry.get(name)
        assert not (await manager.runtime_of(record).status(record)).running  # stopped again
        assert host_leftovers(name) == NOTHING_LEFT
    # Bare means bare: the registry still says stopped, and a real start afterwards works as ever.
    ws = await manager.start(names[0])
    assert ws.state == "running"
    assert (await manager.exec(names[0], "echo ok")).stdout == "ok\n"
