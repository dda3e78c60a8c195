"""What a real stdio client such as Claude Code sees of `sandbox-mcp serve`, byte for byte.

Each test starts the real `serve` as a child process (in process as root, and as an unprivileged
user through a root daemon child, tests/deploy.py) and speaks raw JSON-RPC lines to it, so it
measures exactly what goes over the pipe:

- every result fits a budget like Claude Code's (25,000 tokens; the default
  result_budget_bytes of 60,000 bytes is under that at 3 bytes a token, both copies of a result
  counted), says when it was cut, and the rest can be fetched in steps that fit as well;
- SIGINT, SIGTERM or closing stdin in the middle of a create all stop the server, and the create
  undoes itself: nothing registered, no process, link, namespace or mount left;
- stdout carries nothing but protocol, stderr nothing at a clean start (through a daemon: the one
  line that names it);
- create's progress is on one scale (``total`` 100), always going up, in words.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from sandbox_mcp import supervise
from sandbox_mcp.config import Settings
from sandbox_mcp.images import DebianRoot, ImageStore
from sandbox_mcp.registry import Registry

from .conftest import e2e_settings, e2e_skip_reason
from .deploy import Account, Daemon, as_user, running_daemon, user_env
from .points import HUNG_S, process_alive, wait_until
from .test_e2e import NOTHING_LEFT, Hold, host_leftovers

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

BUDGET = Settings().result_budget_bytes  # the default, which these servers run with
CLAUDE_CODE_BYTES = 25_000 * 3  # Claude Code's default MAX_MCP_OUTPUT_TOKENS, at 3 bytes a token


@dataclass
class Served:
    """How to start one `serve`, and the server-side settings behind it."""

    kind: str
    argv: list[str]
    env: dict[str, str]
    settings: Settings
    cwd: str | None = None
    daemon: Daemon | None = None


@pytest.fixture(scope="module", params=["in-process", "daemon"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    reason = e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    settings = e2e_settings(tmp_path_factory.mktemp(request.param) / "state")
    store = DebianRoot(settings, ImageStore(settings.image_dir))
    if not store.exists(store.key(())):
        pytest.skip("the root image is not cached; ./scripts/test builds it before entering the test namespace")
    if request.param == "in-process":
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_MCP_")}
        env.update({
            "SANDBOX_MCP_STATE_DIR": str(settings.state_dir), "SANDBOX_MCP_IMAGE_DIR": str(settings.image_dir),
            "SANDBOX_MCP_BRIDGE": settings.bridge, "SANDBOX_MCP_MODE": "direct", "SANDBOX_MCP_CONFIG": "/nonexistent",
            "SANDBOX_MCP_HOSTS_FILE": str(settings.hosts_file), "SANDBOX_MCP_BOOT_TIMEOUT_S": "60",
            "SANDBOX_MCP_DAEMON_SOCKET": str(settings.state_dir.parent / "no-daemon.sock"),
        })  # fmt: skip
        yield Served("in-process", [sys.executable, "-m", "sandbox_mcp", "serve"], env, settings)
        return
    accounts = request.getfixturevalue("accounts")
    user: Account = accounts.alice
    with running_daemon(settings, accounts.group) as daemon:
        argv = as_user(user, sys.executable, "-m", "sandbox_mcp", "serve")
        yield Served("daemon", argv, user_env(user, daemon), settings, str(user.home), daemon)


@dataclass
class Wire:
    """A raw JSON-RPC client over a `serve` child's pipes: every line it sends is kept."""

    proc: anyio.abc.Process
    lines: list[bytes] = field(default_factory=list)
    notifications: list[dict[str, Any]] = field(default_factory=list)
    stderr: bytearray = field(default_factory=bytearray)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    _waiters: dict[int, anyio.Event] = field(default_factory=dict)
    _replies: dict[int, tuple[dict[str, Any], int]] = field(default_factory=dict)
    on_notification: Any = None

    async def read(self) -> None:
        assert self.proc.stdout is not None
        buffered = BufferedByteReceiveStream(self.proc.stdout)
        with contextlib.suppress(anyio.EndOfStream, anyio.IncompleteRead, anyio.ClosedResourceError):
            while True:
                line = await buffered.receive_until(b"\n", 256 << 20)
                self.lines.append(line)
                msg = json.loads(line)  # anything but JSON-RPC on stdout fails here
                assert msg.get("jsonrpc") == "2.0", line[:200]
                if "id" in msg and "method" not in msg:
                    self._replies[msg["id"]] = (msg, len(line))
                    self._waiters.pop(msg["id"]).set()
                elif "method" in msg:
                    self.notifications.append(msg)
                    if self.on_notification is not None:
                        self.on_notification(msg)

    async def drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        with contextlib.suppress(anyio.EndOfStream, anyio.ClosedResourceError):
            async for chunk in self.proc.stderr:
                self.stderr += chunk

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send(json.dumps(msg).encode() + b"\n")

    async def request(self, method: str, params: dict[str, Any] | None = None) -> tuple[dict[str, Any], int]:
        """The reply to one request and the length of its line on the wire."""
        rid = next(self._ids)
        done = self._waiters[rid] = anyio.Event()
        await self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}})
        with anyio.fail_after(HUNG_S * 2):
            await done.wait()
        return self._replies.pop(rid)

    async def start_call(self, tool: str, args: dict[str, Any]) -> int:
        """Send a tools/call with a progress token without waiting for it."""
        rid = next(self._ids)
        self._waiters[rid] = anyio.Event()
        params = {"name": tool, "arguments": args, "_meta": {"progressToken": f"p{rid}"}}
        await self.send({"jsonrpc": "2.0", "id": rid, "method": "tools/call", "params": params})
        return rid

    async def call(self, tool: str, **args: Any) -> tuple[dict[str, Any], str, int]:
        """A tool's structured result, its text block and its line's length; fails on a tool error."""
        reply, size = await self.request("tools/call", {"name": tool, "arguments": args})
        result = reply["result"]
        assert not result.get("isError"), f"{tool} failed: {result}"
        return result["structuredContent"], result["content"][0]["text"], size

    async def handshake(self) -> None:
        reply, _ = await self.request("initialize", {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"},
        })  # fmt: skip
        assert reply["result"]["serverInfo"]["name"] == "sandbox-mcp"
        await self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def stderr_text(self) -> str:
        return self.stderr.decode(errors="replace")


