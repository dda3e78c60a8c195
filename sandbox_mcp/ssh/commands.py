"""Pure builders: where a workspace's sshd is, and the exact strings and argv we send it.

Nothing here talks to a network or imports asyncssh; every function is tested by comparing
its output exactly.
"""

from __future__ import annotations

import base64
import posixpath
import re
import secrets
import shlex
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidSpec, clip_repr
from ..paths import EXEC_AGENT_PATH

__all__ = [
    "CLIENT_GRACE_S",
    "DETACHED_NOTE",
    "EXEC_SAVE_DIR",
    "EXEC_SAVE_KEEP",
    "EXEC_AGENT_PATH",
    "KILL_AFTER_S",
    "PID_MARKER",
    "PYTHON_PATH",
    "SSHTarget",
    "agent_command",
    "agent_request",
    "build_exec_command",
    "check_no_nul",
    "encode_chunk",
    "resolve_path",
    "save_request",
    "signal_note",
    "ssh_argv",
]

PID_MARKER = "SBXPID"
KILL_AFTER_S = 2  # `timeout --kill-after`: SIGTERM first, SIGKILL this much later
# The client's own deadline lies past the workspace-side one, so normally that fires first;
# the client deadline catches a wedged sshd or agent, or output held open by a stray process.
CLIENT_GRACE_S = KILL_AFTER_S + 3

DETACHED_NOTE = (
    "\n[sandbox-mcp] the command exited, but a background process still holds its stdout/stderr; "
    "stopped reading. Redirect a background process's output (cmd > log 2>&1 &) to keep it.\n"
)

# The interpreter that runs the exec agent (installed at paths.EXEC_AGENT_PATH). Absolute: starting
# the agent involves no PATH lookup in the workspace user's environment.
PYTHON_PATH = "/usr/bin/python3"

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SAFE_REMOTE_PATH_RE = re.compile(r"^/[A-Za-z0-9_./+-]+$")


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to reach one workspace's sshd.

    ``host_key_path`` is the pinned public key file, or the private key file whose public half
    is pinned; ``workspace_dir`` is the absolute project directory inside the workspace.
    ``host_key_fingerprint``, when set, is the key the caller looked up: a workspace replaced under
    the same name since then (a new key at the same path) is refused, not connected to.
    """

    key: str
    host: str
    user: str
    host_key_path: Path
    client_key_path: Path
    workspace_dir: str
    port: int = 22
    host_key_fingerprint: str = ""

    def __post_init__(self) -> None:
        if not posixpath.isabs(self.workspace_dir):
            raise InvalidSpec(f"workspace_dir must be absolute, got {clip_repr(self.workspace_dir)}")
        if not 0 < self.port < 65536:
            raise InvalidSpec(f"port out of range: {self.port}")

    def same_sshd(self, other: SSHTarget) -> bool:
        """The same sshd, user and pinned host key (a fingerprint, not empty), whatever the key's path or name."""
        return bool(self.host_key_fingerprint) and (self.host, self.port, self.user, self.host_key_fingerprint) == (
            other.host, other.port, other.user, other.host_key_fingerprint)

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def _ssh_option_path(path: Path) -> str:
    # ssh splits option values on whitespace and expands % tokens; such paths would not mean
    # what they say, so refuse them rather than quote.
    s = str(path)
    if re.search(r"[\s\"'\\%]", s):
        raise InvalidSpec(f"path not usable in an ssh option (whitespace, quote or %): {clip_repr(s)}")
    return s


def ssh_argv(target: SSHTarget, known_hosts_file: Path, extra: Sequence[str] = ()) -> list[str]:
    """The OpenSSH client argv to reach ``target`` with its host key pinned.

    ``known_hosts_file`` must hold :func:`~sandbox_mcp.ssh.known_hosts_line` for the target. No
    user configuration is read (``-F /dev/null``), only our key is offered, nothing prompts, and an
    unknown or changed host key is refused. ``extra`` follows the host: more options (``-t``)
    and/or the remote command.

    Raises:
        InvalidSpec: a key or known_hosts path contains whitespace, quotes or ``%``.
    """
    return [
        "ssh",
        "-F", "/dev/null",
        "-i", _ssh_option_path(target.client_key_path),
        "-p", str(target.port),
        "-l", target.user,
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", f"UserKnownHostsFile={_ssh_option_path(known_hosts_file)}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "UpdateHostKeys=no",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "PreferredAuthentications=publickey",
        "-o", "BatchMode=yes",
        target.host,
        *extra,
    ]  # fmt: skip


def check_no_nul(what: str, value: str) -> None:
    """Refuse a string that a remote shell or SFTP path would cut at a NUL byte.

    Raises:
        InvalidSpec: ``value`` contains a NUL byte.
    """
    if "\0" in value:
        raise InvalidSpec(f"{what} must not contain NUL bytes")


def resolve_path(workspace_dir: str, path: str) -> str:
    """The absolute, normalised path inside the workspace: relative paths resolve against ``workspace_dir``.

    Raises:
        InvalidSpec: ``path`` is empty or contains a NUL byte.
    """
    if not path or not path.strip():
        raise InvalidSpec("path must not be empty; give a file path, absolute or relative to the workspace")
    check_no_nul("path", path)
    joined = posixpath.join(workspace_dir, path)
    norm = posixpath.normpath(joined)
    # normpath keeps a leading '//' (POSIX allows it to be special); inside a workspace it is just '/'
    return "/" + norm.lstrip("/")


