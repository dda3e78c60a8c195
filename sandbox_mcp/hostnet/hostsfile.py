"""Host name resolution for workspaces: a managed block of ``workspace-NAME`` lines in /etc/hosts.

Only the block between our markers is ever changed; the markers name the state directory, so
two servers with different state directories keep separate blocks. The NixOS module declares
the same names through ``networking.hosts``; this is the direct-mode counterpart.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from pathlib import Path

from ..fsutil import atomic_write

__all__ = ["host_name", "render_hosts", "update_hosts_file"]


def host_name(name: str) -> str:
    """The host-side name of workspace ``name``."""
    return f"workspace-{name}"


def _markers(owner: str) -> tuple[str, str]:
    return f"# BEGIN sandbox-mcp workspaces ({owner}); managed, do not edit", f"# END sandbox-mcp workspaces ({owner})"


def render_hosts(current: str, entries: Mapping[str, str], owner: str) -> str:
    """``current`` with our block replaced by ``entries`` (workspace name -> IP); no block when empty."""
    begin, end = _markers(owner)
    lines = current.splitlines()
    if begin in lines and end in lines[lines.index(begin) :]:
        i = lines.index(begin)
        j = lines.index(end, i)
        del lines[i : j + 1]
    if entries:
        lines += [begin, *(f"{ip}\t{host_name(n)}" for n, ip in sorted(entries.items())), end]
    return "\n".join(lines) + "\n" if lines else ""


def update_hosts_file(path: Path, entries: Mapping[str, str], owner: str) -> bool:
    """Rewrite our block of ``path``; returns whether anything changed.

    The new file is renamed into place (atomic); where ``path`` is a mount point (as in
    many containers) and cannot be replaced, it is rewritten in place.

    Raises:
        OSError: the file cannot be read or written.
    """
    current = path.read_text() if path.exists() else ""
    new = render_hosts(current, entries, owner)
    if new == current:
        return False
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    try:
        atomic_write(path, new, mode=mode)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        path.write_text(new)  # a bind-mounted /etc/hosts cannot be replaced, only rewritten
    return True
