"""Files written whole or not at all, and locks shared across processes: one helper for each.

Every module that replaces a file (the registry, the hosts file, keys, Claude Code configs,
the NixOS registry) goes through :func:`atomic_write`, and every cross-process lock through
:func:`file_lock` (threads, sync code) or :func:`async_file_lock` (coroutines), so the rules
below hold everywhere:

* a reader sees the old file or the new one, never half of one (temp file in the same
  directory, fsync, rename; the rename is made durable with an fsync of the directory);
* a symlink planted where a file or lock is expected is replaced or refused, never followed;
* a lock dies with its holder (``flock``), and a cancelled wait never leaves one taken.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import anyio
from anyio.lowlevel import RunVar

from .errors import InvalidSpec

__all__ = ["async_file_lock", "atomic_write", "file_lock", "fsync_dir", "lock_is_held", "own_dir", "shared_lock_fd",
           "try_file_lock", "write_in_place", "write_new"]

_LOCK_POLL_MIN_S = 0.005
_LOCK_POLL_MAX_S = 0.1


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def _write_fd(fd: int, data: bytes, mode: int, owner: tuple[int, int] | None) -> None:
    os.fchmod(fd, mode)  # the umask narrowed the mode given to open()
    if owner is not None and (os.fstat(fd).st_uid, os.fstat(fd).st_gid) != owner:
        os.fchown(fd, *owner)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_temp(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> Path:
    """A complete, fsynced temporary file beside ``path``; removed again if writing it fails."""
    tmp = _tmp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        _write_fd(fd, data, mode, owner)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def write_in_place(path: Path, data: str, *, mode: int = 0o644) -> None:
    """Overwrite the file ``path`` keeping its inode, for a file bind-mounted into a workspace (a rename would
    leave the bind on the old one) or read through a held fd. Never follows a symlink; a missing file is
    created with ``mode``.

    Raises:
        OSError: it cannot be written (a symlink: ELOOP).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        raw = data.encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, raw, 0)
    finally:
        os.close(fd)


def atomic_write(
    path: Path, data: bytes | str, *, mode: int = 0o644, owner: tuple[int, int] | None = None
) -> None:
    """Replace ``path`` with ``data`` atomically: complete, with ``mode`` (and ``owner``), or not at all.

    A symlink at ``path`` is replaced, not followed. The parent directory must exist.

    Raises:
        OSError: the file cannot be written.
    """
    path = Path(path)
    tmp = _write_temp(path, data.encode() if isinstance(data, str) else data, mode, owner)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``path`` unless something is there already; True when this call wrote it.

    The file is complete before it appears (temp file + ``link``), so a reader never sees half of
    it, and an existing file (or symlink) is never replaced, even by a concurrent writer.

    Raises:
        OSError: the file cannot be written.
    """
    path = Path(path)
    tmp = _write_temp(path, data, mode, None)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _open_lock(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: whoever can write the lock directory must not point us at another file.
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _try_flock(fd: int, exclusive: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    return True


@contextlib.contextmanager
def file_lock(path: Path, exclusive: bool = True) -> Iterator[None]:
    """Hold ``flock`` on ``path`` (created if missing, 0600) for the ``with`` body; blocks until free.

    For synchronous code and worker threads. The lock is shared by every process that opens
    the same file and dies with its holder.

    Raises:
        OSError: the lock file cannot be opened (e.g. a symlink sits there).
    """
    fd = _open_lock(Path(path))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def try_file_lock(path: Path) -> Iterator[bool]:
    """:func:`file_lock` (exclusive) without waiting: the body gets True when it holds the lock, False when
    another process does.

    Raises:
        OSError: the lock file cannot be opened (e.g. a symlink sits there).
    """
    fd = _open_lock(Path(path))
    try:
        yield _try_flock(fd, True)
    finally:
        os.close(fd)


# The tasks of this event loop waiting for an exclusive file lock queue here first, in order, so one is
# handed the lock the moment the last lets go. Polling alone (all they could do on flock) left the lock
# idle between a release and the next poll: 30 starts at once, each holding the firewall lock for ~7 ms,
# waited 28 s in all for it, backing off to 0.1 s, and the burst took as long as those gaps.
_QUEUES: RunVar[dict[str, anyio.Lock]] = RunVar("sandbox_mcp_file_lock_queues")


def _queue_for(path: Path) -> tuple[str, anyio.Lock, dict[str, anyio.Lock]]:
    try:
        queues = _QUEUES.get()
    except LookupError:
        queues = {}
        _QUEUES.set(queues)
    key = os.path.abspath(path)
    return key, queues.setdefault(key, anyio.Lock()), queues


@contextlib.asynccontextmanager
async def async_file_lock(
    path: Path, exclusive: bool = True, *, on_wait: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[None]:
    """:func:`file_lock` for coroutines: polls with a short back-off instead of blocking a thread.

    Polling means a cancelled wait gives up at once and never leaves the lock taken behind it.
    Exclusive waiters of this event loop queue in order first and are handed the lock at once
    (only other processes are polled for). ``on_wait``, if given, is an async callable run once
    when the lock is found taken (to report progress).

    Raises:
        OSError: the lock file cannot be opened.
    """
    key, queue, queues = _queue_for(Path(path)) if exclusive else ("", None, {})
    told = False
    if queue is not None and queue.locked() and on_wait is not None:
        told = True
        await on_wait()
    try:
        async with queue if queue is not None else contextlib.nullcontext():
            fd = _open_lock(Path(path))
            try:
                delay = _LOCK_POLL_MIN_S
                while not _try_flock(fd, exclusive):
                    if on_wait is not None and not told:
                        told = True
                        await on_wait()
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _LOCK_POLL_MAX_S)
                yield
            finally:
                os.close(fd)
    finally:
        # The last one out drops the path's queue (a workspace's lock path is not kept for ever). The flock
        # is what excludes; a task that took this queue just before it went only polls like another process.
        if queue is not None and queues.get(key) is queue and not queue.locked():
            if not queue.statistics().tasks_waiting:
                del queues[key]


def shared_lock_fd(path: Path) -> int | None:
    """``path``'s lock taken shared, as an fd that holds it until closed (in every process that inherited it);
    None while someone holds it exclusively. For a lock that must outlive this call, e.g. one a child keeps.

    Raises:
        OSError: the lock file cannot be opened (e.g. a symlink sits there).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Read-only: the holder may be a process we trust less (an unprivileged qemu); a lock needs no write access.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if _try_flock(fd, False):
        return fd
    os.close(fd)
    return None


def lock_is_held(path: Path) -> bool:
    """True when another process holds ``path``'s lock (a missing file is not held)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return not _try_flock(fd, True)
    finally:
        os.close(fd)


def own_dir(path: Path, uid: int, gid: int, mode: int | None) -> None:
    """Make ``path`` a real directory owned uid:gid (and ``mode``), never following a symlink there.

    Raises:
        InvalidSpec: a symlink or a non-directory sits at ``path``.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode if mode is not None else 0o755)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidSpec(f"{path} is a symlink or not a directory; move it away and try again")
    if (st.st_uid, st.st_gid) != (uid, gid):
        os.chown(path, uid, gid, follow_symlinks=False)
    if mode is not None and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)  # a directory, checked above; its parent is the server's own
