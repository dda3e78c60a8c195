"""The benchmark's baseline: a workspace's runtime started bare, until its sshd sends a banner.

The same network setup and the same nspawn (or qemu, or Incus) command as a create, but no registry
write, no keys and no SSH login: what booting the box costs on this host, which the bench's figures
are measured against. :func:`bare_boot` times one; :func:`bare_burst` starts many at once, the
baseline of the capacity section's "N at once".
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NamedTuple

import anyio

from ..manager import WorkspaceManager
from ..progress import no_progress

__all__ = ["Burst", "bare_boot", "bare_burst", "wait_banner"]

_POLL_S = 0.01
_CONNECT_TIMEOUT_S = 0.2


class Burst(NamedTuple):
    """What :func:`bare_burst` saw, by name: the seconds until each banner came, and why any failed."""

    answered: dict[str, float]
    errors: dict[str, str]

    @property
    def wall_s(self) -> float:
        """Seconds until the last banner (0.0 when none came)."""
        return max(self.answered.values(), default=0.0)


async def wait_banner(ip: str, deadline: float, port: int = 22) -> None:
    """Poll ``ip:port`` until it sends the start of an SSH banner.

    Raises:
        TimeoutError: no banner by ``deadline`` (a ``time.monotonic()`` value).
    """
    while time.monotonic() < deadline:
        try:
            with anyio.fail_after(_CONNECT_TIMEOUT_S):
                stream = await anyio.connect_tcp(ip, port)
            async with stream:
                with anyio.fail_after(1):
                    if (await stream.receive(4)).startswith(b"SSH-"):
                        return
        except (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError):
            pass
        await anyio.sleep(_POLL_S)
    raise TimeoutError(f"no sshd banner from {ip}")


async def bare_boot(manager: WorkspaceManager, name: str, timeout_s: float = 60) -> float:
    """Start registered, stopped workspace ``name`` bare and return the seconds until its sshd's banner;
    it is stopped again after."""
    record = await manager.registry.get(name)
    runtime = manager.runtime_of(record)
    t0 = time.monotonic()
    record = await runtime.start(record, no_progress)
    try:
        await wait_banner(record.ip, time.monotonic() + timeout_s)
        return time.monotonic() - t0
    finally:
        await runtime.stop(record)


@asynccontextmanager
async def bare_burst(manager: WorkspaceManager, names: list[str], timeout_s: float = 300) -> AsyncIterator[Burst]:
    """Start the registered, stopped workspaces ``names`` bare, all at once, and wait until every sshd sent
    its banner; the body runs with them all up (to read the host's CPU before the stops add to it), and
    they are all stopped again after it."""
    started = []
    errors: dict[str, str] = {}
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    answered: dict[str, float] = {}

    async def one(name: str) -> None:
        try:
            record = await manager.registry.get(name)
            record = await manager.runtime_of(record).start(record, no_progress)
            started.append(record)
            await wait_banner(record.ip, deadline)
            answered[name] = time.monotonic() - t0
        except Exception as exc:  # a figure: how many failed, and why
            errors[name] = str(exc)[:300]

    try:
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(one, name)
        yield Burst(answered, errors)
    finally:
        with anyio.CancelScope(shield=True):
            for record in started:
                await manager.runtime_of(record).stop(record)
