"""The registry on disk: one JSON file, replaced atomically, guarded by a lock shared across processes.

Readers take the lock shared, writers exclusively (``fcntl.flock`` on a sibling
``.lock`` file), so several server processes (an MCP server per client, the
CLI) see one consistent registry. Every write goes to a temporary file that is
fsynced and renamed over the old one: a crash leaves the old or the new file,
never half of one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import anyio
from pydantic import BaseModel, Field, ValidationError

from .errors import BackendError, WorkspaceNotFound
from .fsutil import atomic_write, file_lock
from .models import WorkspaceRecord

__all__ = ["Registry", "RegistryData"]


class RegistryData(BaseModel):
    version: int = 1
    workspaces: dict[str, WorkspaceRecord] = Field(default_factory=dict)


class Registry:
    """The registry file at ``path`` (created on first write)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(path.name + ".lock")
        # The last file parsed, by its bytes. Writers rename complete files into place, so a
        # lock-free read sees a whole file; if it is the one parsed last, the hot path (every
        # exec looks its workspace up) skips the lock, a thread hop and the parse.
        self._cache: tuple[bytes, RegistryData] | None = None

    def _raw(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _locked(self, exclusive: bool) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.lock_path, exclusive)

    def _read_unlocked(self, *, shared: bool = False) -> RegistryData:
        """The registry on disk, a fresh object; ``shared``: also the cache's (then never modified)."""
        raw = self._raw()
        if raw is None:
            return RegistryData()
        try:
            data = RegistryData.model_validate_json(raw)
        except ValidationError as exc:
            raise BackendError(
                f"registry {self.path} is corrupt ({exc.error_count()} errors); "
                f"move it aside and run 'sandbox-mcp doctor'"
            ) from exc
        if shared:
            self._cache = (raw, data)
        return data

    def _write_unlocked(self, data: RegistryData) -> None:
        atomic_write(self.path, data.model_dump_json(indent=2), mode=0o600)

    # Synchronous API (used from worker threads and by tests) -------------------------------

    def read_sync(self) -> RegistryData:
        with self._locked(exclusive=False):
            return self._read_unlocked()

    @contextlib.contextmanager
    def transaction_sync(self) -> Iterator[RegistryData]:
        """Read, let the caller modify, write back; all under the exclusive lock.

        If the body raises, nothing is written.
        """
        with self._locked(exclusive=True):
            data = self._read_unlocked()
            yield data
            self._write_unlocked(data)

    # Async API ----------------------------------------------------------------------------------

    async def _current(self) -> RegistryData:
        """The parsed registry as it is on disk now, shared: never modified, never handed out whole."""
        cache = self._cache
        if cache is not None and cache[0] == self._raw():
            return cache[1]
        # Parsed once, for the cache and this caller alike: a transaction's own read (which it modifies and
        # writes, changing the file) never fills the cache, the next read here does.
        return await anyio.to_thread.run_sync(self._shared_sync)

    def _shared_sync(self) -> RegistryData:
        with self._locked(exclusive=False):
            return self._read_unlocked(shared=True)

    async def read(self) -> RegistryData:
        """A snapshot of the registry (the caller may modify it). Raises BackendError if the file is corrupt."""
        shared, cache = await self._current(), self._cache
        if cache is not None and cache[1] is shared:
            return RegistryData.model_validate_json(cache[0])  # the same bytes again: a third of a deep copy's cost
        return shared.model_copy(deep=True)

    async def peek_all(self) -> RegistryData:
        """The registry as parsed, shared with other callers: read it, never modify it (no copy made)."""
        return await self._current()

    async def get(self, name: str) -> WorkspaceRecord:
        """The record of ``name``, a copy the caller may modify. Raises WorkspaceNotFound."""
        return (await self.peek(name)).model_copy(deep=True)

    async def peek(self, name: str) -> WorkspaceRecord:
        """The record of ``name`` as parsed, shared with other callers: read it, never modify it.

        The hot path (every exec looks its workspace up) copies nothing: a deep copy of the whole
        registry per call was most of an ``exec true``'s cost in this process with ten workspaces.

        Raises:
            WorkspaceNotFound: no such workspace.
        """
        try:
            return (await self._current()).workspaces[name]
        except KeyError:
            raise WorkspaceNotFound(name) from None

    async def put(self, record: WorkspaceRecord) -> None:
        """Insert or replace one record."""

        def _put() -> None:
            with self.transaction_sync() as data:
                data.workspaces[record.name] = record

        await anyio.to_thread.run_sync(_put)

    async def remove(self, name: str) -> None:
        """Remove one record; no error if it is already gone."""

        def _remove() -> None:
            with self.transaction_sync() as data:
                data.workspaces.pop(name, None)

        await anyio.to_thread.run_sync(_remove)
