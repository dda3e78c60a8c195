"""Drive the exec agent (sandbox_mcp/exec_agent.py) over its stdin/stdout, as the SSH pool does.

The agent runs as a real process: locally (``python3 -I -S -u PATH``) or behind a real sshd
(the same command through the OpenSSH client). Tests write JSON lines, several in one write
when the order in which the agent sees them matters, and read its replies with an upper bound
that only stops a hung test.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sandbox_mcp.exec_agent as exec_agent

from .points import HUNG_S

__all__ = ["AgentPipe", "agent_command", "request"]


def agent_command(python: str = sys.executable) -> list[str]:
    """The argv that runs the agent as the pool runs it (isolated, unbuffered, by path): here from this checkout."""
    return [python, "-I", "-S", "-u", str(Path(exec_agent.__file__).resolve())]


def request(rid: int, command: str, cwd: Path | str, *, timeout: float = 60.0, **extra: Any) -> dict[str, Any]:
    """One exec request in the agent's protocol."""
    return {"id": rid, "command": command, "cwd": str(cwd), "env": {}, "stdin": None, "timeout": timeout,
            "cap": 1 << 20, **extra}


class AgentPipe:
    """A running agent process and the replies read from it so far."""

    def __init__(self, argv: Sequence[str], pass_fds: Sequence[int] = ()) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, pass_fds=tuple(pass_fds))
        self.messages: list[dict[str, Any]] = []
        self._buf = b""
        assert self.next_message().get("ready") == 1, self.stderr_tail()

    def send(self, *messages: dict[str, Any]) -> None:
        """Write ``messages`` in one write(2), so the agent reads them together."""
        assert self.proc.stdin is not None
        data = b"".join(json.dumps(m).encode() + b"\n" for m in messages)
        assert len(data) <= select.PIPE_BUF, "one write of at most PIPE_BUF bytes arrives whole"
        os.write(self.proc.stdin.fileno(), data)

    def next_message(self) -> dict[str, Any]:
        """The next line the agent sends; fails the test if none comes."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            if not select.select([fd], [], [], HUNG_S)[0]:
                raise AssertionError(f"the agent sent nothing for {HUNG_S} s; stderr: {self.stderr_tail()}")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise AssertionError(f"the agent exited; stderr: {self.stderr_tail()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        message = json.loads(line)
        self.messages.append(message)
        return message

    def reply(self, rid: int) -> dict[str, Any]:
        """The final reply to request ``rid`` (reading past other messages, which are kept)."""
        for message in self.messages:
            if message.get("id") == rid and "started" not in message:
                return message
        while True:
            message = self.next_message()
            if message.get("id") == rid and "started" not in message:
                return message

    def started(self, rid: int) -> bool:
        """Whether the agent reported starting ``rid`` (among the messages read so far)."""
        return any(m.get("id") == rid and "started" in m for m in self.messages)

    def stderr_tail(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def stderr_after_exit(self) -> str:
        """Close the agent's stdin, wait for it to end and return all it wrote to stderr."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        self.proc.wait(HUNG_S)
        return self.proc.stderr.read().decode(errors="replace")

    def close(self) -> None:
        """Close the agent's stdin (as a closed channel does) and wait for it; kill it if it hangs."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(HUNG_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
