"""SSH to workspaces: keys, pinned host keys, a connection pool, exec and SFTP.

The only module that imports asyncssh. Everything asyncssh (or the socket layer)
raises is translated here into :mod:`sandbox_mcp.errors`, keeping the cause:

* :class:`~sandbox_mcp.errors.SSHError`: the workspace's sshd cannot be reached,
  refuses our key, presents a host key other than the pinned one, or the
  connection broke.
* :class:`~sandbox_mcp.errors.CommandTimeout`: :meth:`SSHPool.wait_ready` gave up.
* :class:`~sandbox_mcp.errors.InvalidSpec`: a bad argument (env name, path) or a
  file-level problem the agent can fix (no such file, is a directory, permission
  denied), with the next step in the message.

Security: the host key is always pinned (``known_hosts`` holds the workspace's
own key, never ``None``); authentication is by our client key only (no agent, no
passwords, no ``~/.ssh/config``).

Exec: where the workspace has python3, each connection runs one long-lived exec agent
(:mod:`sandbox_mcp.exec_agent`) that starts commands for us, which is several times
faster than a session per command; elsewhere, a session per command.

Killing: OpenSSH's sshd ignores channel "signal" requests, so a session per command runs
the command under a small wrapper that reports its PID (a session leader, so also
its process group) on the first stderr line and bounds it with ``timeout``. On a
timeout or a cancellation the client kills that process group over a second
channel.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import posixpath
import re
import secrets
import shlex
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import anyio
import asyncssh

from .errors import CommandTimeout, InvalidSpec, SSHError
from .models import DirEntry, DirListing, ExecResult, FileContent, WriteResult
from .runtimes.base import Progress

__all__ = [
    "PID_MARKER",
    "SSHPool",
    "SSHTarget",
    "build_exec_command",
    "encode_chunk",
    "ensure_client_key",
    "ensure_host_key",
    "host_key_fingerprint",
    "known_hosts_line",
    "resolve_path",
    "ssh_argv",
    "write_authorized_keys",
]

T = TypeVar("T")

PID_MARKER = "SBXPID"
KILL_AFTER_S = 2  # `timeout --kill-after`: SIGTERM first, SIGKILL this much later
# The client's own deadline lies past the server-side one, so normally `timeout` fires first;
# the client deadline catches a wedged sshd or output held open by a stray process.
CLIENT_GRACE_S = KILL_AFTER_S + 3
# After the exit status, how long to wait for stdout/stderr to close. A background process
# that inherited them (`cmd &`) would otherwise hold the call open until it ends.
EOF_GRACE_S = 0.5
TCP_CONNECT_TIMEOUT_S = 1.0  # one SYN retransmit; a workspace on the local bridge answers at once
OPEN_TIMEOUT_S = 10.0  # opening a channel on an established connection
KILL_TIMEOUT_S = 5.0
# sshd's default MaxSessions is 10 per connection; keep one for SFTP and room for kill channels.
DEFAULT_MAX_SESSIONS = 7

AGENT_START_TIMEOUT_S = 5.0
_AGENT_SOURCE_PATH = Path(__file__).with_name("exec_agent.py")

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PID_LINE_RE = re.compile(rb"(?:^|\n)" + PID_MARKER.encode() + rb" (\d+)\n")
_PID_SEARCH_LIMIT = 64 * 1024  # stderr bytes held back while looking for the PID line
_PUB_SUFFIX = ".pub"

# Errors that mean the connection itself is gone (as opposed to a refused request).
_CONN_ERRORS: tuple[type[BaseException], ...] = (
    asyncssh.ConnectionLost,
    asyncssh.DisconnectError,
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,
    OSError,
    TimeoutError,
)


# --- keys -----------------------------------------------------------------------------------------


def _pub_path(path: Path) -> Path:
    return path.with_name(path.name + _PUB_SUFFIX)


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Write ``data`` to ``path`` with ``mode`` unless ``path`` exists; True when written.

    The file is complete before it appears (temp file + link), so a reader never sees half a key,
    and an existing file is never replaced, even by a concurrent writer.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask narrowed the mode given to open()
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_replace(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _ensure_key(path: Path, comment: str) -> asyncssh.SSHKey:
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not path.exists():
            key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
            _write_new(path, key.export_private_key("openssh"), 0o600)
        # Load what is on disk: if another process won the race, its key is the one that counts.
        key = asyncssh.read_private_key(path)
        pub = _pub_path(path)
        if not pub.exists():
            _write_new(pub, key.export_public_key("openssh"), 0o644)
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise SSHError(f"cannot create or read the SSH key {path}: {exc}") from exc
    return key


def ensure_host_key(path: Path) -> str:
    """Make sure a workspace host key (ed25519) exists at ``path``; return its SHA256 fingerprint.

    A missing key is generated and written 0600 with its public half at ``path.pub`` (0644),
    creating parent directories (0755). An existing key is loaded, never replaced.

    Raises:
        SSHError: the key cannot be written, or the existing file is not a readable private key.
    """
    return _ensure_key(path, "sandbox-mcp host key").get_fingerprint("sha256")


def ensure_client_key(path: Path) -> str:
    """Make sure the server's own client key (ed25519) exists at ``path``; return its public key line.

    Same rules as :func:`ensure_host_key`; the result (``ssh-ed25519 AAAA... sandbox-mcp``)
    goes into each workspace's ``authorized_keys``.

    Raises:
        SSHError: the key cannot be written, or the existing file is not a readable private key.
    """
    key = _ensure_key(path, "sandbox-mcp")
    return key.export_public_key("openssh").decode().strip()


def _load_public_key(path: Path) -> asyncssh.SSHKey:
    """The public key in ``path``: a public key file, or a private key file."""
    try:
        try:
            return asyncssh.read_public_key(path)
        except asyncssh.KeyImportError:
            return asyncssh.read_private_key(path).convert_to_public()
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise SSHError(f"cannot read the SSH key {path}: {exc}") from exc


def _load_private_key(path: Path) -> asyncssh.SSHKey:
    try:
        return asyncssh.read_private_key(path)
    except (OSError, asyncssh.KeyImportError, ValueError) as exc:
        raise SSHError(f"cannot read the SSH client key {path}: {exc}") from exc


def host_key_fingerprint(pub_or_priv_path: Path) -> str:
    """The SHA256 fingerprint (``SHA256:...``) of the key in a public or private key file.

    Raises:
        SSHError: the file is missing or holds no key.
    """
    return _load_public_key(Path(pub_or_priv_path)).get_fingerprint("sha256")


def write_authorized_keys(path: Path, public_key_lines: Sequence[str]) -> None:
    """Atomically write ``path`` (0644) with one public key per line.

    Raises:
        InvalidSpec: a line is not a single OpenSSH public key.
        SSHError: the file cannot be written.
    """
    lines = []
    for line in public_key_lines:
        line = line.strip()
        if not line or "\n" in line or "\r" in line:
            raise InvalidSpec(f"not a single public key line: {line!r}")
        try:
            asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise InvalidSpec(f"not an OpenSSH public key: {line[:60]!r}: {exc}") from exc
        lines.append(line + "\n")
    try:
        _atomic_replace(Path(path), "".join(lines).encode(), 0o644)
    except OSError as exc:
        raise SSHError(f"cannot write {path}: {exc}") from exc


# --- pure builders --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SSHTarget:
    """Where and how to reach one workspace's sshd.

    ``host_key_path`` is the pinned public key file, or the private key file whose public half
    is pinned; ``workspace_dir`` is the absolute project directory inside the workspace.
    """

    key: str
    host: str
    user: str
    host_key_path: Path
    client_key_path: Path
    workspace_dir: str
    port: int = 22

    def __post_init__(self) -> None:
        if not posixpath.isabs(self.workspace_dir):
            raise InvalidSpec(f"workspace_dir must be absolute, got {self.workspace_dir!r}")
        if not 0 < self.port < 65536:
            raise InvalidSpec(f"port out of range: {self.port}")

    @property
    def where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def _known_hosts_pattern(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def known_hosts_line(host: str, host_pubkey_path: Path, port: int = 22) -> str:
    """The ``known_hosts`` line that pins the key in ``host_pubkey_path`` for ``host`` (and ``port``).

    Raises:
        SSHError: the key file is missing or holds no key.
    """
    algo, b64 = _load_public_key(Path(host_pubkey_path)).export_public_key("openssh").decode().split()[:2]
    return f"{_known_hosts_pattern(host, port)} {algo} {b64}"


def _ssh_option_path(path: Path) -> str:
    # ssh splits option values on whitespace and expands % tokens; such paths would not mean
    # what they say, so refuse them rather than quote.
    s = str(path)
    if re.search(r"[\s\"'\\%]", s):
        raise InvalidSpec(f"path not usable in an ssh option (whitespace, quote or %): {s!r}")
    return s


def ssh_argv(target: SSHTarget, known_hosts_file: Path, extra: Sequence[str] = ()) -> list[str]:
    """The OpenSSH client argv to reach ``target`` with its host key pinned.

    ``known_hosts_file`` must hold :func:`known_hosts_line` for the target. No user
    configuration is read (``-F /dev/null``), only our key is offered, nothing prompts, and an
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


