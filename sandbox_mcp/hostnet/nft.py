"""nftables from this process: ``libnftables`` (what the ``nft`` program is a front end of) through ctypes,
else the ``nft`` program.

A create used to start six ``nft`` processes (two listings to find the addresses the rules hold, two to
see that the tables are there, two more and a load to admit the port), four of them under the firewall
lock that every create on the host queues for: with 30 creates at once the lock's queue, not the work,
set the pace. In process a listing or a load of our small tables takes about a millisecond and no fork.

One context per process, used by one thread at a time (the library's contexts are not thread-safe);
blocking: call :meth:`Nft.run` from a worker thread (:func:`run` and :func:`list_table` do).
"""

from __future__ import annotations

import ctypes
import shutil
import threading

import anyio

from .. import hostcmd
from ..errors import BackendError

__all__ = ["Nft", "list_table", "run"]


class Nft:
    """``libnftables.so.1`` in process; :attr:`available` is False where the library is missing."""

    def __init__(self) -> None:
        self.available = False
        self._lock = threading.Lock()
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError:
            return
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = (ctypes.c_uint32,)
        lib.nft_ctx_buffer_output.argtypes = (ctypes.c_void_p,)
        lib.nft_ctx_buffer_error.argtypes = (ctypes.c_void_p,)
        lib.nft_run_cmd_from_buffer.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = (ctypes.c_void_p,)
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = (ctypes.c_void_p,)
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            return
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lib, self._ctx, self.available = lib, ctx, True

    def run(self, script: str) -> tuple[bool, str, str]:
        """Run ``script`` as one transaction: (succeeded, what nft printed, nft's error text).

        The buffers are read after every command, so each call sees only its own output.
        """
        with self._lock:
            ok = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode()) == 0
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        return ok, out, err


_shared: Nft | None = None
_shared_lock = threading.Lock()


def shared() -> Nft:
    """This process's context (made on first use)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Nft()
        return _shared


async def run(script: str) -> None:
    """Load an nft script as one transaction (nothing for an empty one).

    Raises:
        BackendError: nft is missing or refused the script (the message says why).
    """
    if not script:
        return
    nft = shared()
    if not nft.available:
        await hostcmd.run(["nft", "-f", "-"], timeout_s=30, stdin=script.encode())
        return
    ok, _, err = await anyio.to_thread.run_sync(nft.run, script)
    if not ok:
        raise BackendError(f"nft refused the firewall rules: {err.strip()[-2000:] or 'no reason given'}")


async def list_table(family: str, table: str) -> str | None:
    """``nft list table FAMILY TABLE`` as nft prints it, or None when the table is missing (or neither the
    library nor the program is installed: then no table of ours can exist)."""
    command = f"list table {family} {table}"
    nft = shared()
    if nft.available:
        ok, out, _ = await anyio.to_thread.run_sync(nft.run, command)
        return out if ok else None
    if shutil.which("nft") is None:
        return None
    done = await hostcmd.run(["nft", *command.split()], timeout_s=30, check=False)
    return done.stdout if done.returncode == 0 else None


async def list_tables(tables: list[tuple[str, str]]) -> list[str | None]:
    """Several tables in one trip to a worker thread (see :func:`list_table`)."""
    nft = shared()
    if not nft.available:
        return [await list_table(f, t) for f, t in tables]

    def _all() -> list[str | None]:
        out: list[str | None] = []
        for family, table in tables:
            ok, text, _ = nft.run(f"list table {family} {table}")
            out.append(text if ok else None)
        return out

    return await anyio.to_thread.run_sync(_all)
