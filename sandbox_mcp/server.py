"""The MCP server: thin tools over :class:`~sandbox_mcp.manager.WorkspaceManager`.

Arguments are flat tool parameters with schema constraints; results are the
pydantic models of ``models.py``. A :class:`~sandbox_mcp.errors.SandboxError`
becomes a ``ToolError`` carrying its message (what went wrong, what to do);
anything else is a crash the SDK reports without leaking a traceback.
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import ToolAnnotations
from pydantic import AnyHttpUrl, Field

from . import __version__, http_auth, process_tools
from .config import Settings, load_settings
from .errors import SandboxError, clip
from .manager import WorkspaceManager
from .models import (
    DestroyResult,
    DirListing,
    ExecResult,
    FileContent,
    LogsResult,
    Workspace,
    WorkspaceList,
    WorkspaceStatus,
    WriteResult,
)
from .owners import OwnedManager
from .runtimes.base import Progress
from .workspaces import Workspaces

__all__ = ["BearerTokenVerifier", "ManagerLifespan", "build_server", "serve_http"]

P = ParamSpec("P")
R = TypeVar("R")

INSTRUCTIONS = """\
Disposable, isolated Linux workspaces (containers; on NixOS also VMs and Incus) for running code safely.
Typical flow: create_workspace(name) -> exec(name, command) / write_file / read_file / list_dir ->
destroy_workspace(name). The project directory inside is ~/workspace (exec's default cwd; relative file
paths resolve against it); it persists across stop/start, everything else is reset on restart.
Call list_workspaces first to reuse an existing workspace instead of creating a new one."""

Name = Annotated[
    str,
    Field(
        description="Workspace name: lowercase letters, digits and '-', starting with a letter, at most 12 chars",
        pattern=r"^[a-z][a-z0-9-]{0,11}$",
        examples=["myproject", "test-2"],
    ),
]


# A ToolError message longer than this is cut: error messages echo at most a clipped input, but a
# log tail or a backend's output could still be long.
MESSAGE_LIMIT = 16 * 1024
log = logging.getLogger(__name__)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _message(exc: BaseException) -> str:
    """What the agent reads for ``exc``: a SandboxError's own message; of a crash only its type.

    A crash's text stays in the server log, as the SDK keeps it for crashes outside groups.
    """
    if isinstance(exc, SandboxError):
        return str(exc)
    return f"internal error ({type(exc).__name__}); the server log has the details"


def _tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Turn our errors into ToolErrors the agent can act on; unwrap exception groups to say why."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except SandboxError as exc:
            raise ToolError(clip(str(exc), MESSAGE_LIMIT)) from exc
        except ExceptionGroup as group:
            # A task group wraps what failed in it; the agent needs the failures, not the wrapper.
            leaves = _leaves(group)
            if not all(isinstance(e, SandboxError) for e in leaves):
                log.error("%s failed", fn.__name__, exc_info=group)
            messages = list(dict.fromkeys(_message(e) for e in leaves))
            raise ToolError(clip("; ".join(messages), MESSAGE_LIMIT)) from group

    return wrapper


def _progress(ctx: Context) -> Progress:
    """Adapt the manager's (message, fraction) progress to MCP progress notifications (0-100, increasing)."""
    last = 0.0

    async def report(message: str, fraction: float | None = None) -> None:
        nonlocal last
        # Progress must increase with every notification; messages without a fraction creep forward.
        value = max(last + 0.01, fraction * 100 if fraction is not None else last + 0.01)
        last = min(value, 100.0)
        await ctx.report_progress(last, 100, message)

    return report


def _output_progress(ctx: Context) -> Progress | None:
    """Progress for a running command's output, when the client asked for progress (a progressToken).

    The SDK keeps the token in its dispatch context, not in the request's ``_meta`` it hands us;
    where that context is not one whose token we can see, the output is streamed anyway (reporting
    progress without a token is a no-op), only at a small cost.
    """
    dctx = getattr(ctx.request_context.session, "_request_outbound", None)
    for _ in range(3):  # the runner wraps the transport's context
        dctx = getattr(dctx, "_inner", dctx)
    for attr in ("_progress_token", "_on_progress"):  # JSON-RPC transports; the in-memory one
        if hasattr(dctx, attr):
            return _counted_progress(ctx) if getattr(dctx, attr) is not None else None
    return _counted_progress(ctx)


