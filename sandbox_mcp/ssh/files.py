"""Workspace files over SFTP: read a chunk, write or append, list a directory.

Each function runs on an open SFTP client; the pool (:mod:`.pool`) supplies it, bounds each call
with a timeout, and replaces the SFTP channel when a call times out. File-level problems become
:class:`~sandbox_mcp.errors.InvalidSpec` with the next step; connection-level asyncssh errors are
left to the pool.

Only regular files are read or written: opening a FIFO blocks until a writer comes (forever, and
the one sftp-server process with it), a device may never end. The type is checked first, and the
file actually opened is checked again.
"""

from __future__ import annotations

import contextlib
import posixpath
import secrets
import stat
from datetime import UTC, datetime

import anyio
import asyncssh

from ..errors import InvalidSpec, clip
from ..models import DirEntry, DirListing, FileContent, WriteResult
from .commands import SSHTarget, encode_chunk
from .errors import file_error, is_conn_error

__all__ = [
    "DEFAULT_PAGE",
    "MAX_DIR_ENTRIES",
    "MAX_LISTING_BYTES",
    "MAX_NAME_BYTES",
    "check_page",
    "entry_name",
    "file_kind",
    "list_directory",
    "read_chunk",
    "write_data",
]

# A listing reads the whole directory (to page it in name order) but keeps at most this many
# entries and this many bytes of them (a name's bytes plus _ENTRY_BYTES each): past either it says
# total=null, and exec `ls`/`find` lists the rest.
MAX_DIR_ENTRIES = 50_000
MAX_LISTING_BYTES = 8 << 20
_ENTRY_BYTES = 64
DEFAULT_PAGE = 1000  # entries per list_dir call when no limit is given (the result budget may cut it)
MAX_NAME_BYTES = 255  # NAME_MAX on Linux: a longer name comes from a broken or hostile sftp-server

_TYPES = {
    asyncssh.FILEXFER_TYPE_REGULAR: "file",
    asyncssh.FILEXFER_TYPE_DIRECTORY: "dir",
    asyncssh.FILEXFER_TYPE_SYMLINK: "symlink",
    asyncssh.FILEXFER_TYPE_FIFO: "fifo",
    asyncssh.FILEXFER_TYPE_SOCKET: "socket",
    asyncssh.FILEXFER_TYPE_CHAR_DEVICE: "char-device",
    asyncssh.FILEXFER_TYPE_BLOCK_DEVICE: "block-device",
}
_LISTED_TYPES = {"file", "dir", "symlink"}  # what list_dir reports by name; the rest is "other"
_SPECIAL = {
    "fifo": "a named pipe (FIFO)",
    "socket": "a socket",
    "char-device": "a character device",
    "block-device": "a block device",
}


def file_kind(attrs: asyncssh.SFTPAttrs) -> str:
    """file, dir, symlink, fifo, socket, char-device, block-device or other."""
    return _TYPES.get(attrs.type, "other")


def _refuse_special(abspath: str, attrs: asyncssh.SFTPAttrs, doing: str) -> None:
    kind = file_kind(attrs)
    if kind == "dir":
        hint = "call list_dir for it" if doing == "read" else "pick a file path"
        raise InvalidSpec(f"cannot {doing} {clip(abspath)}: it is a directory; {hint}")
    if kind != "file":
        what = _SPECIAL.get(kind, "not a regular file")
        raise InvalidSpec(
            f"cannot {doing} {clip(abspath)}: it is {what}; {doing}_file handles regular files only "
            f"(opening a special file can block forever or never end). Use exec instead, with a "
            f"timeout: e.g. `timeout 5 head -c 4096 PATH`"
        )


