"""The small interface every runtime implements; the manager calls nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol

from ..config import Settings
from ..models import RuntimeDetail, WorkspaceRecord, WorkspaceType

__all__ = ["Progress", "Runtime", "no_progress"]


class Progress(Protocol):
    """Reports progress of long work: a message and, when known, a fraction in [0, 1]."""

    async def __call__(self, message: str, fraction: float | None = None) -> None: ...


async def no_progress(message: str, fraction: float | None = None) -> None:
    """A Progress that reports nowhere."""


class Runtime(ABC):
    """Realises workspaces of some types. Stateless between calls: the record carries the state.

    Every method may raise :class:`~sandbox_mcp.errors.BackendError` (or a subclass)
    with a message that says what failed and how to fix it.
    """

    name: ClassVar[str]
    types: ClassVar[frozenset[WorkspaceType]]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def addresses_in_use(self) -> set[str]:
        """IPs in the workspace subnet that are live on this host but may not be in the registry."""
        return set()

    def validate(self, record: WorkspaceRecord) -> None:  # noqa: B027 - optional hook
        """Refuse a new workspace this runtime cannot realise, before anything changes.

        Raises:
            InvalidSpec: with what to change.
        """

    def assign(self, record: WorkspaceRecord, others: list[WorkspaceRecord]) -> WorkspaceRecord:
        """Allocate what the runtime needs per workspace (inside the registry transaction, like IPs).

        ``others`` are the registered workspaces. Default: nothing to allocate.

        Raises:
            InvalidSpec, Conflict, BackendError: the workspace cannot be realised here (the message says why).
        """
        return record

    @abstractmethod
    async def prepare(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        """Make the workspace startable (build/find the image, declare it, rebuild). Called once, on create."""

    @abstractmethod
    async def start(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        """Launch the workspace and return the updated record (pid, ...).

        Returns once the runtime runs; the manager then waits for SSH.
        """

    @abstractmethod
    async def stop(self, record: WorkspaceRecord) -> None:
        """Stop the workspace and release its runtime resources (processes, links, mounts). Idempotent."""

    @abstractmethod
    async def destroy(self, record: WorkspaceRecord) -> None:
        """Undo ``prepare`` (the workspace is already stopped). Idempotent. Host state dirs are the manager's."""

    @abstractmethod
    async def status(self, record: WorkspaceRecord) -> RuntimeDetail:
        """What is running right now. Read-only."""

    @abstractmethod
    async def logs(self, record: WorkspaceRecord, lines: int) -> str:
        """The tail of the workspace's boot/unit log."""

    async def reconcile(self, records: list[WorkspaceRecord]) -> None:  # noqa: B027 - optional hook
        """Clean up what a crashed server left behind (links, namespaces) for workspaces not running."""
