"""The exec agent: a small program the SSH pool runs inside a workspace, once per connection.

Opening an SSH session per command costs sshd a fork, a privilege drop and a login shell
(several milliseconds); the agent instead receives commands as JSON lines on one long-lived
session channel and starts each with ``sh -c`` itself, in its own process group, so the
round trip costs little more than the command. It enforces the timeout inside the workspace
(TERM to the group, KILL two seconds later), caps the output per stream, and kills every
command it started when its channel closes, e.g. when the server goes away.

Protocol (one JSON object per line, both ways; bytes as base64):
  → {"id": 1, "command": "...", "cwd": "/abs", "env": {...}, "stdin": "b64" | null,
     "timeout": 120.0, "cap": 1048576, "tail": true,
     "save": {"dir": "/abs", "name": "ID", "max": N, "keep": 8, "over": N}}
  → {"cancel": 1}                    (kills the command; one not started yet never starts)
  ← {"ready": 1}                     (once, at start)
  ← {"id": 1, "started": 1}          (the command runs: a retry could now run it twice; left out
                                      when the reply goes out in the same write, see _send)
  ← {"id": 1, "exit": 0 | null, "signal": "TERM" | null, "stdout": "b64", "stderr": "b64",
     "truncated": false, "timed_out": false, "detached": false, "cancelled": false}
     with "tail" in the request, per stream also: "stdout_tail": "b64", "stdout_total": N,
     "stdout_saved": N | null (and the same for stderr)

Without "tail" a stream keeps its first ``cap`` bytes. With it, its head and its tail (``cap``
bytes together); with "save" too, a stream longer than "over" (default ``cap``) is written whole
(up to "max" bytes) to DIR/NAME.stdout or DIR/NAME.stderr, so nothing the host may not carry is
lost; of those files the newest "keep" commands' stay.

An exec request with ``"stream": true`` also gets its output while it runs, coalesced and at
most every STREAM_INTERVAL_S, before its reply (``skipped``: bytes left out because the reader
fell behind; the reply still has all of it, up to the cap):
  ← {"id": 1, "out": "b64", "fd": 1 | 2, "skipped": 0}

Processes (``"op"``; see the process section below): a command started detached under a small
supervisor (a double-forked child of this agent, in a session of its own) that keeps its output in
a ring file in DIR, so it outlives this agent, the SSH connection and the server:
  → {"id": 2, "op": "proc_start", "process_id": "web", "command": "...", "cwd": "/abs", "env": {...}, "cap": N}
  ← {"id": 2, "ok": {"process_id": "web", "pid": 123, "started_at": 1.0}}
  → {"id": 3, "op": "proc_read", "process_id": "web", "cursor": 0, "max_bytes": N, "wait_s": 0}
  ← {"id": 3, "ok": {"start": 0, "end": 10, "runs": [[1, "b64"], [2, "b64"]], "info": {...}}}
  → {"id": 4, "op": "proc_wait", "process_id": "web", "until": "exit" | "port:N" | "output:RE",
     "cursor": 0, "timeout": 60}
  ← {"id": 4, "ok": {"matched": true, "next_cursor": 10, "info": {...}}}
  → {"id": 5, "op": "proc_stop", "process_id": "web", "signal": "TERM", "grace": 5}
  → {"id": 6, "op": "proc_list"}     ← {"id": 6, "ok": {"processes": [{...}, ...]}}
  ← {"id": N, "error": "text", "code": "not_found" | "invalid" | "exists" | "limit" | "failed"}
where info is {"process_id", "command", "pid", "running", "exit", "signal", "started_at",
"ended_at", "written", "dropped"}. The host (sandbox_mcp/processes.py) builds these requests and
checks every reply field; the names below (OPS, limits) are the one definition both sides use.

A cancel may overtake its request: the request starts on a thread of its own, and the cancel
can be read while that thread is still on its way to ``Popen``. So cancelled ids are
remembered (the latest ``CANCELLED_MAX``), the check and the start happen under one lock, and
of the lines read together the cancels are applied first: a command cancelled before it
started replies ``cancelled: true`` and never runs.

Standard library only, Python ≥ 3.8: it runs on the workspace's python3, and the pool falls
back to a session per command where there is none. The image recipe installs this file as
/usr/local/libexec/sandbox-mcp/exec-agent and the pool runs it by that path, so it must stay
self-contained.

Two ways it starts. The pool runs it in an SSH session (one per connection), or, for the first
connection after a boot, it is already running: the image's ``sandbox-mcp-agent.service`` starts it
with ``--listen`` as the workspace user, and it waits on LISTEN_PATH for that connection, which
reaches it through sshd's direct-streamlocal forwarding and sends, before anything else, the
environment a session of that connection gets ({"environ": base64 of ``env -0``}). It takes that
environment and HOME as its own and serves the connection as above (see ``listen``).
"""

import os
import sys

# Started at boot (the image's sandbox-mcp-agent.service), the agent waits at LISTEN_PATH for the
# server's first connection: see listen() at the end. It binds the socket before the imports below
# (~13 ms of its start here), so a connection that comes meanwhile waits for it in the backlog rather
# than finding nothing there and starting an agent of its own.
LISTEN_PATH = "/run/sandbox-mcp-agent/agent.sock"


def _bind(path):
    """A listening socket at ``path``, there only once it listens (bound aside, then renamed into place:
    a connection never finds the path and is refused)."""
    import _socket

    aside = path + ".new"
    for stale in (path, aside):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    umask = os.umask(0o177)  # the socket is this user's alone (root inside may connect anyway)
    try:
        listener.bind(aside)
    finally:
        os.umask(umask)
    listener.listen(8)
    os.rename(aside, path)
    return listener


_LISTENING = sys.argv[1:2] == ["--listen"] and __name__ == "__main__"
_LISTENER = _bind(sys.argv[2] if len(sys.argv) > 2 else LISTEN_PATH) if _LISTENING else None

import binascii
import errno
import json
import queue
import re
import select
import signal
import struct
import threading
import time

PROTOCOL_VERSION = 2  # in the ready line: 2 knows "op" requests and "stream"
OP_START, OP_READ, OP_WAIT, OP_STOP, OP_LIST = OPS = ("proc_start", "proc_read", "proc_wait", "proc_stop", "proc_list")
ERROR_CODES = ("not_found", "invalid", "exists", "limit", "failed")
PROCESS_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$"
PROCESS_MAX = 32  # process directories kept per workspace (running and exited); the oldest exited go first
OUTPUT_CAP_MIN, OUTPUT_CAP_MAX = 64 << 10, 64 << 20  # a process's ring, in bytes of output
READ_MAX = 1 << 20  # bytes of output one proc_read returns at most
WAIT_MAX_S = 600.0
SIGNALS = ("TERM", "INT", "HUP", "KILL", "QUIT", "USR1", "USR2")
COMMAND_SHOWN_MAX = 1000  # characters of a command a listing repeats
STREAM_INTERVAL_S = 0.05
STREAM_CHUNK_MAX = 16 << 10  # bytes of output per streamed message
STREAM_PENDING_MAX = 256 << 10  # unsent output held per command; beyond it, output is skipped (and counted)
KILL_AFTER_S = 2.0
DETACH_GRACE_S = 0.5  # how long to keep reading after exit while a background process holds the pipes
CANCELLED_MAX = 1024  # cancelled ids remembered; the pool numbers requests upwards, so old ids never return

