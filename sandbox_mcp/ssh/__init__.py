"""SSH to workspaces: keys, pinned host keys, a connection pool, exec and SFTP.

The only package that imports asyncssh. One concern per module:

* :mod:`.keys`: the server's client key, each workspace's host key, known_hosts lines.
* :mod:`.commands`: pure builders: :class:`SSHTarget`, the OpenSSH argv, the remote exec
  command, the exec agent's start command, path resolution, file chunk encoding.
* :mod:`.errors`: asyncssh's exceptions translated into :mod:`sandbox_mcp.errors`.
* :mod:`.lines`: bounded line framing for what a workspace sends.
* :mod:`.connect` and :mod:`.login`: one authenticated connection (its login one userauth request).
* :mod:`.agent` and :mod:`.session`: the two ways to run a command (the exec agent on one
  long-lived channel; a session per command where the agent is missing).
* :mod:`.agent_start`: a connection's agent, met where the image started it at boot, or started
  in a session.
* :mod:`.agent_ops`: process requests (start_process and its siblings) to the exec agent.
* :mod:`.files`: read, write and list over SFTP, regular files only.
* :mod:`.pool`: :class:`SSHPool`, one connection per workspace, tying the rest together.

Errors: :class:`~sandbox_mcp.errors.SSHError` (unreachable, refused, wrong host key, connection
broke, exec agent misbehaved), :class:`~sandbox_mcp.errors.CommandTimeout` (``wait_ready`` gave
up, an SFTP call hung), :class:`~sandbox_mcp.errors.InvalidSpec` (a bad argument or a file-level
problem the agent can fix, with the next step in the message).

Security: the host key is always pinned (``known_hosts`` holds the workspace's own key, never
``None``); authentication is by our client key only (no agent, no passwords, no
``~/.ssh/config``). Everything a workspace sends back is read with a bound.
"""

from . import _quiet  # noqa: F401 - before asyncssh is imported
from .commands import (
    EXEC_AGENT_PATH,
    EXEC_SAVE_DIR,
    PID_MARKER,
    SSHTarget,
    agent_command,
    build_exec_command,
    encode_chunk,
    resolve_path,
    ssh_argv,
)
from .files import DEFAULT_PAGE as DEFAULT_LIST_PAGE
from .keys import (
    ensure_client_key,
    ensure_host_key,
    host_key_fingerprint,
    known_hosts_line,
    write_authorized_keys,
)
from .pool import SSHPool

__all__ = [
    "DEFAULT_LIST_PAGE",
    "EXEC_AGENT_PATH",
    "EXEC_SAVE_DIR",
    "PID_MARKER",
    "SSHPool",
    "SSHTarget",
    "agent_command",
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
