"""Background processes in a workspace: start_process, process_output, wait_process, stop_process, list_processes.

The process runs inside the workspace under a supervisor the exec agent starts; its output stays
there (see :mod:`sandbox_mcp.processes` and the agent's process section).
"""

from __future__ import annotations

from typing import Annotated, Literal

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from ..exec_agent import PROCESS_ID_PATTERN, READ_MAX, WAIT_MAX_S
from ..models import Name, ProcessInfo, ProcessList, ProcessOutput, ProcessStarted, ProcessWait
from .base import ToolContext, tool, workspaces

__all__ = ["register"]

ProcessId = Annotated[
    str,
    Field(description="The id start_process returned (or was given)", pattern=PROCESS_ID_PATTERN,
          examples=["web", "p-1a2b3c4d"]),
]


def register(mcp: MCPServer) -> None:
    """Add this module's tools to ``mcp``."""

    @tool(mcp, title="Start a background process")
    async def start_process(
        ctx: ToolContext,
        name: Name,
        command: Annotated[
            str, Field(description="Shell command line run by sh -c, e.g. 'python3 -m http.server 8000'", min_length=1)
        ],
        cwd: Annotated[
            str | None, Field(description="Working directory; relative paths resolve against the workspace directory")
        ] = None,
        env: Annotated[dict[str, str] | None, Field(description="Extra environment variables")] = None,
        process_id: Annotated[
            str | None,
            Field(description="Your name for it (1-40 letters, digits, '_', '.', '-'); omit to get one",
                  pattern=PROCESS_ID_PATTERN),
        ] = None,
    ) -> ProcessStarted:
        """Start a long-running command (a server, a watcher, a long build) in the background of a running
        workspace, as the workspace user, and return at once with its process_id.

        Use this instead of exec for anything that runs longer than you want to wait, or that you want to
        watch or stop (exec blocks until the command ends; `cmd &` in exec leaves a process nothing tracks).
        Its output (stdout and stderr) is kept inside the workspace, the last 1 MiB by default, and survives
        a server restart or reconnect: read it with process_output, wait for it to be ready with
        wait_process (until='port:8000' or 'output:Listening'), end it with stop_process. To reach a server
        from the host, publish_port. A workspace restart ends all its processes.

        Errors: a process_id in use -> pick another; too many processes -> stop_process one; a stopped
        workspace -> start_workspace first.
        """
        return await workspaces(ctx).start_process(name, command, cwd, env, process_id)

    @tool(mcp, title="Read a process's output", read_only=True, idempotent=True)
    async def process_output(
        ctx: ToolContext,
        name: Name,
        process_id: ProcessId,
        cursor: Annotated[
            int, Field(description="Where to read from: 0 for the start, else the next_cursor of the last call", ge=0)
        ] = 0,
        wait_s: Annotated[
            float, Field(description="Wait up to this long for new output (or the exit) when there is none yet", ge=0,
                         le=60)
        ] = 0,
        max_bytes: Annotated[int, Field(description="At most this many bytes of output", ge=1, le=READ_MAX)] = 65536,
    ) -> ProcessOutput:
        """Read a background process's output from cursor on: stdout and stderr separately, next_cursor (pass it
        as cursor next time: no line is returned twice or skipped), whether it still runs and its exit_code.

        The cursor counts bytes of both streams in the order they arrived. Only the last part of a very
        chatty process's output is kept: dropped_bytes says how much was gone before your cursor's place.
        more=true means more output is already there (call again at once). To follow a process, call with
        wait_s (up to 60) in a loop.
        """
        return await workspaces(ctx).process_output(name, process_id, cursor, wait_s, max_bytes)

    @tool(mcp, title="Wait for a process", read_only=True)
    async def wait_process(
        ctx: ToolContext,
        name: Name,
        process_id: ProcessId,
        until: Annotated[
            str,
            Field(description="'exit' (it ended), 'port:N' (something in the workspace listens on TCP port N) or "
                  "'output:REGEX' (a line of its output matches the Python regex)",
                  examples=["exit", "port:8000", "output:Listening on"], min_length=1, max_length=1010),
        ] = "exit",
        timeout_s: Annotated[float, Field(description="Give up after this many seconds", ge=0, le=WAIT_MAX_S)] = 60,
        cursor: Annotated[int, Field(description="For output:REGEX: search from here (0: all output kept)", ge=0)] = 0,
    ) -> ProcessWait:
        """Wait until a background process exits, listens on a port, or prints a matching line.

        Returns matched (false when the timeout passed or the process exited first: read its output with
        process_output to see why), running, exit_code and next_cursor (after the matching line, for
        output:REGEX). A regex that does not compile is an error before anything waits.
        """
        return await workspaces(ctx).wait_process(name, process_id, until, timeout_s, cursor)

    @tool(mcp, title="Stop a process", destructive=True, idempotent=True)
    async def stop_process(
        ctx: ToolContext,
        name: Name,
        process_id: ProcessId,
        signal: Annotated[
            Literal["TERM", "INT", "HUP", "KILL", "QUIT", "USR1", "USR2"],
            Field(description="The signal sent first, to the process and everything it started"),
        ] = "TERM",
        grace_s: Annotated[
            float, Field(description="Seconds to wait before KILL of whatever is left", ge=0, le=300)
        ] = 5,
    ) -> ProcessInfo:
        """Stop a background process and everything it started: the signal first, KILL after grace_s. Returns
        its final state (exit_code, or the signal that ended it). Its output stays readable with
        process_output. Stopping an ended process returns its state."""
        return await workspaces(ctx).stop_process(name, process_id, signal, grace_s)

    @tool(mcp, title="List processes", read_only=True, idempotent=True)
    async def list_processes(ctx: ToolContext, name: Name) -> ProcessList:
        """The background processes of a running workspace since it last started, running and ended (with
        exit_code or signal), with how much output each wrote."""
        return await workspaces(ctx).list_processes(name)