@contextlib.asynccontextmanager
async def serve(served: Served) -> AsyncIterator[Wire]:
    """A running `serve` and a wire to it; at the end stdin is closed and the process waited for."""
    proc = await anyio.open_process(served.argv, env=served.env, cwd=served.cwd, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    wire = Wire(proc)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(wire.read)
            tg.start_soon(wire.drain_stderr)
            await wire.handshake()
            yield wire
            if proc.returncode is None:
                assert proc.stdin is not None
                await proc.stdin.aclose()
            with anyio.fail_after(HUNG_S):
                await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()  # this test's own server process
            with anyio.CancelScope(shield=True):
                await proc.wait()


async def _clean(served: Served) -> None:
    """Destroy whatever the test left, through a fresh server."""
    async with serve(served) as wire:
        listed, _, _ = await wire.call("list_workspaces")
        for ws in listed["workspaces"]:
            await wire.call("destroy_workspace", name=ws["name"])


@pytest.fixture
async def cleanup(served: Served) -> AsyncIterator[None]:
    try:
        yield
    finally:
        with anyio.CancelScope(shield=True):
            await _clean(served)


# --- a clean start ------------------------------------------------------------------------------------


async def test_clean_start_protocol_only_and_tidy_descriptions(served: Served) -> None:
    async with serve(served) as wire:
        tools, _ = await wire.request("tools/list")
        listed, text, _ = await wire.call("list_workspaces")
        assert listed["workspaces"] == [] and listed["total"] == 0 and json.loads(text) == listed
    assert wire.proc.returncode == 0
    for tool in tools["result"]["tools"]:
        d = tool["description"]
        assert d == inspect.cleandoc(d) and not any(line.startswith(" ") for line in d.splitlines()), tool["name"]
    stderr = wire.stderr_text()
    if served.daemon is None:
        assert stderr == ""
    else:  # the one line that says which daemon this serve uses
        assert stderr == f"sandbox-mcp serve: through the daemon at {served.daemon.socket}: the daemon's settings apply\n"


# --- results within the budget ------------------------------------------------------------------------


async def test_results_fit_a_claude_code_budget(served: Served, cleanup: None) -> None:
    assert BUDGET <= CLAUDE_CODE_BYTES
    async with serve(served) as wire:
        progress: list[dict[str, Any]] = []
        wire.on_notification = lambda m: progress.append(m["params"]) if m["method"] == "notifications/progress" else 0
        rid = await wire.start_call("create_workspace", {"name": "budget"})
        with anyio.fail_after(HUNG_S * 2):
            await wire._waiters[rid].wait()
        reply, _ = wire._replies.pop(rid)
        assert not reply["result"].get("isError"), reply
        # Progress: one scale, total 100, going up every time, ending at 100, in words.
        values = [p["progress"] for p in progress]
        assert progress and all(p.get("total") == 100 for p in progress), progress
        assert all(b > a for a, b in itertools.pairwise(values)) and values[-1] == 100, values
        assert all(p.get("message") and len(p["message"]) < 200 for p in progress), progress

        def fits(size: int, what: str) -> None:
            assert size <= BUDGET, f"{what}: {size} bytes on the wire, over the budget of {BUDGET}"

        # read_file of a 1 MiB text file: a chunk that fits, saying where to go on; so does the next.
        await wire.call("exec", name="budget", command="head -c 786432 /dev/urandom | base64 -w 76 | head -c 1048576 > big.txt")
        r, text, size = await wire.call("read_file", name="budget", path="big.txt")
        fits(size, "read_file")
        assert (r["size"], r["truncated"], r["encoding"]) == (1 << 20, True, "utf-8")
        assert r["next_offset"] == len(r["content"].encode()) > 10_000
        assert text.index('"next_offset"') < text.index('"content"')  # a cut preview still says where to go on
        r2, _, size = await wire.call("read_file", name="budget", path="big.txt", offset=r["next_offset"], limit=1 << 20)
        fits(size, "read_file with a larger limit")
        assert r2["offset"] == r["next_offset"] and r2["truncated"] and r2["next_offset"] > r["next_offset"]
        # Binary content goes as base64: still within the budget.
        await wire.call("exec", name="budget", command="head -c 1048576 /dev/urandom > big.bin")
        r, _, size = await wire.call("read_file", name="budget", path="big.bin")
        fits(size, "read_file (base64)")
        assert r["encoding"] == "base64" and r["truncated"] and r["next_offset"] > 10_000

        # exec printing 5 MiB: the head and the tail, what was left out, and where the whole is.
        r, text, size = await wire.call("exec", name="budget", command="seq -w 1 1000000 | head -c 5242880; echo oops >&2")
        fits(size, "exec")
        assert (r["exit_code"], r["truncated"], r["stdout_bytes"], r["stderr"]) == (0, True, 5 << 20, "oops\n")
        assert r["stdout"].startswith("0000001\n0000002\n") and r["stdout"].endswith("0655359\n0655360\n")
        assert r["stdout_omitted"] > (5 << 20) - BUDGET and f"{r['stdout_omitted']:,} bytes of stdout left out" in r["stdout"]
        assert text.index('"stdout_path"') < text.index('"stdout"') and text.index('"exit_code"') < 100
        path = r["stdout_path"]
        assert path and path.startswith("/") and f"the whole stdout is in {path}" in r["stdout"]
        # ...which read_file pages, a budget at a time: the bytes left out are there.
        head_bytes = int(r["stdout"].split("offset=", 1)[1].split(" ", 1)[0])
        chunk, _, size = await wire.call("read_file", name="budget", path=path, offset=head_bytes)
        fits(size, "read_file of the saved output")
        whole = "".join(f"{i:07}\n" for i in range(1, 655361))
        assert chunk["size"] == len(whole) == 5 << 20
        assert chunk["content"] == whole[head_bytes : head_bytes + len(chunk["content"].encode())]

        # list_dir of 20,000 entries: pages that fit, in name order, every entry once.
        await wire.call("exec", name="budget", command="mkdir many && cd many && seq -w 1 20000 | xargs touch")
        names: list[str] = []
        offset: int | None = 0
        pages = 0
        while offset is not None:
            page, text, size = await wire.call("list_dir", name="budget", path="many", offset=offset)
            fits(size, f"list_dir page at {offset}")
            assert page["total"] == 20000 and page["offset"] == offset
            assert text.index('"next_offset"') < text.index('"entries"')
            names += [e["name"] for e in page["entries"]]
            assert page["truncated"] == (page["next_offset"] is not None)
            offset = page["next_offset"]
            pages += 1
        assert names == [f"{i:05}" for i in range(1, 20001)] and pages > 1
        print(f"\n[{served.kind}] list_dir of 20,000 entries: {pages} pages; largest line on the wire: "
              f"{max(len(line) for line in wire.lines)} bytes (budget {BUDGET})")  # fmt: skip
        # No line the server sent broke the budget, not even a notification.
        assert max(len(line) for line in wire.lines) <= BUDGET


# --- calls at once ----------------------------------------------------------------------------------


async def test_calls_through_one_serve_never_queue_behind_a_blocked_one(served: Served, cleanup: None) -> None:
    """Through one stdio serve: an exec that blocks until a later call opens its gate ends, so neither the
    calls to the other workspace nor those to its own queued behind it; and 20 execs on one workspace
    meet at a barrier (each waits for all the others' marks). Order, never time, decides."""
    async with serve(served) as wire:
        for name in ("cona", "conb"):
            await wire.call("create_workspace", name=name)
        blocked = await wire.start_call(
            "exec", {"name": "cona", "command": "touch started; while [ ! -e gate ]; do sleep 0.02; done; echo through",
                     "timeout_s": HUNG_S})  # fmt: skip
        with anyio.fail_after(HUNG_S):
            # Polled through the same workspace, while the first exec blocks (the evidence is inside it).
            while (await wire.call("exec", name="cona", command="test -e started && echo yes"))[0]["stdout"] != "yes\n":  # noqa: ASYNC110
                await anyio.sleep(0.02)
        r, _, _ = await wire.call("exec", name="conb", command="echo other")  # the other workspace, meanwhile
        assert r["stdout"] == "other\n"
        await wire.call("exec", name="cona", command="touch gate")
        with anyio.fail_after(HUNG_S):
            await wire._waiters[blocked].wait()
        result = wire._replies.pop(blocked)[0]["result"]["structuredContent"]
        assert (result["exit_code"], result["timed_out"], result["stdout"]) == (0, False, "through\n")

        n = 20
        barrier = f'touch "m.$I"; while [ "$(ls m.* | wc -l)" -lt {n} ]; do sleep 0.02; done; echo "$I"'
        rids = [await wire.start_call("exec", {"name": "conb", "command": barrier, "env": {"I": str(i)},
                                               "timeout_s": HUNG_S}) for i in range(n)]  # fmt: skip
        with anyio.fail_after(HUNG_S * 2):
            for rid in rids:
                if rid in wire._waiters:
                    await wire._waiters[rid].wait()
        outs = [wire._replies.pop(rid)[0]["result"]["structuredContent"] for rid in rids]
        assert [(o["exit_code"], o["timed_out"], o["stdout"]) for o in outs] == [(0, False, f"{i}\n") for i in range(n)]


# --- shutdown mid-create ------------------------------------------------------------------------------


def _registered(settings: Settings) -> set[str]:
    if not settings.registry_path.exists():
        return set()
    return set(Registry(settings.registry_path).read_sync().workspaces)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM", "stdin-eof"])
async def test_stop_during_create_undoes_it(served: Served, cleanup: None, stop: str) -> None:
    """The client stops the server while a create waits for SSH (its container runs): the server
    exits, and the create is undone, whichever of the three ways it was stopped."""
    name = f"sig{stop[-3:].lower()}"
    settings = served.settings
    tag = supervise.workspace_tag(settings.state_dir, name)
    with Hold(settings, "waiting for SSH") as hold:
        async with serve(served) as wire:
            reached = anyio.Event()

            def notified(msg: dict[str, Any]) -> None:
                if (msg["params"].get("message") or "").startswith("waiting for SSH"):
                    reached.set()

            wire.on_notification = notified
            await wire.start_call("create_workspace", {"name": name})
            with anyio.fail_after(HUNG_S):
                await reached.wait()
            assert supervise.tagged(tag), "the container should be running by now"
            t0 = time.monotonic()
            if stop == "stdin-eof":
                assert wire.proc.stdin is not None
                await wire.proc.stdin.aclose()
            else:
                wire.proc.send_signal(getattr(signal, stop))
            with anyio.fail_after(HUNG_S):
                await wire.proc.wait()
            exited_s = time.monotonic() - t0
        hold.release()
    assert wire.proc.returncode in (0, 130), (wire.proc.returncode, wire.stderr_text())
    assert "Traceback" not in wire.stderr_text()
    print(f"\n[{served.kind}] {stop} mid-create: serve exited after {exited_s * 1000:.0f} ms")
    # Through the daemon, the bridge hangs up and the daemon undoes the create: wait for it.
    await wait_until(lambda: name not in _registered(settings), f"{name} to leave the registry")
    await wait_until(lambda: host_leftovers(name) == NOTHING_LEFT, f"{name} to leave nothing on the host")
    await wait_until(lambda: supervise.tagged(tag) == [], f"{name}'s processes to end")
    assert not (settings.state_dir / name).exists()
    if served.daemon is None:
        assert not any(process_alive(p) for p in supervise.tagged(tag))
