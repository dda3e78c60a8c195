"""Results cut to the budget: pure functions over the result models, with content chosen to be hard
(escapes that grow sixfold in JSON, base64, multibyte text), checked against the budget each time."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime

import pytest

from sandbox_mcp import budget
from sandbox_mcp.models import DirEntry, DirListing, ExecResult, FileContent, LogsResult, WorkspaceList

BUDGET = 60_000


def _file(content: str, encoding: str = "utf-8", offset: int = 0, size: int = 10**6) -> FileContent:
    n = len(content.encode()) if encoding == "utf-8" else len(base64.b64decode(content))
    return FileContent(path="/home/agent/workspace/f", content=content, encoding=encoding, size=size,  # type: ignore[arg-type]
                       offset=offset, truncated=offset + n < size, next_offset=offset + n if offset + n < size else None)


@pytest.mark.parametrize(
    ("content", "encoding"),
    [
        ("a" * 200_000, "utf-8"),
        ('\x01"\\' * 40_000, "utf-8"),  # 6, 2 and 2 bytes each in JSON; more in the text copy
        ("é€😀" * 20_000, "utf-8"),  # 2-, 3- and 4-byte characters: never cut inside one
        (base64.b64encode(os.urandom(150_000)).decode(), "base64"),
    ],
)
def test_a_file_chunk_is_cut_to_fit_and_says_where_to_go_on(content: str, encoding: str) -> None:
    fc = _file(content, encoding, offset=100)
    cut = budget.fit(fc, BUDGET)
    assert budget.wire_size(cut) <= BUDGET
    raw = content.encode() if encoding == "utf-8" else base64.b64decode(content)
    kept = cut.content.encode() if encoding == "utf-8" else base64.b64decode(cut.content)
    assert raw.startswith(kept) and len(kept) > 2000
    assert (cut.truncated, cut.next_offset, cut.offset) == (True, 100 + len(kept), 100)
    # As much as fits: a few bytes more would not have.
    more = raw[: len(kept) + 5]  # at least one more character
    bigger = _file(more.decode(errors="ignore") if encoding == "utf-8" else base64.b64encode(more).decode(), encoding, 100)
    assert budget.wire_size(bigger) > BUDGET


def test_a_result_that_fits_is_unchanged() -> None:
    fc = _file("hello\n", size=6)
    assert budget.fit(fc, BUDGET) is fc


def _stream(text: str, name: str) -> tuple[str, tuple[int, int]]:
    return budget.join_stream(text, "", 0, name, None)


def test_exec_streams_keep_head_and_tail_and_count_what_is_left_out() -> None:
    head, tail = "H" * 12_000, "T" * 12_000
    stdout, split = budget.join_stream(head, tail, 5_000_000, "stdout", "/w/.sandbox-mcp/exec/x.stdout")
    stderr, esplit = _stream("\x02" * 30_000, "stderr")  # escape-heavy, never saved
    r = ExecResult(exit_code=0, stdout=stdout, stderr=stderr, duration_ms=1.0, stdout_bytes=5_024_000,
                   stderr_bytes=30_000, stdout_omitted=5_000_000, stdout_path="/w/.sandbox-mcp/exec/x.stdout",
                   truncated=True)  # fmt: skip
    r.set_splits({"stdout": split, "stderr": esplit})
    cut = budget.fit(r, BUDGET)
    assert budget.wire_size(cut) <= BUDGET and cut.truncated
    # stdout: a shorter head and tail around one marker, counting all that is left out.
    assert cut.stdout.startswith("H" * 1000) and cut.stdout.endswith("T" * 1000)
    kept = cut.stdout.count("H") + cut.stdout.count("T")
    assert cut.stdout_omitted == 5_024_000 - kept
    assert cut.stdout.count("[sandbox-mcp: ") == 1 and f"{cut.stdout_omitted:,} bytes of stdout left out" in cut.stdout
    assert f"is in /w/.sandbox-mcp/exec/x.stdout (read_file it from offset={cut.stdout.count('H')} " in cut.stdout
    # stderr: cut too (its head and tail), and it says it was not saved.
    assert cut.stderr_omitted == 30_000 - cut.stderr.count("\x02") > 0 and "not saved" in cut.stderr
    # The text rendering: the small fields first, the content last.
    text = budget.text_rendering(cut)
    assert json.loads(text) == cut.model_dump(mode="json")
    assert max(text.index(f'"{k}"') for k in ("exit_code", "truncated", "stdout_path", "stdout_omitted")) \
        < text.index('"stdout":') < text.index('"stderr":')  # fmt: skip


def test_list_dir_pages_are_cut_to_fit_and_continue() -> None:
    when = datetime(2026, 1, 1, tzinfo=UTC)
    entries = [DirEntry(name=f"{i:05}-" + "n" * 40, type="file", size=i, mtime=when) for i in range(2000)]
    dl = DirListing(path="/d", entries=entries, offset=4000, total=20_000, next_offset=6000, truncated=True)
    cut = budget.fit(dl, BUDGET)
    assert budget.wire_size(cut) <= BUDGET and 100 < len(cut.entries) < 2000
    assert (cut.next_offset, cut.truncated, cut.total) == (4000 + len(cut.entries), True, 20_000)
    text = budget.text_rendering(cut)
    assert text.index('"next_offset"') < text.index('"entries"')


def test_logs_keep_their_last_whole_lines() -> None:
    log = "".join(f"line {i} " + "x" * 80 + "\n" for i in range(5000))
    cut = budget.fit(LogsResult(name="w", log=log, lines=5000), BUDGET)
    assert budget.wire_size(cut) <= BUDGET and cut.truncated
    assert log.endswith(cut.log) and cut.log.startswith("line ") and cut.lines == len(cut.log.splitlines())


def test_sizes_derived_from_the_budget() -> None:
    assert budget.read_limit(BUDGET) == budget.content_room(BUDGET) > 20_000
    assert budget.exec_keep(BUDGET) == budget.content_room(BUDGET) == 2 * budget.exec_save_over(BUDGET)
    # A listing of workspaces has nothing to cut: it is returned as it is.
    assert budget.fit(WorkspaceList(workspaces=[]), 8192) == WorkspaceList(workspaces=[])


def test_workspace_lists_page_and_fit() -> None:
    from sandbox_mcp.models import SSHInfo, Workspace

    def ws(i: int) -> Workspace:
        return Workspace(name=f"w{i:03}", type="container", state="running", ip=f"10.0.{i // 250}.{i % 250}",
                         user="agent", workspace_dir="/home/agent/workspace", host_workspace_dir=f"/s/w{i}/workspace",
                         ssh=SSHInfo(host="10.0.0.1", user="agent", host_key_fingerprint="SHA256:" + "x" * 43,
                                     known_hosts="10.0.0.1 ssh-ed25519 " + "A" * 68),
                         created_at=datetime(2026, 1, 1, tzinfo=UTC))  # fmt: skip

    listing = WorkspaceList(workspaces=[ws(i) for i in reversed(range(240))])
    page = budget.fit(budget.page_workspaces(listing, 0, None), BUDGET)
    assert budget.wire_size(page) <= BUDGET and page.total == 240 and page.truncated
    assert [w.name for w in page.workspaces] == [f"w{i:03}" for i in range(len(page.workspaces))]
    names = [w.name for w in page.workspaces]
    while page.next_offset is not None:
        page = budget.fit(budget.page_workspaces(listing, page.next_offset, None), BUDGET)
        assert budget.wire_size(page) <= BUDGET
        names += [w.name for w in page.workspaces]
    assert names == [f"w{i:03}" for i in range(240)]


def test_error_messages_fit() -> None:
    message = "boot failed; last log lines:\n" + "\x1b" * 50_000 + "\nthe end"
    cut = budget.fit_message(message, 8192)
    assert len(json.dumps(cut)) <= 8192 - budget.ENVELOPE_BYTES
    assert cut.startswith("boot failed") and cut.endswith("the end") and "cut to fit" in cut
    assert budget.fit_message("short", 8192) == "short"
