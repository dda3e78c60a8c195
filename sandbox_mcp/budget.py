"""Tool results that fit a client's budget, and their text rendering.

An MCP client limits how much of a tool result reaches the model: Claude Code by default refuses a
result over 25,000 tokens (``MAX_MCP_OUTPUT_TOKENS``) and swaps anything over ~50,000 characters for
a file with a 2 KB preview. A result goes out twice, as ``structuredContent`` and as a JSON text
block beside it, so :func:`wire_size` counts both, as the JSON-RPC message carries them. The
budget (``Settings.result_budget_bytes``, 60,000 bytes by default) bounds that whole: one copy is
then under 30,000 bytes, about 10,000 tokens at a conservative 3 bytes a token.

The fitters here cut a result that would not fit and say so in the result (``truncated``,
``next_offset``, the ``*_omitted`` and ``*_path`` fields of exec), so the agent can fetch the
rest in steps that fit as well. :func:`text_rendering` puts the small fields before the content,
so even a client's cut preview of the text carries them.

Pure functions over the result models; no MCP import (the server builds the wire objects).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel

from .models import DirListing, ExecResult, FileContent, LogsResult, WorkspaceList

__all__ = [
    "ENVELOPE_BYTES",
    "content_room",
    "exec_keep",
    "exec_save_over",
    "fit",
    "fit_message",
    "join_stream",
    "page_workspaces",
    "read_limit",
    "text_rendering",
    "wire_size",
]

M = TypeVar("M", bound=BaseModel)

# The JSON-RPC envelope around a result ({"jsonrpc":"2.0","id":..,"result":{"content":[{"type":
# "text","text":..}],"structuredContent":..,"isError":false}}) with room for a _meta and a long id.
ENVELOPE_BYTES = 512
# Fields of a result that a client's cut preview loses first: rendered after all the others.
_CONTENT_FIELDS = ("content", "stdout", "stderr", "entries", "log", "workspaces")
# The other fields of a result with content (path, sizes, offsets, paths of saved output): the
# most they take in both copies, so content sizing leaves them room. Paths are at most 4 KiB.
_FIELDS_ROOM = 2 * 4096 + 2048


def _json_len(value: Any) -> int:
    return len(pydantic_core.to_json(value))


def _ordered(data: dict[str, Any]) -> dict[str, Any]:
    small = {k: v for k, v in data.items() if k not in _CONTENT_FIELDS}
    small.update({k: data[k] for k in _CONTENT_FIELDS if k in data})
    return small


def text_rendering(model: BaseModel) -> str:
    """The result as compact JSON with the small fields (exit_code, truncated, next_offset, sizes,
    paths) before the content, so a preview cut short still says whether and where to continue."""
    return pydantic_core.to_json(_ordered(model.model_dump(mode="json"))).decode()


def wire_size(model: BaseModel) -> int:
    """Bytes the result takes in the JSON-RPC message: the structured copy, the text copy (a JSON
    string holding JSON, so escaped twice) and the envelope."""
    return _json_len(model.model_dump(mode="json")) + _json_len(text_rendering(model)) + ENVELOPE_BYTES


def content_room(budget: int) -> int:
    """Bytes of plain content (ASCII text that needs no escaping) one result can carry: half of
    what is left after the envelope and the small fields, as the content goes out twice."""
    return max(1024, (budget - ENVELOPE_BYTES - _FIELDS_ROOM) // 2)


def read_limit(budget: int) -> int:
    """read_file's default (and largest) chunk under ``budget``: what fits as plain text. A chunk
    that does not fit as read (base64, or text full of escapes) is cut further by :func:`fit`."""
    return content_room(budget)


def exec_keep(budget: int) -> int:
    """Bytes of one exec stream kept (its head and tail) under ``budget``: the whole room, for when
    the other stream is short. When both are long, :func:`fit` halves them."""
    return content_room(budget)


def exec_save_over(budget: int) -> int:
    """Past how many bytes an exec stream is saved whole: past its share of the room when both
    streams are long, as then :func:`fit` cuts it to that."""
    return content_room(budget) // 2


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The largest n in [lo, hi] with ok(n), given ok is monotone and ok(lo) holds."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# read_file ------------------------------------------------------------------------------------


def _utf8_boundary(data: bytes, n: int) -> int:
    """The largest character boundary of UTF-8 ``data`` at or before byte ``n``."""
    while 0 < n < len(data) and (data[n] & 0xC0) == 0x80:
        n -= 1
    return n


def _fit_file(fc: FileContent, budget: int) -> FileContent:
    raw = fc.content.encode() if fc.encoding == "utf-8" else base64.b64decode(fc.content)

    def chunk(n: int) -> FileContent:
        if fc.encoding == "utf-8":
            n = _utf8_boundary(raw, n)
            content = raw[:n].decode()
        else:
            content = base64.b64encode(raw[:n]).decode("ascii")
        end = fc.offset + n
        more = end < fc.size
        return fc.model_copy(update={"content": content, "truncated": more, "next_offset": end if more else None})

    n = _largest(0, len(raw), lambda k: wire_size(chunk(k)) <= budget)
    if n == 0 and raw:
        n = _utf8_boundary(raw, 4) or 1  # always move on, even under a budget too small for the fields
    return chunk(n)


# exec -----------------------------------------------------------------------------------------


def _marker(stream: str, omitted: int, path: str | None, head_bytes: int) -> str:
    if path:
        where = f"the whole {stream} is in {path} (read_file it from offset={head_bytes} for what is missing)"
    else:
        where = f"it was not saved: redirect the command's {stream} to a file to keep all of it"
    return f"\n[sandbox-mcp: {omitted:,} bytes of {stream} left out here; {where}]\n"


def join_stream(head: str, tail: str, omitted: int, stream: str, path: str | None) -> tuple[str, tuple[int, int]]:
    """One exec stream as a result carries it: the head, a marker line saying how much was left out
    and where the whole is, the tail. Returns the text and where the marker lies in it (for
    :func:`fit`, which may cut further around it). Without anything omitted: the text alone."""
    if omitted <= 0:
        text = head + tail
        return text, (len(text), len(text))
    marker = _marker(stream, omitted, path, len(head.encode("utf-8", errors="surrogatepass")))
    return head + marker + tail, (len(head), len(head) + len(marker))


def _cut_stream(text: str, split: tuple[int, int] | None, omitted: int, keep: int, stream: str,
                path: str | None) -> tuple[str, tuple[int, int], int]:  # fmt: skip
    """Keep at most ``keep`` characters of the stream's head and tail together."""
    if split is None or split[0] == split[1]:  # not cut before: keep its head and its tail
        mid = len(text) // 2
        head0, tail0 = text[:mid], text[mid:]
    else:
        head0, tail0 = text[: split[0]], text[split[1] :]
    if len(head0) + len(tail0) <= keep:
        return text, split or (len(text), len(text)), omitted
    b = min(len(tail0), keep // 2)
    a = min(len(head0), keep - b)
    b = min(len(tail0), keep - a)
    removed = head0[a:] + tail0[: len(tail0) - b]
    omitted += len(removed.encode("utf-8", errors="surrogatepass"))
    new, new_split = join_stream(head0[:a], tail0[len(tail0) - b :], omitted, stream, path)
    return new, new_split, omitted


def _fit_exec(r: ExecResult, budget: int) -> ExecResult:
    splits, saved = r.splits(), r.saved()

    def cut(keep: int) -> ExecResult:
        update: dict[str, Any] = {}
        new_splits = {}
        for stream in ("stdout", "stderr"):
            path = getattr(r, f"{stream}_path") or saved.get(stream)
            text, split, omitted = _cut_stream(
                getattr(r, stream), splits.get(stream), getattr(r, f"{stream}_omitted"), keep, stream, path
            )
            update[stream] = text
            update[f"{stream}_omitted"] = omitted
            update[f"{stream}_path"] = path if omitted else None
            new_splits[stream] = split
        if update["stdout_omitted"] or update["stderr_omitted"]:
            update["truncated"] = True
        out = r.model_copy(update=update)
        out.set_splits(new_splits)
        return out

    longest = max(len(r.stdout), len(r.stderr))
    return cut(_largest(0, longest, lambda k: wire_size(cut(k)) <= budget))


# list_dir, workspace_logs ---------------------------------------------------------------------


def _fit_listing(dl: DirListing, budget: int) -> DirListing:
    def page(n: int) -> DirListing:
        end = dl.offset + n
        more = n < len(dl.entries) or dl.next_offset is not None
        return dl.model_copy(update={
            "entries": dl.entries[:n],
            "next_offset": end if n < len(dl.entries) else dl.next_offset,
            "truncated": dl.truncated or more,
        })  # fmt: skip

    n = _largest(0, len(dl.entries), lambda k: wire_size(page(k)) <= budget)
    return page(max(n, 1) if dl.entries else 0)


def page_workspaces(listing: WorkspaceList, offset: int, limit: int | None) -> WorkspaceList:
    """One page of a workspace list (in name order), saying how many there are and where the next starts."""
    ordered = sorted(listing.workspaces, key=lambda w: w.name)
    page = ordered[offset : offset + limit if limit else None]
    end = offset + len(page)
    more = end < len(ordered)
    return WorkspaceList(workspaces=page, total=len(ordered), offset=offset, next_offset=end if more else None,
                         truncated=more)  # fmt: skip


def _fit_workspaces(wl: WorkspaceList, budget: int) -> WorkspaceList:
    def page(n: int) -> WorkspaceList:
        more = n < len(wl.workspaces) or wl.next_offset is not None
        next_offset = wl.offset + n if n < len(wl.workspaces) else wl.next_offset
        return wl.model_copy(update={"workspaces": wl.workspaces[:n], "next_offset": next_offset, "truncated": more})

    n = _largest(0, len(wl.workspaces), lambda k: wire_size(page(k)) <= budget)
    return page(max(n, 1) if wl.workspaces else 0)


def fit_message(message: str, budget: int) -> str:
    """An error message cut to fit ``budget`` on the wire (its head and its tail, which usually
    hold what went wrong and a log's last lines)."""
    room = budget - ENVELOPE_BYTES

    def cut(n: int) -> str:
        if n >= len(message):
            return message
        return message[: n - n // 2] + "\n[... cut to fit the result ...]\n" + message[len(message) - n // 2 :]

    if _json_len(message) <= room:
        return message
    return cut(_largest(0, len(message), lambda k: _json_len(cut(k)) <= room))


def _fit_logs(lr: LogsResult, budget: int) -> LogsResult:
    def tail(n: int) -> LogsResult:
        text = lr.log[len(lr.log) - n :] if n else ""
        if n < len(lr.log):
            nl = text.find("\n")
            text = text[nl + 1 :] if nl >= 0 else text  # whole lines only
        return lr.model_copy(update={"log": text, "lines": len(text.splitlines()), "truncated": True})

    return tail(_largest(0, len(lr.log), lambda k: wire_size(tail(k)) <= budget))


_FITTERS: dict[type, Callable[[Any, int], Any]] = {
    FileContent: _fit_file,
    ExecResult: _fit_exec,
    DirListing: _fit_listing,
    LogsResult: _fit_logs,
    WorkspaceList: _fit_workspaces,
}


def fit(result: M, budget: int) -> M:
    """``result`` cut to fit ``budget`` bytes on the wire (see the module docstring), saying so in
    its own fields; unchanged when it fits. A result with nothing to cut is returned as it is."""
    if wire_size(result) <= budget:
        return result
    fitter = _FITTERS.get(type(result))
    return fitter(result, budget) if fitter is not None else result