_out_lock = threading.Lock()
_out_pending = []  # [(request id or None, "started" | "final" | None, bytes)], not written yet
_out_writing = [False]  # a thread is writing them (it writes all that queue up meanwhile)
_running = {}  # request id -> _Child
_cancelled = {}  # request ids cancelled while not running, oldest first (a dict keeps insertion order)
_running_lock = threading.Lock()  # guards both: a start and a cancel never interleave


def _send(message, kind=None):
    """Queue one line for stdout, in order, and write it unless another thread is writing.

    That thread takes it along: lines queued while a write is under way go out together in the next
    write, so a burst of replies makes a few SSH packets rather than one per line (sshd sends what one
    read of our pipe returns). A command's ``started`` line that goes out in the same write as its
    reply is left out: the reply says as much, and the host reads one line less. ``kind`` marks those
    two ("started", "final").
    """
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    with _out_lock:
        _out_pending.append((message.get("id"), kind, data))
        if _out_writing[0]:
            return
        _out_writing[0] = True
    while True:
        with _out_lock:
            batch = _out_pending[:]
            del _out_pending[:]
            if not batch:
                _out_writing[0] = False
                return
        if len(batch) > 1:
            final = set(rid for rid, kind, _ in batch if kind == "final")
            data = b"".join(d for rid, kind, d in batch if kind != "started" or rid not in final)
        else:
            data = batch[0][2]
        try:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        except BaseException:
            with _out_lock:
                _out_writing[0] = False
            raise


def _b64(data):
    return binascii.b2a_base64(bytes(data), newline=False).decode("ascii")


def _killpg(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# Commands start with os.posix_spawn (a vfork and an exec in C) rather than subprocess.Popen: ~60 us of
# this process's CPU per start instead of ~150, and no ``subprocess`` import (with its locale, selectors,
# warnings and contextlib: ~2 ms of every agent's start and 0.3-0.7 MiB of its memory). What Popen did for
# us is done here alike: ``sh`` found on the command's own PATH, a session of its own, SIGPIPE and
# SIGXFSZ back to their defaults (Python ignores them), no descriptor of ours inherited (all of them are
# close-on-exec), and the working directory. posix_spawn has no working directory of its own, so the
# start changes this process's for a moment, under _spawn_lock; nothing else here uses relative paths.
_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
_spawn_lock = threading.Lock()


class _Child:
    """A command started by _start_child: its pid (a session and process group of its own), our end of
    its stdin (a file, or None), and of its stdout and stderr (descriptors; their readers close them)."""

    def __init__(self, pid, stdin, stdout, stderr):
        self.pid, self.stdin, self.stdout, self.stderr = pid, stdin, stdout, stderr
        self.returncode = None  # the exit status, or -N for signal N (as Popen's)
        self._lock = threading.Lock()

    def poll(self):
        """The return code once it exited (reaped here), else None."""
        with self._lock:
            if self.returncode is None:
                self._reap(os.WNOHANG)
            return self.returncode

    def wait(self, timeout=None):
        """Wait until it exited (at most ``timeout`` seconds, polled); its return code, or None."""
        if timeout is None:
            with self._lock:
                if self.returncode is None:
                    self._reap(0)
                return self.returncode
        deadline, pause = time.monotonic() + timeout, 0.0005
        while self.poll() is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
        return self.returncode

    def _reap(self, flags):
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:  # no longer ours to wait for (reaped elsewhere): its status is lost
            pid, status = self.pid, 255 << 8
        if pid:
            self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _find_sh(env):
    """``sh`` on the PATH of ``env`` (bytes; /bin:/usr/bin without one), as Popen looked it up: the first
    executable one (a few ``access`` calls, ~10 us).

    Raises:
        FileNotFoundError: there is none.
    """
    for d in os.get_exec_path(env):
        path = os.path.join(os.fsencode(d), b"sh")
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", "sh")


def _start_child(command, cwd, env, stdin=False):
    """Start ``sh -c command`` in ``cwd`` with ``env`` (bytes) and pipes for its output (and, with
    ``stdin``, its input; /dev/null otherwise). Raises OSError when it cannot start (no such ``cwd``, no
    ``sh``), like Popen."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if stdin else (None, None)
    actions = [
        (os.POSIX_SPAWN_DUP2, in_r, 0) if stdin else (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, out_w, 1),
        (os.POSIX_SPAWN_DUP2, err_w, 2),
    ]
    sh = _find_sh(env)
    try:
        with _spawn_lock:
            here = _open_cwd()
            try:
                os.chdir(cwd)
                pid = os.posix_spawn(sh, [b"sh", b"-c", os.fsencode(command)], env, file_actions=actions,
                                     setsid=True, setsigdef=_DEFAULT_SIGNALS)
            finally:
                _back_to(here)
    except BaseException:
        for fd in (out_r, err_r, in_w):
            if fd is not None:
                os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w, in_r):
            if fd is not None:
                os.close(fd)
    return _Child(pid, os.fdopen(in_w, "wb", 0) if stdin else None, out_r, err_r)


def _open_cwd():
    try:
        return os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:  # gone, or not ours to read: the start goes back to / instead
        return None


def _back_to(here):
    if here is None:
        os.chdir("/")
        return
    try:
        os.fchdir(here)
    finally:
        os.close(here)


class _Pump:
    """What one pipe of a command delivered, keeping at most ``cap`` bytes (the rest is drained).

    Without ``tail``, the first ``cap`` bytes; with it, the head and the tail (``cap`` bytes
    together). With ``save`` (see _save_paths), once the stream outgrows its "over" all of it goes
    to the file too. With ``stream``, every chunk is also handed to it as it arrives
    (exec output as progress notifications). The command's thread reads both pipes (_drain).
    """

    def __init__(self, fd, cap, tail=False, save=None, stream=None, stream_fd=1):
        self.fd, self.cap, self.keep_tail, self.save = fd, cap, tail, save
        self.head_cap = cap - cap // 2 if tail else cap
        self.data, self.tail, self.total, self.truncated = bytearray(), bytearray(), 0, False
        self.file, self.saved = None, None
        self.lock = threading.Lock()
        self.stream, self.stream_fd = stream, stream_fd

    def feed(self, chunk):
        """One chunk read from the pipe."""
        if self.stream is not None:
            self.stream.add(self.stream_fd, chunk)
        with self.lock:
            self._take(chunk)

    def finish(self):
        """The pipe ended."""
        with self.lock:
            self._close()

    def _take(self, chunk):
        if self.save is not None:
            self._write(chunk)
        self.total += len(chunk)
        room = self.head_cap - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        rest = chunk[max(room, 0):]
        if not self.keep_tail:
            self.truncated = self.truncated or bool(rest)
            return
        self.tail += rest
        over = len(self.tail) - self.cap // 2
        if over > 0:
            del self.tail[:over]
            self.truncated = True

    def _write(self, chunk):
        directory, path, limit, keep, over = self.save
        if self.file is None:
            if self.saved is not None or self.total + len(chunk) <= over:
                return  # saving failed before, or the stream still fits in what is kept
            try:
                _prepare(directory, keep)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
                self.file = os.fdopen(fd, "wb")
                self.saved = 0
                chunk = bytes(self.data) + bytes(self.tail) + chunk  # everything so far was kept
            except OSError:
                self.saved = -1
                return
        try:
            part = chunk[: max(0, limit - self.saved)]
            if part:
                self.file.write(part)
                self.saved += len(part)
        except OSError:
            self._close()
            self.saved = -1

    def _close(self):
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                self.saved = -1
            self.file = None

    def report(self, name, reply):
        """The stream's fields of the reply (a saved stream's file counts only if written whole or to its bound)."""
        with self.lock:
            reply[name] = _b64(self.data)
            if self.keep_tail:
                reply[name + "_tail"] = _b64(self.tail)
                reply[name + "_total"] = self.total
                reply[name + "_saved"] = self.saved if self.saved is not None and self.saved >= 0 else None
            return self.truncated


def _save_paths(save):
    """Where a saving request's two streams go: (dir, path, max bytes, keep, over) each; None for a bad request."""
    try:
        directory, name, limit, keep = save["dir"], save["name"], int(save["max"]), int(save.get("keep", 8))
        over = int(save["over"]) if save.get("over") is not None else None
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(name, str) or "/" in name or name.startswith(".") or not os.path.isabs(directory):
        return None
    return [(directory, os.path.join(directory, name + "." + s), limit, keep, over) for s in ("stdout", "stderr")]


