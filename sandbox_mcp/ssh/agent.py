"""The client end of the exec agent (:mod:`sandbox_mcp.exec_agent`): one channel, many commands.

The agent is installed in the image; :mod:`.agent_start` starts it in a session by absolute path
(:func:`.commands.agent_command`) or meets the one the image started at boot.
It speaks JSON lines; everything it sends is read with a bound (:class:`.lines.LineBuffer`) and
checked before use, since a workspace's root can replace it with anything. A protocol violation
closes the channel and fails the calls waiting on it with :class:`AgentFault`.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import anyio
import asyncssh

from .. import budget
from ..coalesce import Coalescer
from ..errors import LimitExceeded
from ..models import ExecResult
from .commands import CLIENT_GRACE_S, DETACHED_NOTE, signal_note
from .lines import LineBuffer, LineTooLong

__all__ = [
    "AGENT_START_TIMEOUT_S",
    "DEFAULT_MAX_EXECS",
    "AgentFault",
    "AgentGone",
    "AgentOutdated",
    "AgentSession",
    "NotStarted",
    "reply_limit",
    "run_agent_command",
    "run_agent_op",
]

AGENT_START_TIMEOUT_S = 5.0
# Commands one agent (one workspace) runs at once (a process and an agent thread each); more wait their
# turn, in order, within their own timeout. Other workspaces' calls never wait on them.
DEFAULT_MAX_EXECS = 64
_REPLY_OVERHEAD = 64 * 1024  # JSON keys, exit status, signal name: far less than this
_STDERR_TAIL = 4096  # the agent's own stderr (why it failed to start), for the error message
_SIGNAL_NAME_MAX = 32


def reply_limit(cap: int) -> int:
    """The longest reply line a well-behaved agent sends for a command with output ``cap``.

    Two streams of at most ``cap`` bytes each (head and tail together), base64 encoded, plus the
    rest of the JSON.
    """
    return 2 * 4 * ((cap + 2) // 3 + 2) + _REPLY_OVERHEAD


class NotStarted(ConnectionError):
    """The exec agent's channel closed before it started the command (so it never ran)."""


class AgentGone(ConnectionError):
    """The exec agent's channel closed after the command started (its outcome is unknown)."""


class AgentFault(ConnectionError):
    """The exec agent broke the protocol (an unbounded or malformed line); its channel was closed."""


class AgentOutdated(ConnectionError):
    """The workspace's exec agent predates process requests (an image from before them)."""


