"""The MCP server: :func:`build_server` puts the tools of :mod:`sandbox_mcp.tools` over a lifespan.

The tools are thin layers over :class:`~sandbox_mcp.workspaces.Workspaces` (see
:mod:`sandbox_mcp.tools`); this module adds the lifespan (a local manager by default), the stdio
transport that stops on SIGINT, SIGTERM or EOF alike (:func:`serve_stdio`), the HTTP transport and
its bearer token.
"""

from __future__ import annotations

import hmac
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.lowlevel import Server
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, InputRequiredResult, Tool
from pydantic import AnyHttpUrl, ValidationError

from . import __version__, http_auth, shutdown, tools
from .config import Settings, load_settings
from .manager import WorkspaceManager
from .owners import OwnedManager
from .workspaces import Workspaces

__all__ = [
    "BearerTokenVerifier",
    "ManagerLifespan",
    "SandboxServer",
    "build_server",
    "invalid_arguments",
    "lowlevel_server",
    "schema_without_titles",
    "serve_http",
    "serve_stdio",
]

log = logging.getLogger(__name__)

INSTRUCTIONS = """\
Disposable, isolated Linux workspaces (containers; on NixOS also VMs and Incus) for running code safely.
Typical flow: create_workspace(name) -> exec(name, command) / write_file / read_file / list_dir ->
destroy_workspace(name). The project directory inside is ~/workspace (exec's default cwd; relative file
paths resolve against it); it persists across stop/start, everything else is reset on restart.
Call list_workspaces first to reuse an existing workspace instead of creating a new one."""


class BearerTokenVerifier(TokenVerifier):
    """Accepts exactly one static bearer token (the HTTP transport's), compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def verify_token(self, token: str) -> AccessToken | None:
        """The access grant for the right token; None (so a 401) for any other."""
        if hmac.compare_digest(token.encode(), self._token):
            return AccessToken(token="<redacted>", client_id="sandbox-mcp-http", scopes=[])
        return None


# Keywords whose values are data, not schemas: a default or an example may hold a "title" of its own.
_DATA_KEYWORDS = frozenset({"default", "examples", "const", "enum"})


def schema_without_titles(schema: Any) -> Any:
    """``schema`` without the ``title`` pydantic generates for every property and model ("Name" for
    ``name``): it repeats the key, and a client puts each tool's input schema in the model's context.
    A property named ``title`` stays (its value is a schema, not a string)."""
    if isinstance(schema, list):
        return [schema_without_titles(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: value if key in _DATA_KEYWORDS else schema_without_titles(value)
        for key, value in schema.items()
        if not (key == "title" and isinstance(value, str))
    }


_INPUT_SHOWN = 80  # characters of a rejected value's repr in the message


def invalid_arguments(exc: ValidationError, schema: dict[str, Any] | None) -> str:
    """What a tool's rejected arguments were, for the agent that sent them: each bad field, what is wrong,
    the value given, and the field's description from the input schema, without pydantic's model name,
    error codes and documentation links."""
    properties = (schema or {}).get("properties", {})
    parts, described = [], set()
    for err in exc.errors(include_url=False):
        loc = [str(part) for part in err["loc"]]
        field = loc[0] if loc else "arguments"
        where = field + "".join(f"[{part}]" for part in loc[1:])
        text = f"{where}: {err['msg'].removeprefix('Value error, ')}"  # our validators' own words
        if err["type"] != "missing":
            given = repr(err.get("input"))
            text += f" (got {given if len(given) <= _INPUT_SHOWN else given[:_INPUT_SHOWN] + '...'})"
        description = properties.get(field, {}).get("description") if isinstance(properties, dict) else None
        if description and field not in described:
            described.add(field)
            text += f"; {field} is: {description}"
        parts.append(text)
    return "invalid arguments: " + "; ".join(parts) + ". Correct them and call again."


class SandboxServer(MCPServer):
    """The SDK's server, listing each tool's input schema without pydantic's generated titles
    (about 2.5 KB of the 22 KB of input schemas; validation still uses the full models), and saying
    what was wrong with rejected arguments in a line the agent can act on."""

    async def list_tools(self) -> list[Tool]:
        """Every tool, as the SDK lists it, input schemas without titles."""
        return [
            tool.model_copy(update={"input_schema": schema_without_titles(tool.input_schema)})
            for tool in await super().list_tools()
        ]

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> CallToolResult | InputRequiredResult:
        """The SDK's call; arguments that fail validation raise a :class:`ToolError` worded by
        :func:`invalid_arguments` (the SDK's is pydantic's own text, with a documentation link per field)."""
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(exc, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            schema = next((tool.input_schema for tool in await super().list_tools() if tool.name == name), None)
            message = invalid_arguments(cause, schema)
            raise ToolError(f"Error executing tool {name}: {message}") from cause


# What a lifespan yields to the tools: the caller's Workspaces (the daemon hands each connection a
# view limited to its peer's workspaces; in process, this user's OwnedManager).
ManagerLifespan = Callable[[MCPServer], AbstractAsyncContextManager[Workspaces]]


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
    mcp = SandboxServer(
        "sandbox-mcp",
        title="Sandbox workspaces",
        version=__version__,
        instructions=INSTRUCTIONS,
        lifespan=lifespan or own_manager,
        **auth,
    )

    tools.register(mcp)
    return mcp


def lowlevel_server(server: MCPServer) -> Server[Any]:
    """The SDK's low-level server under ``server``: the one thing that serves a given stream pair.

    mcp 2.x has no public way to run an ``MCPServer`` session over streams of our own (``run`` and
    ``run_stdio_async`` take the process's stdin/stdout; ``Server.run(read, write, options)`` is
    public, but ``MCPServer`` keeps its ``Server`` private). The SDK's own in-memory client reaches
    it the same way (``mcp/client/_memory.py``: "TODO: Make `lowlevel_server` public"), so this is
    the one place we do; ``tests/test_daemon.py`` fails loudly if the SDK renames or changes it.
    """
    return server._lowlevel_server  # noqa: SLF001


async def serve_stdio(server: MCPServer) -> None:
    """Serve MCP on stdin/stdout until the client closes stdin or SIGINT/SIGTERM arrives.

    Any of the three cancels the calls still running (a create in flight undoes itself), then the
    lifespan closes the manager; see :mod:`shutdown` for why not the SDK's ``run("stdio")``.
    """
    from mcp.server.stdio import stdio_server

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
