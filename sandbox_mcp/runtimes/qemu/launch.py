"""The first moments of a VM's host process: enter qemu's user namespace, drop to its ids, exec qemu.

The server (root) starts it through :func:`sandbox_mcp.supervise.spawn` as::

    python3 -I -S launch.py USERNS_FD UID GID GROUPS -- qemu-system-x86_64 ...

It imports nothing but the standard library (``-S``: no site-packages, so no venv is needed)
and execs qemu in place, so the PID, start time and environment (the workspace tag) the
supervisor recorded are qemu's. In the user namespace the server made (``UID``/``GID`` there
are one host uid and gid of the VM's own; see :mod:`sandbox_mcp.runtimes.qemu`) it empties its
capability bounding set, sets its groups, gids and uids, and clears its remaining capabilities
(entering a namespace grants all of them there, and a uid change away from a uid that is not
the namespace's root keeps them); no-new-privs then bars regaining any through a setuid
program, and it refuses to exec while any capability is left.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["main"]

_CLONE_NEWUSER = 0x10000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAPBSET_DROP = 24
_PR_CAP_AMBIENT = 47
_PR_CAP_AMBIENT_CLEAR_ALL = 4
_CAPABILITY_VERSION_3 = 0x20080522


def _clear_capabilities(libc: ctypes.CDLL) -> bool:
    """Empty the effective, permitted, inheritable and ambient sets (capset with all zeros)."""
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    if libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        return False
    return libc.capset(header, data) == 0


def _fail(message: str) -> int:
    print(f"qemu_launch: {message}", file=sys.stderr, flush=True)
    return 111


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return -1


def _which(program: str) -> str | None:
    """``program``'s path, found while still privileged (the interpreter's own files may be unreadable later)."""
    if "/" in program:
        return program
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(directory or ".", program)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def main(argv: list[str]) -> int:
    """Enter the namespace, drop privileges and exec the command; returns only on failure."""
    try:
        sep = argv.index("--")
        fd_s, uid_s, gid_s, groups_s = argv[:sep]
        command = argv[sep + 1 :]
        fd, uid, gid = int(fd_s), int(uid_s), int(gid_s)
        groups = [int(g) for g in groups_s.split(",") if g]
    except ValueError:
        return _fail("usage: launch.py USERNS_FD UID GID GROUPS -- COMMAND...")
    program = _which(command[0]) if command else None
    if program is None:
        return _fail(f"{command[0] if command else 'no command'}: not found")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWUSER) != 0:
        return _fail(f"setns: {os.strerror(ctypes.get_errno())}")
    os.close(fd)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            return _fail(f"dropping capability {cap} from the bounding set: {os.strerror(ctypes.get_errno())}")
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        return _fail(f"dropping to uid {uid} gid {gid}: {exc}")
    if not _clear_capabilities(libc):
        return _fail(f"clearing capabilities: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return _fail(f"no_new_privs: {os.strerror(ctypes.get_errno())}")
    if _effective_caps() != 0:
        return _fail("capabilities left after dropping privileges; not starting qemu")
    try:
        os.execv(program, command)
    except OSError as exc:
        return _fail(f"{command[0]}: {exc}")
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
