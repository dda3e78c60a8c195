"""The host-wide kernel limits that cap how many container workspaces run at once, and the
sysctl.d file ``scripts/setup`` writes to raise them (as Incus and LXD do).

Why inotify, user namespaces or not (measured on the dev machine, Linux 6.18, systemd 252):
the kernel charges an inotify instance (and each watch) through ``inc_ucount`` to the creating
uid in its own user namespace and then, level by level, to *the owner of each namespace* in
its parent. nspawn creates a container's user namespace as root, so every container's instances
land on host root's count, limited by ``fs.inotify.max_user_instances`` (128 by default). The
experiment: in a user namespace U1 with ``user.max_inotify_instances`` = 10, a nested namespace
owned by U1's root could open 10 instances; with U1's root holding 6, only 4; a nested namespace
owned by uid 1000 of U1 still 10. nspawn refuses to run as non-root, so the owner cannot change:
the limit has to be raised instead.

Per workspace (distinct instances, counted with kcmp(2) over ``anon_inode:inotify`` fds of the
container's processes): 6 idle (5 systemd, 1 D-Bus) and 7 at the peak of a boot, the same
privileged or not. Image recipe 8 also ran systemd-logind (7 idle, 8 booting); recipe 9 masks it,
as no session reaches it (sshd runs without PAM). Watches: 19 to 23 per workspace. Recipe 11 masks
the two password-prompt path units and starts D-Bus only on demand: 3 idle (systemd's, counted by
fd); the constants below keep the earlier figures, an upper bound, until a boot's peak is measured again.
With the limits raised, 80 workspaces created at once all came up here; nothing else capped them.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "CONF_PATH",
    "INOTIFY_INSTANCES_BOOTING",
    "INOTIFY_INSTANCES_IDLE",
    "INOTIFY_WATCHES_PER_WORKSPACE",
    "RECOMMENDED",
    "conf_text",
    "inotify_headroom",
    "main",
    "read_current",
]

# Per workspace, measured as the module docstring says.
INOTIFY_INSTANCES_IDLE = 6
INOTIFY_INSTANCES_BOOTING = 7
INOTIFY_WATCHES_PER_WORKSPACE = 23

# The values Incus sets on NixOS (nixpkgs nixos/modules/virtualisation/incus.nix); nix/modules/kernel.nix
# sets the same, and a test keeps the two equal.
RECOMMENDED: dict[str, int] = {
    "fs.inotify.max_user_instances": 1048576,
    "fs.inotify.max_user_watches": 1048576,
}
CONF_PATH = Path("/etc/sysctl.d/60-sandbox-mcp.conf")


def _proc_file(proc: Path, key: str) -> Path:
    return proc / "sys" / key.replace(".", "/")


def read_current(proc: Path = Path("/proc")) -> dict[str, int | None]:
    """The current value of each key in :data:`RECOMMENDED` (None where unreadable)."""
    out: dict[str, int | None] = {}
    for key in RECOMMENDED:
        try:
            out[key] = int(_proc_file(proc, key).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            out[key] = None
    return out


def conf_text(current: Mapping[str, int | None]) -> str:
    """The sysctl.d file: each recommended value, or the current one where that is higher.

    Never lowering matters at boot too: files sort by name, so a higher value from an earlier
    file (``10-foo.conf``) would otherwise be undone by ours.
    """
    lines = [
        "# Written by sandbox-mcp's scripts/setup (SANDBOX_MCP_SETUP_SYSCTL=0 skips it). Every container",
        "# workspace's inotify instances count against host root's limit (nspawn owns their user",
        "# namespaces), so the defaults cap a host at a few dozen workspaces. Never lower than found.",
    ]
    for key, want in RECOMMENDED.items():
        have = current.get(key)
        lines.append(f"{key} = {max(want, have) if have is not None else want}")
    return "\n".join(lines) + "\n"


def inotify_headroom(needed: int) -> bool:
    """Whether this process's user may open ``needed`` more inotify instances right now.

    The server runs as host root, whose count every container shares (see above), so this says
    whether one more container can boot: it opens ``needed`` instances and closes them again.
    A best-effort check before a boot that would otherwise die slowly, mid-way, of EMFILE in the
    container's systemd; creates running at the same moment can still use the room up.

    Raises:
        OSError: inotify fails for another reason than its limit.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    opened: list[int] = []
    try:
        for _ in range(needed):
            fd = libc.inotify_init1(os.O_CLOEXEC)
            if fd < 0:
                err = ctypes.get_errno()
                if err == errno.EMFILE:
                    return False
                raise OSError(err, f"inotify_init1: {os.strerror(err)}")
            opened.append(fd)
        return True
    finally:
        for fd in opened:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    """Print the sysctl.d file for this host (``scripts/setup`` writes it and applies it)."""
    parser = argparse.ArgumentParser(prog="python -m sandbox_mcp.sysctls", description=main.__doc__)
    parser.add_argument("--proc", type=Path, default=Path("/proc"), help="where procfs is (tests)")
    args = parser.parse_args(argv)
    sys.stdout.write(conf_text(read_current(args.proc)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