class AgentSession(asyncssh.SSHClientSession[bytes]):
    """The agent's channel: JSON lines out, replies routed to the tasks waiting for them."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHClientChannel[bytes] | asyncssh.SSHUnixChannel[bytes] | None = None
        self.ready = anyio.Event()
        self.closed = anyio.Event()
        self.waiters: dict[int, anyio.Event] = {}
        self.replies: dict[int, dict[str, Any]] = {}
        self.started: set[int] = set()
        self.stderr = bytearray()
        self.fault: str | None = None
        self.lines = LineBuffer(_REPLY_OVERHEAD)
        self.version = 1  # the ready line's protocol version (1: exec only)
        self.outputs: dict[int, Callable[[int, bytes, int], None]] = {}  # request id -> streamed output sink
        self._ids = itertools.count(1)
        self._out = Coalescer(self._write, self._write_failed)
        self.max_execs = DEFAULT_MAX_EXECS
        self.slots = anyio.Semaphore(DEFAULT_MAX_EXECS)  # places for running commands (exec_slot)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.stderr += data[-_STDERR_TAIL:]
            del self.stderr[:-_STDERR_TAIL]
            return
        if self.fault is not None:
            return
        try:
            for line in self.lines.feed(data):
                self._handle(line)
        except LineTooLong as exc:
            self._fail(f"it sent {exc}")
        except (ValueError, TypeError) as exc:
            self._fail(f"it sent a malformed line ({exc})")

    def _handle(self, line: bytes) -> None:
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("not a JSON object")
        if "ready" in msg:
            version = msg.get("version", 1)
            self.version = version if isinstance(version, int) and not isinstance(version, bool) else 1
            self.ready.set()
            return
        rid = msg.get("id")
        if not isinstance(rid, int) or isinstance(rid, bool):
            raise ValueError("no request id")
        if "out" in msg:
            self._output(rid, msg)
        elif "started" in msg:
            if rid in self.waiters:
                self.started.add(rid)
        elif (waiter := self.waiters.pop(rid, None)) is not None:
            self.replies[rid] = msg
            self.started.discard(rid)
            waiter.set()

    def _output(self, rid: int, msg: dict[str, Any]) -> None:
        """A chunk of a running command's output: checked, then handed to its sink (if it still has one)."""
        sink = self.outputs.get(rid)
        if sink is None:
            return
        fd, skipped, out = msg.get("fd"), msg.get("skipped", 0), msg.get("out")
        if fd not in (1, 2) or not isinstance(skipped, int) or isinstance(skipped, bool) or skipped < 0:
            raise ValueError("a malformed output message")
        if not isinstance(out, str):
            raise ValueError("output is not a string")
        sink(fd, base64.b64decode(out, validate=True), skipped)

    def _fail(self, reason: str) -> None:
        self.fault = reason
        if self.chan is not None:
            self.chan.close()
        self.connection_lost(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self.ready.set()
        for waiter in self.waiters.values():
            waiter.set()  # no reply: the caller sees the channel is gone

    def submit(self, request: dict[str, Any], reply_cap: int | None = None) -> tuple[int, anyio.Event]:
        """Send one request; returns its id and the event set when its reply (or the end) comes.

        ``reply_cap``: the output bytes its reply may carry (an exec request's ``cap`` by default).
        """
        assert self.chan is not None
        rid = next(self._ids)
        self.lines.raise_limit(reply_limit(int(request["cap"]) if reply_cap is None else reply_cap))
        waiter = self.waiters[rid] = anyio.Event()
        self._send(json.dumps({"id": rid, **request}) + "\n")
        return rid, waiter

    def _send(self, line: str) -> None:
        """Queue ``line`` for the channel: a burst of requests shares writes (see :mod:`..coalesce`),
        in order (a cancel after its request). asyncssh sends every channel write as an SSH packet of
        its own, with an ignore packet before it: 200 execs started at once were 400 TCP segments."""
        self._out.write(line.encode())

    def _write(self, data: bytes) -> None:
        if self.chan is not None and not self.closed.is_set():  # else the waiters have been woken
            self.chan.write(data)

    def _write_failed(self, exc: Exception) -> None:
        # The channel is closing: none of these requests reached the agent (NotStarted for them).
        self.connection_lost(None)

    def cancel(self, rid: int) -> None:
        """Ask the agent to kill the command's process group; forget its reply."""
        self.waiters.pop(rid, None)
        self.replies.pop(rid, None)
        self.outputs.pop(rid, None)
        self.started.discard(rid)
        if self.chan is not None and not self.closed.is_set():
            self._send(json.dumps({"cancel": rid}) + "\n")

    def stderr_tail(self) -> str:
        return self.stderr.decode(errors="replace").strip()[-500:]


def _b64_field(reply: dict[str, Any], key: str) -> bytes:
    value = reply.get(key, "")
    if not isinstance(value, str):
        raise AgentFault(f"its reply's {key} is not a string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AgentFault(f"its reply's {key} is not base64") from exc


def _count(reply: dict[str, Any], key: str) -> int | None:
    value = reply.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise AgentFault(f"its reply's {key} is not a byte count")
    return value


class _Stream(NamedTuple):
    """One stream of a reply as the result carries it."""

    text: str
    split: tuple[int, int]  # where the marker line lies in text (see budget.join_stream)
    omitted: int
    total: int | None  # the whole stream's bytes; None from an agent that does not count them
    path: str | None  # where the whole stream was saved
    cut: bool


def _stream(reply: dict[str, Any], name: str, cap: int, save_path: str | None) -> _Stream:
    """One stream of a reply, checked (wrong types are an AgentFault) and cut to ``cap``."""
    head = _b64_field(reply, name)
    tail = _b64_field(reply, f"{name}_tail") if f"{name}_tail" in reply else b""
    total = _count(reply, f"{name}_total")
    saved = _count(reply, f"{name}_saved")
    clipped = len(head) + len(tail) > cap  # more than asked for: keep what was asked
    if clipped:
        keep_tail = min(len(tail), cap // 2)
        head, tail = head[: cap - keep_tail], tail[len(tail) - keep_tail :]
    if total is not None and total < len(head) + len(tail):
        raise AgentFault(f"its reply's {name}_total is less than the output it sent")
    omitted = total - len(head) - len(tail) if total is not None else 0
    path = save_path if saved else None
    text, split = budget.join_stream(
        head.decode("utf-8", errors="replace"), tail.decode("utf-8", errors="replace"), omitted, name, path
    )
    return _Stream(text, split, omitted, total, path, clipped or omitted > 0)


def _result(reply: dict[str, Any], cap: int, duration_s: float, save: dict[str, str] | None = None) -> ExecResult:
    """An ExecResult from a reply, checked: wrong types are an AgentFault, output is cut to ``cap``.

    ``save`` names the files the request asked the agent to save long streams in (by stream).
    """
    timed_out = reply.get("timed_out") is True
    code = reply.get("exit")
    if code is not None and (not isinstance(code, int) or isinstance(code, bool)):
        raise AgentFault("its reply's exit status is not an integer")
    sig = reply.get("signal")
    if sig is not None and not isinstance(sig, str):
        raise AgentFault("its reply's signal is not a string")
    save = save or {}
    out = _stream(reply, "stdout", cap, save.get("stdout"))
    err = _stream(reply, "stderr", cap, save.get("stderr"))
    note = DETACHED_NOTE if reply.get("detached") is True else ""
    if sig and not timed_out:
        note += signal_note(sig[:_SIGNAL_NAME_MAX])
    result = ExecResult(
        exit_code=None if timed_out else code,
        stdout=out.text,
        stderr=err.text + note,
        timed_out=timed_out,
        truncated=reply.get("truncated") is True or out.cut or err.cut,
        duration_ms=round(duration_s * 1000, 3),
        stdout_bytes=out.total,
        stderr_bytes=err.total,
        stdout_omitted=out.omitted,
        stderr_omitted=err.omitted,
        stdout_path=out.path if out.omitted else None,
        stderr_path=err.path if err.omitted else None,
    )
    result.set_saved({s: p for s, p in (("stdout", out.path), ("stderr", err.path)) if p})
    result.set_splits({"stdout": out.split, "stderr": err.split})
    return result


@asynccontextmanager
async def exec_slot(agent: AgentSession, timeout_s: float) -> AsyncIterator[None]:
    """One of the agent's ``max_execs`` places for a running command, waited for in order for at most
    ``timeout_s``; before the request is sent, so a call cancelled meanwhile runs nothing.

    Raises:
        LimitExceeded: no place came free within ``timeout_s``.
    """
    try:
        agent.slots.acquire_nowait()  # the usual case, without a timer
        acquired = True
    except anyio.WouldBlock:
        acquired = False
        with anyio.move_on_after(timeout_s):
            await agent.slots.acquire()
            acquired = True
    if not acquired:
        raise LimitExceeded(
            f"the workspace already runs {agent.max_execs} commands at once and none ended within this call's "
            f"timeout_s ({timeout_s:g} s); wait for them, or run long work with start_process"
        )
    try:
        yield
    finally:
        agent.slots.release()


async def run_agent_command(
    agent: AgentSession,
    request: dict[str, Any],
    timeout_s: float,
    on_output: Callable[[int, bytes, int], None] | None = None,
) -> ExecResult:
    """Run one command through the agent and wait for its result.

    The agent enforces ``timeout_s`` itself; a client deadline ``CLIENT_GRACE_S`` later catches a
    wedged agent (the result then says ``timed_out``). Cancelling the awaiting task makes the agent
    kill the command's process group. ``on_output(fd, data, skipped)``, when given, receives the
    output while the command runs (the agent streams it), before the result.

    Raises:
        LimitExceeded: the agent ran ``max_execs`` commands for all of ``timeout_s`` (nothing was sent).
        NotStarted: the channel closed before the command started: safe to retry elsewhere.
        AgentGone: the channel closed while the command ran.
        AgentFault: the agent broke the protocol; the channel is closed.
    """
    async with exec_slot(agent, timeout_s):
        return await _run_command(agent, request, timeout_s, on_output)


async def _run_command(
    agent: AgentSession, request: dict[str, Any], timeout_s: float, on_output: Callable[[int, bytes, int], None] | None
) -> ExecResult:
    start = time.monotonic()
    if on_output is not None:
        request = {**request, "stream": True}
    rid, waiter = agent.submit(request)
    if on_output is not None:
        agent.outputs[rid] = on_output
    try:
        with anyio.move_on_after(timeout_s + CLIENT_GRACE_S) as deadline:
            await waiter.wait()
    except BaseException:
        agent.cancel(rid)  # cancellation: the agent kills the command's process group
        raise
    finally:
        agent.outputs.pop(rid, None)
    reply = agent.replies.pop(rid, None)
    started = rid in agent.started
    agent.started.discard(rid)
    if agent.fault is not None:
        raise AgentFault(agent.fault)
    if deadline.cancelled_caught:
        agent.cancel(rid)
        reply = {"exit": None, "timed_out": True}
    elif reply is None:
        if not started:
            raise NotStarted("the channel closed before the command started")
        raise AgentGone(agent.stderr_tail())
    save = request.get("save")
    paths = {s: f"{save['dir']}/{save['name']}.{s}" for s in ("stdout", "stderr")} if save else None
    return _result(reply, int(request["cap"]), time.monotonic() - start, paths)


async def run_agent_op(agent: AgentSession, request: dict[str, Any], timeout_s: float, reply_cap: int) -> dict[str, Any]:
    """Send one process request (``op``) and return the agent's reply, unchecked beyond being a dict.

    Raises:
        AgentOutdated: the workspace runs an agent from before process requests.
        AgentGone: the channel closed before the reply (whether a start happened is unknown).
        AgentFault: the agent broke the protocol; the channel is closed.
        TimeoutError: no reply within ``timeout_s`` (the agent is asked to forget the request).
    """
    if agent.version < 2:
        raise AgentOutdated(f"the workspace's exec agent speaks protocol {agent.version}; processes need 2")
    rid, waiter = agent.submit(request, reply_cap)
    try:
        with anyio.move_on_after(timeout_s) as deadline:
            await waiter.wait()
    except BaseException:
        agent.cancel(rid)
        raise
    reply = agent.replies.pop(rid, None)
    if agent.fault is not None:
        raise AgentFault(agent.fault)
    if deadline.cancelled_caught:
        agent.cancel(rid)
        raise TimeoutError(f"no reply to {request.get('op')} within {timeout_s:g} s")
    if reply is None:
        raise AgentGone(agent.stderr_tail())
    return reply
