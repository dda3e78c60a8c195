"""Exec with a session per command: where the exec agent cannot run (no python3, no agent installed).

OpenSSH's sshd ignores channel "signal" requests, so the command runs under a small wrapper
(:func:`.commands.build_exec_command`) that reports its PID (a session leader, so also its
process group) on the first stderr line and bounds it with ``timeout``. On a timeout or a
cancellation the group is killed over a second channel. Output is kept up to a cap per stream;
stderr held back while looking for the PID line is bounded too.
"""

from __future__ import annotations

import contextlib
import re
import time

import anyio
import asyncssh

from .. import budget
from ..models import ExecResult
from .commands import CLIENT_GRACE_S, DETACHED_NOTE, PID_MARKER, signal_note

__all__ = ["OPEN_TIMEOUT_S", "ExecSession", "SessionLost", "kill_group", "open_session", "run_session"]

# After the exit status, how long to wait for stdout/stderr to close. A background process
# that inherited them (`cmd &`) would otherwise hold the call open until it ends.
EOF_GRACE_S = 0.5
OPEN_TIMEOUT_S = 10.0  # opening a channel on an established connection
KILL_TIMEOUT_S = 5.0

_PID_LINE_RE = re.compile(rb"(?:^|\n)" + PID_MARKER.encode() + rb" (\d{1,10})\n")
PID_SEARCH_LIMIT = 64 * 1024  # stderr bytes held back while looking for the PID line


class SessionLost(ConnectionError):
    """The connection broke before the command's exit status arrived (its outcome is unknown)."""


class _Kept:
    """One stream as kept: its head and its tail, ``cap`` bytes together, and how long it was."""

    def __init__(self, cap: int) -> None:
        self.head_cap, self.tail_cap = cap - cap // 2, cap // 2
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_cap - len(self.head)
        if room > 0:
            self.head += data[:room]
        self.tail += data[max(room, 0) :]
        del self.tail[: max(0, len(self.tail) - self.tail_cap)]

    def text(self, stream: str) -> tuple[str, tuple[int, int], int]:
        """The stream for the result (see budget.join_stream; nothing is saved here), and the bytes left out."""
        omitted = self.total - len(self.head) - len(self.tail)
        head, tail = bytes(self.head).decode("utf-8", "replace"), bytes(self.tail).decode("utf-8", "replace")
        text, split = budget.join_stream(head, tail, omitted, stream, None)
        return text, split, omitted