async def read_chunk(
    sftp: asyncssh.SFTPClient, target: SSHTarget, abspath: str, offset: int, limit: int
) -> FileContent:
    """Read up to ``limit`` bytes of the regular file ``abspath`` from ``offset``.

    Raises:
        InvalidSpec: no such file, a directory or special file, permission denied.
        asyncssh.Error, OSError: the SFTP channel or connection broke (for the pool).
    """
    try:
        _refuse_special(abspath, await sftp.stat(abspath), "read")
        async with sftp.open(abspath, "rb") as f:
            attrs = await f.stat()  # what was opened, should the path have changed since
            _refuse_special(abspath, attrs, "read")
            size = attrs.size or 0
            data = await f.read(limit, offset) if offset < size else b""
    except asyncssh.SFTPError as exc:
        if is_conn_error(exc):
            raise
        raise file_error(target, abspath, exc, "read") from exc
    data = data[:limit]  # never more than asked for, whatever the server sent
    content, encoding, used = encode_chunk(data, offset + len(data) >= size)
    end = offset + used
    more = end < size
    return FileContent(
        path=abspath,
        content=content,
        encoding=encoding,  # type: ignore[arg-type]
        size=size,
        offset=offset,
        truncated=more,
        next_offset=end if more else None,
    )


async def _make_dirs(sftp: asyncssh.SFTPClient, abspath: str, parent: str) -> None:
    missing: list[str] = []
    d = parent
    while d != "/":
        try:
            attrs = await sftp.stat(d)
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            missing.append(d)
            d = posixpath.dirname(d)
            continue
        if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
            raise InvalidSpec(f"cannot write {clip(abspath)}: {clip(d)} exists and is not a directory")
        break
    for d in reversed(missing):
        try:
            await sftp.mkdir(d)
        except (asyncssh.SFTPFailure, asyncssh.SFTPFileAlreadyExists):
            if not await sftp.isdir(d):  # lost a race to someone creating it is fine
                raise


async def write_data(
    sftp: asyncssh.SFTPClient,
    target: SSHTarget,
    abspath: str,
    data: bytes,
    *,
    append: bool,
    mode: int | None,
    make_parents: bool,
) -> WriteResult:
    """Write (or append) ``data`` to the regular file ``abspath``; see :meth:`.pool.SSHPool.write_file`.

    Raises:
        InvalidSpec: a missing parent without ``make_parents``, a directory or special file,
            permission denied, disk full.
        asyncssh.Error, OSError: the SFTP channel or connection broke (for the pool).
    """
    parent = posixpath.dirname(abspath)

    async def opened(name: str, pmode: str) -> asyncssh.SFTPClientFile:
        try:
            return await sftp.open(name, pmode)
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            if not make_parents:
                raise InvalidSpec(
                    f"cannot write {clip(abspath)}: directory {clip(parent)} does not exist; "
                    f"create it or pass make_parents=true"
                ) from None
            await _make_dirs(sftp, abspath, parent)
            return await sftp.open(name, pmode)

    try:
        try:
            attrs: asyncssh.SFTPAttrs | None = await sftp.stat(abspath)
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            attrs = None
        if attrs is not None:
            _refuse_special(abspath, attrs, "write")
        if append:
            f = await opened(abspath, "ab")
            try:
                _refuse_special(abspath, await f.stat(), "write")
                await f.write(data)
                if mode is not None:
                    await f.chmod(mode)
            finally:
                await f.close()
            return WriteResult(path=abspath, bytes_written=len(data))
        keep_mode = mode
        if keep_mode is None and attrs is not None and attrs.permissions is not None:
            keep_mode = stat.S_IMODE(attrs.permissions)
        tmp = posixpath.join(parent, f".{posixpath.basename(abspath)}.sbx-{secrets.token_hex(4)}")
        f = await opened(tmp, "wb")
        try:
            try:
                await f.write(data)
                if keep_mode is not None:
                    await f.chmod(keep_mode)
            finally:
                await f.close()
            await sftp.posix_rename(tmp, abspath)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                with contextlib.suppress(asyncssh.Error, OSError):
                    await sftp.remove(tmp)
            raise
        return WriteResult(path=abspath, bytes_written=len(data))
    except asyncssh.SFTPError as exc:
        if is_conn_error(exc):
            raise
        raise file_error(target, abspath, exc, "write") from exc