def _prepare(directory, keep):
    """Make the directory of saved output (hidden from git) and make room in it."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    ignore = os.path.join(directory, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as f:
            f.write("# command output saved by sandbox-mcp's exec\n*\n")
    _prune_saved(directory, keep)


def _prune_saved(directory, keep):
    """Make room for one more command's saved output in ``directory``: keep the newest ``keep - 1``."""
    newest = {}  # command (file name without .stdout/.stderr) -> its newest mtime
    for entry in os.scandir(directory):
        stem, dot, suffix = entry.name.rpartition(".")
        if dot and suffix in ("stdout", "stderr") and entry.is_file(follow_symlinks=False):
            newest[stem] = max(newest.get(stem, 0), entry.stat(follow_symlinks=False).st_mtime)
    old = sorted(newest, key=lambda stem: (newest[stem], stem), reverse=True)[max(0, keep - 1):]
    for stem in old:
        for suffix in (".stdout", ".stderr"):
            try:
                os.unlink(os.path.join(directory, stem + suffix))
            except OSError:
                pass


class _Stream:
    """A running command's output sent as it comes: coalesced, at most every STREAM_INTERVAL_S.

    Held output is bounded (STREAM_PENDING_MAX); what does not fit is counted as skipped, never
    buffered: the final reply carries the whole output anyway.
    """

    def __init__(self, rid):
        self.rid = rid
        self.pending = []  # [fd, bytearray], in arrival order
        self.held = self.skipped = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def add(self, fd, data):
        with self.lock:
            room = STREAM_PENDING_MAX - self.held
            if room <= 0:
                self.skipped += len(data)
                return
            if len(data) > room:
                self.skipped += len(data) - room
                data = data[:room]
            if self.pending and self.pending[-1][0] == fd:
                self.pending[-1][1].extend(data)
            else:
                self.pending.append([fd, bytearray(data)])
            self.held += len(data)

    def _flush(self):
        with self.lock:
            pending, skipped = self.pending, self.skipped
            self.pending, self.held, self.skipped = [], 0, 0
        for fd, data in pending:
            for at in range(0, len(data), STREAM_CHUNK_MAX):
                _send({"id": self.rid, "out": _b64(data[at:at + STREAM_CHUNK_MAX]), "fd": fd, "skipped": skipped})
                skipped = 0
        if skipped:
            _send({"id": self.rid, "out": "", "fd": 1, "skipped": skipped})

    def _loop(self):
        while not self.done.wait(STREAM_INTERVAL_S):
            self._flush()

    def close(self):
        """Send what is left; every streamed message leaves before the command's reply."""
        self.done.set()
        self.thread.join()
        self._flush()


def _feed(pipe, data):
    try:
        pipe.write(data)
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def _drain(proc, pumps, timeout, reply):
    """Read the command's pipes until they end, enforcing its timeout; returns with it exited.

    One thread per command (this one): both pipes in one poll loop, the timeout as the loop's
    deadline (TERM to the group, KILL KILL_AFTER_S later). Threads for each pipe and a timer
    were three thread starts per command, most of an ``exec true``'s cost in the agent.
    A background process that keeps the pipes open after the command exited gets DETACH_GRACE_S,
    then ``detached`` and a thread that drains what it still writes (so it never blocks on a
    full pipe).
    """
    by_fd = {p.fd: p for p in pumps}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    now = time.monotonic()
    deadline, kill_at, exited_at = now + timeout, None, None
    while by_fd:
        now = time.monotonic()
        if exited_at is None and proc.poll() is not None:
            exited_at = now
        if exited_at is not None and now >= exited_at + DETACH_GRACE_S:
            reply["detached"] = True
            threading.Thread(target=_drain_rest, args=(poller, by_fd), daemon=True).start()
            break
        if exited_at is None and not reply["timed_out"] and now >= deadline:
            reply["timed_out"] = True
            _killpg(proc, signal.SIGTERM)
            kill_at = now + KILL_AFTER_S
        if exited_at is None and kill_at is not None and now >= kill_at:
            _killpg(proc, signal.SIGKILL)
            kill_at = None
        # Wake for the next deadline, and now and then to notice an exit while the pipes stay open.
        wake = [now + _EXIT_CHECK_S]
        if exited_at is not None:
            wake.append(exited_at + DETACH_GRACE_S)
        elif not reply["timed_out"]:
            wake.append(deadline)
        elif kill_at is not None:
            wake.append(kill_at)
        _read_ready(poller, by_fd, max(0.0, min(wake) - now))
    _wait_exit(proc, deadline, reply)


_EXIT_CHECK_S = 0.05
_ENVB = dict(os.environb)  # the agent's environment (sshd's for the user), read once


