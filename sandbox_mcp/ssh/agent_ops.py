"""Process requests to a workspace's exec agent over the pool's connection (see sandbox_mcp/processes.py).

The pool's connection and agent are reused; a dead connection is replaced and a request without
effect sent again, once. What goes wrong becomes an :class:`~sandbox_mcp.errors.SSHError` that
says what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import SSHError
from .agent import AgentFault, AgentGone, AgentOutdated, run_agent_op
from .commands import EXEC_AGENT_PATH, SSHTarget
from .errors import agent_error, lost_error

if TYPE_CHECKING:
    from .pool import SSHPool

__all__ = ["agent_op"]


async def agent_op(
    pool: SSHPool, target: SSHTarget, request: dict[str, object], *, timeout_s: float, reply_cap: int, retry: bool
) -> dict[str, object]:
    """Send one process request to the workspace's exec agent; its reply, unchecked (processes.py checks it).

    ``retry``: the request has no effect (a read, a list): on a dead connection it is sent again
    on a new one, once.

    Raises:
        SSHError: the workspace cannot be reached, has no exec agent (or an outdated one), or the
            agent broke the protocol, did not answer within ``timeout_s`` or went away.
    """
    for attempt in (1, 2):
        entry = await pool._entry(target)
        agent = await pool._agent(entry)
        if agent is None:
            raise SSHError(
                f"{target.where} has no exec agent ({EXEC_AGENT_PATH} with /usr/bin/python3), which processes "
                "need (a NixOS workspace has it unless the module sets sandboxed-workspace.execAgent.enable = "
                "false); use exec with a command that redirects its output to a file instead"
            )
        try:
            return await run_agent_op(agent, request, timeout_s, reply_cap)
        except AgentOutdated as exc:
            raise SSHError(
                f"the exec agent in {target.where} is older than this server ({exc}); restart the workspace "
                "(stop_workspace, start_workspace) to run the current one"
            ) from exc
        except AgentFault as exc:
            pool._discard(entry)
            raise agent_error(target, exc) from exc
        except TimeoutError as exc:
            raise SSHError(f"the exec agent in {target.where} did not answer: {exc}") from exc
        except AgentGone as exc:
            if entry.alive():
                entry.agent = None
                raise agent_error(target, exc) from exc
            pool._discard(entry)
            if attempt == 2 or not retry:
                raise lost_error(target, str(request.get("op")), exc) from exc
    raise AssertionError("unreachable")