def _counted_progress(ctx: Context) -> Progress:
    """Output as progress messages, numbered 1, 2, 3, ... (no total: a command's length is unknown)."""
    sent = 0

    async def report(message: str, fraction: float | None = None) -> None:
        nonlocal sent
        sent += 1
        await ctx.report_progress(sent, None, message)

    return report


class BearerTokenVerifier(TokenVerifier):
    """Accepts exactly one static bearer token (the HTTP transport's), compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        """The access grant for the right token; None (so a 401) for any other."""
        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token="<redacted>", client_id="sandbox-mcp-http", scopes=[])
        return None


# What a lifespan yields to the tools: the manager, or anything with its methods (the daemon
# hands each connection a view limited to its peer's workspaces).
ManagerLifespan = Callable[[MCPServer], AbstractAsyncContextManager[Any]]


def build_server(
    settings: Settings | None = None,
    *,
    lifespan: ManagerLifespan | None = None,
    http_token: str | None = None,
    http_url: str = "http://127.0.0.1",
) -> MCPServer:
    """The MCP server with every tool of the contract.

    By default its lifespan opens a :class:`WorkspaceManager` in this process; ``lifespan``
    replaces that (the daemon shares one manager between connections). ``http_token`` makes the
    HTTP transport require ``Authorization: Bearer <token>`` (stdio ignores it); ``http_url`` is
    where that server is reached, named in the auth settings.
    """

    @asynccontextmanager
    async def own_manager(server: MCPServer) -> AsyncIterator[OwnedManager]:
        async with WorkspaceManager(settings or load_settings()) as manager:
            yield OwnedManager(manager, os.geteuid())  # in process: this user creates, and root sees all

    auth: dict[str, Any] = {}
    if http_token is not None:
        # A resource server with a static token and no OAuth: no metadata routes, so issuer_url
        # only names this server (the SDK requires one).
        auth = {
            "auth": AuthSettings(issuer_url=AnyHttpUrl(http_url), resource_server_url=None),
            "token_verifier": BearerTokenVerifier(http_token),
        }

    # MCPServer sets the root logger to INFO; asyncssh would then log every channel open and
    # close, which costs milliseconds per exec and floods the stdio server's stderr.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # the Incus client would log every API request
    mcp = MCPServer(
        "sandbox-mcp",
        title="Sandbox workspaces",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan or own_manager,
        **auth,
    )

    def manager_of(ctx: Context) -> Workspaces:
        return ctx.request_context.lifespan_context

    def tool(*, read_only: bool = False, destructive: bool = False, idempotent: bool = False, title: str):
        annotations = ToolAnnotations(
            title=title,
            read_only_hint=read_only,
            destructive_hint=destructive,
            idempotent_hint=idempotent,
            open_world_hint=False,
        )

        def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
            wrapped = _tool_errors(fn)
            mcp.tool(annotations=annotations, structured_output=True)(wrapped)
            return wrapped

        return decorate

    @tool(title="Create a workspace")
    async def create_workspace(
        ctx: Context,
        name: Name,
        type: Annotated[
            Literal["container", "vm", "incus"],
            Field(
                description="'container' (the default: systemd-nspawn, shared kernel, boots in about a second), "
                "'vm' (qemu with its own kernel: stronger isolation, slower to boot) or 'incus' (an Incus "
                "container, on the local Incus daemon or a remote server/cluster when configured)"
            ),
        ] = "container",
        packages: Annotated[
            list[str],
            Field(
                description="Extra packages to install: Debian package names on a plain Linux host "
                "(e.g. ['python3', 'jq']), nixpkgs attribute paths on NixOS (e.g. ['ripgrep'])",
                max_length=200,
            ),
        ] = [],  # noqa: B006 - pydantic copies defaults
        ip: Annotated[
            str | None,
            Field(description="Static IPv4 address in the workspace subnet; omit to get a free one"),
        ] = None,
        start: Annotated[bool, Field(description="Start it and wait until SSH answers")] = True,
        egress: Annotated[
            Literal["none", "internet"],
            Field(
                description="Network access from inside: 'none' (the default) reaches nothing, not other "
                "workspaces, not the host, not the outside; 'internet' adds NAT to the outside (package "
                "downloads, git clone) while private ranges, link-local and the host stay closed. "
                "'internet' works only where the host allows NAT (SANDBOX_MCP_NAT=true)"
            ),
        ] = "none",
        cpus: Annotated[
            float | None,
            Field(description="CPUs it may use (fractions allowed, e.g. 0.5); omit for the server's default"),
        ] = None,
        memory_mib: Annotated[
            int | None,
            Field(description="Memory in MiB (exceeding it kills a process inside); omit for the server's default"),
        ] = None,
    ) -> Workspace:
        """Create a new isolated Linux workspace and (by default) start it.

        Use this when you need a clean, disposable machine to run untrusted or messy work (builds, tests,
        installs) without touching the host. Check list_workspaces first: an existing workspace can simply
        be reused. The first create on a host builds a root image (about a minute, with progress); later
        ones take about a second. Extra packages are baked into a cached image variant, so the first
        create with a new package set takes longer.

        Returns the workspace: its state ('running' when start=true), IP, user, workspace_dir (the
        persistent project directory inside, exec's default cwd) and host_workspace_dir (the same
        directory on the host), the pinned SSH host key fingerprint and phase timings, its isolation
        ('unprivileged-container': root inside is an unprivileged uid on the host; 'privileged-container';
        'microvm') and limits (cpus, memory_mib, tasks).

        Network: by default a workspace reaches nothing (the server still reaches it over SSH); pass
        egress='internet' when the work needs downloads. Packages listed in `packages` are installed
        on the host side into a cached image and need no egress.

        Errors: a taken name -> pick another or reuse it; an IP conflict -> omit ip; egress='internet'
        refused -> the host has NAT off, work without it or ask the user; a boot failure includes the
        last log lines (see also workspace_logs).
        """
        return await manager_of(ctx).create(
            name, type, packages, ip, start, progress=_progress(ctx), egress=egress, cpus=cpus, memory_mib=memory_mib
        )

    @tool(title="Start a workspace", idempotent=True)
    async def start_workspace(ctx: Context, name: Name) -> Workspace:
        """Start a stopped workspace and wait until SSH answers with its pinned host key.

        The root filesystem starts clean (anything installed at run time is gone); the workspace
        directory keeps its files. Starting a running workspace returns it unchanged.
        """
        return await manager_of(ctx).start(name, progress=_progress(ctx))

    @tool(title="Stop a workspace", idempotent=True)
    async def stop_workspace(ctx: Context, name: Name) -> Workspace:
        """Stop a workspace: its processes end and its root filesystem is discarded; the workspace directory
        (and the workspace itself) stay, ready for start_workspace. Stopping a stopped workspace is a no-op."""
        return await manager_of(ctx).stop(name)

    @tool(title="Destroy a workspace", destructive=True, idempotent=False)
    async def destroy_workspace(
        ctx: Context,
        name: Name,
        keep_data: Annotated[
            bool,
            Field(description="Keep the host workspace directory (and host key) for a later create of the same name"),
        ] = False,
    ) -> DestroyResult:
        """Stop and delete a workspace for good: its processes, network, registry entry and, unless
        keep_data is true, its files on the host. Use stop_workspace instead to pause it."""
        return await manager_of(ctx).destroy(name, keep_data)

    @tool(title="List workspaces", read_only=True, idempotent=True)
    async def list_workspaces(ctx: Context) -> WorkspaceList:
        """List every workspace with its state, IP and directories. Call this before creating a new one."""
        return await manager_of(ctx).list()

    @tool(title="Workspace status", read_only=True, idempotent=True)
    async def workspace_status(ctx: Context, name: Name) -> WorkspaceStatus:
        """One workspace with live runtime detail (process or unit state, PID, uptime)."""
        return await manager_of(ctx).status(name)

    @tool(title="Run a command in a workspace")
    async def exec(
        ctx: Context,
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

        Returns exit_code, stdout and stderr (separately), timed_out and duration_ms. Output beyond the cap
        (1 MiB per stream by default) is cut and truncated=true: redirect big output to a file and page
        it with read_file. On timeout the command and its children are killed and timed_out=true. When the
        request carries a progressToken, the output also arrives as progress notifications while it runs.
        For a server or anything you want to leave running, watch or stop, use start_process instead.
        If the workspace is stopped, call start_workspace first.
        """
        return await manager_of(ctx).exec(name, command, cwd, env, timeout_s, stdin, _output_progress(ctx))

    @tool(title="Read a file from a workspace", read_only=True, idempotent=True)
    async def read_file(
        ctx: Context,
        name: Name,
        path: Annotated[str, Field(description="File path; relative paths resolve against the workspace directory")],
        offset: Annotated[int, Field(description="Byte offset to start at", ge=0)] = 0,
        limit: Annotated[
            int | None, Field(description="Bytes to read (default 256 KiB, capped at 4 MiB)", ge=1)
        ] = None,
    ) -> FileContent:
        """Read a file (or a chunk of it) from a running workspace.

        Text comes back as utf-8; anything else as base64 (see encoding). If truncated is true, call again
        with offset=next_offset to read the rest. For a directory, use list_dir. Regular files only: a named
        pipe, socket or device is refused (read those with exec and a timeout).
        """
        return await manager_of(ctx).read_file(name, path, offset, limit)

    @tool(title="Write a file in a workspace", idempotent=False)
    async def write_file(
        ctx: Context,
        name: Name,
        path: Annotated[str, Field(description="File path; relative paths resolve against the workspace directory")],
        content: Annotated[str, Field(description="The file content, as text or base64 (see encoding)")],
        encoding: Annotated[
            Literal["utf-8", "base64"], Field(description="'base64' for binary content")
        ] = "utf-8",
        append: Annotated[bool, Field(description="Append instead of replacing the file")] = False,
        mode: Annotated[
            str | None, Field(description="Octal permissions such as '644' or '755'", pattern=r"^0?[0-7]{3}$")
        ] = None,
    ) -> WriteResult:
        """Write (replace or append) a file in a running workspace, creating missing parent directories.
        A replaced file is swapped in atomically. Owned by the workspace user. Large payloads: write in parts
        with append=true. Regular files only: a named pipe, socket or device is refused."""
        return await manager_of(ctx).write_file(name, path, content, encoding, append, mode)

    @tool(title="List a directory in a workspace", read_only=True, idempotent=True)
    async def list_dir(
        ctx: Context,
        name: Name,
        path: Annotated[
            str, Field(description="Directory; relative paths resolve against the workspace directory")
        ] = ".",
    ) -> DirListing:
        """List a directory in a running workspace: each entry's name, type (file, dir, symlink, other),
        size and modification time. At most 10,000 entries: truncated=true means there are more (list them
        with exec, e.g. 'ls -A | head -n 20000')."""
        return await manager_of(ctx).list_dir(name, path)

    @tool(title="Workspace boot log", read_only=True, idempotent=True)
    async def workspace_logs(
        ctx: Context,
        name: Name,
        lines: Annotated[int, Field(description="How many of the last lines", ge=1, le=10000)] = 200,
    ) -> LogsResult:
        """The tail of the workspace's boot/console log (or its systemd unit's journal on NixOS). Use it when
        a workspace fails to start or SSH does not answer."""
        return await manager_of(ctx).logs(name, lines)

    process_tools.register(tool, manager_of, Name)
    return mcp