def _read_ready(poller, by_fd, wait_s):
    """One poll of the pipes: what is ready is read and fed; an ended pipe is finished and dropped."""
    for fd, _ in poller.poll(wait_s * 1000):
        pump = by_fd.get(fd)
        if pump is None:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            chunk = b""
        if chunk:
            pump.feed(chunk)
        else:
            pump.finish()
            poller.unregister(fd)
            del by_fd[fd]
            os.close(fd)  # here, at its end: never while a detached drain (_drain_rest) may still poll its number


def _drain_rest(poller, by_fd):
    while by_fd:
        _read_ready(poller, by_fd, 1.0)


def _exited_within(proc, wait_s):
    """Whether ``proc`` exits within ``wait_s``: on a pidfd where there is one (woken at the exit),
    else _Child.wait's polling (its growing sleeps would delay every short command otherwise)."""
    if proc.poll() is not None:
        return True
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Python < 3.9, or a kernel < 5.3
        return proc.wait(timeout=wait_s) is not None
    try:
        select.select([pidfd], [], [], wait_s)
    finally:
        os.close(pidfd)
    return proc.poll() is not None


def _wait_exit(proc, deadline, reply):
    """Wait for a command whose pipes have ended (it may still run: it closed them), timeout enforced."""
    if _exited_within(proc, max(0.0, deadline - time.monotonic()) if not reply["timed_out"] else KILL_AFTER_S):
        return
    if not reply["timed_out"]:
        reply["timed_out"] = True
        _killpg(proc, signal.SIGTERM)
        if _exited_within(proc, KILL_AFTER_S):
            return
    _killpg(proc, signal.SIGKILL)
    proc.wait()


def _run(req):
    rid, cwd, cap = req["id"], req["cwd"], int(req["cap"])
    reply = {"id": rid, "exit": None, "signal": None, "stdout": "", "stderr": "", "truncated": False,
             "timed_out": False, "detached": False, "cancelled": False}
    env = _ENVB.copy()  # bytes, as Popen passes them: no encoding of the whole environment per command
    for key, value in (req.get("env") or {}).items():
        env[os.fsencode(key)] = os.fsencode(value)
    stdin = binascii.a2b_base64(req["stdin"]) if req.get("stdin") is not None else None
    # The cancel check, the start and the registration under one lock: a cancel handled before
    # this block stops the start; one handled after it finds the process to kill.
    with _running_lock:
        if rid in _cancelled:
            del _cancelled[rid]
            reply["cancelled"] = True
            return _send(reply, "final")
        if not os.path.isdir(cwd):
            reply.update(exit=1, stderr=_b64(f"sh: cd: {cwd}: No such file or directory\n".encode()))
            return _send(reply, "final")
        try:
            # Its own session and process group: a timeout or cancel kills all of it.
            proc = _start_child(req["command"], cwd, env, stdin=stdin is not None)
        except OSError as exc:
            reply.update(exit=126, stderr=_b64(f"sh: {exc}\n".encode()))
            return _send(reply, "final")
        _running[rid] = proc
    _send({"id": rid, "started": 1}, "started")
    tail = req.get("tail") is True
    saves = (_save_paths(req["save"]) if tail and req.get("save") else None) or [None, None]
    saves = [s and s[:4] + (cap if s[4] is None else min(s[4], cap),) for s in saves]
    stream = _Stream(rid) if req.get("stream") is True else None
    pumps = [_Pump(proc.stdout, cap, tail, saves[0], stream, 1), _Pump(proc.stderr, cap, tail, saves[1], stream, 2)]
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
    _drain(proc, pumps, float(req["timeout"]), reply)
    if reply["timed_out"]:
        _killpg(proc, signal.SIGKILL)  # what ignored TERM, or outlived the shell
    with _running_lock:
        _running.pop(rid, None)
    code = proc.returncode
    if code is not None and code < 0:
        try:
            reply["signal"] = signal.Signals(-code).name[3:]
        except ValueError:
            reply["signal"] = str(-code)
    else:
        reply["exit"] = code
    out_cut = pumps[0].report("stdout", reply)
    err_cut = pumps[1].report("stderr", reply)
    reply["truncated"] = out_cut or err_cut
    if stream is not None:
        stream.close()
    _send(reply, "final")


# Processes ----------------------------------------------------------------------------------
#
# Each process has a directory under the process root (``$HOME/.cache/sandbox-mcp/processes``,
# on the workspace's root filesystem, which a restart discards):
#   spec.json    what to run (written by the agent, read by the supervisor)
#   state.json   process_id, command, pid (also its process group), supervisor pid and start time,
#                started_at and the boot it belongs to (written by the supervisor once it runs)
#   ring         a header (bytes written so far, capacity) then the last ``cap`` bytes of output
#                (both streams in arrival order) then one tag byte per output byte (1 stdout, 2 stderr)
#   exit.json    exit, signal, ended_at (written by the supervisor when the process ends)
#   sock         a unix socket: the supervisor writes a byte to, and closes, every connection on
#                each new output and at the end, so a reader waits without polling
# The byte at stream position p sits at ring offset p % cap: a reader checks the count before and
# after reading and drops what was overwritten meanwhile (so nothing is ever returned twice or wrong).

_HEADER = struct.Struct("<QQ")
_WAITERS_MAX = 64
_SPAWN_TIMEOUT_S = 10.0


class _ProcError(Exception):
    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code


def _process_root():
    root = os.environ.get("SANDBOX_MCP_PROCESS_DIR")  # tests run the agent outside a workspace
    if not root:
        root = os.path.join(os.path.expanduser("~"), ".cache", "sandbox-mcp", "processes")
    os.makedirs(root, mode=0o700, exist_ok=True)
    return root


