"""``python3 -I .../sandbox_mcp/git_remote.py FD``: the command git's ``ext::`` transport runs for fetch_workspace.

The host's ``git fetch`` speaks the git protocol to this program's stdin and stdout; it passes
the bytes on, both ways, to the inherited socket ``FD``, whose other end the server holds and
relays to ``git upload-pack`` running inside the workspace over SSH (:mod:`sandbox_mcp.gitflow`).
So the host's git never opens the workspace's directory: it sees only a stream, which the server
bounds. Stdlib only and run as a plain script (any python3 will do, so one every user can run),
as the user who owns the host repository (never as root).
"""

from __future__ import annotations

import os
import socket
import sys
import threading

__all__ = ["main", "relay"]

_CHUNK = 64 * 1024


def relay(sock: socket.socket, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """Copy ``stdin_fd`` to ``sock`` (then half-close it) and ``sock`` to ``stdout_fd`` until both end."""

    def upstream() -> None:
        try:
            while data := os.read(stdin_fd, _CHUNK):
                sock.sendall(data)
        except OSError:
            pass
        finally:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    sender = threading.Thread(target=upstream, daemon=True)
    sender.start()
    try:
        while data := sock.recv(_CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(stdout_fd, view) :]
    except OSError:
        pass
    os.close(stdout_fd)  # git sees the end of the server's answer now, whatever the sender is doing


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: git_remote.py FD (run by git's ext:: transport)", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[0]))
    relay(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
