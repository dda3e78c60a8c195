"""What an exec result says when a command ran into one of the workspace's limits (``ExecResult.hint``).

A command the OOM killer ended shows only "killed by signal KILL", and one that filled the root
file system shows "No space left on device": neither says which limit it was or what to do. The
manager adds a hint naming the limit as the create result reports it. Pure functions here; the
counts come from the runtime (the host's cgroup counters) or, in a VM, from its own kernel.
"""

from __future__ import annotations

import re

from .models import ExecResult, Limits

__all__ = ["OOM_PROBE", "disk_hint", "maybe_oom_killed", "oom_hint", "parse_oom_probe", "timeout_hint"]

# Read inside a workspace with a kernel of its own (a VM): its /proc/vmstat counts only its own OOM kills.
OOM_PROBE = "grep -m1 '^oom_kill ' /proc/vmstat"

_DISK_FULL = ("No space left on device", "Disk quota exceeded")
_SIGKILL_EXIT = 128 + 9  # a shell's report of a child killed by SIGKILL


def maybe_oom_killed(result: ExecResult) -> bool:
    """True when the command (or a child the shell reported) was killed by a signal, not by the timeout."""
    return not result.timed_out and (result.exit_code is None or result.exit_code == _SIGKILL_EXIT)


def parse_oom_probe(stdout: str) -> int | None:
    """The count from :data:`OOM_PROBE`'s output, or None if it is not one."""
    m = re.fullmatch(r"oom_kill (\d{1,18})\s*", stdout)
    return int(m.group(1)) if m else None


def oom_hint(new_kills: int, limits: Limits | None) -> str:
    """The hint for ``new_kills`` processes the OOM killer ended since the last report."""
    limit = f"its memory limit (memory_mib={limits.memory_mib})" if limits else "its memory limit"
    return (
        f"out of memory: the kernel's OOM killer ended {new_kills} process(es) in this workspace, which reached "
        f"{limit}. The rest of the workspace still runs. Use less memory at once (fewer parallel jobs, e.g. "
        "make -j1, smaller inputs), or create a workspace with a larger memory_mib"
    )


def timeout_hint(timeout_s: float) -> str:
    """The hint for a command the exec's own timeout killed: what the agent can do instead of retrying as is."""
    return (
        f"timed out after {timeout_s:g} s (timeout_s): the command and everything it started were killed. "
        "Pass a larger timeout_s (up to 86400), or start it with start_process and follow it with "
        "process_output or wait_process, which keeps it running between calls"
    )


def disk_hint(stderr: str, limits: Limits | None) -> str | None:
    """The hint for a command that found a file system full, or None when its stderr does not say so."""
    if not any(s in stderr for s in _DISK_FULL):
        return None
    root = f"disk_mib={limits.disk_mib} MiB" if limits and limits.disk_mib else "its disk"
    if limits and limits.host_disk_mib:
        here = (f"the workspace dir, with the Claude config and snapshots, holds host_disk_mib={limits.host_disk_mib} "
                "MiB of the host's disk")
        elsewhere = "keep big files where there is room"
    else:
        here, elsewhere = "the workspace dir is on the host's disk", "keep big files in the workspace dir (the host's disk)"
    return (
        f"a file system is full. The root file system (everything outside the workspace dir) holds {root}; "
        f"{here}. `df -h / .` shows which is full. Delete what you no longer need (caches, build output, /tmp, "
        f"/var/tmp, old snapshots), {elsewhere}, or create a workspace with more room"
    )
