"""Run as root by tests/test_sysctls.py: who is charged for inotify instances made in a user namespace?

Prints one JSON object. In a user namespace U1 whose ``user.max_inotify_instances`` is 10 (its
own limit, so the host's count is never touched): how many instances a nested namespace owned by
U1's root can open with U1's root holding none and holding 6, and how many one owned by uid 1000
of U1 can open while root holds 6; and what :func:`sandbox_mcp.sysctls.inotify_headroom` says
with 4 left. Every process here is a fork of this one; all exit at the end.
"""

from __future__ import annotations

import ctypes
import json
import os

from sandbox_mcp.sysctls import inotify_headroom

_libc = ctypes.CDLL(None, use_errno=True)
_CLONE_NEWUSER = 0x10000000
_LIMIT = 10


def _unshare_user() -> None:
    if _libc.unshare(_CLONE_NEWUSER) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _enter_u1() -> None:
    """A user namespace mapping 0..65535 to host 200000.. (maps written by a helper outside it)."""
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.read(go_r, 1)
        target = os.getppid()
        for f in ("uid_map", "gid_map"):
            with open(f"/proc/{target}/{f}", "w") as fh:
                fh.write("0 200000 65536\n")
        os.write(done_w, b"x")
        os._exit(0)
    _unshare_user()
    os.write(go_w, b"x")
    os.read(done_r, 1)
    os.waitpid(helper, 0)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _open_all() -> int:
    n = 0
    while _libc.inotify_init1(0) >= 0 and n < 10 * _LIMIT:
        n += 1
    return n


def _nested_count(uid: int) -> int:
    """In a child: become ``uid`` in U1, make a user namespace (owned by it), open instances until refused."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        n = -1
        try:
            if uid:
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            _unshare_user()
            n = _open_all()
        finally:
            os.write(w, str(n).encode())
            os._exit(0)
    os.close(w)
    out = os.read(r, 32)
    os.waitpid(pid, 0)
    return int(out)


def main() -> None:
    _enter_u1()
    with open("/proc/sys/user/max_inotify_instances", "w") as f:
        f.write(f"{_LIMIT}\n")
    result = {"limit": _LIMIT, "root_owned": _nested_count(0)}
    held = [_libc.inotify_init1(0) for _ in range(6)]
    assert all(fd >= 0 for fd in held)
    result["root_owned_with_6_held_by_root"] = _nested_count(0)
    result["uid1000_owned_with_6_held_by_root"] = _nested_count(1000)
    # What the nspawn runtime asks before a boot, here with 4 of the 10 left.
    result["headroom_4_with_6_held"] = inotify_headroom(4)
    result["headroom_5_with_6_held"] = inotify_headroom(5)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
