"""supervise: real host processes, spawned detached, known by PID + start time, stopped politely then by force."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from sandbox_mcp import supervise
from sandbox_mcp.errors import BackendError

pytestmark = pytest.mark.anyio

_IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(600)"


def _wait_for_line(log: Path, text: str) -> None:
    import time

    deadline = time.monotonic() + 30  # an upper bound for a hung start, not a timing bet
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.01)


async def test_spawn_is_detached_and_identified(tmp_path: Path) -> None:
    log = tmp_path / "log"
    ref = supervise.spawn([sys.executable, "-c", _IGNORES_TERM, "--marker-x"], log)
    try:
        _wait_for_line(log, "up")  # the program runs (and ignores SIGTERM from here on)
        assert os.getsid(ref.pid) == ref.pid  # its own session: it outlives the server
        assert supervise.alive(ref) and supervise.alive(ref, b"--marker-x")
        assert not supervise.alive(ref, b"--marker-y")
        # Same PID with another start time is somebody else (a reused PID).
        assert not supervise.alive(ref.model_copy(update={"start_time": ref.start_time + 1}))
        # It ignores SIGTERM: terminate escalates to SIGKILL after the grace period.
        assert await supervise.terminate(ref, grace_s=0.2, marker=b"--marker-x")
        assert not supervise.alive(ref)
    finally:
        if supervise.alive(ref):
            os.kill(ref.pid, signal.SIGKILL)


async def test_terminate_never_signals_a_process_that_is_not_ours(tmp_path: Path) -> None:
    ref = supervise.spawn([sys.executable, "-c", _IGNORES_TERM], tmp_path / "log")
    try:
        # The marker does not match: no process of ours is there (True), and this one is left alone.
        assert await supervise.terminate(ref, grace_s=0.05, marker=b"--not-this-one")
        assert await supervise.kill(ref, marker=b"--not-this-one")
        assert supervise.alive(ref)
    finally:
        os.kill(ref.pid, signal.SIGKILL)
        await supervise.wait_gone(ref, 30)


async def test_spawn_of_a_missing_program_says_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="apt-get install nothing-here"):
        supervise.spawn(["/nonexistent/prog"], tmp_path / "log", missing_hint="apt-get install nothing-here")


def test_identify_and_children_of_this_process() -> None:
    me = supervise.identify(os.getpid())
    assert me is not None and supervise.alive(me) and supervise.uptime_s(me) >= 0
    # Reported to the hundredth /proc/uptime has, without float noise (1.42999999999995).
    assert all(len(repr(supervise.uptime_s(me)).partition(".")[2]) <= 2 for _ in range(20))
    assert supervise.identify(2**22 + 12345) is None  # above pid_max: never a process


async def test_bounded_sink_keeps_the_bound_and_never_blocks_the_writer(tmp_path: Path) -> None:
    """A writer pushing 3x the bound (far past a pipe's buffer) is never blocked or refused; the log
    keeps exactly the first bytes; the copier is tagged and ends at EOF."""
    log = tmp_path / "console.log"
    tag = supervise.workspace_tag(tmp_path, "sink")
    copier, write_end = supervise.spawn_bounded_sink(log, 64 * 1024, tag=tag)
    try:
        assert copier in supervise.tagged(tag)
        chunk = bytes(range(256)) * 16  # 4 KiB, so the kept prefix is checkable byte for byte
        # A short line reaches the log while the pipe stays open (a boot's console is a few KiB).
        os.write(write_end, b"booting\n")
        _wait_for_line(log, "booting")
        os.set_blocking(write_end, False)
        try:
            data, deadline = chunk * 48, time.monotonic() + 60  # 192 KiB, far past the pipe's buffer
            while data:
                # A copier that stopped reading would leave the pipe full: this bound is for a hang only.
                assert time.monotonic() < deadline, "the copier stopped reading: the writer would block"
                select.select([], [write_end], [], 1)
                with contextlib.suppress(BlockingIOError):
                    data = data[os.write(write_end, data):]
        finally:
            os.close(write_end)
        assert await supervise.wait_gone(copier, 30)  # EOF ends it: nothing lingers after the writer
        assert log.read_bytes() == (b"booting\n" + chunk * 48)[: 64 * 1024]
    finally:
        if supervise.alive(copier):
            os.kill(copier.pid, signal.SIGKILL)


async def test_a_process_writing_into_the_sink_gets_no_file_size_limit(tmp_path: Path) -> None:
    """nspawn's way (issue 28): its output goes to the sink through ``spawn(stdout=)``. It and what it
    starts keep the server's file-size limit (none here), can write a file far past the log's bound,
    and its output past the bound is dropped while it keeps running."""
    log = tmp_path / "console.log"
    tag = supervise.workspace_tag(tmp_path, "sink2")
    copier, write_end = supervise.spawn_bounded_sink(log, 4096, tag=tag)
    big = tmp_path / "big.bin"
    script = ("import resource, sys; print(resource.getrlimit(resource.RLIMIT_FSIZE), flush=True); "
              f"open({str(big)!r}, 'wb').write(b'x' * (8 << 20)); sys.stdout.write('y' * 100000); "
              "print('done', flush=True)")
    try:
        proc = supervise.spawn([sys.executable, "-c", script], log, tag=tag, stdout=write_end)
    finally:
        os.close(write_end)
    try:
        assert await supervise.wait_gone(proc, 60) and await supervise.wait_gone(copier, 30)
        assert big.stat().st_size == 8 << 20
        kept = log.read_text()
        assert kept.startswith(f"{(-1, -1)}\n") and len(kept) == 4096 and "done" not in kept
    finally:
        for ref in (proc, copier):
            if supervise.alive(ref):
                os.kill(ref.pid, signal.SIGKILL)
