"""Host processes a runtime runs (systemd-nspawn, qemu, virtiofsd): spawned detached, known by identity.

A process outlives the server that started it (its own session), so a later server finds it
again by what the registry recorded: its PID *and* its start time in ``/proc/PID/stat``, so a
reused PID is never mistaken for it, optionally checked against a marker in its command line.
Stopping sends a polite signal first and SIGKILL when that does not end it in time.

A server can be killed between spawning a process and recording its PID. So every process a
runtime spawns for a workspace also carries the workspace's *tag* in its environment
(``SANDBOX_MCP_WORKSPACE=<tag>``, derived from the state directory and the name, so it is known
before anything is spawned): :func:`tagged` finds them all, recorded or not, and stop, destroy
and the start-up reconcile end them. Runtimes pass the tag on to what their process starts
(nspawn: ``--setenv`` for the container's init), so an orphan is found too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import anyio
from pydantic import BaseModel

from .errors import BackendError

__all__ = [
    "ProcessRef",
    "alive",
    "children",
    "identify",
    "kill",
    "kill_tagged",
    "proc_start_time",
    "spawn",
    "spawn_bounded_sink",
    "tagged",
    "terminate",
    "uptime_s",
    "wait_gone",
    "workspace_tag",
]

TAG_ENV = "SANDBOX_MCP_WORKSPACE"

_POLL_S = 0.02

# The copier of spawn_bounded_sink: head keeps the first $1 bytes, each read written at once (stdbuf: no
# stdio buffer holding a boot's console back), then cat drains the rest, never refusing the writer. A
# shell and head, then cat: about 0.3 MiB of private memory per workspace, where a Python copier
# held 2.8 MiB (and ~20 ms of CPU to start, on every boot).
_SINK = 'stdbuf -o0 head -c "$1"; exec cat > /dev/null'


class ProcessRef(BaseModel):
    """One host process: its PID and its start time (clock ticks after boot), which tell it from a reused PID."""

    pid: int
    start_time: int


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if the process is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def identify(pid: int) -> ProcessRef | None:
    """A :class:`ProcessRef` for a live ``pid``, or None."""
    start = proc_start_time(pid)
    return ProcessRef(pid=pid, start_time=start) if start is not None else None


def alive(ref: ProcessRef | None, marker: bytes | None = None) -> bool:
    """True while the process ``ref`` names runs (same PID and start time) and, if given, has ``marker``
    as one of its command-line arguments.

    A process that is exiting has already released its command line (empty) but is not a zombie
    yet: PID and start time say it is still the one we started, so it counts as alive until it
    has ended (otherwise a wait for it would return while it still runs).
    """
    if ref is None or proc_start_time(ref.pid) != ref.start_time:
        return False
    if marker is None:
        return True
    try:
        cmdline = Path(f"/proc/{ref.pid}/cmdline").read_bytes()
    except OSError:
        return proc_start_time(ref.pid) == ref.start_time  # gone meanwhile, or exiting
    return not cmdline or marker in cmdline.split(b"\0")


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (its main thread's), or [] when it is gone."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def workspace_tag(state_dir: Path, name: str) -> str:
    """The tag of workspace ``name`` of the server with ``state_dir``: stable, and distinct across state dirs."""
    return hashlib.sha256(f"{Path(state_dir).absolute()}\0{name}".encode()).hexdigest()[:20]


def tagged(tag: str) -> list[ProcessRef]:
    """Every live process whose environment carries ``tag`` (see the module docstring)."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue
        if needle in environ.split(b"\0") and (ref := identify(int(entry.name))) is not None:
            found.append(ref)
    return found


def uptime_s(ref: ProcessRef) -> float:
    """Seconds since the process started, to the hundredth /proc/uptime gives (not 1.42999999999995)."""
    ticks = os.sysconf("SC_CLK_TCK")
    boot_uptime = float(Path("/proc/uptime").read_text().split()[0])
    return round(max(0.0, boot_uptime - ref.start_time / ticks), 2)


