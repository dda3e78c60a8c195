"""Running commands in a workspace: the exec tool."""

from __future__ import annotations

from typing import Annotated

from mcp.server.mcpserver import MCPServer
from pydantic import Field

from ..models import ExecResult, Name
from .base import ToolContext, output_progress_of, tool, workspaces

__all__ = ["register"]


def register(mcp: MCPServer) -> None:
    """Add this module's tools to ``mcp``."""

    @tool(mcp, title="Run a command in a workspace")
    async def exec(
        ctx: ToolContext,
        name: Name,
        command: Annotated[
            str,
            Field(description="Shell command line run by sh -c, e.g. 'make test 2>&1 | tail -50'", min_length=1),
        ],
        cwd: Annotated[
            str | None,
            Field(description="Working directory; relative paths resolve against the workspace directory"),
        ] = None,
        env: Annotated[dict[str, str] | None, Field(description="Extra environment variables")] = None,
        timeout_s: Annotated[
            float, Field(description="Seconds before the command is killed (with its children)", gt=0, le=86400)
        ] = 120,
        stdin: Annotated[str | None, Field(description="Text fed to the command's standard input")] = None,
    ) -> ExecResult:
        """Run a shell command in a running workspace as the (non-root) workspace user, who has passwordless
        sudo, and wait for it to end. The default cwd is the workspace directory. Not a login shell: no
        profile files are read.

        Returns exit_code, stdout and stderr (separately), timed_out and duration_ms. Long output is cut to
        fit the result (about 24 KB at the default budget, 12 KB each when both streams are long):
        truncated=true, its head and tail are kept with a marker line where the middle was left out;
        stdout_omitted/stderr_omitted count the bytes left out and stdout_path/stderr_path name a file in
        the workspace with the whole stream (page it with read_file, offset/next_offset).
        stdout_bytes/stderr_bytes are the whole sizes. On timeout the command and its children are killed
        and timed_out=true. hint, when set, names the limit the command ran into (its timeout, memory, a
        full disk) and what to do. When the request carries a progressToken, the output also arrives as
        progress notifications while it runs. For a server or anything you want to leave running, watch or stop,
        use start_process instead. If the workspace is stopped, call start_workspace first.
        """
        return await workspaces(ctx).exec(name, command, cwd, env, timeout_s, stdin, output_progress_of(ctx))