def _boot_marker():
    """This boot of the workspace: the kernel's boot id and the start time of PID 1 (a container's init)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "?"
    return boot + ":" + str(_start_time(1))


def _start_time(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _read_json(path, limit=1 << 16):
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            return None
        value = json.loads(data)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def _write_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f)
    os.rename(tmp, path)


def _proc_dir(process_id):
    if not isinstance(process_id, str) or not re.match(PROCESS_ID_PATTERN, process_id):
        raise _ProcError("invalid", "bad process_id")
    return os.path.join(_process_root(), process_id)


class _Proc:
    """One process directory, as a reader sees it."""

    def __init__(self, process_id, must_exist=True):
        self.process_id = process_id
        self.dir = _proc_dir(process_id)
        self.state = _read_json(os.path.join(self.dir, "state.json"))
        if must_exist and (self.state is None or self.state.get("boot") != _boot_marker()):
            raise _ProcError("not_found", "no such process")

    def path(self, name):
        return os.path.join(self.dir, name)

    def exit(self):
        return _read_json(self.path("exit.json"))

    def supervisor_alive(self):
        sup = self.state.get("supervisor")
        return isinstance(sup, int) and _start_time(sup) == self.state.get("supervisor_start")

    def header(self):
        try:
            with open(self.path("ring"), "rb") as f:
                return _HEADER.unpack(f.read(_HEADER.size))
        except (OSError, struct.error):
            return 0, 1

    def info(self):
        ended = self.exit()
        written, cap = self.header()
        return {
            "process_id": self.process_id, "command": str(self.state.get("command", ""))[:COMMAND_SHOWN_MAX],
            "pid": self.state.get("pid"), "running": ended is None and self.supervisor_alive(),
            "exit": (ended or {}).get("exit"), "signal": (ended or {}).get("signal"),
            "started_at": self.state.get("started_at"), "ended_at": (ended or {}).get("ended_at"),
            "written": written, "dropped": max(0, written - cap),
        }

    def read(self, cursor, max_bytes):
        """Output from ``cursor`` (at most ``max_bytes``): (start, end, runs of [fd, bytes])."""
        try:
            fd = os.open(self.path("ring"), os.O_RDONLY)
        except OSError:
            return cursor, cursor, []
        try:
            written, cap = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
            start = min(max(cursor, written - cap), written)
            end = min(written, start + max_bytes)
            data, tags = bytearray(), bytearray()
            at = start
            while at < end:  # at most two pieces: up to the ring's end, then from its start
                off = at % cap
                n = min(end - at, cap - off)
                data += os.pread(fd, n, _HEADER.size + off)
                tags += os.pread(fd, n, _HEADER.size + cap + off)
                at += n
            after, _ = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        finally:
            os.close(fd)
        lost = after - cap - start  # overwritten while we read
        if lost > 0:
            lost = min(lost, end - start)
            start += lost
            del data[:lost]
            del tags[:lost]
        runs = []
        i = 0
        while i < len(tags):
            tag = tags[i]
            j = tags.find(b"\x02" if tag == 1 else b"\x01", i)
            j = len(tags) if j < 0 else j
            runs.append([1 if tag == 1 else 2, bytes(data[i:j])])
            i = j
        return start, end, runs

    def wait_change(self, written, deadline):
        """Block until output past ``written`` or the end, or ``deadline`` (time.monotonic).

        Returns why: "seen" (the change was there after connecting), "poked" (the supervisor
        woke us), "polled" (no socket, or the supervisor had too many waiters) or "deadline".
        """
        import socket  # here, not at the top: only process waits use it, and it is 1 ms of every start

        sock = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(self.path("sock"))
        except OSError:
            if sock is not None:
                sock.close()
            sock = None
        try:
            # Checked after connecting: what happened before it is seen here, what after wakes us.
            if self.header()[0] != written or self.exit() is not None or not self.supervisor_alive():
                return "seen"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "deadline"
            if sock is None:
                time.sleep(min(0.1, remaining))  # no socket (a long path): poll
                return "polled"
            if not select.select([sock], [], [], remaining)[0]:
                return "deadline"
            try:
                poked = sock.recv(1) == b"!"
            except OSError:  # reset: the supervisor ended with us still in its backlog
                poked = True
            if not poked:  # closed unpoked: the supervisor has too many waiters; poll
                time.sleep(min(0.1, remaining))
                return "polled"
            return "poked"
        finally:
            if sock is not None:
                sock.close()


def _descendants(root_pid):
    """Every process below ``root_pid`` (the supervisor: a subreaper, so orphans stay below it)."""
    children = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root_pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            found.append(child)
            todo.append(child)
    return found


def _signal_tree(proc, sig):
    pid = proc.state.get("pid")
    if isinstance(pid, int) and pid > 1:
        try:
            os.killpg(pid, sig)
        except OSError:
            pass
    sup = proc.state.get("supervisor")
    if isinstance(sup, int) and proc.supervisor_alive():
        for child in _descendants(sup):
            try:
                os.kill(child, sig)
            except OSError:
                pass


def _prune_processes(root):
    """Make room for one more process: drop the oldest ended ones (or those of an earlier boot)."""
    boot = _boot_marker()
    entries = []
    for name in os.listdir(root):
        if not re.match(PROCESS_ID_PATTERN, name):
            continue
        proc = _Proc(name, must_exist=False)
        if proc.state is None or proc.state.get("boot") != boot:
            if proc.state is not None or not os.path.exists(proc.path("spec.json")):
                _rmtree(proc.dir)
            continue
        entries.append(proc)
    ended = sorted((p for p in entries if not p.info()["running"]), key=lambda p: p.state.get("started_at") or 0)
    while len(entries) >= PROCESS_MAX and ended:
        gone = ended.pop(0)
        _rmtree(gone.dir)
        entries.remove(gone)
    if len(entries) >= PROCESS_MAX:
        raise _ProcError("limit", f"{len(entries)} processes are running; stop one first")


def _rmtree(path):
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            try:
                os.unlink(os.path.join(dirpath, name))
            except OSError:
                pass
        for name in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, name))
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _op_start(req):
    root = _process_root()
    d = _proc_dir(req["process_id"])
    if os.path.exists(d):
        old = _Proc(req["process_id"], must_exist=False)
        if old.state is not None and old.state.get("boot") == _boot_marker():
            raise _ProcError("exists", "a process with this process_id exists")
        try:
            starting = old.state is None and time.time() - os.stat(d).st_mtime < 2 * _SPAWN_TIMEOUT_S
        except OSError:
            starting = False
        if starting:  # another start of this id is under way
            raise _ProcError("exists", "a process with this process_id is starting")
        _rmtree(d)
    _prune_processes(root)
    cwd = req["cwd"]
    if not os.path.isdir(cwd):
        raise _ProcError("invalid", f"cwd {cwd[:300]}: no such directory")
    cap = min(max(int(req["cap"]), OUTPUT_CAP_MIN), OUTPUT_CAP_MAX)
    env = dict(os.environ)
    env.update(req.get("env") or {})
    os.mkdir(d, 0o700)
    _write_json(os.path.join(d, "spec.json"), {"process_id": req["process_id"], "command": req["command"],
                                               "cwd": cwd, "env": env, "cap": cap})
    started = _spawn_supervisor(d)
    if "error" in started:
        _rmtree(d)
        raise _ProcError("failed", str(started["error"])[:300])
    return {"process_id": req["process_id"], "pid": started["pid"], "started_at": started["started_at"]}


def _spawn_supervisor(d):
    """Fork the supervisor of directory ``d`` (detached: a double fork, a session of its own); its report.

    A fork, not a new interpreter: this process has everything loaded, which saves a Python start
    (~100 ms on a busy guest). Only the forking thread exists in the child, which touches no lock
    another thread may hold (it never writes to our stdout) and leaves with os._exit.
    """
    import ctypes  # noqa: F401 - loaded here, once, so the child's subreaper call costs nothing

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the intermediate child: a new session, then the supervisor below it, then gone
        try:
            os.close(r)
            os.setsid()
            if os.fork() == 0:
                try:
                    supervise(d, w)
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    line = b""
    deadline = time.monotonic() + _SPAWN_TIMEOUT_S
    try:
        while not line.endswith(b"\n") and time.monotonic() < deadline:
            if not select.select([r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(r, 4096)
            if not chunk:
                break
            line += chunk
    finally:
        os.close(r)
    try:
        return json.loads(line)
    except ValueError:
        return {"error": "the supervisor did not start"}


def _op_read(req):
    proc = _Proc(req["process_id"])
    cursor, max_bytes = int(req["cursor"]), min(int(req["max_bytes"]), READ_MAX)
    deadline = time.monotonic() + min(float(req.get("wait_s") or 0), WAIT_MAX_S)
    while True:
        info = proc.info()
        start, end, runs = proc.read(cursor, max_bytes)
        if end > start or not info["running"] or time.monotonic() >= deadline:
            break
        proc.wait_change(info["written"], deadline)
    return {"start": start, "end": end, "runs": [[fd, _b64(data)] for fd, data in runs], "info": proc.info()}


def _listening(port):
    """Whether a TCP socket in this network namespace listens on ``port`` (any address)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (OSError, ValueError):
            continue
    return False


