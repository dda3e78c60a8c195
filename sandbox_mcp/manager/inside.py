"""Inside a running workspace: exec (with the result budget and the limit hints) and the file tools."""

from __future__ import annotations

import base64
import contextlib
import re
from typing import TYPE_CHECKING

import anyio

from .. import budget, limit_hints, ssh
from ..errors import InvalidSpec, SandboxError, clip_repr
from ..models import DirListing, ExecResult, FileContent, WorkspaceRecord, WriteResult
from ..output_relay import OutputRelay
from ..progress import Progress

if TYPE_CHECKING:
    from . import WorkspaceManager as _Manager
else:
    _Manager = object

__all__ = ["InsideOps", "parse_mode"]

_MODE_RE = re.compile(r"^0?[0-7]{3}$")


def parse_mode(mode: str | int | None) -> int | None:
    """Accept a file mode as octal text ('644', '0755') or an int; None keeps the default.

    Raises:
        InvalidSpec: anything else.
    """
    if mode is None or isinstance(mode, int):
        if isinstance(mode, int) and not 0 <= mode <= 0o777:
            raise InvalidSpec(f"mode {mode} is out of range; use octal text such as '644' or '755'")
        return mode
    if not _MODE_RE.fullmatch(mode):
        raise InvalidSpec(f"mode {clip_repr(mode)} is not an octal file mode; use e.g. '644' or '0755'")
    return int(mode, 8)


class InsideOps(_Manager):
    """exec, read_file, write_file, list_dir."""

    async def exec(
        self,
        name: str,
        command: str,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 120,
        stdin: str | None = None,
        progress: Progress | None = None,
        *,
        owner_uid: int | None = None,
    ) -> ExecResult:
        """Run a shell command as the workspace user. See :meth:`ssh.SSHPool.exec`.

        Each stream keeps its head and tail within what a result carries (:func:`budget.exec_keep`,
        at most ``exec_output_cap``); a longer one is saved whole in the workspace (``exec_save_mib``).
        ``progress``: the output also goes there while the command runs (see :mod:`output_relay`);
        the result is the same either way.
        """
        record = await self._running(name, owner_uid)
        budget_bytes = self.settings.result_budget_bytes
        keep = min(self.settings.exec_output_cap, budget.exec_keep(budget_bytes))
        relay = OutputRelay(progress) if progress is not None else None

        def call(t: ssh.SSHTarget):  # type: ignore[no-untyped-def]
            return self.ssh.exec(
                t, command, cwd=cwd, env=env, stdin=stdin, timeout_s=timeout_s, output_cap=keep,
                save_max=self.settings.exec_save_mib << 20, save_over=min(keep, budget.exec_save_over(budget_bytes)),
                on_output=relay.feed if relay else None,
            )  # fmt: skip

        if relay is None:
            return await self._with_hint(record, await self._ssh_call(record, call), timeout_s)
        outcome: ExecResult | BaseException
        async with anyio.create_task_group() as tg:
            tg.start_soon(relay.run)
            try:
                outcome = await self._ssh_call(record, call)
            except Exception as exc:  # raised outside the task group, so not wrapped in a group
                outcome = exc
            tg.cancel_scope.cancel()
        await relay.close()  # every notification before the result
        if isinstance(outcome, BaseException):
            raise outcome
        return await self._with_hint(record, outcome, timeout_s)

    async def _with_hint(self, record: WorkspaceRecord, result: ExecResult, timeout_s: float) -> ExecResult:
        """``result`` with a hint naming the limit the command ran into, if it did (:mod:`.limit_hints`)."""
        hint = limit_hints.timeout_hint(timeout_s) if result.timed_out else None
        if limit_hints.maybe_oom_killed(result):
            runtime = self._runtime_of(record)
            kills = await runtime.oom_kills(record)
            if kills is None and runtime.own_kernel:
                with contextlib.suppress(SandboxError):
                    probe = await self.ssh.exec(self._target(record), limit_hints.OOM_PROBE, timeout_s=15,
                                                output_cap=4096)  # fmt: skip
                    kills = limit_hints.parse_oom_probe(probe.stdout)
            key = (record.name, record.started_at)  # counters start at 0 with each boot
            if kills is not None and kills > (seen := self._oom_seen.get(key, 0)):
                self._oom_seen[key] = kills
                hint = limit_hints.oom_hint(kills - seen, record.limits)
        hint = hint or limit_hints.disk_hint(result.stderr, record.limits)
        return result.model_copy(update={"hint": hint}) if hint else result

    async def read_file(
        self, name: str, path: str, offset: int = 0, limit: int | None = None, *, owner_uid: int | None = None
    ) -> FileContent:
        """Read up to ``limit`` bytes from ``offset``: by default, and at most, what one result carries
        (:func:`budget.read_limit`; ``truncated``/``next_offset`` say where to go on)."""
        if offset < 0:
            raise InvalidSpec("offset must be ≥ 0")
        room = min(budget.read_limit(self.settings.result_budget_bytes), self.settings.read_limit_max)
        limit = min(limit or room, room)
        record = await self._running(name, owner_uid)
        return await self._ssh_call(record, lambda t: self.ssh.read_file(t, path, offset=offset, limit=limit))

    async def write_file(
        self,
        name: str,
        path: str,
        content: str,
        encoding: str = "utf-8",
        append: bool = False,
        mode: str | int | None = None,
        *,
        owner_uid: int | None = None,
    ) -> WriteResult:
        """Write (or append) text or base64 content to a file, creating parent directories."""
        if encoding == "utf-8":
            data = content.encode()
        elif encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except ValueError as exc:
                raise InvalidSpec(f"content is not valid base64: {exc}") from exc
        else:
            raise InvalidSpec(f"encoding must be 'utf-8' or 'base64', not {clip_repr(encoding)}")
        if len(data) > self.settings.write_max:
            raise InvalidSpec(
                f"content is {len(data)} bytes; the limit is {self.settings.write_max}. "
                f"Write it in parts with append=true, or put it in the host workspace dir"
            )
        file_mode = parse_mode(mode)
        record = await self._running(name, owner_uid)
        return await self._ssh_call(
            record, lambda t: self.ssh.write_file(t, path, data, append=append, mode=file_mode)
        )

    async def list_dir(
        self, name: str, path: str = ".", offset: int = 0, limit: int | None = None, *, owner_uid: int | None = None
    ) -> DirListing:
        """List a directory in name order, ``limit`` entries (default: a page) from index ``offset``
        (relative paths resolve against the workspace dir)."""
        record = await self._running(name, owner_uid)
        page = limit or ssh.DEFAULT_LIST_PAGE
        return await self._ssh_call(record, lambda t: self.ssh.list_dir(t, path, offset, page))