def _check_no_nul(what: str, value: str) -> None:
    if "\0" in value:
        raise InvalidSpec(f"{what} must not contain NUL bytes")


def resolve_path(workspace_dir: str, path: str) -> str:
    """The absolute, normalised path inside the workspace: relative paths resolve against ``workspace_dir``.

    Raises:
        InvalidSpec: ``path`` is empty or contains a NUL byte.
    """
    if not path or not path.strip():
        raise InvalidSpec("path must not be empty; give a file path, absolute or relative to the workspace")
    _check_no_nul("path", path)
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
    _check_no_nul("command", command)
    _check_no_nul("cwd", cwd)
    steps = [f"cd -- {shlex.quote(cwd)}"]
    if env:
        assignments = []
        for name, value in env.items():
            if not _ENV_NAME_RE.match(name):
                raise InvalidSpec(
                    f"invalid environment variable name {name!r}: use letters, digits and _, "
                    f"not starting with a digit"
                )
            _check_no_nul(f"env value of {name}", value)
            assignments.append(f"{name}={shlex.quote(value)}")
        steps.append("export " + " ".join(assignments))
    steps.append(
        f"exec timeout --kill-after={_fmt_seconds(kill_after_s)} {_fmt_seconds(timeout_s)} "
        f"sh -c {shlex.quote(command)}"
    )
    return f"printf '{PID_MARKER} %s\\n' \"$$\" >&2; " + " && ".join(steps)


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


