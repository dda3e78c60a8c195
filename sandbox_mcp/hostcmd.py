"""Host commands as data, and one way to run them.

The ``*_argv`` functions are pure: they validate their inputs and return the argv a
step would run, so tests compare them exactly without a host. :func:`run` is the only
place that starts a host process; it streams output lines, enforces a timeout that kills
the process (not only the wait), and turns failures into :mod:`sandbox_mcp.errors`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import anyio
from anyio.abc import ByteReceiveStream, Process

from .errors import BackendError, CommandFailed, CommandTimeout, InvalidSpec

__all__ = [
    "SYSTEMCTL_ACTIONS",
    "CompletedRun",
    "Escalation",
    "LineCallback",
    "escalate",
    "journalctl_argv",
    "run",
    "systemctl_argv",
    "systemctl_show_argv",
]

Escalation = Literal["doas", "sudo", "none"]
LineCallback = Callable[[str], Awaitable[None]]

SYSTEMCTL_ACTIONS = frozenset({"start", "stop", "restart", "reset-failed"})
# systemd unit names: no leading '-' so a name can never be read as an option.
_UNIT_RE = re.compile(r"^[A-Za-z0-9_@:][A-Za-z0-9_@:.\\-]{0,250}$")
_PROPERTY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*$")
_MAX_LOG_LINES = 100_000
_KEEP_BYTES = 4 << 20  # per stream; the tail is what errors quote
_TERM_GRACE_S = 5.0  # SIGTERM first: sudo/doas relay it to the root child, which SIGKILL could not reach

_INSTALL_HINTS = {
    "nixos-rebuild": "it ships with NixOS; nixos mode only works on a NixOS host",
    "systemctl": "install systemd (the host must run systemd)",
    "journalctl": "install systemd (the host must run systemd)",
    "git": "install git (NixOS: environment.systemPackages = [ pkgs.git ];), or keep the flake outside git",
    "doas": "enable it (NixOS: security.doas.enable = true;) or set [runtimes.nixos] escalation to 'sudo' or 'none'",
    "sudo": "enable it (NixOS: security.sudo.enable = true;) or set [runtimes.nixos] escalation to 'doas' or 'none'",
    "nft": "apt-get install nftables (needed only with SANDBOX_MCP_NAT=true)",
    "debootstrap": "apt-get install debootstrap (it builds the root image once)",
    "systemd-nspawn": "apt-get install systemd-container",
}


@dataclass(frozen=True)
class CompletedRun:
    """A finished host command. ``stdout``/``stderr`` keep at most the last 4 MiB each."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def escalate(argv: Sequence[str], escalation: Escalation) -> list[str]:
    """Prefix ``argv`` so it runs as root: ``doas -n …``, ``sudo -n …`` or unchanged for ``"none"``.

    ``-n`` makes both fail instead of prompting for a password the server could never type.

    Raises:
        InvalidSpec: unknown escalation.
    """
    if escalation == "none":
        return list(argv)
    if escalation in ("doas", "sudo"):
        return [escalation, "-n", *argv]
    raise InvalidSpec(f"unknown escalation {escalation!r}; use 'doas', 'sudo' or 'none'")


def _check_unit(unit: str) -> str:
    if not isinstance(unit, str) or not _UNIT_RE.fullmatch(unit):
        raise InvalidSpec(f"{unit!r} is not a valid systemd unit name")
    return unit


def systemctl_argv(action: str, unit: str, escalation: Escalation) -> list[str]:
    """``systemctl <action> <unit>``, escalated.

    Raises:
        InvalidSpec: an action outside :data:`SYSTEMCTL_ACTIONS` or a malformed unit name.
    """
    if action not in SYSTEMCTL_ACTIONS:
        raise InvalidSpec(f"systemctl action {action!r} is not one of {sorted(SYSTEMCTL_ACTIONS)}")
    return escalate(["systemctl", action, _check_unit(unit)], escalation)


def systemctl_show_argv(unit: str, props: Sequence[str]) -> list[str]:
    """``systemctl show -p A,B <unit>``: read-only, so not escalated.

    Prints ``Key=Value`` lines rather than ``--value``, because systemctl prints properties
    in its own order, not the order asked for, so bare values cannot be matched up reliably.

    Raises:
        InvalidSpec: no properties, a malformed property or unit name.
    """
    if not props or any(not _PROPERTY_RE.fullmatch(p) for p in props):
        raise InvalidSpec(f"invalid systemd property list {list(props)!r}")
    return ["systemctl", "show", "-p", ",".join(props), _check_unit(unit)]


