"""The MCP server: thin tools over :class:`~sandbox_mcp.manager.WorkspaceManager`.

Arguments are flat tool parameters with schema constraints; results are the
pydantic models of ``models.py``. A :class:`~sandbox_mcp.errors.SandboxError`
becomes a ``ToolError`` carrying its message (what went wrong, what to do);
anything else is a crash the SDK reports without leaking a traceback.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import anyio
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import AnyHttpUrl, BaseModel, Field

from . import __version__, budget, http_auth, shutdown
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

__all__ = ["BearerTokenVerifier", "ManagerLifespan", "build_server", "serve_http", "serve_stdio"]

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


# MCP progress goes up with every notification (the spec's MUST); a message without a fraction of
# its own moves it on by this much, on the scale of PROGRESS_TOTAL.
PROGRESS_TOTAL = 100.0
_CREEP = 0.1


def _progress(ctx: Context) -> Progress:
    """Adapt the manager's (message, fraction) progress to MCP progress notifications: ``progress``
    out of ``total`` = 100, always above the last one sent (a fraction below it, or none, creeps on
    from there), never past 100."""
    last: float | None = None

    async def report(message: str, fraction: float | None = None) -> None:
        nonlocal last
        value = min(max(fraction, 0.0), 1.0) * PROGRESS_TOTAL if fraction is not None else 0.0
        if last is not None and value <= last:
            value = last + _CREEP
        if value > PROGRESS_TOTAL or (last is not None and last >= PROGRESS_TOTAL):
            return  # nothing above the total to report; the result follows
        last = round(value, 3)
        await ctx.report_progress(last, PROGRESS_TOTAL, message)

    return report


def _call_result(result: Any, budget_bytes: int) -> Any:
    """A tool's model result as the SDK would send it, cut to the result budget (see :mod:`budget`),
    with a text rendering that puts the small fields before the content."""
    if not isinstance(result, BaseModel):
        return result
    result = budget.fit(result, budget_bytes)
    return CallToolResult(
        content=[TextContent(type="text", text=budget.text_rendering(result))],
        structured_content=result.model_dump(mode="json", by_alias=True),
    )


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

            @functools.wraps(wrapped)
            async def sent(*args: Any, **kwargs: Any) -> Any:
                budget_bytes = manager_of(kwargs["ctx"]).settings.result_budget_bytes
                try:
                    result = await wrapped(*args, **kwargs)
                except ToolError as exc:
                    raise ToolError(budget.fit_message(str(exc), budget_bytes)) from exc.__cause__
                return _call_result(result, budget_bytes)

            # The docstring is what the agent reads: without the source's indentation, sent on every request.
            description = inspect.cleandoc(fn.__doc__ or "")
            mcp.tool(description=description, annotations=annotations, structured_output=True)(sent)
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
    async def list_workspaces(
        ctx: Context,
        offset: Annotated[int, Field(description="Index (in name order) of the first one to list", ge=0)] = 0,
        limit: Annotated[
            int | None, Field(description="Most to list; default: as many as fit one result", ge=1, le=1000)
        ] = None,
    ) -> WorkspaceList:
        """List every workspace with its state, IP and directories, in name order. Call this before creating
        a new one. total says how many there are; if truncated is true, call again with offset=next_offset."""
        return budget.page_workspaces(await manager_of(ctx).list(), offset, limit)

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
        sudo. The default cwd is the workspace directory. Not a login shell: no profile files are read.

        Returns exit_code, stdout and stderr (separately), timed_out and duration_ms. Long output is cut to
        fit the result (about 24 KB at the default budget, 12 KB each when both streams are long):
        truncated=true, its head and tail
        are kept with a marker line where the middle was left out; stdout_omitted/stderr_omitted count
        the bytes left out and stdout_path/stderr_path name a file in the workspace with the whole stream
        (page it with read_file, offset/next_offset). stdout_bytes/stderr_bytes are the whole sizes.
        On timeout the command and its children are killed and timed_out=true.
        If the workspace is stopped, call start_workspace first.
        """
        return await manager_of(ctx).exec(name, command, cwd, env, timeout_s, stdin)

    @tool(title="Read a file from a workspace", read_only=True, idempotent=True)
    async def read_file(
        ctx: Context,
        name: Name,
        path: Annotated[str, Field(description="File path; relative paths resolve against the workspace directory")],
        offset: Annotated[int, Field(description="Byte offset to start at", ge=0)] = 0,
        limit: Annotated[
            int | None,
            Field(description="Bytes to read; default and most: what fits one result (about 24 KB of text "
                  "at the default budget, less for binary content)", ge=1),
        ] = None,
    ) -> FileContent:
        """Read a file (or a chunk of it) from a running workspace.

        Text comes back as utf-8; anything else as base64 (see encoding). size is the whole file's size. If
        truncated is true, call again with offset=next_offset to read the rest. For a directory, use
        list_dir. Regular files only: a named pipe, socket or device is refused (read those with exec and a
        timeout).
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
        offset: Annotated[int, Field(description="Index (in name order) of the first entry to list", ge=0)] = 0,
        limit: Annotated[
            int | None,
            Field(description="Most entries to list; default: as many as fit one result (a few hundred)",
                  ge=1, le=10000),
        ] = None,
    ) -> DirListing:
        """List a directory in a running workspace, in name order: each entry's name, type (file, dir,
        symlink, other), size and modification time. total is how many entries it has; a long directory
        comes in pages: truncated=true and next_offset say to call again with offset=next_offset."""
        return await manager_of(ctx).list_dir(name, path, offset, limit)

    @tool(title="Workspace boot log", read_only=True, idempotent=True)
    async def workspace_logs(
        ctx: Context,
        name: Name,
        lines: Annotated[int, Field(description="How many of the last lines", ge=1, le=10000)] = 200,
    ) -> LogsResult:
        """The tail of the workspace's boot/console log (or its systemd unit's journal on NixOS). Use it when
        a workspace fails to start or SSH does not answer."""
        return await manager_of(ctx).logs(name, lines)

    return mcp


async def serve_stdio(server: MCPServer) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin or SIGINT/SIGTERM arrives.

    Any of the three cancels the calls still running (a create in flight undoes itself), then the
    lifespan closes the manager; see :mod:`shutdown` for why not the SDK's ``run("stdio")``.
    """
    from mcp.server.stdio import stdio_server

    from .daemon import lowlevel_server

    lowlevel = lowlevel_server(server)
    async with anyio.create_task_group() as tg:
        tg.start_soon(shutdown.cancel_on_signals, tg.cancel_scope, "sandbox-mcp serve")

        def closed() -> None:
            log.debug("sandbox-mcp serve: stdin closed, stopping")
            tg.cancel_scope.cancel()

        async with shutdown.stdio_pipes(on_eof=closed) as (lines, writer):
            async with stdio_server(lines, writer) as (read, write):  # type: ignore[arg-type]
                await lowlevel.run(read, write, lowlevel.create_initialization_options())
        tg.cancel_scope.cancel()


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