class _LineSearch:
    """Finds ``pattern`` in the output's lines (each stream's lines apart); lines are cut at READ_MAX."""

    def __init__(self, pattern):
        self.pattern = pattern
        self.partial = {1: bytearray(), 2: bytearray()}

    def feed(self, start, runs, final=False):
        """The stream position just after the first matching line, or None."""
        at = start
        for fd, data in runs:
            buf = self.partial[fd]
            i = 0
            while True:
                j = data.find(b"\n", i)
                if j < 0:
                    buf += data[i:]
                    if len(buf) > READ_MAX:
                        del buf[:len(buf) - READ_MAX]
                    break
                buf += data[i:j]
                if self.pattern.search(buf.decode("utf-8", "replace")):
                    return at + j + 1
                del buf[:]
                i = j + 1
            at += len(data)
        if final:
            for buf in self.partial.values():
                if buf and self.pattern.search(buf.decode("utf-8", "replace")):
                    return at
        return None


def _op_wait(req):
    proc = _Proc(req["process_id"])
    until = req["until"]
    deadline = time.monotonic() + min(float(req["timeout"]), WAIT_MAX_S)
    cursor = int(req.get("cursor") or 0)
    search = port = None
    if until.startswith("output:"):
        try:
            search = _LineSearch(re.compile(until[len("output:"):]))
        except (re.error, RecursionError, OverflowError) as exc:
            raise _ProcError("invalid", f"the regex does not compile: {exc}") from None
    elif until.startswith("port:"):
        port = int(until[len("port:"):])
    elif until != "exit":
        raise _ProcError("invalid", "until must be exit, port:N or output:REGEX")
    while True:
        info = proc.info()
        if search is not None:
            start, end, runs = proc.read(cursor, READ_MAX)
            found = search.feed(start, runs, final=not info["running"] and end >= info["written"])
            cursor = end
            if found is not None:
                return {"matched": True, "next_cursor": found, "info": info}
            if end < info["written"]:
                continue
        elif port is not None and _listening(port):
            return {"matched": True, "next_cursor": info["written"], "info": info}
        if not info["running"]:
            return {"matched": until == "exit", "next_cursor": info["written"] if search is None else cursor,
                    "info": info}
        if time.monotonic() >= deadline:
            return {"matched": False, "next_cursor": info["written"] if search is None else cursor, "info": info}
        if port is not None:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        else:
            proc.wait_change(info["written"], deadline)


def _op_stop(req):
    proc = _Proc(req["process_id"])
    sig = req.get("signal") or "TERM"
    if sig not in SIGNALS:
        raise _ProcError("invalid", "unknown signal")
    if proc.info()["running"]:
        _signal_tree(proc, getattr(signal, "SIG" + sig))
        deadline = time.monotonic() + min(float(req["grace"]), WAIT_MAX_S)
        while proc.info()["running"] and time.monotonic() < deadline:
            proc.wait_change(proc.header()[0], min(deadline, time.monotonic() + 0.1))
        if proc.info()["running"] or sig != "KILL":
            _signal_tree(proc, signal.SIGKILL)  # the whole tree, also what outlived the main process
        deadline = time.monotonic() + 5
        while proc.info()["running"] and time.monotonic() < deadline:
            proc.wait_change(proc.header()[0], min(deadline, time.monotonic() + 0.1))
    return {"info": proc.info()}


def _op_list(req):
    out = []
    for name in sorted(os.listdir(_process_root())):
        if re.match(PROCESS_ID_PATTERN, name):
            try:
                out.append(_Proc(name).info())
            except _ProcError:
                continue
    return {"processes": out[:PROCESS_MAX]}


_OP_FUNCS = {OP_START: _op_start, OP_READ: _op_read, OP_WAIT: _op_wait, OP_STOP: _op_stop, OP_LIST: _op_list}


def _op(req):
    """Run one process request on its own thread; the reply is ``ok`` or an ``error`` with a code."""
    rid = req.get("id")
    try:
        _send({"id": rid, "ok": _OP_FUNCS[req["op"]](req)})
    except _ProcError as exc:
        _send({"id": rid, "error": str(exc), "code": exc.code})
    except (KeyError, TypeError, ValueError, OSError) as exc:
        _send({"id": rid, "error": f"{type(exc).__name__}: {exc}", "code": "failed"})


# The supervisor -------------------------------------------------------------------------------


class _Ring:
    def __init__(self, path, cap):
        self.cap, self.written = cap, 0
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, _HEADER.size + 2 * cap)
        os.pwrite(self.fd, _HEADER.pack(0, cap), 0)
        self.tags = {1: b"\x01" * 65536, 2: b"\x02" * 65536}

    def append(self, tag, data):
        n = len(data)
        w = self.written
        if n > self.cap:
            data, w, n = data[-self.cap:], w + n - self.cap, self.cap
        at = 0
        while at < n:
            off = (w + at) % self.cap
            k = min(n - at, self.cap - off, 65536)
            os.pwrite(self.fd, data[at:at + k], _HEADER.size + off)
            os.pwrite(self.fd, self.tags[tag][:k], _HEADER.size + self.cap + off)
            at += k
        self.written = w + n
        os.pwrite(self.fd, _HEADER.pack(self.written, self.cap), 0)  # after the data: readers trust it


