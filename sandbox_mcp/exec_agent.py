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
  ← {"id": 1, "started": 1}          (the command runs: a retry could now run it twice)
  ← {"id": 1, "exit": 0 | null, "signal": "TERM" | null, "stdout": "b64", "stderr": "b64",
     "truncated": false, "timed_out": false, "detached": false, "cancelled": false}
     with "tail" in the request, per stream also: "stdout_tail": "b64", "stdout_total": N,
     "stdout_saved": N | null (and the same for stderr)

Without "tail" a stream keeps its first ``cap`` bytes. With it, its head and its tail (``cap``
bytes together); with "save" too, a stream longer than "over" (default ``cap``) is written whole
(up to "max" bytes) to DIR/NAME.stdout or DIR/NAME.stderr, so nothing the host may not carry is
lost; of those files the newest "keep" commands' stay.

A cancel may overtake its request: the request starts on a thread of its own, and the cancel
can be read while that thread is still on its way to ``Popen``. So cancelled ids are
remembered (the latest ``CANCELLED_MAX``), the check and the start happen under one lock, and
of the lines read together the cancels are applied first: a command cancelled before it
started replies ``cancelled: true`` and never runs.

Standard library only, Python ≥ 3.7: it runs on the workspace's python3, and the pool falls
back to a session per command where there is none. The image recipe installs this file as
/usr/local/libexec/sandbox-mcp/exec-agent and the pool runs it by that path, so it must stay
self-contained.
"""

import base64
import json
import os
import signal
import subprocess
import sys
import threading

KILL_AFTER_S = 2.0
DETACH_GRACE_S = 0.5  # how long to keep reading after exit while a background process holds the pipes
CANCELLED_MAX = 1024  # cancelled ids remembered; the pool numbers requests upwards, so old ids never return

_out_lock = threading.Lock()
_running = {}  # request id -> Popen
_cancelled = {}  # request ids cancelled while not running, oldest first (a dict keeps insertion order)
_running_lock = threading.Lock()  # guards both: a start and a cancel never interleave


def _send(message):
    data = (json.dumps(message, separators=(",", ":")) + "\n").encode()
    with _out_lock:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def _b64(data):
    return base64.b64encode(bytes(data)).decode("ascii")


def _killpg(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Pump(threading.Thread):
    """Reads one pipe to its end, keeping at most ``cap`` bytes (the rest is drained).

    Without ``tail``, the first ``cap`` bytes; with it, the head and the tail (``cap`` bytes
    together). With ``save`` (see _save_paths), once the stream outgrows its "over" all of it goes
    to the file too.
    """

    def __init__(self, fd, cap, tail=False, save=None):
        threading.Thread.__init__(self, daemon=True)
        self.fd, self.cap, self.keep_tail, self.save = fd, cap, tail, save
        self.head_cap = cap - cap // 2 if tail else cap
        self.data, self.tail, self.total, self.truncated = bytearray(), bytearray(), 0, False
        self.file, self.saved = None, None
        self.lock = threading.Lock()

    def run(self):
        try:
            while True:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    break
                with self.lock:
                    self._take(chunk)
        except OSError:
            pass
        finally:
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
    _prune(directory, keep)


def _prune(directory, keep):
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


def _expire(proc, reply):
    """The command ran out of time: TERM to its group, KILL two seconds later if it is still there."""
    reply["timed_out"] = True
    _killpg(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_AFTER_S)
    except subprocess.TimeoutExpired:
        _killpg(proc, signal.SIGKILL)


def _run(req):
    rid, cwd, cap = req["id"], req["cwd"], int(req["cap"])
    reply = {"id": rid, "exit": None, "signal": None, "stdout": "", "stderr": "", "truncated": False,
             "timed_out": False, "detached": False, "cancelled": False}
    env = dict(os.environ)
    env.update(req.get("env") or {})
    stdin = base64.b64decode(req["stdin"]) if req.get("stdin") is not None else None
    # The cancel check, the start and the registration under one lock: a cancel handled before
    # this block stops the start; one handled after it finds the process to kill.
    with _running_lock:
        if rid in _cancelled:
            del _cancelled[rid]
            reply["cancelled"] = True
            return _send(reply)
        if not os.path.isdir(cwd):
            reply.update(exit=1, stderr=_b64(f"sh: cd: {cwd}: No such file or directory\n".encode()))
            return _send(reply)
        try:
            proc = subprocess.Popen(
                ["sh", "-c", req["command"]], cwd=cwd, env=env,
                stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,  # its own process group: a timeout or cancel kills all of it
            )
        except OSError as exc:
            reply.update(exit=126, stderr=_b64(f"sh: {exc}\n".encode()))
            return _send(reply)
        _running[rid] = proc
    _send({"id": rid, "started": 1})
    tail = req.get("tail") is True
    saves = (_save_paths(req["save"]) if tail and req.get("save") else None) or [None, None]
    saves = [s and s[:4] + (cap if s[4] is None else min(s[4], cap),) for s in saves]
    pumps = [_Pump(proc.stdout.fileno(), cap, tail, saves[0]), _Pump(proc.stderr.fileno(), cap, tail, saves[1])]
    for p in pumps:
        p.start()
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True).start()
    # A timer enforces the timeout while this thread blocks in waitpid: Popen.wait(timeout=...)
    # polls with growing sleeps, which would add a millisecond or more to every short command.
    timer = threading.Timer(float(req["timeout"]), _expire, args=(proc, reply))
    timer.daemon = True
    timer.start()
    proc.wait()
    timer.cancel()
    if reply["timed_out"]:
        _killpg(proc, signal.SIGKILL)  # what ignored TERM, or outlived the shell
    with _running_lock:
        _running.pop(rid, None)
    for p in pumps:
        p.join(DETACH_GRACE_S)
        reply["detached"] = reply["detached"] or p.is_alive()
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
    _send(reply)


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
        if "cancel" not in msg:
            threading.Thread(target=_run, args=(msg,), daemon=True).start()


def main():
    _send({"ready": 1})
    pending = b""
    try:
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
            for proc in list(_running.values()):
                _killpg(proc, signal.SIGKILL)
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
