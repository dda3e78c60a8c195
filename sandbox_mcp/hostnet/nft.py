"""nftables from this process: ``libnftables`` (what the ``nft`` program is a front end of) through ctypes,
else the ``nft`` program.

A create used to start six ``nft`` processes (two listings to find the addresses the rules hold, two to
see that the tables are there, two more and a load to admit the port), four of them under the firewall
lock that every create on the host queues for: with 30 creates at once the lock's queue, not the work,
set the pace. In process a listing or a load of our small tables takes about a millisecond and no fork.

A context's netlink socket belongs to the network namespace it was made in, and a forked child
inherits its parent's: so there is one context per process and network namespace (a bench or a test
that unshares one, a child forked into another, gets its own), used by one thread at a time (the
library's contexts are not thread-safe). Blocking: :func:`run` and :func:`list_tables` call it from a
worker thread.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import threading

import anyio

from .. import hostcmd
from ..errors import BackendError, CommandTimeout

__all__ = ["Nft", "list_tables", "list_tables_sync", "run", "shared"]


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


_contexts: dict[tuple[int, int], Nft] = {}
_contexts_lock = threading.Lock()


def shared() -> Nft:
    """The context of this process in the calling thread's network namespace (made on first use)."""
    key = (os.getpid(), os.stat("/proc/thread-self/ns/net").st_ino)
    with _contexts_lock:
        nft = _contexts.get(key)
        if nft is None:
            nft = _contexts[key] = Nft()
        return nft


def _in_thread(commands: list[str]) -> list[tuple[bool, str, str]] | None:
    """Run ``commands`` one by one with the context of this thread's namespace; None without the library."""
    nft = shared()
    if not nft.available:
        return None
    return [nft.run(command) for command in commands]


async def run(script: str) -> None:
    """Load an nft script as one transaction (nothing for an empty one).

    Raises:
        BackendError: nft is missing or refused the script (the message says why).
    """
    if not script:
        return
    done = await anyio.to_thread.run_sync(_in_thread, [script])
    if done is None:
        await hostcmd.run(["nft", "-f", "-"], timeout_s=30, stdin=script.encode())
        return
    ok, _, err = done[0]
    if not ok:
        raise BackendError(f"nft refused the firewall rules: {err.strip()[-2000:] or 'no reason given'}")


def list_tables_sync(tables: list[tuple[str, str]]) -> list[str | None]:
    """``nft list table FAMILY TABLE`` for each of ``tables`` as nft prints it, None for one that is missing (or
    when neither the library nor the program is installed: then no table of ours can exist). Blocking."""
    commands = [f"list table {family} {table}" for family, table in tables]
    done = _in_thread(commands)
    if done is not None:
        return [out if ok else None for ok, out, _ in done]
    if shutil.which("nft") is None:
        return [None for _ in tables]
    out: list[str | None] = []
    for command in commands:
        try:
            listed = subprocess.run(["nft", *command.split()], capture_output=True, text=True, timeout=30, check=False)
        except subprocess.TimeoutExpired as exc:
            raise CommandTimeout(f"nft {command} did not finish within 30 s") from exc
        except OSError as exc:
            raise BackendError(f"cannot run nft: {exc}") from exc
        out.append(listed.stdout if listed.returncode == 0 else None)
    return out


async def list_tables(tables: list[tuple[str, str]]) -> list[str | None]:
    """:func:`list_tables_sync` in a worker thread."""
    return await anyio.to_thread.run_sync(list_tables_sync, tables)