def check_page(offset: int, limit: int) -> None:
    """Raises InvalidSpec for a page (of a file or a listing) that cannot be: a negative offset, a limit below 1."""
    if offset < 0:
        raise InvalidSpec(f"offset must be >= 0, got {offset}")
    if limit < 1:
        raise InvalidSpec(f"limit must be >= 1, got {limit}")


async def list_directory(
    sftp: asyncssh.SFTPClient,
    target: SSHTarget,
    abspath: str,
    offset: int = 0,
    limit: int = DEFAULT_PAGE,
    *,
    max_entries: int = MAX_DIR_ENTRIES,
    max_bytes: int = MAX_LISTING_BYTES,
) -> DirListing:
    """List ``abspath`` in name order, ``limit`` entries from index ``offset``.

    The whole directory is read to sort it, keeping at most ``max_entries`` entries and
    ``max_bytes`` of them (only name, type, size and mtime of each, never the server's long
    listing line); past either bound ``total`` is None and the pages end where the reading did.

    Raises:
        InvalidSpec: no such directory, a file, permission denied.
        asyncssh.Error, OSError: the SFTP channel or connection broke (for the pool).
    """
    kept: list[_Entry] = []
    used = 0
    complete = True
    try:
        async with contextlib.aclosing(sftp.scandir(abspath.encode())) as entries:
            async for n in entries:
                if n.filename in (b".", b".."):
                    continue
                entry = _entry(n)
                used += len(entry[0]) + _ENTRY_BYTES
                if len(kept) >= max_entries or used > max_bytes:
                    complete = False
                    break
                kept.append(entry)
    except asyncssh.SFTPError as exc:
        if is_conn_error(exc):
            raise
        with contextlib.suppress(asyncssh.SFTPError):
            if await sftp.isfile(abspath):
                raise InvalidSpec(f"{clip(abspath)} is a file, not a directory; call read_file for it") from exc
        raise file_error(target, abspath, exc, "list") from exc
    kept.sort(key=lambda e: e[0])
    page = kept[offset : offset + limit]
    end = offset + len(page)
    more = end < len(kept)
    cut = any(e[4] for e in page)
    return DirListing(
        path=abspath,
        entries=[_dir_entry(e) for e in page],
        offset=offset,
        next_offset=end if more else None,
        total=len(kept) if complete else None,
        truncated=more or not complete or cut,
    )


# One kept entry: (name as UTF-8 bytes, at most MAX_NAME_BYTES; type; size; mtime; name was cut).
_Entry = tuple[bytes, str, int, int | None, bool]


def _entry(n: asyncssh.SFTPName) -> _Entry:
    raw = n.filename if isinstance(n.filename, bytes) else n.filename.encode("utf-8", errors="surrogateescape")
    kind = file_kind(n.attrs)
    return (raw[:MAX_NAME_BYTES], kind if kind in _LISTED_TYPES else "other", max(n.attrs.size or 0, 0),
            n.attrs.mtime, len(raw) > MAX_NAME_BYTES)  # fmt: skip


def _dir_entry(e: _Entry) -> DirEntry:
    return DirEntry(name=entry_name(e[0]), type=e[1], size=e[2], mtime=_mtime(e[3]))  # type: ignore[arg-type]


def entry_name(raw: bytes | str) -> str:
    """A directory entry's name for the listing: UTF-8 (invalid bytes replaced), at most MAX_NAME_BYTES."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", errors="surrogateescape")
    return raw[:MAX_NAME_BYTES].decode("utf-8", errors="replace")


def _mtime(value: int | None) -> datetime:
    try:
        return datetime.fromtimestamp(value or 0, UTC)
    except (OverflowError, ValueError, OSError):  # a time no calendar holds: a hostile server
        return datetime.fromtimestamp(0, UTC)
