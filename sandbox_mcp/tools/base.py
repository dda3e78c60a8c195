"""What every tool shares: errors the agent can act on, progress, the typed context, the decorator.

A tool is thin: it takes flat arguments (schema-constrained), calls one method of the
:class:`~sandbox_mcp.workspaces.Workspaces` its lifespan yields, and returns that method's
pydantic model. A :class:`~sandbox_mcp.errors.SandboxError` becomes a ``ToolError`` carrying its
message; anything else is a crash the SDK reports without leaking a traceback.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, ParamSpec, TypeVar

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field

from .. import budget
from ..errors import SandboxError, clip
from ..progress import Progress
from ..workspaces import Workspaces

__all__ = [
    "MESSAGE_LIMIT",
    "PROGRESS_TOTAL",
    "ToolContext",
    "call_result",
    "output_progress_of",
    "progress_of",
    "spec_parameters",
    "tool",
    "tool_errors",
    "workspaces",
]

P = ParamSpec("P")
R = TypeVar("R")

# What a tool receives: its lifespan context is the caller's Workspaces (the manager seen as one
# user, in process or through the daemon).
ToolContext = Context[Workspaces, Any]

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


def tool_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
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


def spec_parameters(
    model: type[BaseModel], narrowed: Mapping[str, Any] | None = None
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a tool ``fn(ctx, **fields)`` one flat parameter per field of ``model`` (its type, constraints,
    description and default), so the tool's schema is the model's and an argument is added in one place.

    ``narrowed`` replaces a field's type for the tool (the workspace types the runtimes know, say)."""

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=ToolContext)]
        for name, field in model.model_fields.items():
            info = Field(description=field.description, examples=field.examples)
            default = inspect.Parameter.empty if field.is_required() else field.get_default(call_default_factory=True)
            kind = (narrowed or {}).get(name, field.annotation)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=Annotated[(kind, *field.metadata, info)]))
        fn.__signature__ = inspect.Signature(params, return_annotation=inspect.signature(fn, eval_str=True).return_annotation)  # type: ignore[attr-defined]
        return fn

    return decorate


# MCP progress goes up with every notification (the spec's MUST); a message without a fraction of
# its own moves it on by this much, on the scale of PROGRESS_TOTAL.
PROGRESS_TOTAL = 100.0
_CREEP = 0.1


def progress_of(ctx: ToolContext) -> Progress:
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


def call_result(result: Any, budget_bytes: int) -> Any:
    """A tool's model result as the SDK would send it, cut to the result budget (see :mod:`budget`),
    with a text rendering that puts the small fields before the content."""
    if not isinstance(result, BaseModel):
        return result
    result = budget.fit(result, budget_bytes)
    return CallToolResult(
        content=[TextContent(type="text", text=budget.text_rendering(result))],
        structured_content=result.model_dump(mode="json", by_alias=True),
    )


def output_progress_of(ctx: ToolContext) -> Progress | None:
    """Progress for a running command's output, when the client asked for progress (a progressToken).

    Messages are numbered 1, 2, 3, ... without a total (a command's length is unknown; the 0-100
    scale of :func:`progress_of` would stop rising). The SDK keeps the token in its dispatch
    context, not in the request's ``_meta`` it hands us; where that context is not one whose token
    we can see, the output is streamed anyway (progress without a token is a no-op), at a small cost.
    """
    dctx = getattr(ctx.request_context.session, "_request_outbound", None)
    for _ in range(3):  # the runner wraps the transport's context
        dctx = getattr(dctx, "_inner", dctx)
    for attr in ("_progress_token", "_on_progress"):  # JSON-RPC transports; the in-memory one
        if hasattr(dctx, attr) and getattr(dctx, attr) is None:
            return None
    sent = 0

    async def report(message: str, fraction: float | None = None) -> None:
        nonlocal sent
        sent += 1
        await ctx.report_progress(sent, None, message)

    return report


def workspaces(ctx: ToolContext) -> Workspaces:
    """The workspaces this call may see and touch (what the server's lifespan yielded)."""
    return ctx.request_context.lifespan_context


def tool(
    mcp: MCPServer, *, read_only: bool = False, destructive: bool = False, idempotent: bool = False, title: str
) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Register the decorated function as a tool of ``mcp``: structured output, honest annotations, our errors."""
    annotations = ToolAnnotations(
        title=title,
        read_only_hint=read_only,
        destructive_hint=destructive,
        idempotent_hint=idempotent,
        open_world_hint=False,
    )

    def decorate(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        wrapped = tool_errors(fn)

        @functools.wraps(wrapped)
        async def sent(*args: Any, **kwargs: Any) -> Any:
            budget_bytes = workspaces(kwargs["ctx"]).settings.result_budget_bytes
            try:
                result = await wrapped(*args, **kwargs)
            except ToolError as exc:
                raise ToolError(budget.fit_message(str(exc), budget_bytes)) from exc.__cause__
            return call_result(result, budget_bytes)

        # The docstring is what the agent reads: without the source's indentation, sent on every request.
        description = inspect.cleandoc(fn.__doc__ or "")
        mcp.tool(description=description, annotations=annotations, structured_output=True)(sent)
        return wrapped

    return decorate
