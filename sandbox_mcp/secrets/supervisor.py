"""The secrets proxy process: ``python -m sandbox_mcp.secrets.supervisor STATE`` (``STATE`` =
``<state>/.server/secrets-proxy``), started by :mod:`sandbox_mcp.secrets.service`.

Two processes, privileges apart. This one (root, like the server) binds the port, forks the worker
(:mod:`.proxy`) and starts it again when it dies; it parses nothing a workspace sends. The worker, which
does, drops to a uid of its own (``secrets_proxy.uid``: no groups, not dumpable, killed with its parent)
right after fork, with everything it will import already loaded, and asks this process over a socket
pair for what only root may read: a workspace's client file, and a secret's value, only for a secret some
current client file names. So a worker taken over by a request is an unprivileged process holding the
values it is there to send, not root on the host. The worker's output comes through a pipe into the log,
which this process moves aside past ``log_max_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import os
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import BackendError
from .files import ClientFile, ProxyConfig, ProxyPaths
from .proxy import Keeper, ProxyApp, log_event
from .settings import read_value

__all__ = ["main"]

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_MAX_REQUEST = 4096


def _answer(request: bytes, paths: ProxyPaths) -> dict[str, Any]:
    """The supervisor's answer to one worker request: only what a current client file names."""
    try:
        r = json.loads(request)
        ip = str(ipaddress.IPv4Address(r["ip"]))
        path = paths.client(ip)
        client = ClientFile.model_validate_json(path.read_bytes()) if path.exists() else None
        if r["op"] == "client":
            return {"client": client.model_dump(mode="json") if client else None}
        if r["op"] == "value" and client is not None:
            for secret in client.secrets:
                if secret.name == r["secret"]:
                    return {"value": read_value(secret.name, secret.spec)}
        return {"error": "no such secret for this workspace"}
    except BackendError as exc:
        return {"error": str(exc)}
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return {"error": f"bad request: {type(exc).__name__}"}


def _drop_privileges(uid: int) -> None:
    """Become ``uid`` (its own group, no others), not dumpable (no ptrace, /proc/PID root's), killed with
    the supervisor."""
    libc = ctypes.CDLL(None, use_errno=True)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # after setuid: a change of credentials clears it


def _worker(listener: socket.socket, channel: socket.socket, config: ProxyConfig, parent: int) -> None:
    """The worker, in the forked child: load everything while still root, then drop and serve."""
    import encodings.idna  # noqa: F401 - host names are encoded lazily; nothing is imported after the drop

    import uvicorn

    s = config.settings
    uconfig = uvicorn.Config(
        ProxyApp(Keeper(channel), s), http="h11", loop="asyncio", lifespan="on",
        access_log=False, server_header=False, date_header=False, proxy_headers=False, log_level="warning",
        h11_max_incomplete_event_size=s.max_header_bytes, limit_concurrency=max(64, 4 * s.max_connections),
        timeout_keep_alive=30, timeout_graceful_shutdown=3,
    )
    uconfig.load()  # imports the protocol, loop and lifespan modules now
    server = uvicorn.Server(uconfig)
    os.environ.clear()  # the server's environment (an env: secret) has no business here
    if s.uid is not None and os.geteuid() == 0:  # (a proxy run by a user for a test has nothing to drop)
        _drop_privileges(s.uid)
    if os.getppid() != parent:
        os._exit(1)
    asyncio.run(server.serve(sockets=[listener]))


def main(argv: list[str] | None = None) -> int:
    """The supervisor: bind, fork the worker (again when it dies), answer its requests, until SIGTERM/SIGINT."""
    argv = sys.argv[1:] if argv is None else argv
    paths = ProxyPaths(Path(argv[0]))
    config = ProxyConfig.model_validate_json(paths.config.read_bytes())
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY on accepted sockets only when their proto says TCP (0 would
    # leave Nagle on: a response's head and body 40 ms apart against the client's delayed ACK).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((config.listen, config.settings.port))
    listener.listen(1024)
    stopping = False
    child = 0

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    parent = os.getpid()
    backoff = 0.2
    while not stopping:
        started = time.monotonic()
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        child = os.fork()
        if child == 0:
            ours.close()
            os.close(out_r)
            os.dup2(out_w, 1)  # its log lines go through the supervisor, which bounds the file
            os.dup2(out_w, 2)
            os.close(out_w)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                _worker(listener, theirs, config, parent)
            finally:
                os._exit(0)
        theirs.close()
        os.close(out_w)
        status = _supervise(child, ours, out_r, paths, config.log_max_bytes)
        ours.close()
        os.close(out_r)
        child = 0
        if stopping:
            break
        log_event("worker-exited", status=status, restart_in_s=backoff)
        time.sleep(backoff)
        backoff = 0.2 if time.monotonic() - started > 10 else min(backoff * 2, 5.0)
    return 0


def _copylog_event(out: int, paths: ProxyPaths, log_max_bytes: int) -> None:
    """Move what the worker wrote to our stdout (the log, opened for appending); past ``log_max_bytes`` the
    log is moved to proxy.log.1 and a new one begun, so it never grows without bound."""
    try:
        data = os.read(out, 65536)
    except (BlockingIOError, InterruptedError):
        return
    if data:
        os.write(1, data)
        if os.fstat(1).st_size > log_max_bytes:
            with contextlib.suppress(OSError):
                os.replace(paths.log, paths.log.with_name("proxy.log.1"))
                fresh = os.open(paths.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                os.dup2(fresh, 1, inheritable=False)
                os.close(fresh)


def _supervise(child: int, channel: socket.socket, out: int, paths: ProxyPaths, log_max_bytes: int) -> int:
    """Answer the worker and copy its log lines until it exits; its wait status."""
    buffer = b""
    channel.setblocking(False)
    os.set_blocking(out, False)
    with selectors.DefaultSelector() as sel:
        sel.register(channel, selectors.EVENT_READ)
        sel.register(out, selectors.EVENT_READ)
        while True:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                _copylog_event(out, paths, log_max_bytes)
                return status
            ready = {key.fileobj for key, _ in sel.select(timeout=0.2)}
            if out in ready:
                _copylog_event(out, paths, log_max_bytes)
            if channel not in ready:
                continue
            try:
                data = channel.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:  # the worker closed its end: wait for it to go
                sel.unregister(channel)
                status = os.waitpid(child, 0)[1]
                _copylog_event(out, paths, log_max_bytes)
                return status
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                reply = json.dumps(_answer(line, paths)).encode() + b"\n"
                channel.setblocking(True)
                channel.sendall(reply)
                channel.setblocking(False)
            if len(buffer) > _MAX_REQUEST:  # a worker gone wrong: start a fresh one
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
                buffer = b""


if __name__ == "__main__":
    sys.exit(main())
