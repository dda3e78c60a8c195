"""Runtimes: one module per way of realising a workspace, behind :class:`Runtime`."""

from .base import Progress, Runtime, no_progress

__all__ = ["Progress", "Runtime", "no_progress"]
