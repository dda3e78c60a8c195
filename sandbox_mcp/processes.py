"""Processes in a workspace, the host's side: validate, build the exec agent's requests, check its replies.

The process runs inside the workspace under a supervisor the exec agent starts (see the process
section of :mod:`sandbox_mcp.exec_agent`, whose constants are the one definition of the protocol);
its output lives there too, so nothing here holds state: a process is found again by its id after
a server restart. Everything the agent sends back is untrusted: replies are validated against the
wire models below (types, ranges, lengths) before anything is built from them.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import secrets
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from . import exec_agent as wire
from .errors import InvalidSpec, SSHError, clip, clip_repr
from .models import ProcessInfo, ProcessList, ProcessOutput, ProcessStarted, ProcessWait

__all__ = [
    "MAX_READ_BYTES",
    "ProcessNotFound",
    "check_reply",
    "list_request",
    "new_process_id",
    "output_result",
    "parse_until",
    "read_request",
    "start_request",
    "stop_request",
    "validate_process_id",
    "wait_request",
]

MAX_READ_BYTES = wire.READ_MAX
REGEX_MAX = 1000  # characters of an output:REGEX
_PROCESS_ID_RE = re.compile(wire.PROCESS_ID_PATTERN)
_SMALL = 1 << 16  # a reply without output stays far below this
_WIRE_TEXT_MAX = 4 * wire.COMMAND_SHOWN_MAX  # a command's characters, JSON-escaped


class ProcessNotFound(InvalidSpec):
    """No process of that id in the workspace (or one from before its last restart)."""

    def __init__(self, name: str, process_id: str) -> None:
        super().__init__(
            f"no process {clip_repr(process_id)} in workspace {name!r} (a restart ends all of them); "
            "call list_processes to see its processes"
        )


def validate_process_id(process_id: str) -> str:
    """Raises InvalidSpec unless ``process_id`` is 1-40 letters, digits, '_', '.', '-', not starting with a symbol."""
    if not _PROCESS_ID_RE.match(process_id):
        raise InvalidSpec(
            f"process_id {clip_repr(process_id)} is not valid: use 1-40 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (or omit it to get one)"
        )
    return process_id


def new_process_id() -> str:
    """A fresh id ("p-" and 8 hex digits)."""
    return f"p-{secrets.token_hex(4)}"


def parse_until(until: str) -> str:
    """``until`` checked: 'exit', 'port:N' (1-65535) or 'output:REGEX' (a regex Python compiles).

    Raises:
        InvalidSpec: anything else, with what was wrong (e.g. the regex's own error).
    """
    if until == "exit":
        return until
    kind, sep, arg = until.partition(":")
    if sep and kind == "port":
        if not arg.isdigit() or not 1 <= int(arg) <= 65535:
            raise InvalidSpec(f"until={clip_repr(until)}: the port must be a number from 1 to 65535, e.g. 'port:8000'")
        return f"port:{int(arg)}"
    if sep and kind == "output":
        if not arg:
            raise InvalidSpec("until='output:' needs a regex after the colon, e.g. 'output:Listening on'")
        if len(arg) > REGEX_MAX:
            raise InvalidSpec(f"the regex is {len(arg)} characters long; at most {REGEX_MAX}")
        try:
            re.compile(arg)
        except (re.error, RecursionError, OverflowError) as exc:
            raise InvalidSpec(f"the regex {clip_repr(arg)} does not compile: {exc}; fix it and call again") from None
        return until
    raise InvalidSpec(f"until={clip_repr(until)} is not understood; use 'exit', 'port:N' or 'output:REGEX'")


# Requests ------------------------------------------------------------------------------------


def start_request(process_id: str, command: str, cwd: str, env: dict[str, str], cap: int) -> dict[str, Any]:
    return {"op": wire.OP_START, "process_id": process_id, "command": command, "cwd": cwd, "env": env, "cap": cap}


def read_request(process_id: str, cursor: int, max_bytes: int, wait_s: float) -> dict[str, Any]:
    return {"op": wire.OP_READ, "process_id": process_id, "cursor": cursor, "max_bytes": max_bytes, "wait_s": wait_s}


def wait_request(process_id: str, until: str, cursor: int, timeout_s: float) -> dict[str, Any]:
    return {"op": wire.OP_WAIT, "process_id": process_id, "until": until, "cursor": cursor, "timeout": timeout_s}


def stop_request(process_id: str, signal: str, grace_s: float) -> dict[str, Any]:
    return {"op": wire.OP_STOP, "process_id": process_id, "signal": signal, "grace": grace_s}


def list_request() -> dict[str, Any]:
    return {"op": wire.OP_LIST}


def reply_cap(request: dict[str, Any]) -> int:
    """The output bytes a reply to ``request`` may carry (for the reply line's bound)."""
    if request["op"] == wire.OP_LIST:
        return wire.PROCESS_MAX * (_WIRE_TEXT_MAX + 1024)
    return int(request.get("max_bytes", 0)) + _SMALL


# Replies (untrusted) -----------------------------------------------------------------------------

_Count = Annotated[StrictInt, Field(ge=0, le=1 << 62)]
_Time = Annotated[float, Field(ge=0, le=1e11, allow_inf_nan=False, strict=True)]
_Signal = Annotated[StrictStr, Field(max_length=32, pattern=r"^[A-Z0-9]+$")]
_Id = Annotated[StrictStr, Field(pattern=wire.PROCESS_ID_PATTERN)]
_Pid = Annotated[StrictInt, Field(ge=1, le=1 << 22)]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Info(_Wire):
    process_id: _Id
    command: Annotated[StrictStr, Field(max_length=_WIRE_TEXT_MAX)]
    pid: _Pid
    running: StrictBool
    exit: Annotated[StrictInt, Field(ge=0, le=255)] | None = None
    signal: _Signal | None = None
    started_at: _Time
    ended_at: _Time | None = None
    written: _Count
    dropped: _Count


class _Started(_Wire):
    process_id: _Id
    pid: _Pid
    started_at: _Time


class _Read(_Wire):
    start: _Count
    end: _Count
    runs: list[tuple[Literal[1, 2], StrictStr]]
    info: _Info


class _Waited(_Wire):
    matched: StrictBool
    next_cursor: _Count
    info: _Info


class _Stopped(_Wire):
    info: _Info


class _Listed(_Wire):
    processes: Annotated[list[_Info], Field(max_length=wire.PROCESS_MAX)]


def check_reply(name: str, process_id: str | None, reply: dict[str, Any]) -> dict[str, Any]:
    """The ``ok`` part of an agent reply, or the error it stands for.

    Raises:
        ProcessNotFound: the agent knows no such process.
        InvalidSpec: the agent refused the request (a cwd that does not exist, an id in use, too many).
        SSHError: the reply is malformed, or the agent failed otherwise.
    """
    if isinstance(reply.get("ok"), dict):
        return reply["ok"]
    code, text = reply.get("code"), reply.get("error")
    said = clip(text if isinstance(text, str) else "", 300)
    if code == "not_found" and process_id is not None:
        raise ProcessNotFound(name, process_id)
    if code == "exists":
        raise InvalidSpec(f"a process {process_id!r} already exists in {name!r}; pick another process_id or omit it")
    if code == "limit":
        raise InvalidSpec(
            f"workspace {name!r} has {wire.PROCESS_MAX} processes running; stop_process one first"
        )
    if code == "invalid":
        raise InvalidSpec(f"the workspace refused the request: {said}")
    raise SSHError(f"the exec agent in {name!r} could not do it: {said or 'no reason given'}")


def _parse(model: type[_Wire], data: dict[str, Any], name: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise SSHError(
            f"the exec agent in workspace {name!r} sent a malformed reply ({exc.error_count()} problems, e.g. "
            f"{clip(str(exc.errors()[0]['loc']), 100)}); if this repeats, restart the workspace"
        ) from None


def _when(t: float | None) -> datetime | None:
    return None if t is None else datetime.fromtimestamp(t, UTC)


def _info(i: _Info) -> ProcessInfo:
    return ProcessInfo(
        process_id=i.process_id, command=i.command[: wire.COMMAND_SHOWN_MAX], pid=i.pid, running=i.running,
        exit_code=i.exit, signal=i.signal, started_at=_when(i.started_at) or datetime.now(UTC),
        ended_at=_when(i.ended_at), output_bytes=i.written, dropped_bytes=min(i.dropped, i.written),
    )  # fmt: skip


def started_result(name: str, ok: dict[str, Any]) -> ProcessStarted:
    s = _parse(_Started, ok, name)
    return ProcessStarted(process_id=s.process_id, pid=s.pid, state="running")


def info_result(name: str, ok: dict[str, Any]) -> ProcessInfo:
    return _info(_parse(_Stopped, ok, name).info)


def list_result(name: str, ok: dict[str, Any]) -> ProcessList:
    return ProcessList(processes=[_info(i) for i in _parse(_Listed, ok, name).processes])


def wait_result(name: str, ok: dict[str, Any]) -> ProcessWait:
    w = _parse(_Waited, ok, name)
    return ProcessWait(matched=w.matched, running=w.info.running, exit_code=w.info.exit, signal=w.info.signal,
                       next_cursor=w.next_cursor)  # fmt: skip


def _incomplete_utf8_tail(data: bytes) -> int:
    """How many bytes at the end of ``data`` start a UTF-8 character that is not complete yet (0-3)."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the lead
            continue
        need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return back if need > back else 0
    return 0


def output_result(name: str, ok: dict[str, Any], cursor: int, max_bytes: int) -> ProcessOutput:
    """The tool's result for a proc_read reply; the cursor arithmetic is checked against what came.

    A character cut at the end is left for the next read (next_cursor stops before it), unless the
    process has ended and nothing will complete it.
    """
    r = _parse(_Read, ok, name)
    chunks: list[tuple[int, bytes]] = []
    for fd, text in r.runs:
        try:
            chunks.append((fd, base64.b64decode(text, validate=True)))
        except (binascii.Error, ValueError):
            raise SSHError(f"the exec agent in workspace {name!r} sent output that is not base64") from None
    total = sum(len(d) for _, d in chunks)
    if r.end - r.start != total or total > max_bytes or r.end > r.info.written or r.start < min(cursor, r.info.written):
        raise SSHError(f"the exec agent in workspace {name!r} sent output that does not add up; restart the workspace")
    end = r.end
    more = end < r.info.written
    if chunks and (more or r.info.running):
        cut = _incomplete_utf8_tail(chunks[-1][1])
        if 0 < cut < total:
            fd, data = chunks[-1]
            chunks[-1] = (fd, data[:-cut])
            end -= cut
    out = b"".join(d for fd, d in chunks if fd == 1)
    err = b"".join(d for fd, d in chunks if fd == 2)
    return ProcessOutput(
        stdout=out.decode("utf-8", errors="replace"), stderr=err.decode("utf-8", errors="replace"),
        next_cursor=end, running=r.info.running, exit_code=r.info.exit, signal=r.info.signal,
        dropped_bytes=max(0, r.start - cursor), more=end < r.info.written,
    )  # fmt: skip


def checked_wait_s(wait_s: float) -> float:
    """Raises InvalidSpec unless 0 <= wait_s <= 60."""
    if not (math.isfinite(wait_s) and 0 <= wait_s <= 60):
        raise InvalidSpec(f"wait_s must be between 0 and 60 seconds, got {wait_s!r}")
    return wait_s


def checked_signal(signal: str) -> str:
    """``signal`` without a 'SIG' prefix, upper case; raises InvalidSpec for one not offered."""
    sig = signal.upper().removeprefix("SIG")
    if sig not in wire.SIGNALS:
        raise InvalidSpec(f"signal {clip_repr(signal)} is not offered; use one of {', '.join(wire.SIGNALS)}")
    return sig