def _fmt_seconds(seconds: float) -> str:
    # `timeout 0` means "no timeout", so never round down to 0
    s = f"{max(seconds, 0.001):.3f}".rstrip("0").rstrip(".")
    return s


def build_exec_command(
    command: str,
    *,
    cwd: str,
    env: Mapping[str, str] | None = None,
    timeout_s: float,
    kill_after_s: float = KILL_AFTER_S,
) -> str:
    """The remote command string ``exec`` sends (the user's shell runs it with ``-c``).

    It reports the shell's PID (a session leader under sshd, so also the process group of
    everything started below it) as the first stderr line, changes to ``cwd`` (a failure shows
    on stderr and exits non-zero), exports ``env``, and replaces itself with
    ``timeout --kill-after=K T sh -c COMMAND``.

    Raises:
        InvalidSpec: an env name is not ``[A-Za-z_][A-Za-z0-9_]*``, a value or the command holds a
            NUL byte, or ``timeout_s`` is not positive.
    """
    if not timeout_s > 0:
        raise InvalidSpec(f"timeout_s must be positive, got {timeout_s!r}")
    check_no_nul("command", command)
    check_no_nul("cwd", cwd)
    steps = [f"cd -- {shlex.quote(cwd)}"]
    if env:
        assignments = []
        for name, value in env.items():
            if not _ENV_NAME_RE.fullmatch(name):
                raise InvalidSpec(
                    f"invalid environment variable name {clip_repr(name)}: use letters, digits and _, "
                    f"not starting with a digit"
                )
            check_no_nul(f"env value of {name}", value)
            assignments.append(f"{name}={shlex.quote(value)}")
        steps.append("export " + " ".join(assignments))
    steps.append(
        f"exec timeout --kill-after={_fmt_seconds(kill_after_s)} {_fmt_seconds(timeout_s)} "
        f"sh -c {shlex.quote(command)}"
    )
    return f"printf '{PID_MARKER} %s\\n' \"$$\" >&2; " + " && ".join(steps)


def agent_command(agent_path: str = EXEC_AGENT_PATH, python: str = PYTHON_PATH) -> str:
    """The remote command that starts the exec agent installed at ``agent_path``.

    Both paths are absolute and plain, so the user's shell only ``exec``s them: no PATH lookup,
    no quoting. ``-I`` keeps the user's site-packages and PYTHON* variables out; ``-S`` skips
    ``site`` altogether (the agent needs the standard library only; ~1.3 ms of every start here);
    ``-u`` makes every reply line leave at once.

    Raises:
        InvalidSpec: a path is relative or holds characters other than letters, digits and ``_./+-``.
    """
    for what, path in (("exec agent path", agent_path), ("python path", python)):
        if not _SAFE_REMOTE_PATH_RE.fullmatch(path) or "/../" in f"{path}/":
            raise InvalidSpec(f"{what} must be a plain absolute path, got {clip_repr(path)}")
    return f"exec {python} -I -S -u {agent_path}"


def signal_note(signal: str) -> str:
    """The line appended to stderr when a command was killed by ``signal`` (e.g. ``KILL``)."""
    return f"\n[sandbox-mcp] the command was killed by signal {signal}\n"


def encode_chunk(data: bytes, at_eof: bool) -> tuple[str, str, int]:
    """Encode a file chunk for transport: ``(content, encoding, bytes_used)``.

    UTF-8 when it decodes; when more of the file follows and only a multibyte character is cut
    at the end, the chunk is shortened (by at most 3 bytes) so it decodes, and ``bytes_used``
    says how far it got. Anything else is base64 of the whole chunk.
    """
    try:
        return data.decode("utf-8"), "utf-8", len(data)
    except UnicodeDecodeError as exc:
        cut_at_end = exc.reason == "unexpected end of data" and exc.start >= len(data) - 3
        if not at_eof and cut_at_end and exc.start > 0:
            return data[: exc.start].decode("utf-8"), "utf-8", exc.start
    return base64.b64encode(data).decode("ascii"), "base64", len(data)


# Where the exec agent saves output too long for a result, relative to the workspace directory
# (on the host's disk, not in the container's memory-backed root; hidden from git by a .gitignore
# the agent writes there), and how many commands' output it keeps there.
EXEC_SAVE_DIR = ".sandbox-mcp/exec"
EXEC_SAVE_KEEP = 8


def agent_request(command: str, cwd: str, env: Mapping[str, str] | None, timeout_s: float, stdin: bytes | None,
                  cap: int, save: dict[str, object] | None) -> dict[str, object]:  # fmt: skip
    """One exec request for the exec agent (:mod:`sandbox_mcp.exec_agent`): each stream's head and
    tail, ``cap`` bytes together; ``save`` (from :func:`save_request`) to save a long one whole."""
    request: dict[str, object] = {
        "command": command, "cwd": cwd, "env": dict(env or {}), "timeout": timeout_s,
        "stdin": base64.b64encode(stdin).decode() if stdin is not None else None, "cap": cap, "tail": True,
    }  # fmt: skip
    if save is not None:
        request["save"] = save
    return request


def save_request(workspace_dir: str, max_bytes: int, over: int | None) -> dict[str, object]:
    """The exec agent's ``save`` request: where a long stream goes whole (a file per stream named by
    time, unique), at most ``max_bytes`` of it, once it is longer than ``over`` bytes."""
    name = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(4)
    return {"dir": posixpath.join(workspace_dir, EXEC_SAVE_DIR), "name": name, "max": max_bytes,
            "keep": EXEC_SAVE_KEEP, "over": over}  # fmt: skip