def _subreaper():
    """Orphans of the process's tree stay below us (so a stop finds them); best effort (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def supervise(d, report_fd):
    """Run the process of directory ``d`` and keep its output in its ring until it and its pipes end.

    Runs in a child of the agent (see _spawn_supervisor); says how the start went on ``report_fd``.
    """
    report = os.fdopen(report_fd, "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # nothing of the agent's channel stays open here
        os.dup2(devnull, fd)
    os.closerange(3, report_fd)
    os.closerange(report_fd + 1, 1 << 16)
    spec = _read_json(os.path.join(d, "spec.json"), 1 << 22) or {}
    _subreaper()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    try:
        ring = _Ring(os.path.join(d, "ring"), int(spec["cap"]))
        # Its own session and process group (pgid = pid), which a stop signals.
        child = _start_child(spec["command"], spec["cwd"], {os.fsencode(k): os.fsencode(v) for k, v in spec["env"].items()})
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        report.write(json.dumps({"error": f"cannot start: {exc}"}) + "\n")
        report.close()
        return
    listener = None
    sock_path = os.path.join(d, "sock")
    if len(sock_path) < 100:
        import socket

        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(sock_path)
        listener.listen(_WAITERS_MAX)
        listener.setblocking(False)  # notify() takes what is queued without waiting for more
    started_at = time.time()
    _write_json(os.path.join(d, "state.json"), {
        "process_id": spec["process_id"], "command": spec["command"], "pid": child.pid,
        "supervisor": os.getpid(), "supervisor_start": _start_time(os.getpid()), "started_at": started_at,
        "boot": _boot_marker(),
    })
    report.write(json.dumps({"pid": child.pid, "started_at": started_at}) + "\n")
    report.close()
    pipes = {child.stdout: 1, child.stderr: 2}
    waiters = []
    ended = False

    def accept(limit):
        """Take every queued waiter; beyond ``limit`` held, one is closed unpoked (it polls instead)."""
        while listener is not None:
            try:
                conn, _ = listener.accept()
            except OSError:  # nothing queued (BlockingIOError), or an aborted connect
                return
            if len(waiters) >= limit:
                conn.close()
            else:
                waiters.append(conn)

    def notify():
        # A waiter connects, then checks the ring's header; one that connected before this change
        # reached the header (or exit.json) may still sit in the listener's queue, because select
        # returned with the output before it connected. It is poked too: every connection made
        # before the change is queued by now, and one made after it sees the change itself.
        accept(float("inf"))
        for w in waiters:
            try:
                w.send(b"!")
            except OSError:
                pass
            w.close()
        del waiters[:]

    def take(r):
        data = os.read(r, 65536)
        if data:
            ring.append(pipes[r], data)
        else:
            os.close(r)
            del pipes[r]

    def drain():
        # What the process wrote before it exited is in the pipes by now: into the ring before its exit
        # is told, or a wait for the exit would return without its last output. Bounded: a descendant
        # still writing must not hold the exit back.
        for _ in range(256):
            ready = select.select(list(pipes), [], [], 0)[0] if pipes else []
            if not ready:
                return
            for r in ready:
                take(r)

    while pipes or not ended:
        watched = list(pipes) + [wake_r] + ([listener] if listener is not None else [])
        ready = select.select(watched, [], [], 1.0)[0]
        changed = False
        for r in ready:
            if r is listener:
                accept(_WAITERS_MAX)
            elif r == wake_r:
                try:
                    os.read(wake_r, 512)
                except OSError:
                    pass
            else:
                take(r)
                changed = True
        while True:  # reap: the process, and orphans of its tree (we are their subreaper)
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child.pid:
                ended = True
                changed = True
                code = sig = None
                if os.WIFSIGNALED(status):
                    try:
                        sig = signal.Signals(os.WTERMSIG(status)).name[3:]
                    except ValueError:
                        sig = str(os.WTERMSIG(status))
                else:
                    code = os.WEXITSTATUS(status)
                drain()
                _write_json(os.path.join(d, "exit.json"), {"exit": code, "signal": sig, "ended_at": time.time()})
        if changed:
            notify()
    notify()  # the queued waiters too; one that connects after this finds exit.json
    if listener is not None:
        listener.close()
        try:
            os.unlink(sock_path)
        except OSError:
            pass


def _cancel(rid):
    """Kill the command ``rid`` if it runs; otherwise remember it, so it never starts."""
    with _running_lock:
        proc = _running.get(rid)
        if proc is None:
            _cancelled[rid] = None
            while len(_cancelled) > CANCELLED_MAX:
                del _cancelled[next(iter(_cancelled))]
    if proc is not None:
        _killpg(proc, signal.SIGKILL)


def _handle(lines):
    """Apply the cancels among ``lines`` first, then start the requests (each on its own thread)."""
    messages = []
    for line in lines:
        try:
            messages.append(json.loads(line))
        except ValueError:
            continue
    for msg in messages:
        if "cancel" in msg:
            _cancel(msg["cancel"])
    for msg in messages:
        if "cancel" in msg:
            continue
        _start(_op if msg.get("op") in _OP_FUNCS else _run, msg)


# Threads that finished a request wait a while for the next one: a thread start costs about as much
# as the rest of an ``exec true`` in this process. Every request still starts at once (a new thread
# when none is idle), so a long command never holds up another.
_IDLE_S = 10.0
_tasks = queue.Queue()  # (function, request) handed to an idle thread
_idle = [0]  # idle threads not promised a task yet
_idle_lock = threading.Lock()


def _start(fn, msg):
    with _idle_lock:
        reuse = _idle[0] > 0
        if reuse:
            _idle[0] -= 1
    if reuse:
        _tasks.put((fn, msg))
    else:
        threading.Thread(target=_worker, args=(fn, msg), daemon=True).start()


def _worker(fn, msg):
    while True:
        try:
            fn(msg)
        except Exception:  # as an uncaught exception in a thread of its own would: said on stderr
            import traceback

            traceback.print_exc()
        with _idle_lock:
            _idle[0] += 1
        while True:
            try:
                fn, msg = _tasks.get(timeout=_IDLE_S)
                break
            except queue.Empty:
                with _idle_lock:
                    if _idle[0] > 0:  # no task was promised to the idle threads: one fewer of them
                        _idle[0] -= 1
                        return
                # a task was promised (and is on its way to the queue): wait for it


def main(pending=b""):
    """Serve requests on stdin/stdout until stdin ends; ``pending``: request bytes already read."""
    if not hasattr(os, "posix_spawn"):  # Python < 3.8: the pool runs a session per command instead
        sys.exit("exec-agent: needs Python 3.8 or later (os.posix_spawn)")
    _no_inherited_fds()
    _send({"ready": 1, "version": PROTOCOL_VERSION})
    try:
        if b"\n" in pending:
            *lines, pending = pending.split(b"\n")
            _handle(lines)
        while True:
            # Everything that has arrived, at once: a request and the cancel right behind it are
            # handled together, so the cancel wins without the command ever starting.
            chunk = os.read(0, 1 << 16)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            _handle(lines)
    finally:
        # The channel closed (the server went away): nothing we started may outlive it.
        with _running_lock:
            killed = list(_running.values())
            for proc in killed:
                _killpg(proc, signal.SIGKILL)
        sys.stdout.flush()
        if _relisten is not None:
            _relisten(killed)
        os._exit(0)


_relisten = None  # set by listen(): what the agent started at boot does once its connection is gone


def _no_inherited_fds():
    """Make every descriptor this process was given beyond 0-2 close-on-exec: a command started by
    posix_spawn inherits what is not (Popen closed them all in the child)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        if int(name) > 2:
            try:
                os.set_inheritable(int(name), False)
            except OSError:  # the listing's own descriptor, closed by now
                pass


