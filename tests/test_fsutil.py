"""fsutil: whole files or none, no symlink followed, locks shared across processes and cancel-safe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from sandbox_mcp.fsutil import async_file_lock, atomic_write, file_lock, lock_is_held, write_new

_HOLD = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"


def test_atomic_write_sets_mode_and_replaces_a_symlink_instead_of_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    link = tmp_path / "file"
    link.symlink_to(victim)
    atomic_write(link, "new", mode=0o640)
    assert victim.read_text() == "untouched"
    assert not link.is_symlink() and link.read_text() == "new"
    assert link.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "d"
    (target / "inside").mkdir(parents=True)  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_write_new_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "key"
    assert write_new(target, b"first", 0o600)
    assert not write_new(target, b"second", 0o600)
    assert target.read_bytes() == b"first" and target.stat().st_mode & 0o777 == 0o600


def test_lock_refuses_a_planted_symlink(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "x.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OSError), file_lock(tmp_path / "x.lock"):
        pass


@pytest.mark.anyio
async def test_async_lock_waits_for_another_process_and_a_cancelled_wait_leaves_it_free(tmp_path: Path) -> None:
    lock = tmp_path / "ws.lock"
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert lock_is_held(lock)
        waited = anyio.Event()

        async def on_wait() -> None:
            waited.set()

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def take() -> None:
                    async with async_file_lock(lock, on_wait=on_wait):
                        pytest.fail("took a lock another process holds")

                tg.start_soon(take)
                await waited.wait()  # it is waiting: now cancel the wait
                scope.cancel()
        assert scope.cancelled_caught
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not lock_is_held(lock)  # neither the holder nor the cancelled waiter keeps it
    async with async_file_lock(lock):
        assert lock_is_held(lock)  # flock is per open file: our own second open sees it taken


@pytest.mark.anyio
async def test_async_lock_hands_over_in_order_within_a_process_and_still_excludes_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sandbox_mcp import fsutil

    lock = tmp_path / "fw.lock"
    tries = 0
    real_try = fsutil._try_flock

    def counted(fd: int, exclusive: bool) -> bool:
        nonlocal tries
        tries += 1
        return real_try(fd, exclusive)

    monkeypatch.setattr(fsutil, "_try_flock", counted)
    order: list[int] = []
    inside = 0
    told: list[int] = []

    async def take(i: int) -> None:
        nonlocal inside

        async def on_wait() -> None:
            told.append(i)

        async with async_file_lock(lock, on_wait=on_wait):
            inside += 1
            assert inside == 1  # one holder at a time
            if i == 0:
                assert lock_is_held(lock)  # the flock itself is taken (one more try): another process would wait
            order.append(i)
            await anyio.sleep(0.005)  # others arrive and queue meanwhile
            inside -= 1

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(take, i)
            await anyio.lowlevel.checkpoint()  # each asks in turn
    # Handed over in the order asked, the moment the last let go (polling flock alone left it idle until the
    # next poll, and let whichever woke first take it), and every waiter but the first was told it waited.
    assert order == list(range(12))
    assert tries == 12 + 1  # each took the flock at its first try: handed over, not polled for
    assert sorted(told) == list(range(1, 12))
    assert not lock_is_held(lock)
    assert fsutil._QUEUES.get({}) == {}  # the path's queue went with its last user

    # Another process holding it: the first waiter here polls for that process, the second queues behind it
    # (the queue is this loop's only); both say they wait, and neither takes it. Cancelled once both said so.
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        waiting = [anyio.Event(), anyio.Event()]

        async def wait_for_it(i: int) -> None:
            async def on_wait() -> None:
                waiting[i].set()

            async with async_file_lock(lock, on_wait=on_wait):
                pytest.fail("took a lock another process holds")

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait_for_it, 0)
                await waiting[0].wait()
                tg.start_soon(wait_for_it, 1)
                await waiting[1].wait()
                scope.cancel()
        assert scope.cancelled_caught
        assert fsutil._QUEUES.get({}) == {}  # the cancelled waiters left no queue behind
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