# --- error translation ----------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError):
        return f"{type(exc).__name__}: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _host_key_mismatch(target: SSHTarget, exc: BaseException) -> SSHError:
    try:
        pinned = host_key_fingerprint(target.host_key_path)
    except SSHError:
        pinned = "?"
    return SSHError(
        f"the SSH host key of {target.host}:{target.port} does not match the pinned key of workspace "
        f"{target.key!r} ({pinned}, {target.host_key_path}); the address may belong to another machine, "
        f"or the workspace's sshd is not using the key generated for it. Restart the workspace "
        f"(stop_workspace, start_workspace); do not trust the new key blindly ({_describe(exc)})"
    )


def _connect_error(target: SSHTarget, exc: BaseException) -> SSHError:
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return _host_key_mismatch(target, exc)
    if isinstance(exc, asyncssh.PermissionDenied):
        return SSHError(
            f"SSH login to {target.where} (workspace {target.key!r}) was refused: the server's client key "
            f"{target.client_key_path} is not in the workspace user's authorized_keys ({_describe(exc)})"
        )
    return SSHError(
        f"cannot reach SSH on {target.where} (workspace {target.key!r}): {_describe(exc)}; "
        f"is the workspace running? (workspace_status)"
    )


def _lost_error(target: SSHTarget, what: str, exc: BaseException) -> SSHError:
    return SSHError(f"SSH connection to workspace {target.key!r} ({target.where}) broke during {what}: "
                    f"{_describe(exc)}")


def _file_error(target: SSHTarget, path: str, exc: asyncssh.SFTPError, doing: str) -> InvalidSpec:
    parent = posixpath.dirname(path) or "/"
    if isinstance(exc, asyncssh.SFTPNoSuchFile | asyncssh.SFTPNoSuchPath):
        msg = f"{path}: no such file or directory; call list_dir on {parent} to see what exists"
    elif isinstance(exc, asyncssh.SFTPPermissionDenied):
        msg = (f"{path}: permission denied for user {target.user}; use exec with sudo/doas "
               f"(for example `sudo cat {shlex.quote(path)}`) or pick a path the user owns")
    elif isinstance(exc, asyncssh.SFTPFileIsADirectory):
        msg = f"{path} is a directory; call list_dir for directories"
    elif isinstance(exc, asyncssh.SFTPNotADirectory):
        msg = f"a component of {path} is not a directory; call list_dir on {parent}"
    elif isinstance(exc, asyncssh.SFTPNoSpaceOnFilesystem | asyncssh.SFTPQuotaExceeded):
        msg = f"{path}: no space left in the workspace; delete files (exec `df -h`, `du`) and retry"
    else:
        msg = f"{path}: {exc.reason or type(exc).__name__}"
    return InvalidSpec(f"cannot {doing} {msg}")


def _is_conn_error(exc: BaseException) -> bool:
    return isinstance(exc, _CONN_ERRORS)


# --- exec session ---------------------------------------------------------------------------------


class _ExecSession(asyncssh.SSHClientSession[bytes]):
    """Collects one command's output as it arrives, up to a cap per stream, and its exit."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.truncated = False
        self.pid: int | None = None
        self.exit_status: int | None = None
        self.exit_signal: str | None = None
        self.lost: Exception | None = None
        self.pid_seen = anyio.Event()
        self.done = anyio.Event()  # exit status/signal received, or channel closed
        self.closed = anyio.Event()
        self._head: bytearray | None = bytearray()  # stderr held back until the PID line is found

    def _keep(self, buf: bytearray, data: bytes) -> None:
        room = self.cap - len(buf)
        if room > 0:
            buf += data[:room]
        if len(data) > room:
            self.truncated = True  # keep draining: the command must not block on a full pipe

    def _flush_head(self) -> None:
        if self._head is not None:
            head, self._head = bytes(self._head), None
            self._keep(self.stderr, head)
            self.pid_seen.set()

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype != asyncssh.EXTENDED_DATA_STDERR:
            self._keep(self.stdout, data)
            return
        if self._head is None:
            self._keep(self.stderr, data)
            return
        self._head += data
        m = _PID_LINE_RE.search(self._head)
        if m:
            self.pid = int(m.group(1))
            start = m.start() + (1 if self._head[m.start() : m.start() + 1] == b"\n" else 0)
            # whatever a shell rc file printed before our line stays the user's stderr
            self._head = self._head[:start] + self._head[m.end() :]
            self._flush_head()
        elif len(self._head) > _PID_SEARCH_LIMIT:
            self._flush_head()

    def exit_status_received(self, status: int) -> None:
        self.exit_status = status
        self.done.set()

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit_signal = signal
        self.done.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = exc
        self._flush_head()
        self.closed.set()
        self.done.set()


class _NotStarted(ConnectionError):
    """The exec agent's channel closed before it started the command."""


