"""The image store: cached build artefacts under keys, built once, aside, and renamed into place.

The store knows nothing of what it holds. A recipe (the Debian root in :mod:`.debootstrap`; what
other runtimes derive from it: a VM disk and kernel, an Incus image) names an artefact by a key
that changes whenever its inputs or recipe change, and hands :meth:`ImageStore.ensure` a
coroutine that builds it into an empty directory. The store then guarantees:

* one build per key at a time, across processes (a lock per key, so a recipe may ensure the
  artefacts it derives from while it holds its own);
* never half an artefact: the build runs in ``.tmp-KEY-PID`` and is renamed to ``KEY`` when
  complete, with ``KEY.json`` (its metadata) written last, which is what makes it exist;
* :meth:`prune` removes artefacts a recipe says are stale and interrupted builds, never one
  being built or in use (its key in ``keep``, or its lock held: :meth:`hold`, which a runtime's
  process inherits, so the lock lasts exactly as long as the process), and never anything
  outside the store (no symlink is followed).

Layout: ``<root>/<key>/`` (the artefact), ``<root>/<key>.json`` (metadata: recipe, version,
inputs), ``<root>/.locks/<key>.lock``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from ..errors import BackendError, InvalidSpec
from ..fsutil import async_file_lock, atomic_write, shared_lock_fd, try_file_lock

__all__ = ["Build", "ImageStore"]

_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")

# A build: fills the given (new, empty) directory; reports through its own progress.
Build = Callable[[Path], Awaitable[None]]


class ImageStore:
    """Cached artefacts under ``root``, each a directory named by its key plus ``KEY.json``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @staticmethod
    def _check_key(key: str) -> str:
        if not _KEY_RE.fullmatch(key):
            raise InvalidSpec(f"image key {key!r} is not a plain name (a-z, 0-9, '.', '_', '-')")
        return key

    def path(self, key: str) -> Path:
        """The directory of artefact ``key`` (it may not exist)."""
        return self.root / self._check_key(key)

    def _meta_path(self, key: str) -> Path:
        return self.root / f"{self._check_key(key)}.json"

    def _lock_path(self, key: str) -> Path:
        return self.root / ".locks" / f"{self._check_key(key)}.lock"

    def exists(self, key: str) -> bool:
        """True when artefact ``key`` was built completely."""
        return self._meta_path(key).is_file() and self.path(key).is_dir()

    def meta(self, key: str) -> dict[str, Any] | None:
        """The metadata written with artefact ``key``, or None."""
        try:
            data = json.loads(self._meta_path(key).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def ensure(self, key: str, build: Build, meta: Mapping[str, Any]) -> Path:
        """The directory of artefact ``key``, building it with ``build`` first if it is missing.

        Concurrent callers (any process) wait for one build. A failed or cancelled build leaves
        nothing behind.

        Raises:
            whatever ``build`` raises; OSError when the store cannot be written.
        """
        final = self.path(key)
        if self.exists(key):
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        async with async_file_lock(self._lock_path(key)):
            if self.exists(key):  # another process built it while we waited
                return final
            tmp = self.root / f".tmp-{key}-{os.getpid()}"
            await anyio.to_thread.run_sync(_remove, tmp)
            tmp.mkdir(mode=0o755)
            try:
                await build(tmp)
                await anyio.to_thread.run_sync(self._commit, tmp, key, dict(meta))
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(_remove, tmp)
                raise
        return final

    def _commit(self, tmp: Path, key: str, meta: dict[str, Any]) -> None:
        final = self.path(key)
        _remove(final)  # an incomplete leftover without its metadata
        os.rename(tmp, final)
        atomic_write(self._meta_path(key), json.dumps({"key": key, "built_at": time.time(), **meta}), mode=0o644)

    def hold(self, key: str) -> int:
        """A shared lock on artefact ``key`` as an fd: while it is open anywhere (a VM's qemu inherits it),
        :meth:`prune` leaves ``key`` alone. The caller closes its copy.

        Raises:
            InvalidSpec: ``key`` is malformed.
            BackendError: the artefact is being removed or built right now, or is gone.
        """
        fd = shared_lock_fd(self._lock_path(key))
        if fd is not None and self.exists(key):
            return fd
        if fd is not None:
            os.close(fd)
        raise BackendError(f"image {key} is gone, or being built or removed ('sandbox-mcp image prune') right now; "
                           "start the workspace again (a missing image is rebuilt)")

    def list_images(self) -> list[dict[str, Any]]:
        """Metadata of every complete artefact, by key."""
        out = []
        for meta_file in sorted(self.root.glob("*.json")):
            key = meta_file.stem
            if _KEY_RE.fullmatch(key) and (meta := self.meta(key)) is not None and self.path(key).is_dir():
                out.append(meta)
        return out

    def prune(self, is_current: Callable[[dict[str, Any]], bool], keep: frozenset[str] = frozenset()) -> list[str]:
        """Remove artefacts whose metadata ``is_current`` rejects, and interrupted builds; return their names.

        ``keep`` (keys in use) and anything locked (being built, or held: :meth:`hold`) stay. Entries of a foreign
        shape and symlinks are left alone, and removal never follows a link out of the store.
        """
        removed = []
        if not self.root.is_dir():
            return removed
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if entry.is_symlink() or name.startswith(".") and not name.startswith(".tmp-"):
                continue
            if name.startswith(".tmp-"):
                pid = name.rsplit("-", 1)[-1]
                if pid.isdigit() and Path(f"/proc/{pid}").exists():
                    continue  # a build in progress
                _remove(entry)
                removed.append(name)
                continue
            key = name[: -len(".json")] if name.endswith(".json") else name
            if not _KEY_RE.fullmatch(key) or key in keep:
                continue
            meta = self.meta(key)
            if meta is not None and is_current(meta):
                continue
            # Never wait: a lock held is a build, or a running workspace's hold, that may last for days.
            with try_file_lock(self._lock_path(key)) as locked:
                if not locked:
                    continue
                _remove(self.path(key))
                with contextlib.suppress(FileNotFoundError):
                    self._meta_path(key).unlink()
            if key not in removed:
                removed.append(key)
        return removed


def _remove(path: Path) -> None:
    """Remove a directory tree or file; symlinks inside are removed, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)
