"""Snapshots, restores and forks on the host's disk: built aside, renamed into place, rolled forward after a crash.

Under ``<state>/<name>/``::

    snapshots/<snap>/            meta.json, workspace/, claude-config/, root/ (the runtime's copy of its
                                 writable root: a container's overlay upper dir, a VM's qcow2 layer)
    snapshots/.tmp-<snap>-<hex>/ a snapshot being taken, or one being deleted (recover() removes them)
    <part>.restoring             a restore's copies being built, beside the parts they replace
    restore.json                 the restore's journal: written once every copy is complete

A snapshot appears under its name only by a rename of a finished directory, so a server killed
while taking one leaves nothing visible. A restore builds every part aside first, writes the
journal, then swaps each part in by renames; a server killed before the journal leaves the old
state (the copies are removed), after it the swap is finished on the next start: the old state or
the new one, never a mix.

Copies are ``cp -a --reflink=auto``: copy-on-write clones where the filesystem has them (xfs with
reflink=1, btrfs, bcachefs, zfs 2.2+), a full copy elsewhere (ext4, tmpfs): then a snapshot costs its
size in disk and the time to write it (see ``sandbox-mcp bench``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from . import hostcmd
from .errors import Conflict, InvalidSpec, InvalidState, LimitExceeded
from .fsutil import atomic_write, fsync_dir
from .models import SnapshotInfo
from .paths import WorkspacePaths

__all__ = [
    "PARTS",
    "SnapshotStore",
    "check_bound",
    "copy_method",
    "copy_tree",
    "copy_tree_argv",
    "drop_old",
    "recover_restore",
    "restore_swap",
    "shift_owners",
    "tree_size",
    "validate_snapshot_name",
]

_SNAPSHOT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,39}$")
_FICLONE = 0x40049409  # ioctl(dest_fd, FICLONE, src_fd): share src's extents (linux/fs.h)
_COPY_TIMEOUT_S = 6 * 3600
# The parts of a workspace a snapshot holds: (its directory in a snapshot, its path in the workspace).
PARTS = ("workspace", "claude-config", "root")
_JOURNAL = "restore.json"


def validate_snapshot_name(snapshot: str) -> str:
    """A snapshot name: lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, ≤ 40.

    Raises:
        InvalidSpec: anything else.
    """
    if not isinstance(snapshot, str) or not _SNAPSHOT_RE.match(snapshot):
        raise InvalidSpec(
            f"snapshot name {snapshot!r} is not allowed: use lowercase letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 40 characters (e.g. 'before-migration')"
        )
    return snapshot


def part_path(paths: WorkspacePaths, part: str) -> Path:
    """Where snapshot part ``part`` lives in the workspace itself."""
    return {"workspace": paths.workspace, "claude-config": paths.claude_config, "root": paths.root_layer}[part]


def copy_tree_argv(src: Path, dst: Path) -> list[str]:
    """``cp`` copying directory ``src`` to the new path ``dst``: owners, modes, times, xattrs (overlayfs
    whiteouts and opaque marks too), hard links; clones where the filesystem can."""
    return ["cp", "-a", "--reflink=auto", "--no-target-directory", "--", str(src), str(dst)]


async def copy_tree(src: Path, dst: Path) -> None:
    """Copy directory ``src`` to ``dst`` (which must not exist).

    Raises:
        CommandFailed: cp failed (disk full, a file vanished); ``dst`` may be partial, the caller removes it.
    """
    await hostcmd.run(copy_tree_argv(src, dst), timeout_s=_COPY_TIMEOUT_S)


def copy_method(directory: Path) -> Literal["reflink", "copy"]:
    """Whether copies inside ``directory``'s filesystem are clones ('reflink') or full copies ('copy').

    Probed with FICLONE on two scratch files (removed again). Blocking.
    """
    directory.mkdir(parents=True, exist_ok=True)
    src = directory / f".reflink-probe-{secrets.token_hex(4)}"
    dst = src.with_name(src.name + ".clone")
    try:
        src.write_bytes(b"probe")
        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        return "reflink"
    except OSError:
        return "copy"
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def tree_size(root: Path) -> int:
    """Bytes allocated under ``root`` (st_blocks; clones are counted in full). Blocking."""
    total = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in [dirpath, *(os.path.join(dirpath, n) for n in filenames)]:
            with contextlib.suppress(OSError):
                st = os.lstat(entry)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_blocks * 512
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return total


# File capabilities (security.capability) name the owner of the user namespace they are for (v3);
# chown drops them, so a shift re-sets them with the new root uid.
_CAP_XATTR = "security.capability"
_VFS_CAP_REVISION_3 = 0x03000000
_VFS_CAP_REVISION_MASK = 0xFF000000


def _shift_caps(value: bytes, old_base: int, new_base: int, size: int) -> bytes:
    if len(value) >= 24 and (struct.unpack_from("<I", value)[0] & _VFS_CAP_REVISION_MASK) == _VFS_CAP_REVISION_3:
        rootid = struct.unpack_from("<I", value, 20)[0]
        if old_base <= rootid < old_base + size:
            return value[:20] + struct.pack("<I", rootid - old_base + new_base) + value[24:]
    return value


def shift_owners(roots: Iterable[Path], old_base: int, new_base: int, size: int = 65536) -> int:
    """Move owners (and groups) in ``[old_base, old_base+size)`` to the same offset from ``new_base``.

    What a fork needs: the files of one user-namespaced container, given to another with its own
    uid range. Symlinks are changed themselves, never followed. Modes (setuid bits, which chown
    clears) and file capabilities (which chown drops) are put back. Returns the entries changed.
    Blocking.
    """
    if old_base == new_base:
        return 0

    def shifted(i: int) -> int:
        return i - old_base + new_base if old_base <= i < old_base + size else i

    def shift(entry: str) -> int:
        st = os.lstat(entry)
        uid, gid = shifted(st.st_uid), shifted(st.st_gid)
        if (uid, gid) == (st.st_uid, st.st_gid):
            return 0
        if stat.S_ISLNK(st.st_mode):
            os.lchown(entry, uid, gid)
            return 1
        caps = None
        with contextlib.suppress(OSError):
            caps = os.getxattr(entry, _CAP_XATTR, follow_symlinks=False)
        os.lchown(entry, uid, gid)
        os.chmod(entry, st.st_mode & 0o7777)
        if caps is not None:
            os.setxattr(entry, _CAP_XATTR, _shift_caps(caps, old_base, new_base, size), follow_symlinks=False)
        return 1

    changed = 0
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            changed += shift(dirpath)
            # Files, and symlinks to directories (listed with the directories, never walked into).
            links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
            for n in [*filenames, *links]:
                changed += shift(os.path.join(dirpath, n))
    return changed


class SnapshotStore:
    """The snapshots of one workspace, on the host's disk (see the module docstring)."""

    def __init__(self, paths: WorkspacePaths, workspace: str) -> None:
        self.paths = paths
        self.workspace = workspace
        self.root = paths.snapshots

    def path(self, snapshot: str) -> Path:
        return self.root / validate_snapshot_name(snapshot)

    def list(self) -> list[SnapshotInfo]:
        """Every finished snapshot, oldest first. Blocking."""
        out = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                with contextlib.suppress(OSError, ValueError):
                    out.append(SnapshotInfo.model_validate_json((Path(entry.path) / "meta.json").read_bytes()))
        return sorted(out, key=lambda i: (i.created_at, i.snapshot))

    def total_bytes(self) -> int:
        """What the finished snapshots take on the host, as each recorded it when taken. Blocking (reads
        only their meta.json: cheap, unlike walking them)."""
        return sum(i.size_bytes for i in self.list())

    def get(self, snapshot: str) -> SnapshotInfo:
        """A finished snapshot's record.

        Raises:
            InvalidSpec: a bad snapshot name.
            InvalidState: no snapshot of that name.
        """
        try:
            return SnapshotInfo.model_validate_json((self.path(snapshot) / "meta.json").read_bytes())
        except FileNotFoundError:
            known = ", ".join(i.snapshot for i in self.list()) or "none"
            raise InvalidState(
                f"workspace {self.workspace!r} has no snapshot {snapshot!r} (it has: {known}); call list_snapshots"
            ) from None

    def check_free(self, snapshot: str) -> None:
        """Raises Conflict when ``snapshot`` exists already (InvalidSpec for a bad name)."""
        if self.path(snapshot).exists():
            raise Conflict(
                f"workspace {self.workspace!r} already has a snapshot {snapshot!r}; pick another name "
                "or delete_snapshot it first"
            )

    def aside(self, snapshot: str) -> Path:
        """A fresh private directory to build ``snapshot`` in (root only: it holds the root layer). Blocking."""
        self.root.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)
        tmp = self.root / f".tmp-{validate_snapshot_name(snapshot)}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o700)
        return tmp

    def commit(self, tmp: Path, info: SnapshotInfo) -> None:
        """Write ``info`` into the finished ``tmp`` and rename it into place. Blocking.

        Raises:
            Conflict: a snapshot of that name appeared meanwhile (``tmp`` is removed).
        """
        atomic_write(tmp / "meta.json", info.model_dump_json(indent=2), mode=0o600)
        try:
            os.rename(tmp, self.path(info.snapshot))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                self.check_free(info.snapshot)
            raise
        fsync_dir(self.root)

    def delete(self, snapshot: str) -> None:
        """Remove ``snapshot``: renamed out of sight first, so a crash never leaves half of one. Blocking.

        Raises:
            InvalidState: no snapshot of that name.
        """
        self.get(snapshot)
        doomed = self.root / f".tmp-deleting-{secrets.token_hex(4)}"
        os.rename(self.path(snapshot), doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def recover(self) -> None:
        """Remove snapshots a crash left half-taken or half-deleted. Blocking."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.root):
                if entry.name.startswith(".tmp-"):
                    shutil.rmtree(entry.path, ignore_errors=True)


def check_bound(workspace: str, snapshot: str, owner_bytes: int, adding: int, limit_bytes: int) -> None:
    """Refuse ``snapshot`` when the owner's snapshots (``owner_bytes``) plus its ``adding`` bytes pass the bound.

    Raises:
        LimitExceeded: with the sizes, the setting, and what to do.
    """
    if owner_bytes + adding <= limit_bytes:
        return

    def mib(n: int) -> str:
        return f"{n / (1 << 20):.1f} MiB"

    raise LimitExceeded(
        f"snapshot {snapshot!r} of workspace {workspace!r} would take {mib(adding)} of host disk, and the owner's "
        f"snapshots already take {mib(owner_bytes)} of the {mib(limit_bytes)} they may (uid_max_snapshot_mib); "
        "delete_snapshot ones no longer needed (list_snapshots shows their sizes), or free space in the workspace, "
        "then take it again"
    )


def staging(paths: WorkspacePaths, part: str) -> Path:
    """Where a restore (or a fork) builds ``part`` before swapping it in."""
    target = part_path(paths, part)
    return target.with_name(target.name + ".restoring")


def restore_swap(paths: WorkspacePaths) -> None:
    """Swap in every staged part (see :func:`staging`): journal first, then renames. Blocking.

    The caller has built each staged part completely (parts without one stay as they are), and
    calls :func:`drop_old` when it is convenient (after the restart: deleting is not on the way).
    """
    pairs = [(str(staging(paths, p)), str(part_path(paths, p))) for p in PARTS if staging(paths, p).exists()]
    atomic_write(paths.root / _JOURNAL, json.dumps({"pairs": pairs}), mode=0o600)
    _apply_journal(paths)


def _apply_journal(paths: WorkspacePaths) -> None:
    journal = paths.root / _JOURNAL
    pairs = json.loads(journal.read_text())["pairs"]
    for new, dst in pairs:
        new_p, dst_p = Path(new), Path(dst)
        old = dst_p.with_name(dst_p.name + ".old")
        if new_p.exists():  # not swapped yet (a crash may have moved the old part aside already)
            if dst_p.exists() or dst_p.is_symlink():
                if old.exists():
                    shutil.rmtree(old)
                os.rename(dst_p, old)
            os.rename(new_p, dst_p)
    fsync_dir(paths.root)
    # The new state is whole: the journal goes, and the old parts are garbage that drop_old (or, after
    # a crash, recover_restore) removes, once the workspace runs again.
    journal.unlink()
    fsync_dir(paths.root)


def drop_old(paths: WorkspacePaths) -> None:
    """Remove the parts a finished swap replaced (``<part>.old``). Blocking."""
    for part in PARTS:
        target = part_path(paths, part)
        shutil.rmtree(target.with_name(target.name + ".old"), ignore_errors=True)


def recover_restore(paths: WorkspacePaths) -> bool:
    """After a crash: finish a journaled restore, or drop one that never reached its journal. Blocking.

    Returns True when a restore was finished (the workspace now holds the snapshot's state).
    """
    finished = (paths.root / _JOURNAL).exists()
    if finished:
        _apply_journal(paths)
    for part in PARTS:
        shutil.rmtree(staging(paths, part), ignore_errors=True)
    drop_old(paths)
    return finished
