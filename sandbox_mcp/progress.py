"""Progress reporting for long work (image builds, boots): one callable shape, used at every layer."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress", "no_progress"]


class Progress(Protocol):
    """Reports progress of long work: a message and, when known, a fraction in [0, 1]."""

    async def __call__(self, message: str, fraction: float | None = None) -> None: ...


async def no_progress(message: str, fraction: float | None = None) -> None:
    """A Progress that reports nowhere."""