class _AgentSession(asyncssh.SSHClientSession[bytes]):
    """The client end of the exec agent's channel: JSON lines out, replies routed to waiters."""

    def __init__(self) -> None:
        self.chan: asyncssh.SSHClientChannel[bytes] | None = None
        self.ready = anyio.Event()
        self.closed = anyio.Event()
        self.waiters: dict[int, anyio.Event] = {}
        self.replies: dict[int, dict] = {}
        self.started: set[int] = set()
        self.stderr = bytearray()  # why it failed to start, for the log
        self._buf = bytearray()
        self._ids = itertools.count(1)

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.stderr = (self.stderr + data)[-4096:]
            return
        self._buf += data
        while (end := self._buf.find(b"\n")) >= 0:
            line, self._buf = bytes(self._buf[:end]), self._buf[end + 1 :]
            msg = json.loads(line)
            if "ready" in msg:
                self.ready.set()
            elif "started" in msg:
                if msg["id"] in self.waiters:
                    self.started.add(msg["id"])
            elif (waiter := self.waiters.pop(msg.get("id"), None)) is not None:
                self.replies[msg["id"]] = msg
                self.started.discard(msg["id"])
                waiter.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()
        self.ready.set()
        for waiter in self.waiters.values():
            waiter.set()  # no reply: the caller sees the channel is gone

    def submit(self, request: dict) -> tuple[int, anyio.Event]:
        assert self.chan is not None
        rid = next(self._ids)
        waiter = self.waiters[rid] = anyio.Event()
        self.chan.write((json.dumps({"id": rid, **request}) + "\n").encode())
        return rid, waiter

    def cancel(self, rid: int) -> None:
        self.waiters.pop(rid, None)
        self.started.discard(rid)
        if self.chan is not None and not self.closed.is_set():
            self.chan.write((json.dumps({"cancel": rid}) + "\n").encode())


# --- the pool -------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Entry:
    target: SSHTarget
    conn: asyncssh.SSHClientConnection
    sessions: anyio.Semaphore
    sftp: asyncssh.SFTPClient | None = None
    sftp_lock: anyio.Lock = field(default_factory=anyio.Lock)
    agent: _AgentSession | None = None
    agent_unavailable: bool = False  # no python3 there: a session per command
    agent_lock: anyio.Lock = field(default_factory=anyio.Lock)

    def alive(self) -> bool:
        return not self.conn.is_closed()


