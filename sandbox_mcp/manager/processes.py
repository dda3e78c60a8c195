"""Background processes: the host side of start_process, process_output, wait_process, stop_process and
list_processes (the processes themselves live inside the workspace, run by its exec agent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import claude_workspace, processes, ssh
from ..errors import InvalidSpec
from ..models import ProcessInfo, ProcessList, ProcessOutput, ProcessStarted, ProcessWait, WorkspaceRecord
from ..naming import validate_name
from ..ssh.agent_ops import agent_op

if TYPE_CHECKING:
    from . import WorkspaceManager as _Manager
else:
    _Manager = object

__all__ = ["ProcessOps"]

# A guest under emulation (a VM under TCG) answers an agent request slowly: on top of any wait.
_SLOW_GUEST_S = 30.0


class ProcessOps(_Manager):
    """start_process, process_output, wait_process, stop_process, list_processes."""

    async def _agent_op(
        self, record: WorkspaceRecord, process_id: str | None, request: dict, timeout_s: float, *, retry: bool
    ) -> dict:
        """One process request to the workspace's exec agent; its checked ``ok`` part (see processes.py)."""
        reply = await self._ssh_call(
            record,
            lambda t: agent_op(self.ssh, t, request, timeout_s=timeout_s, reply_cap=processes.reply_cap(request),
                               retry=retry),
        )
        return processes.check_reply(record.name, process_id, reply)

    async def start_process(
        self,
        name: str,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        process_id: str | None = None,
        *,
        owner_uid: int | None = None,
    ) -> ProcessStarted:
        """Start ``command`` detached in the workspace (see :mod:`processes`); returns its id and PID.

        Raises:
            InvalidSpec: a bad command, cwd, env or process_id; an id in use; too many processes.
            WorkspaceNotFound, InvalidState (not running), SSHError.
        """
        validate_name(name)
        process_id = processes.validate_process_id(process_id) if process_id is not None else processes.new_process_id()
        workspace_dir = claude_workspace.workspace_dir_inside(self.settings.user)
        wd = ssh.resolve_path(workspace_dir, cwd) if cwd is not None else workspace_dir
        if not command.strip():
            raise InvalidSpec("command must not be empty")
        ssh.build_exec_command(command, cwd=wd, env=env, timeout_s=1)  # validates command, cwd and env
        record = await self._running(name, owner_uid)
        request = processes.start_request(process_id, command, wd, dict(env or {}), self.settings.process_output_cap)
        ok = await self._agent_op(record, process_id, request, 30 + _SLOW_GUEST_S, retry=False)
        return processes.started_result(name, ok)

    async def process_output(
        self,
        name: str,
        process_id: str,
        cursor: int = 0,
        wait_s: float = 0,
        max_bytes: int = 65536,
        *,
        owner_uid: int | None = None,
    ) -> ProcessOutput:
        """Output of a process from ``cursor`` (bytes of both streams in arrival order), waiting up to ``wait_s``.

        Raises:
            InvalidSpec (also ProcessNotFound), WorkspaceNotFound, InvalidState, SSHError.
        """
        validate_name(name)
        processes.validate_process_id(process_id)
        if cursor < 0:
            raise InvalidSpec("cursor must be ≥ 0 (0 reads from the start; pass next_cursor to read on)")
        if not 1 <= max_bytes <= processes.MAX_READ_BYTES:
            raise InvalidSpec(f"max_bytes must be between 1 and {processes.MAX_READ_BYTES}")
        processes.checked_wait_s(wait_s)
        record = await self._running(name, owner_uid)
        request = processes.read_request(process_id, cursor, max_bytes, wait_s)
        ok = await self._agent_op(record, process_id, request, wait_s + _SLOW_GUEST_S, retry=True)
        return processes.output_result(name, ok, cursor, max_bytes)

    async def wait_process(
        self,
        name: str,
        process_id: str,
        until: str = "exit",
        timeout_s: float = 60,
        cursor: int = 0,
        *,
        owner_uid: int | None = None,
    ) -> ProcessWait:
        """Wait until the process exits, listens on a port, or prints a line matching a regex (``until``).

        Raises:
            InvalidSpec (a bad until or regex; ProcessNotFound), WorkspaceNotFound, InvalidState, SSHError.
        """
        validate_name(name)
        processes.validate_process_id(process_id)
        until = processes.parse_until(until)
        if not 0 <= timeout_s <= processes.wire.WAIT_MAX_S:
            raise InvalidSpec(f"timeout_s must be between 0 and {processes.wire.WAIT_MAX_S:g}")
        if cursor < 0:
            raise InvalidSpec("cursor must be ≥ 0")
        record = await self._running(name, owner_uid)
        request = processes.wait_request(process_id, until, cursor, timeout_s)
        ok = await self._agent_op(record, process_id, request, timeout_s + _SLOW_GUEST_S, retry=True)
        return processes.wait_result(name, ok)

    async def stop_process(
        self,
        name: str,
        process_id: str,
        signal: str = "TERM",
        grace_s: float = 5,
        *,
        owner_uid: int | None = None,
    ) -> ProcessInfo:
        """Send ``signal`` to the process's whole tree, then KILL what is left after ``grace_s``; its final state.

        Raises:
            InvalidSpec (a bad signal or grace; ProcessNotFound), WorkspaceNotFound, InvalidState, SSHError.
        """
        validate_name(name)
        processes.validate_process_id(process_id)
        sig = processes.checked_signal(signal)
        if not 0 <= grace_s <= 300:
            raise InvalidSpec("grace_s must be between 0 and 300 seconds")
        record = await self._running(name, owner_uid)
        request = processes.stop_request(process_id, sig, grace_s)
        ok = await self._agent_op(record, process_id, request, grace_s + 5 + _SLOW_GUEST_S, retry=True)
        return processes.info_result(name, ok)

    async def list_processes(self, name: str, *, owner_uid: int | None = None) -> ProcessList:
        """The workspace's processes (since it last started), running and exited.

        Raises:
            WorkspaceNotFound, InvalidState (not running: a stopped workspace has no processes), SSHError.
        """
        validate_name(name)
        record = await self._running(name, owner_uid)
        ok = await self._agent_op(record, None, processes.list_request(), _SLOW_GUEST_S, retry=True)
        return processes.list_result(name, ok)