def transport_security(host: str) -> TransportSecuritySettings:
    """Host and Origin checks (DNS rebinding protection), on for every bind address."""
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=http_auth.allowed_hosts(host),
        allowed_origins=http_auth.allowed_origins(host),
    )


def serve_http(
    settings: Settings, host: str, port: int, *, lifespan: ManagerLifespan | None = None
) -> None:
    """Serve streamable HTTP on ``host:port`` behind the bearer token (see :mod:`http_auth`).

    Says on stderr where the token is. Blocks until interrupted.

    Raises:
        InvalidSpec: a non-loopback ``host`` without an explicitly configured token, or an
            unusable token file.
    """
    token = http_auth.load_token(settings)
    http_auth.check_bind(host, token)
    url_host = f"[{host}]" if ":" in host else host
    server = build_server(settings, lifespan=lifespan, http_token=token.value, http_url=f"http://{url_host}:{port}")
    where = f"from {token.path}" if token.path else "from SANDBOX_MCP_HTTP_TOKEN"
    print(
        f"sandbox-mcp: HTTP on http://{url_host}:{port}/mcp requires 'Authorization: Bearer <token>', token {where}",
        file=sys.stderr,
        flush=True,
    )
    server.run("streamable-http", host=host, port=port, transport_security=transport_security(host))