def journalctl_argv(unit: str, lines: int) -> list[str]:
    """``journalctl -u <unit> -n <lines> --no-pager -o short-iso``.

    Not escalated: members of the ``wheel``/``systemd-journal`` groups read the system journal.

    Raises:
        InvalidSpec: a malformed unit or ``lines`` outside 1..100000.
    """
    if isinstance(lines, bool) or not isinstance(lines, int) or not 1 <= lines <= _MAX_LOG_LINES:
        raise InvalidSpec(f"lines must be between 1 and {_MAX_LOG_LINES}, got {lines!r}")
    return ["journalctl", "-u", _check_unit(unit), "-n", str(lines), "--no-pager", "-o", "short-iso"]


class _Collector:
    """Splits a byte stream into lines, forwards each, and keeps the last ``_KEEP_BYTES``."""

    def __init__(self, on_line: LineCallback | None) -> None:
        self.on_line = on_line
        self.kept = bytearray()
        self._partial = b""

    async def _emit(self, raw: bytes) -> None:
        if self.on_line is not None:
            await self.on_line(raw.decode("utf-8", "replace").rstrip("\r"))

    async def pump(self, stream: ByteReceiveStream | None) -> None:
        if stream is None:
            return
        async for chunk in stream:
            self.kept += chunk
            if len(self.kept) > _KEEP_BYTES:
                del self.kept[: len(self.kept) - _KEEP_BYTES]
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            if len(self._partial) > _KEEP_BYTES:  # a "line" this long is not one; pass it on in pieces
                lines.append(self._partial)
                self._partial = b""
            for raw in lines:
                await self._emit(raw)
        if self._partial:
            await self._emit(self._partial)
            self._partial = b""

    def text(self) -> str:
        return self.kept.decode("utf-8", "replace")


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _terminate(process: Process) -> None:
    """Stop the process and everything in its process group: SIGTERM, a grace period, then SIGKILL."""
    _signal_group(process.pid, signal.SIGTERM)
    with anyio.move_on_after(_TERM_GRACE_S):
        await process.wait()
    _signal_group(process.pid, signal.SIGKILL)  # also reaps stragglers the leader left behind
    if process.returncode is None:
        await process.wait()


async def run(
    argv: Sequence[str],
    *,
    timeout_s: float,
    on_line: LineCallback | None = None,
    check: bool = True,
    stdin: bytes | None = None,
) -> CompletedRun:
    """Run a host command without a shell, stdin closed (or fed ``stdin``), and wait for it.

    Each line of stdout and stderr is passed to ``on_line`` as it arrives (interleaved in
    arrival order, without the newline). The command runs in its own process group; on
    timeout or cancellation the whole group gets SIGTERM, then SIGKILL after 5 s.

    Raises:
        CommandFailed: it exited non-zero and ``check`` is true (argv, status, stderr tail —
            stdout's tail when stderr is empty).
        CommandTimeout: it ran longer than ``timeout_s``; it has been killed.
        BackendError: the program does not exist (the message says how to install it) or
            cannot be executed.
    """
    args = [str(a) for a in argv]
    if not args:
        raise InvalidSpec("empty command")
    try:
        process = await anyio.open_process(
            args,
            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError as exc:
        hint = _INSTALL_HINTS.get(os.path.basename(args[0]), "install it or put it on the server's PATH")
        raise BackendError(f"program {args[0]!r} not found: {hint}") from exc
    except PermissionError as exc:
        raise BackendError(f"program {args[0]!r} cannot be executed: {exc}") from exc

    out, err = _Collector(on_line), _Collector(on_line)
    finished = False
    try:
        with anyio.move_on_after(timeout_s) as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(out.pump, process.stdout)
                tg.start_soon(err.pump, process.stderr)
                if stdin is not None and process.stdin is not None:
                    async with process.stdin:
                        await process.stdin.send(stdin)
            await process.wait()
            finished = True
    finally:
        # On timeout, cancellation or an error from on_line, stop the whole group, even when the
        # leader has exited and only a child holding the pipes open is left.
        if not finished:
            with anyio.CancelScope(shield=True):
                await _terminate(process)
        with anyio.CancelScope(shield=True):
            await process.aclose()
    if scope.cancelled_caught:
        raise CommandTimeout(
            f"{args[0]} did not finish within {timeout_s:g} s and was killed: {' '.join(args)}"
        )
    assert process.returncode is not None
    done = CompletedRun(tuple(args), process.returncode, out.text(), err.text())
    if check and done.returncode != 0:
        raise CommandFailed(args, done.returncode, done.stderr or done.stdout)
    return done
