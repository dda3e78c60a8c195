"""The daemon's fair-share bounds over real unix socket pairs: message sizes, large-message slots, per-uid counts."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import anyio.abc
import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.errors import LimitExceeded
from sandbox_mcp.fairshare import LineTooLong, MessageReader, UserShares, large_message_bytes

pytestmark = pytest.mark.anyio

SETTINGS = Settings(daemon_line_kib=64, daemon_large_messages=1, write_max=1 << 20, uid_max_connections=2,
                    uid_max_calls=2)  # fmt: skip


async def pair() -> tuple[anyio.abc.SocketStream, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return await anyio.abc.UNIXSocketStream.from_socket(ours), theirs


async def test_lines_small_and_large_arrive_whole() -> None:
    shares = UserShares(SETTINGS)
    stream, peer = await pair()
    big = b"y" * (900 << 10)  # past the small bound, within the largest message
    peer.sendall(b'{"a": 1}\n{"b": 2}\n')
    reader = MessageReader(stream, shares, 1000)
    assert await reader.receive_line() == b'{"a": 1}'
    assert await reader.receive_line() == b'{"b": 2}'

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, peer.sendall, big + b"\nnext\n")
        assert await reader.receive_line() == big
    assert await reader.receive_line() == b"next"
    peer.close()
    with pytest.raises(anyio.EndOfStream):
        await reader.receive_line()
    await stream.aclose()


async def test_a_message_past_the_largest_is_refused_and_the_slot_comes_back() -> None:
    shares = UserShares(SETTINGS)
    limit = large_message_bytes(SETTINGS)
    stream, peer = await pair()
    peer.setblocking(False)

    def flood() -> None:
        sent = 0
        peer.setblocking(True)
        peer.settimeout(10)
        try:
            while sent <= limit + (1 << 20):
                sent += peer.send(b"z" * 65536)
        except OSError:
            pass  # the reader gave up on us

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, flood)
        with pytest.raises(LineTooLong, match="longer than"):
            await MessageReader(stream, shares, 1000).receive_line()
        await stream.aclose()
    peer.close()
    # The slot is free again: another large message gets it at once.
    with anyio.fail_after(10):
        async with shares.large_slot(1000):
            pass


async def test_one_large_slot_per_user_and_a_small_line_needs_none() -> None:
    shares = UserShares(SETTINGS)
    held = anyio.Event()
    release = anyio.Event()

    async def hold() -> None:
        async with shares.large_slot(1000):
            held.set()
            await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(hold)
        await held.wait()
        # The only slot is taken: a small line still arrives, a large one waits.
        stream, peer = await pair()
        reader = MessageReader(stream, shares, 2000)
        peer.sendall(b"small\n" + b"L" * (200 << 10))
        assert await reader.receive_line() == b"small"
        got: list[bytes] = []

        async def read_large() -> None:
            got.append(await reader.receive_line())

        tg.start_soon(read_large)
        await anyio.wait_all_tasks_blocked()  # every task waits on something: no timing involved
        assert not got  # still waiting for the slot
        release.set()
        peer.sendall(b"\n")
    assert got == [b"L" * (200 << 10)]
    peer.close()
    await stream.aclose()


def test_connections_and_calls_are_counted_per_uid_and_root_is_not_limited() -> None:
    shares = UserShares(SETTINGS)
    with shares.connection(1000), shares.connection(1000):
        with pytest.raises(LimitExceeded, match="uid 1000 already has 2 connections"):
            with shares.connection(1000):
                pass
        with shares.connection(1001):  # another user is not held up by the first
            pass
        for _ in range(5):
            with shares.connection(0):
                pass
    with shares.connection(1000):  # released again
        pass
    with shares.call(1000), shares.call(1000):
        with pytest.raises(LimitExceeded, match="uid_max_calls"):
            with shares.call(1000):
                pass
        with shares.call(0), shares.call(0), shares.call(0):
            pass


async def test_the_daemon_refuses_to_copy_roots_claude_credentials(tmp_path: Path) -> None:
    """They would be root's, copied into every user's workspaces."""
    import os

    from sandbox_mcp.daemon import run_daemon
    from sandbox_mcp.errors import InvalidSpec

    if os.geteuid() != 0:
        pytest.skip("the daemon's checks start with being root")
    settings = Settings(state_dir=tmp_path / "state", daemon_socket=tmp_path / "d.sock", copy_claude_credentials=True)
    with pytest.raises(InvalidSpec, match="copy_claude_credentials would copy root's Claude credentials"):
        await run_daemon(settings)
    assert not (tmp_path / "state").exists() and not (tmp_path / "d.sock").exists()  # refused before anything