class SSHPool:
    """One pooled SSH connection per workspace key: lazy, reused, replaced when it dropped.

    All methods are coroutines for the asyncio backend (asyncssh is asyncio-only).
    """

    def __init__(
        self,
        *,
        connect_timeout_s: float = 15.0,
        keepalive_interval_s: float = 15.0,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        exec_agent: bool = True,
    ) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._use_agent = exec_agent
        self._keepalive_interval_s = keepalive_interval_s
        self._max_sessions = max_sessions
        self._entries: dict[str, _Entry] = {}
        self._locks: dict[str, anyio.Lock] = {}

    # connections

    def _lock(self, key: str) -> anyio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = anyio.Lock()
        return lock

    async def _connect(self, target: SSHTarget, *, tcp_timeout_s: float, timeout_s: float) -> _Entry:
        """Open one authenticated connection; raises what asyncssh/socket raise (untranslated)."""
        host_key = _load_public_key(target.host_key_path)
        client_key = _load_private_key(target.client_key_path)
        aloop = asyncio.get_running_loop()  # asyncssh runs on asyncio only
        infos = await aloop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        family, socktype, proto, _, addr = infos[0]
        sock = socket.socket(family, socktype, proto)
        try:
            sock.setblocking(False)
            # A short TCP timeout so wait_ready polls quickly; the SSH handshake may take longer
            # (a VM under emulation is slow at key exchange).
            with anyio.fail_after(tcp_timeout_s):
                await aloop.sock_connect(sock, addr)
            conn = await asyncssh.connect(
                target.host,
                target.port,
                sock=sock,
                config=[],
                username=target.user,
                known_hosts=([host_key], [], []),
                x509_trusted_certs=None,
                client_keys=[client_key],
                agent_path=None,
                preferred_auth="publickey",
                gss_auth=False,
                keepalive_interval=self._keepalive_interval_s,
                keepalive_count_max=3,
                connect_timeout=timeout_s,
            )
        except BaseException:
            sock.close()
            raise
        return _Entry(target, conn, anyio.Semaphore(self._max_sessions))

    def _install(self, entry: _Entry) -> None:
        old = self._entries.get(entry.target.key)
        self._entries[entry.target.key] = entry
        if old is not None and old is not entry:
            old.conn.close()

    async def _entry(self, target: SSHTarget) -> _Entry:
        entry = self._entries.get(target.key)
        if entry is not None and entry.alive() and entry.target == target:
            return entry
        async with self._lock(target.key):
            entry = self._entries.get(target.key)
            if entry is not None and entry.alive() and entry.target == target:
                return entry
            try:
                entry = await self._connect(
                    target, tcp_timeout_s=min(3.0, self._connect_timeout_s), timeout_s=self._connect_timeout_s
                )
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                raise _connect_error(target, exc) from exc
            self._install(entry)
            return entry

    def _discard(self, entry: _Entry) -> None:
        """Forget a connection found dead (or misbehaving) so the next call makes a new one."""
        if self._entries.get(entry.target.key) is entry:
            del self._entries[entry.target.key]
        entry.conn.close()

    async def wait_ready(self, target: SSHTarget, timeout_s: float, progress: Progress | None = None) -> None:
        """Poll until sshd answers with the pinned key and our login works; keep that connection.

        Attempts start ~20 ms apart and back off to 100 ms, each with a short TCP connect timeout.

        Raises:
            SSHError: the host key does not match the pinned one (at once, without retrying), or
                the key files cannot be read.
            CommandTimeout: no successful login within ``timeout_s``; the message has the last error.
        """
        start = time.monotonic()
        deadline = start + timeout_s
        delay = 0.02
        attempts = 0
        last = "no attempt made"
        next_report = start + 1.0
        entry = self._entries.get(target.key)
        if entry is not None and entry.alive() and entry.target == target:
            return
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CommandTimeout(
                    f"SSH on {target.where} (workspace {target.key!r}) did not answer within {timeout_s:g} s "
                    f"({attempts} attempts); last error: {last}. Look at workspace_logs for boot problems"
                )
            attempts += 1
            try:
                async with self._lock(target.key):
                    entry = await self._connect(
                        target, tcp_timeout_s=min(TCP_CONNECT_TIMEOUT_S, remaining), timeout_s=remaining
                    )
                    self._install(entry)
                return
            except asyncssh.HostKeyNotVerifiable as exc:
                raise _host_key_mismatch(target, exc) from exc
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                last = _describe(exc)
            now = time.monotonic()
            if progress is not None and now >= next_report:
                next_report = now + 1.0
                await progress(
                    f"waiting for SSH on {target.host}:{target.port} ({attempts} attempts, last: {last})",
                    min(1.0, (now - start) / timeout_s),
                )
            await anyio.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 1.5, 0.1)

    async def drop(self, key: str) -> None:
        """Close and forget the pooled connection of ``key`` (when its workspace stops). Never raises."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry.conn.close()
            with anyio.move_on_after(2, shield=True):
                await entry.conn.wait_closed()

    async def close(self) -> None:
        """Close every pooled connection. Never raises."""
        for key in list(self._entries):
            await self.drop(key)

    # exec

    async def exec(
        self,
        target: SSHTarget,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdin: str | bytes | None = None,
        timeout_s: float = 120,
        output_cap: int = 1 << 20,
    ) -> ExecResult:
        """Run ``command`` with ``sh -c`` in the workspace and collect its result.

        ``cwd`` defaults to the workspace directory; a relative one resolves against it. stdout and
        stderr are kept separately, each up to ``output_cap`` bytes (the rest is read and dropped,
        ``truncated=True``); the command sees EOF on stdin after ``stdin``. A command killed by a
        signal has ``exit_code=None`` and a note naming the signal on stderr. After ``timeout_s`` the
        command's whole process group is killed and the result has ``timed_out=True`` and
        ``exit_code=None``. If the awaiting task is cancelled, the process group is killed too and
        the cancellation propagates.

        Raises:
            InvalidSpec: a bad env name, NUL bytes, a non-positive timeout, an empty cwd.
            SSHError: the workspace cannot be reached, or the connection broke while the command
                ran (whether it completed is then unknown).
        """
        wd = resolve_path(target.workspace_dir, cwd) if cwd is not None else target.workspace_dir
        remote = build_exec_command(command, cwd=wd, env=env, timeout_s=timeout_s)  # validates all inputs
        data = stdin.encode() if isinstance(stdin, str) else stdin
        for attempt in (1, 2):
            entry = await self._entry(target)
            agent = await self._agent(entry)
            if agent is not None:
                request = {"command": command, "cwd": wd, "env": dict(env or {}), "timeout": timeout_s,
                           "stdin": base64.b64encode(data).decode() if data is not None else None,
                           "cap": output_cap}  # fmt: skip
                try:
                    return await self._agent_exec(target, entry, agent, request, timeout_s)
                except _NotStarted as exc:
                    # The connection died before the command started (the agent kills what it
                    # started when its channel closes, so nothing runs twice). Replace it, once.
                    self._discard(entry)
                    if attempt == 2:
                        raise _lost_error(target, "exec", exc) from exc
                    continue
            async with entry.sessions:
                start = time.monotonic()
                try:
                    # Shielded: a channel whose exec request went out must be seen through, so a
                    # cancellation can still kill what it started.
                    with anyio.CancelScope(shield=True), anyio.fail_after(OPEN_TIMEOUT_S):
                        chan, sess = await entry.conn.create_session(
                            lambda: _ExecSession(output_cap), remote, encoding=None
                        )
                except (asyncssh.Error, OSError, TimeoutError) as exc:
                    if entry.alive() and not _is_conn_error(exc):
                        raise SSHError(f"cannot start a command on {target.where}: {_describe(exc)}") from exc
                    # The pooled connection died under us; nothing ran. Replace it, once.
                    self._discard(entry)
                    if attempt == 2:
                        raise _lost_error(target, "exec", exc) from exc
                    continue
                return await self._run(target, entry, chan, sess, data, timeout_s, start)
        raise AssertionError("unreachable")

    async def _agent(self, entry: _Entry) -> _AgentSession | None:
        """The connection's exec agent, started on first use; None where it cannot run."""
        if not self._use_agent or entry.agent_unavailable:
            return None
        if entry.agent is not None and not entry.agent.closed.is_set():
            return entry.agent
        async with entry.agent_lock:
            if entry.agent is not None and not entry.agent.closed.is_set():
                return entry.agent
            source = _AGENT_SOURCE_PATH.read_text()
            try:
                with anyio.CancelScope(shield=True), anyio.fail_after(AGENT_START_TIMEOUT_S):
                    chan, agent = await entry.conn.create_session(
                        _AgentSession, f"exec python3 -I -u -c {shlex.quote(source)}", encoding=None
                    )
                    agent.chan = chan
                    await agent.ready.wait()
            except (asyncssh.Error, OSError, TimeoutError):
                if not entry.alive():
                    raise
                entry.agent_unavailable = True
                return None
            if agent.closed.is_set():  # e.g. "python3: command not found"
                entry.agent_unavailable = True
                return None
            entry.agent = agent
            return agent

    async def _agent_exec(
        self, target: SSHTarget, entry: _Entry, agent: _AgentSession, request: dict, timeout_s: float
    ) -> ExecResult:
        start = time.monotonic()
        rid, waiter = agent.submit(request)
        try:
            # The agent enforces the timeout itself; this deadline only catches a wedged agent.
            with anyio.move_on_after(timeout_s + CLIENT_GRACE_S) as deadline:
                await waiter.wait()
        except BaseException:
            agent.cancel(rid)  # cancellation: the agent kills the command's process group
            raise
        reply = agent.replies.pop(rid, None)
        started = rid in agent.started
        agent.started.discard(rid)
        if deadline.cancelled_caught:
            agent.cancel(rid)
            reply = {"exit": None, "timed_out": True}
        elif reply is None:  # the channel closed under us
            if not started:
                raise _NotStarted("the connection closed before the command started")
            if not entry.alive():
                self._discard(entry)
                raise _lost_error(target, "exec (the command's outcome is unknown)", ConnectionError("closed"))
            entry.agent = None
            raise SSHError(
                f"the exec agent in workspace {target.key!r} exited during a command (its outcome is unknown): "
                f"{agent.stderr.decode(errors='replace').strip()[-500:]}"
            )
        note = ""
        if reply.get("detached"):
            note += (
                "\n[sandbox-mcp] the command exited, but a background process still holds its stdout/stderr; "
                "stopped reading. Redirect a background process's output (cmd > log 2>&1 &) to keep it.\n"
            )
        timed_out = bool(reply.get("timed_out"))
        if reply.get("signal") and not timed_out:
            note += f"\n[sandbox-mcp] the command was killed by signal {reply['signal']}\n"
        return ExecResult(
            exit_code=None if timed_out else reply.get("exit"),
            stdout=base64.b64decode(reply.get("stdout", "")).decode("utf-8", errors="replace"),
            stderr=base64.b64decode(reply.get("stderr", "")).decode("utf-8", errors="replace") + note,
            timed_out=timed_out,
            truncated=bool(reply.get("truncated")),
            duration_ms=round((time.monotonic() - start) * 1000, 3),
        )

    async def _run(
        self,
        target: SSHTarget,
        entry: _Entry,
        chan: asyncssh.SSHClientChannel[bytes],
        sess: _ExecSession,
        stdin: bytes | None,
        timeout_s: float,
        start: float,
    ) -> ExecResult:
        timed_out = False
        note = ""
        try:
            if stdin:
                chan.write(stdin)
            chan.write_eof()
            with anyio.move_on_after(timeout_s + CLIENT_GRACE_S) as deadline:
                await sess.done.wait()
                if not sess.closed.is_set():
                    with anyio.move_on_after(EOF_GRACE_S):
                        await sess.closed.wait()
                    if not sess.closed.is_set() and sess.exit_status is not None:
                        note = (
                            "\n[sandbox-mcp] the command exited, but a background process still holds its "
                            "stdout/stderr; stopped reading. Redirect a background process's output "
                            "(cmd > log 2>&1 &) to keep it.\n"
                        )
            elapsed = time.monotonic() - start
            if deadline.cancelled_caught:
                timed_out = True
                await self._kill(entry, sess)
            elif elapsed >= timeout_s and (sess.exit_status == 124 or sess.exit_signal == "KILL"):
                # `timeout` fired: 124 after SIGTERM worked; after --kill-after it SIGKILLs the group,
                # itself included. Killing the group again gets what escaped both.
                timed_out = True
                await self._kill(entry, sess)
            elif sess.lost is not None and sess.exit_status is None and sess.exit_signal is None:
                self._discard(entry)
                raise _lost_error(target, "exec (the command's outcome is unknown)", sess.lost)
        except BaseException:
            # cancellation (or anything else): kill what we started, then let it propagate
            with anyio.CancelScope(shield=True):
                await self._kill(entry, sess, wait_for_pid=True)
                chan.close()
            raise
        finally:
            chan.close()
        if sess.exit_signal is not None and not timed_out:
            note += f"\n[sandbox-mcp] the command was killed by signal {sess.exit_signal}\n"
        stderr = bytes(sess.stderr).decode("utf-8", errors="replace") + note
        return ExecResult(
            exit_code=None if timed_out else sess.exit_status,
            stdout=bytes(sess.stdout).decode("utf-8", errors="replace"),
            stderr=stderr,
            timed_out=timed_out,
            truncated=sess.truncated,
            duration_ms=round((time.monotonic() - start) * 1000, 3),
        )

    async def _kill(self, entry: _Entry, sess: _ExecSession, wait_for_pid: bool = False) -> None:
        """SIGKILL the command's process group over a second channel. Best effort, never raises."""
        with anyio.move_on_after(KILL_TIMEOUT_S):
            if sess.pid is None and wait_for_pid and not sess.closed.is_set():
                await sess.pid_seen.wait()  # cancelled right after the start: the PID is on its way
            if sess.pid is None or not entry.alive():
                return
            with contextlib.suppress(asyncssh.Error, OSError):
                await entry.conn.run(f"kill -KILL -- -{sess.pid} 2>/dev/null", check=False)

    # SFTP

    async def _sftp_client(self, entry: _Entry) -> asyncssh.SFTPClient:
        if entry.sftp is None:
            async with entry.sftp_lock:
                if entry.sftp is None:
                    with anyio.fail_after(OPEN_TIMEOUT_S):
                        entry.sftp = await entry.conn.start_sftp_client()
        return entry.sftp

    async def _with_sftp(
        self,
        target: SSHTarget,
        what: str,
        op: Callable[[asyncssh.SFTPClient], Awaitable[T]],
        *,
        idempotent: bool = True,
    ) -> T:
        """Run ``op`` with the pooled SFTP client; replace a dead connection and retry once.

        ``op`` translates file-level SFTP errors itself; connection errors arrive here.
        """
        for attempt in (1, 2):
            entry = await self._entry(target)
            started = False
            try:
                sftp = await self._sftp_client(entry)
                started = True
                return await op(sftp)
            except (asyncssh.Error, OSError, TimeoutError) as exc:
                if not _is_conn_error(exc) and entry.alive():
                    raise SSHError(f"SFTP {what} on {target.where} failed: {_describe(exc)}") from exc
                self._discard(entry)
                if attempt == 2 or (started and not idempotent):
                    raise _lost_error(target, f"SFTP {what}", exc) from exc
        raise AssertionError("unreachable")

    async def read_file(
        self, target: SSHTarget, path: str, offset: int = 0, limit: int = 256 * 1024
    ) -> FileContent:
        """Read up to ``limit`` bytes of a workspace file from ``offset``.

        Content is UTF-8 text when the chunk decodes as UTF-8 (a multibyte character cut at the
        end is left for the next chunk), else base64. ``truncated``/``next_offset`` say whether
        and where to continue.

        Raises:
            InvalidSpec: a bad path/offset/limit, no such file, a directory, permission denied.
            SSHError: the workspace cannot be reached or the connection broke.
        """
        if offset < 0:
            raise InvalidSpec(f"offset must be >= 0, got {offset}")
        if limit < 1:
            raise InvalidSpec(f"limit must be >= 1, got {limit}")
        abspath = resolve_path(target.workspace_dir, path)

        async def op(sftp: asyncssh.SFTPClient) -> FileContent:
            try:
                async with sftp.open(abspath, "rb") as f:
                    attrs = await f.stat()
                    if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                        raise InvalidSpec(f"cannot read {abspath}: it is a directory; call list_dir for it")
                    size = attrs.size or 0
                    data = await f.read(limit, offset) if offset < size else b""
            except asyncssh.SFTPError as exc:
                if _is_conn_error(exc):
                    raise
                raise _file_error(target, abspath, exc, "read") from exc
            at_eof = offset + len(data) >= size
            content, encoding, used = encode_chunk(data, at_eof)
            end = offset + used
            more = end < size
            return FileContent(
                path=abspath,
                content=content,
                encoding=encoding,  # type: ignore[arg-type]
                size=size,
                offset=offset,
                truncated=more,
                next_offset=end if more else None,
            )

        return await self._with_sftp(target, "read", op)

    async def write_file(
        self,
        target: SSHTarget,
        path: str,
        data: bytes,
        *,
        append: bool = False,
        mode: int | None = None,
        make_parents: bool = True,
    ) -> WriteResult:
        """Write (or append) ``data`` to a workspace file.

        Without ``append`` the file is replaced atomically (written under a temporary name in the
        same directory, then renamed over the target); an existing file keeps its permission bits
        unless ``mode`` is given. Missing parent directories are created with ``make_parents``.

        Raises:
            InvalidSpec: a bad path or mode, a missing parent without ``make_parents``, the path is
                a directory, permission denied, disk full.
            SSHError: the workspace cannot be reached or the connection broke.
        """
        if mode is not None and not 0 <= mode <= 0o7777:
            raise InvalidSpec(f"mode must be between 0 and 0o7777, got {mode!r}")
        abspath = resolve_path(target.workspace_dir, path)
        if abspath == "/":
            raise InvalidSpec("cannot write to /; give a file path")
        parent = posixpath.dirname(abspath)

        async def make_dirs(sftp: asyncssh.SFTPClient) -> None:
            missing: list[str] = []
            d = parent
            while d != "/":
                try:
                    attrs = await sftp.stat(d)
                except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                    missing.append(d)
                    d = posixpath.dirname(d)
                    continue
                if attrs.type != asyncssh.FILEXFER_TYPE_DIRECTORY:
                    raise InvalidSpec(f"cannot write {abspath}: {d} exists and is not a directory")
                break
            for d in reversed(missing):
                try:
                    await sftp.mkdir(d)
                except (asyncssh.SFTPFailure, asyncssh.SFTPFileAlreadyExists):
                    if not await sftp.isdir(d):  # lost a race to someone creating it is fine
                        raise

        async def opened(sftp: asyncssh.SFTPClient, name: str, pmode: str) -> asyncssh.SFTPClientFile:
            try:
                return await sftp.open(name, pmode)
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                if not make_parents:
                    raise InvalidSpec(
                        f"cannot write {abspath}: directory {parent} does not exist; "
                        f"create it or pass make_parents=true"
                    ) from None
                await make_dirs(sftp)
                return await sftp.open(name, pmode)

        async def op(sftp: asyncssh.SFTPClient) -> WriteResult:
            try:
                if append:
                    f = await opened(sftp, abspath, "ab")
                    try:
                        await f.write(data)
                        if mode is not None:
                            await f.chmod(mode)
                    finally:
                        await f.close()
                    return WriteResult(path=abspath, bytes_written=len(data))
                keep_mode = mode
                try:
                    attrs = await sftp.stat(abspath)
                except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
                    attrs = None
                if attrs is not None:
                    if attrs.type == asyncssh.FILEXFER_TYPE_DIRECTORY:
                        raise InvalidSpec(f"cannot write {abspath}: it is a directory; pick a file path")
                    if keep_mode is None and attrs.permissions is not None:
                        keep_mode = stat.S_IMODE(attrs.permissions)
                tmp = posixpath.join(parent, f".{posixpath.basename(abspath)}.sbx-{secrets.token_hex(4)}")
                f = await opened(sftp, tmp, "wb")
                try:
                    try:
                        await f.write(data)
                        if keep_mode is not None:
                            await f.chmod(keep_mode)
                    finally:
                        await f.close()
                    await sftp.posix_rename(tmp, abspath)
                except BaseException:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                        with contextlib.suppress(asyncssh.Error, OSError):
                            await sftp.remove(tmp)
                    raise
                return WriteResult(path=abspath, bytes_written=len(data))
            except asyncssh.SFTPError as exc:
                if _is_conn_error(exc):
                    raise
                raise _file_error(target, abspath, exc, "write") from exc

        return await self._with_sftp(target, "write", op, idempotent=not append)

    async def list_dir(self, target: SSHTarget, path: str = ".") -> DirListing:
        """List a workspace directory: name, type (file/dir/symlink/other), size, mtime (UTC), by name.

        Symlinks are reported as such, not followed.

        Raises:
            InvalidSpec: a bad path, no such directory, not a directory, permission denied.
            SSHError: the workspace cannot be reached or the connection broke.
        """
        abspath = resolve_path(target.workspace_dir, path)

        async def op(sftp: asyncssh.SFTPClient) -> DirListing:
            try:
                names = await sftp.readdir(abspath.encode())
            except asyncssh.SFTPError as exc:
                if _is_conn_error(exc):
                    raise
                with contextlib.suppress(asyncssh.SFTPError):
                    if await sftp.isfile(abspath):
                        raise InvalidSpec(f"{abspath} is a file, not a directory; call read_file for it") from exc
                raise _file_error(target, abspath, exc, "list") from exc
            return DirListing(path=abspath, entries=_dir_entries(names))

        return await self._with_sftp(target, "list_dir", op)


_TYPES = {
    asyncssh.FILEXFER_TYPE_REGULAR: "file",
    asyncssh.FILEXFER_TYPE_DIRECTORY: "dir",
    asyncssh.FILEXFER_TYPE_SYMLINK: "symlink",
}


def _dir_entries(names: Iterable[asyncssh.SFTPName]) -> list[DirEntry]:
    entries = []
    for n in names:
        name = n.filename.decode("utf-8", errors="replace") if isinstance(n.filename, bytes) else n.filename
        if name in (".", ".."):
            continue
        a = n.attrs
        entries.append(
            DirEntry(
                name=name,
                type=_TYPES.get(a.type, "other"),  # type: ignore[arg-type]
                size=a.size or 0,
                mtime=datetime.fromtimestamp(a.mtime or 0, UTC),
            )
        )
    entries.sort(key=lambda e: e.name)
    return entries