class ExecSession(asyncssh.SSHClientSession[bytes]):
    """Collects one command's output as it arrives (the head and the tail of each stream, up to a
    cap; the rest is drained), and its exit."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.stdout = _Kept(cap)
        self.stderr = _Kept(cap)
        self.pid: int | None = None
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.lost: Exception | None = None
        self.pid_seen = anyio.Event()
        self.done = anyio.Event()  # exit status/signal received, or channel closed
        self.closed = anyio.Event()
        self._head: bytearray | None = bytearray()  # stderr held back until the PID line is found

    def _keep(self, kept: _Kept, data: bytes) -> None:
        kept.add(data)  # and keep draining: the command must not block on a full pipe

    def _flush_head(self, rest: bytes = b"") -> None:
        if self._head is not None:
            head, self._head = bytes(self._head), None
            self._keep(self.stderr, head)
            self.pid_seen.set()
        if rest:
            self._keep(self.stderr, rest)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype != asyncssh.EXTENDED_DATA_STDERR:
            self._keep(self.stdout, data)
            return
        if self._head is None:
            self._keep(self.stderr, data)
            return
        room = PID_SEARCH_LIMIT - len(self._head)
        self._head += data[:room]
        m = _PID_LINE_RE.search(self._head)
        if m:
            self.pid = int(m.group(1))
            start = m.start() + (1 if self._head[m.start() : m.start() + 1] == b"\n" else 0)
            # whatever a shell rc file printed before our line stays the user's stderr
            self._head = self._head[:start] + self._head[m.end() :]
            self._flush_head(data[room:] if room < len(data) else b"")
        elif room < len(data) or len(self._head) >= PID_SEARCH_LIMIT:
            self._flush_head(data[room:])  # no PID line within the limit: give up looking

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status
        self.done.set()

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = signal[:32]
        self.done.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc
        self._flush_head()
        self.closed.set()
        self.done.set()


async def open_session(
    conn: asyncssh.SSHClientConnection, remote: str, cap: int
) -> tuple[asyncssh.SSHClientChannel[bytes], ExecSession]:
    """Open a channel running ``remote``.

    Shielded: a channel whose exec request went out must be seen through, so a cancellation can
    still kill what it started.

    Raises:
        asyncssh.Error, OSError, TimeoutError: the channel could not be opened within OPEN_TIMEOUT_S.
    """
    with anyio.CancelScope(shield=True), anyio.fail_after(OPEN_TIMEOUT_S):
        return await conn.create_session(lambda: ExecSession(cap), remote, encoding=None)


async def run_session(
    conn: asyncssh.SSHClientConnection,
    chan: asyncssh.SSHClientChannel[bytes],
    sess: ExecSession,
    stdin: bytes | None,
    timeout_s: float,
    start: float,
) -> ExecResult:
    """Feed ``stdin``, wait for the exit (killing the group after ``timeout_s``), and collect the result.

    Raises:
        SessionLost: the connection broke before the exit status came.
    """
    timed_out = False
    note = ""
    try:
        if stdin:
            chan.write(stdin)
        chan.write_eof()
        with anyio.move_on_after(timeout_s + CLIENT_GRACE_S) as deadline:
            await sess.done.wait()
            if not sess.closed.is_set():
                with anyio.move_on_after(EOF_GRACE_S):
                    await sess.closed.wait()
                if not sess.closed.is_set() and sess.exit_status is not None:
                    note = DETACHED_NOTE
        elapsed = time.monotonic() - start
        if deadline.cancelled_caught:
            timed_out = True
            await kill_group(conn, sess)
        elif elapsed >= timeout_s and (sess.exit_status == 124 or sess.exit_signal == "KILL"):
            # `timeout` fired: 124 after SIGTERM worked; after --kill-after it SIGKILLs the group,
            # itself included. Killing the group again gets what escaped both.
            timed_out = True
            await kill_group(conn, sess)
        elif sess.lost is not None and sess.exit_status is None and sess.exit_signal is None:
            raise SessionLost(str(sess.lost) or type(sess.lost).__name__)
    except BaseException:
        # cancellation (or anything else): kill what we started, then let it propagate
        with anyio.CancelScope(shield=True):
            await kill_group(conn, sess, wait_for_pid=True)
            chan.close()
        raise
    finally:
        chan.close()
    if sess.exit_signal is not None and not timed_out:
        note += signal_note(sess.exit_signal)
    stdout, out_split, out_omitted = sess.stdout.text("stdout")
    stderr, err_split, err_omitted = sess.stderr.text("stderr")
    result = ExecResult(
        exit_code=None if timed_out else sess.exit_status,
        stdout=stdout,
        stderr=stderr + note,
        timed_out=timed_out,
        truncated=bool(out_omitted or err_omitted),
        duration_ms=round((time.monotonic() - start) * 1000, 3),
        stdout_bytes=sess.stdout.total,
        stderr_bytes=sess.stderr.total,
        stdout_omitted=out_omitted,
        stderr_omitted=err_omitted,
    )
    result.set_splits({"stdout": out_split, "stderr": err_split})
    return result


async def kill_group(conn: asyncssh.SSHClientConnection, sess: ExecSession, wait_for_pid: bool = False) -> None:
    """SIGKILL the command's process group over a second channel. Best effort, never raises."""
    with anyio.move_on_after(KILL_TIMEOUT_S):
        if sess.pid is None and wait_for_pid and not sess.closed.is_set():
            await sess.pid_seen.wait()  # cancelled right after the start: the PID is on its way
        if sess.pid is None or conn.is_closed():
            return
        with contextlib.suppress(asyncssh.Error, OSError):
            # Output discarded as it comes: the user's shell rc files could print without end.
            await conn.run(
                f"kill -KILL -- -{sess.pid} 2>/dev/null", check=False, stdout=asyncssh.DEVNULL, stderr=asyncssh.DEVNULL
            )
