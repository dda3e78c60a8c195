"""What a warm pool claim changes in a running container, from outside: its host name, and its shared
directories (a slot boots without them), mapped for the identity that owns them once claimed.

Both join one of the container's namespaces from a thread made for it, which ends afterwards: a UTS
namespace is per thread, and a thread that first unshares its file system attributes (``CLONE_FS``)
may join a mount namespace without the rest of the process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ... import idmap
from ...errors import BackendError
from ...supervise import ProcessRef, alive

__all__ = ["mount_shares", "set_hostname"]

T = TypeVar("T")

_CLONE_FS = 0x00000200
_CLONE_NEWNS = 0x00020000
_CLONE_NEWUTS = 0x04000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def _join(pid: int, kind: str, flag: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, flag) != 0:  # os.setns is 3.12+
            raise OSError(ctypes.get_errno(), f"joining the {kind} namespace of process {pid}")
    finally:
        os.close(fd)


async def _in_own_thread(fn: Callable[[], T], what: str) -> T:
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-handover")
    try:
        return await asyncio.wrap_future(pool.submit(fn))
    except OSError as exc:
        raise BackendError(f"{what} failed: {exc}") from exc
    finally:
        pool.shutdown(wait=False)  # its thread is in the container's namespace: it ends with its task


async def set_hostname(leader: ProcessRef, name: str) -> None:
    """Give the container whose init is ``leader`` the host name ``name`` (``hostname`` inside says it).

    Raises:
        BackendError: the container is gone, or the kernel refused.
    """
    if not alive(leader):
        raise BackendError(f"the container meant to become {name!r} is gone")

    def run() -> None:
        _join(leader.pid, "uts", _CLONE_NEWUTS)
        socket.sethostname(name)

    await _in_own_thread(run, f"setting the host name {name!r} in the container")


async def mount_shares(leader: ProcessRef, shares: list[tuple[Path, str]], uid_base: int,
                       user_ids: tuple[int, int]) -> None:
    """Mount ``shares`` (host dir, path inside) into the container whose init is ``leader``: idmapped mounts
    that map each dir's owner on disk now to the workspace user, as a boot's binds do (rootfs.mount_all).

    Root inside may unmount them (it could not unmount a boot's binds): it then finds the image's empty
    directory there, nothing of the host, and only the workspace loses its view.

    Raises:
        BackendError: the container is gone, or the kernel refused a step (then the container is not to be
            handed over: the caller destroys it).
    """
    if not alive(leader):
        raise BackendError("the container to hand over is gone")
    trees: list[tuple[int, str]] = []
    try:
        for source, inside in shares:
            st = os.lstat(source)
            uids, gids = idmap.share_map(uid_base, (st.st_uid, st.st_gid), user_ids)
            nosuid = idmap.MOUNT_ATTR_NOSUID | idmap.MOUNT_ATTR_NODEV
            trees.append((idmap.detached_idmapped_tree(source, uids, nosuid, gid_map=gids), inside))

        def run() -> None:
            if _libc.unshare(_CLONE_FS) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_FS)")
            _join(leader.pid, "mnt", _CLONE_NEWNS)  # root and cwd are the container's from here
            for fd, inside in trees:
                if not os.path.isdir(inside):  # not in the image: made as the container's root would
                    os.makedirs(inside, mode=0o755)
                    os.chown(inside, uid_base + user_ids[0], uid_base + user_ids[1])
                idmap.move_tree(fd, Path(inside))

        await _in_own_thread(run, "mounting the workspace's directories into the container")
    except OSError as exc:
        raise BackendError(f"mounting the workspace's directories into the container failed: {exc}") from exc
    finally:
        for fd, _ in trees:
            os.close(fd)
