"""Idmapped mounts: show a host directory to a user-namespaced container with shifted owners.

Why not nspawn's own options (systemd 252, found on the dev machines):
``--private-users-ownership=map`` refuses ``--volatile=overlay`` ("ID mapped mounts are
apparently not available": overlayfs itself cannot be idmapped), and ``--bind=…:idmap``
maps host uid 0 to the container's root, so a file ``sudo`` leaves in the workspace
directory would land on the host owned by root (a setuid-root program one ``chmod`` later).

So the host makes the mounts itself, with the new mount API (Linux 5.12+):
``open_tree(OPEN_TREE_CLONE)`` detaches a copy of a directory's mount,
``mount_setattr(MOUNT_ATTR_IDMAP | …)`` attaches a user namespace's id map to it, and
``move_mount`` places it. The user namespace is a throwaway ``unshare --user`` process
whose maps the host writes; the mount keeps a reference, so the process can go at once.

Two maps (BASE = the workspace's first host uid, see :func:`naming.allocate_uid_base`):

* :func:`root_map` for the image (the overlay's lower layer) and the read-only host keys:
  disk uid ``u`` appears as ``BASE+u``, i.e. as ``u`` inside the container.
* :func:`share_map` for the directories the workspace shares with the host user (workspace,
  Claude config): exactly one id each way, the directory's owner (uid and gid on disk) as the
  workspace user (``BASE+user_uid`` in the kernel's view), so the agent's files are the host
  owner's and nothing else inside has a host id there. Container root (``BASE``) and every other
  id of the range are unmapped on this mount: whatever they try to create there fails
  (``EOVERFLOW``), a ``chown``/``chgrp`` to any other id fails (``EINVAL``), and host-root files
  show up as ``nobody``. Root inside can still change the owner's own files (it is root in the
  namespace that maps their owner), so a setuid bit makes at most a program setuid to the owner,
  in the owner's 0700 workspace dir; mounted ``nosuid,nodev`` as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from .errors import BackendError, InvalidSpec

__all__ = [
    "MOUNT_ATTR_IDMAP",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_RDONLY",
    "IdMap",
    "UserNamespaces",
    "detached_idmapped_tree",
    "format_map",
    "idmapped_mount",
    "move_tree",
    "root_map",
    "share_map",
    "userns_with_map",
]

IdMap = Sequence[tuple[int, int, int]]  # (id on disk, id as the kernel sees it, count): uid_map lines

MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_IDMAP = 0x100000
_OPEN_TREE_CLONE = 0x1
_OPEN_TREE_CLOEXEC = os.O_CLOEXEC
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
# The new mount syscalls have the same numbers on every architecture (the unified table).
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
RANGE = 65536


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check_base(base: int) -> None:
    if base < RANGE or base % RANGE or base + RANGE > 2**32 - 1:
        raise InvalidSpec(f"uid base {base} is not a positive multiple of {RANGE} below 2^32")


def root_map(base: int) -> list[tuple[int, int, int]]:
    """Disk ``0..65535`` shown as ``base..base+65535``: the container's own view of its image.

    Raises:
        InvalidSpec: ``base`` is not a multiple of 65536 (or is 0).
    """
    _check_base(base)
    return [(0, base, RANGE)]


def share_map(base: int, owner: tuple[int, int], inside: tuple[int, int]) -> tuple[IdMap, IdMap]:
    """The uid and gid maps of a host-shared directory: its owner on disk (``owner`` = uid, gid) as the
    workspace user (``inside`` = uid, gid in the image), and no other id.

    Raises:
        InvalidSpec: ``base`` is not a multiple of 65536 (or is 0), ``inside`` is out of the range, or the
            owner is root (its files would be root's on the host).
    """
    _check_base(base)
    (uid, gid), (in_uid, in_gid) = owner, inside
    if not (0 < in_uid < RANGE and 0 < in_gid < RANGE):
        raise InvalidSpec(f"the workspace user's ids {inside} are not inside a {RANGE}-id range")
    if uid == 0 or gid == 0:
        raise InvalidSpec("a shared directory belongs to root; chown it to the workspace's owner and start again")
    return [(uid, base + in_uid, 1)], [(gid, base + in_gid, 1)]


def format_map(idmap: IdMap) -> str:
    """The text written to ``/proc/PID/uid_map`` (and ``gid_map``): one ``inside outside count`` per line."""
    return "".join(f"{a} {b} {n}\n" for a, b, n in idmap)


def userns_with_map(idmap: IdMap, gid_map: IdMap | None = None) -> int:
    """An fd of a new user namespace whose uid map is ``idmap`` (gid map: ``gid_map``, default the same).

    The caller closes it.

    Raises:
        BackendError: ``unshare`` is missing or the kernel refused the namespace or the map.
    """
    try:
        proc = subprocess.Popen(
            ["unshare", "--user", "--", "cat"],  # blocks reading stdin until we close it
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
    except FileNotFoundError as exc:
        raise BackendError("'unshare' not found; install util-linux") from exc
    try:
        # unshare execs cat once the namespace exists; before that /proc/PID/ns/user is ours.
        own = os.stat("/proc/self/ns/user").st_ino
        for _ in range(10_000):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise BackendError(f"could not create a user namespace: {err.strip()}; run 'sandbox-mcp doctor'")
            try:
                if os.stat(f"/proc/{proc.pid}/ns/user").st_ino != own:
                    break
            except FileNotFoundError:
                pass
            os.sched_yield()
        text, gids = format_map(idmap), format_map(idmap if gid_map is None else gid_map)
        try:
            Path(f"/proc/{proc.pid}/uid_map").write_text(text)
            Path(f"/proc/{proc.pid}/gid_map").write_text(gids)
        except OSError as exc:
            raise BackendError(f"the kernel refused the id map {text!r} / {gids!r}: {exc}") from exc
        return os.open(f"/proc/{proc.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


class UserNamespaces:
    """User namespaces made for id maps, one per distinct pair of maps, all closed together: the mounts of
    one workspace share them (its image and host keys use one map, its shared directories another), and
    each costs a child process (``unshare``) to make."""

    def __init__(self) -> None:
        self._fds: dict[tuple[tuple[tuple[int, int, int], ...], ...], int] = {}

    def fd(self, idmap: IdMap, gid_map: IdMap | None = None) -> int:
        """An fd of a user namespace with these maps (see :func:`userns_with_map`); this object closes it."""
        key = (tuple(idmap), tuple(idmap if gid_map is None else gid_map))
        if key not in self._fds:
            self._fds[key] = userns_with_map(idmap, gid_map)
        return self._fds[key]

    def close(self) -> None:
        fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> UserNamespaces:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _syscall_fail(what: str, path: Path) -> BackendError:
    err = ctypes.get_errno()
    return BackendError(
        f"{what} failed for {path}: {os.strerror(err)}; idmapped mounts need Linux 5.12+ and a file "
        f"system that supports them (ext4, xfs, btrfs, tmpfs 6.3+); run 'sandbox-mcp doctor'"
    )


def detached_idmapped_tree(source: Path, idmap: IdMap, extra_attrs: int = 0, gid_map: IdMap | None = None,
                           namespaces: UserNamespaces | None = None) -> int:
    """An fd of a copy of ``source``'s mount with ``idmap`` (gids: ``gid_map``, default the same) applied,
    attached nowhere. The caller closes it.

    The copy lives while the fd (or anything opened through it, e.g. ``/proc/self/fd/N`` in a
    process that inherited it) does, and is gone with the last one: nothing to unmount.
    ``extra_attrs`` adds ``MOUNT_ATTR_RDONLY``/``NOSUID``/``NODEV``. ``namespaces``: where the user namespace
    of the maps comes from (and stays, for the next mount with them); by default one made for this call.

    Raises:
        BackendError: the kernel or the file system refused (the message says which step).
    """
    with contextlib.nullcontext(namespaces) if namespaces is not None else UserNamespaces() as userns:
        return _idmapped_tree(source, userns.fd(idmap, gid_map), extra_attrs)


def _idmapped_tree(source: Path, nsfd: int, extra_attrs: int) -> int:
    fd = _libc.syscall(_SYS_OPEN_TREE, -100, os.fsencode(source), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)
    if fd < 0:
        raise _syscall_fail("open_tree", source)
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP | extra_attrs, 0, 0, nsfd)
        if _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", _AT_EMPTY_PATH, ctypes.byref(attr), ctypes.sizeof(attr)):
            raise _syscall_fail("mount_setattr", source)
    except BaseException:
        os.close(fd)
        raise
    return fd


def move_tree(fd: int, target: Path) -> None:
    """Attach the detached mount ``fd`` (:func:`detached_idmapped_tree`) at ``target`` in the caller's mount
    namespace (the calling thread's, when it joined another).

    Raises:
        BackendError: the kernel refused.
    """
    if _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", -100, os.fsencode(target), _MOVE_MOUNT_F_EMPTY_PATH):
        raise _syscall_fail("move_mount", target)


def idmapped_mount(source: Path, target: Path, idmap: IdMap, extra_attrs: int = 0,
                   gid_map: IdMap | None = None, namespaces: UserNamespaces | None = None) -> None:
    """Mount a copy of ``source`` at ``target`` (an existing directory) with ``idmap`` applied (gids:
    ``gid_map``, default the same).

    ``extra_attrs`` adds ``MOUNT_ATTR_RDONLY``/``NOSUID``/``NODEV``; ``namespaces`` as for
    :func:`detached_idmapped_tree`. Unmount with ``umount``.

    Raises:
        BackendError: the kernel or the file system refused (the message says which step).
    """
    fd = detached_idmapped_tree(source, idmap, extra_attrs, gid_map, namespaces)
    try:
        move_tree(fd, target)
    finally:
        os.close(fd)