def spawn_bounded_sink(log_path: Path, limit_bytes: int, *, tag: str | None = None) -> tuple[ProcessRef, int]:
    """A pipe whose output lands in ``log_path`` up to ``limit_bytes``; the rest is read and dropped.

    For a log a workspace fills (a VM's serial console, a container's console as nspawn copies
    it): the writer never blocks or fails past the bound, and the host's disk holds at most
    ``limit_bytes`` of it. No limit is set on the writer, so none reaches the workspace. The
    copier (a shell with head, then cat) is a tagged, detached process like the one it serves; it ends
    at the pipe's EOF, when every writer has closed it. Blocking: call it from a worker thread.

    Returns:
        The copier and the pipe's write end (the caller passes it to the writer, then closes it).

    Raises:
        BackendError: the copier did not start.
    """
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        copier = spawn(["sh", "-c", _SINK, "sh", str(int(limit_bytes))], log_path, tag=tag, stdin=read_end)
    except BaseException:
        os.close(write_end)
        raise
    finally:
        os.close(read_end)
    return copier, write_end


def spawn(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    tag: str | None = None,
    missing_hint: str = "",
    pass_fds: Sequence[int] = (),
    stdin: int | None = None,
    stdout: int | None = None,
) -> ProcessRef:
    """Start ``argv`` detached (its own session, stdin from /dev/null or the fd ``stdin``, output to
    ``log_path``, replaced, or to the fd ``stdout``: then ``log_path`` is only named in messages).

    It survives the server; a thread of ours reaps it if it exits while we run, so no zombie
    stays. ``tag`` (a :func:`workspace_tag`) goes into its environment, so :func:`tagged` finds it
    even if the caller never gets to record its PID. ``pass_fds`` stay open in it under the same
    numbers (every other fd is closed). Blocking: call it from a worker thread.

    Raises:
        BackendError: the program is missing (with ``missing_hint``), or it exited at once.
    """
    environment = dict(os.environ if env is None else env)
    if tag is not None:
        environment[TAG_ENV] = tag
    with contextlib.ExitStack() as files:
        log = stdout if stdout is not None else files.enter_context(open(log_path, "wb"))
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL if stdin is None else stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                pass_fds=tuple(pass_fds),
                env=environment,
            )
        except FileNotFoundError as exc:
            raise BackendError(f"{argv[0]} not found; {missing_hint or 'install it'}") from exc
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    ref = identify(proc.pid)
    if ref is None:
        raise BackendError(f"{argv[0]} exited at once; see {log_path}")
    return ref


async def wait_gone(ref: ProcessRef | None, timeout_s: float, marker: bytes | None = None) -> bool:
    """Wait until the process has ended; False if it still runs after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while alive(ref, marker):
        if time.monotonic() >= deadline:
            return False
        await anyio.sleep(_POLL_S)
    return True


def _signal(ref: ProcessRef, sig: int, marker: bytes | None) -> None:
    if alive(ref, marker):  # never signal a PID that is no longer ours
        with contextlib.suppress(ProcessLookupError):
            os.kill(ref.pid, sig)


async def kill(ref: ProcessRef | None, marker: bytes | None = None, timeout_s: float = 10) -> bool:
    """SIGKILL the process and wait until it is gone; True when it is."""
    if ref is None:
        return True
    _signal(ref, signal.SIGKILL, marker)
    return await wait_gone(ref, timeout_s, marker)


async def kill_tagged(tag: str, timeout_s: float = 10) -> int:
    """SIGKILL every process carrying ``tag`` and wait until they are gone; returns how many there were."""
    refs = tagged(tag)
    for ref in refs:
        _signal(ref, signal.SIGKILL, None)
    for ref in refs:
        await wait_gone(ref, timeout_s)
    return len(refs)


async def terminate(
    ref: ProcessRef | None,
    *,
    grace_s: float,
    marker: bytes | None = None,
    sig: int = signal.SIGTERM,
) -> bool:
    """Send ``sig``, wait up to ``grace_s``, then SIGKILL; True when the process is gone."""
    if ref is None or not alive(ref, marker):
        return True
    _signal(ref, sig, marker)
    if await wait_gone(ref, grace_s, marker):
        return True
    return await kill(ref, marker)