# The agent started at boot: the Python start and the imports above, two thirds of an agent's start,
# are over before the server's first connection, which reaches this process through an SSH
# direct-streamlocal channel to LISTEN_PATH instead of a session running a new interpreter. The
# connection brings the environment sshd gives a session (the server reads it with a session running
# ``env -0``), so the commands run as they would under one. One connection at a time: this process then
# is that connection's agent (others meanwhile start the agent the usual way), and waits again after it.
LISTEN_WAIT_S = 120.0  # unused by then (a server that came too early, or none), it leaves
# Its connection gone, it starts afresh as such an agent (the same process: the unit stays active) and
# waits this long for the next one: a server started again (each Claude Code session starts its own) or a
# connection dropped and made again meets an agent ready, not one started in a session (~30 ms here, and
# seconds in an emulated VM). 0: it ends with its connection.
RELISTEN_WAIT_S = 900.0
ENVIRON_LINE_MAX = 1 << 20  # the first line: {"environ": base64 of ``env -0``}


def _read_environ_line(conn):
    """The connection's first line, and the bytes read past it; None if it broke the rules."""
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(1 << 16)
        if not chunk or len(data) + len(chunk) > ENVIRON_LINE_MAX:
            return None
        data += chunk
    line, rest = data.split(b"\n", 1)
    try:
        raw = binascii.a2b_base64(json.loads(line)["environ"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    return raw, rest


def _take_environ(raw):
    """Become the session's environment: ``raw`` is ``env -0``'s output from a session of this user."""
    global _ENVB
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if key and sep and b"\n" not in key:  # not a name: something printed before env's output
            env[key] = value
    if b"_" in env:  # the shell sets it to what it runs: there ``env``, for a session's agent python3
        env[b"_"] = os.fsencode(sys.executable)
    _coerce_c_locale(env)
    os.environb.clear()
    os.environb.update(env)
    _ENVB = dict(os.environb)
    try:
        os.chdir(os.environ.get("HOME") or "/")  # where sshd starts a session
    except OSError:
        os.chdir("/")


def _coerce_c_locale(env):
    """Do to ``env`` what Python's start does to its own (PEP 538), as it did to an agent's under sshd,
    whose commands inherit it: where LC_ALL is unset and LC_CTYPE resolves to the C locale (unset,
    C, POSIX, or one not installed), LC_CTYPE becomes the first of C.UTF-8, C.utf8, UTF-8 there is."""
    try:
        import _locale as locale  # its C half: ``locale`` itself (its alias tables) is ~0.4 MiB of an idle agent
    except ImportError:
        import locale

    if env.get(b"LC_ALL"):
        return
    name = (env.get(b"LC_CTYPE") or env.get(b"LANG") or b"").decode("ascii", "replace")
    own = locale.setlocale(locale.LC_CTYPE)
    try:
        try:
            resolved = locale.setlocale(locale.LC_CTYPE, name or "C")
        except locale.Error:
            resolved = "C"
        if resolved not in ("C", "POSIX"):
            return
        for target in ("C.UTF-8", "C.utf8", "UTF-8"):
            try:
                locale.setlocale(locale.LC_CTYPE, target)
            except locale.Error:
                continue
            env[b"LC_CTYPE"] = target.encode()
            return
    finally:
        locale.setlocale(locale.LC_CTYPE, own)  # this process's own, as it was


def listen(listener, path=LISTEN_PATH, wait_s=LISTEN_WAIT_S, relisten_s=RELISTEN_WAIT_S):
    """Wait on ``listener`` (bound at ``path``) for one connection of this user's, then serve it as
    ``main`` does (``exec-agent --listen [PATH [WAIT_S [RELISTEN_S]]]``); when it closes, start again
    as such an agent that waits ``relisten_s`` seconds (:func:`_listen_again`; 0: end instead).

    Exits quietly when none comes within ``wait_s`` seconds, or when the one that comes sends no
    environment line. The socket is removed first either way: while a connection is served, others
    find nothing there and start the agent the usual way.
    """
    import socket

    unit_environ = dict(os.environb)  # before the connection's replaces it: the next start's own
    script = os.path.abspath(sys.argv[0])  # before it moves to the session's HOME
    listener = socket.socket(fileno=listener.detach())
    deadline = time.monotonic() + float(wait_s)
    conn = None
    try:
        while conn is None:
            listener.settimeout(max(0.0, deadline - time.monotonic()))
            try:
                conn, _ = listener.accept()
            except (socket.timeout, BlockingIOError):  # noqa: UP041 - not TimeoutError before 3.10
                return  # (a timeout of 0, at the deadline, makes the socket non-blocking)
            _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            if uid != os.getuid():
                conn.close()
                conn = None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        listener.close()
    conn.settimeout(10.0)  # the environment line follows the connection at once
    try:
        first = _read_environ_line(conn)
    except OSError:
        first = None
    if first is None:
        conn.close()
        return
    conn.settimeout(None)
    _take_environ(first[0])
    global _relisten
    if float(relisten_s) > 0:
        own = (os.dup(0), os.dup(1))  # the unit's stdin and stdout (the journal), for the next start
        _relisten = lambda killed: _listen_again(killed, own, unit_environ, script, path, relisten_s)  # noqa: E731
    fd = conn.detach()
    os.dup2(fd, 0)
    os.dup2(fd, 1)
    os.close(fd)
    main(first[1])


def _listen_again(killed, own, environ, script, path, wait_s):
    """Become a new agent waiting at ``path`` for ``wait_s`` seconds (``main`` calls this when the
    connection is gone and its commands, ``killed``, have been killed). The same process, so the unit
    stays active: an exec of this file with the unit's environment and standard streams (``own``)."""
    for proc in killed:  # reaped here: the new start would never wait for them
        try:
            proc.wait(timeout=5)
        except Exception:
            pass
    try:
        os.dup2(own[0], 0)
        os.dup2(own[1], 1)
        os.chdir("/")
        argv = [sys.executable, "-I", "-S", "-u", script, "--listen", path, str(wait_s), str(wait_s)]
        os.execve(sys.executable, argv, environ)
    except OSError:
        pass  # then it ends, as it did before it started again: the next connection starts one in a session


if __name__ == "__main__":
    if _LISTENER is not None:
        listen(_LISTENER, *sys.argv[2:5])
    else:
        main()
