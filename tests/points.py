"""Helpers that make tests independent of the machine's speed.

A test waits for *evidence* (a file, a process gone, a message) rather than sleeping for a
guess, and cancels work at a chosen *point* rather than after a delay. The only durations
here are upper bounds that stop a hung test; none of them decides whether a test passes.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.lowlevel

__all__ = ["HUNG_S", "cancel_after_points", "process_alive", "wait_until", "wait_until_sync"]

HUNG_S = 60.0  # only a hung test waits this long
_POLL_S = 0.01


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


async def wait_until(predicate: Callable[[], bool], what: str, limit_s: float = HUNG_S) -> None:
    """Return once ``predicate()`` holds; fail the test (naming ``what``) if it never does."""
    with anyio.move_on_after(limit_s):
        # Polled: the evidence (a file, /proc) is outside this process, so there is no event to await.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(_POLL_S)
        return
    raise AssertionError(f"gave up after {limit_s:g} s waiting for: {what}")


def wait_until_sync(predicate: Callable[[], bool], what: str, limit_s: float = HUNG_S) -> None:
    """:func:`wait_until` for synchronous tests."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {limit_s:g} s waiting for: {what}")
        time.sleep(_POLL_S)


async def cancel_after_points(points: int, fn: Callable[[], Awaitable[object]]) -> bool:
    """Run ``fn()`` and cancel it once the event loop has run other tasks ``points`` times.

    Each point is one pass of the scheduler, so successive values of ``points`` cancel at
    successive places of ``fn``'s progress, whatever the machine's speed (with ``points=0``,
    at its first await). Returns True if ``fn`` was cancelled, False if it finished first.
    """
    finished = False
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            nonlocal finished
            await fn()
            finished = True
            tg.cancel_scope.cancel()  # stop the canceller

        tg.start_soon(run)
        for _ in range(points):
            await anyio.lowlevel.checkpoint()
        tg.cancel_scope.cancel()
    return not finished
