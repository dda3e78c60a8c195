"""Setting a running container's host name from outside: a warm pool slot gets its workspace's name."""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import os
import socket

from ...errors import BackendError
from ...supervise import ProcessRef, alive

__all__ = ["set_hostname"]

_CLONE_NEWUTS = 0x04000000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


def _in_uts_of(pid: int, name: str) -> None:
    """Join ``pid``'s UTS namespace and set its host name. Runs in a thread of its own that ends
    afterwards: the namespace is the thread's from then on (a UTS namespace is per thread)."""
    fd = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWUTS) != 0:  # os.setns is 3.12+
            raise OSError(ctypes.get_errno(), f"setns into the UTS namespace of process {pid}")
    finally:
        os.close(fd)
    socket.sethostname(name)


async def set_hostname(leader: ProcessRef, name: str) -> None:
    """Give the container whose init is ``leader`` the host name ``name`` (``hostname`` inside says it).

    Raises:
        BackendError: the container is gone, or the kernel refused.
    """
    if not alive(leader):
        raise BackendError(f"the container meant to become {name!r} is gone")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-uts")
    try:
        await asyncio.wrap_future(pool.submit(_in_uts_of, leader.pid, name))
    except OSError as exc:
        raise BackendError(f"setting the host name {name!r} in the container failed: {exc}") from exc
    finally:
        pool.shutdown(wait=False)  # its thread is in the container's UTS namespace: it ends with its task
