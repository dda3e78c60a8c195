"""Processes without a workspace: the exec agent's process requests as a real local process, the host's
checks of its replies (malformed ones are refused), the output relay of exec's progress, and the port
forwarder on loopback with the peer-uid check.

The agent runs here as in a workspace (``python3 -I -S -u exec_agent.py``) with its process directory
under a temp dir; supervisors are real detached processes, ended by PID at the end of each test.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from sandbox_mcp import exec_agent, processes
from sandbox_mcp.errors import Conflict, InvalidSpec, SSHError
from sandbox_mcp.output_relay import OutputRelay
from sandbox_mcp.ports import PortForwarder, _diag_uid, _table_uid, peer_uid, proc_net_address

from .agent_pipe import AgentPipe, agent_command, request
from .points import HUNG_S, process_alive, wait_until_sync


class Agent:
    """An AgentPipe with process requests; every supervisor it started is ended afterwards."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pipe = AgentPipe(agent_command())
        self.next_id = 100

    def op(self, op: str, **fields: Any) -> dict[str, Any]:
        self.next_id += 1
        self.pipe.send({"id": self.next_id, "op": op, **fields})
        return self.pipe.reply(self.next_id)

    def ok(self, op: str, **fields: Any) -> dict[str, Any]:
        reply = self.op(op, **fields)
        assert "ok" in reply, reply
        return reply["ok"]

    def start(self, process_id: str, command: str, cap: int = 1 << 20) -> dict[str, Any]:
        return self.ok("proc_start", process_id=process_id, command=command, cwd=str(self.root), env={"X": "1"},
                       cap=cap)  # fmt: skip

    def supervisors(self) -> list[int]:
        out = []
        for state in self.root.glob("procs/*/state.json"):
            out.append(int(re.search(rb'"supervisor": (\d+)', state.read_bytes()).group(1)))  # type: ignore[union-attr]
        return out


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Agent]:
    monkeypatch.setenv("SANDBOX_MCP_PROCESS_DIR", str(tmp_path / "procs"))
    a = Agent(tmp_path)
    try:
        yield a
    finally:
        a.pipe.close()
        # What the test started, by PID: each process group, then its supervisor.
        for state in (tmp_path / "procs").glob("*/state.json"):
            if m := re.search(r'"pid": (\d+)', state.read_text()):
                with contextlib.suppress(OSError):
                    os.killpg(int(m.group(1)), signal.SIGKILL)
        for pid in a.supervisors():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _text(ok: dict[str, Any]) -> str:
    return "".join(base64.b64decode(data).decode() for _, data in ok["runs"])


# The agent's side -----------------------------------------------------------------------------------


def test_a_process_outlives_the_agent_and_its_output_is_read_with_a_cursor(agent: Agent, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    started = agent.start("web", "echo one; echo two >&2; read line < fifo; echo three; exec sleep 3600")
    assert started["process_id"] == "web" and started["pid"] > 1
    first = agent.ok("proc_read", process_id="web", cursor=0, max_bytes=100, wait_s=HUNG_S)
    while first["end"] < 8:  # both lines (they may come in two reads)
        first = agent.ok("proc_read", process_id="web", cursor=0, max_bytes=100, wait_s=HUNG_S)
    assert [fd for fd, _ in first["runs"]] == [1, 2] and _text(first) == "one\ntwo\n"
    # The agent goes (as when the SSH connection drops); a new one finds the process and reads on.
    agent.pipe.close()
    agent.pipe = AgentPipe(agent_command())
    assert agent.ok("proc_list")["processes"][0]["running"] is True
    with open(tmp_path / "fifo", "w") as f:
        f.write("go\n")
    more = agent.ok("proc_read", process_id="web", cursor=first["end"], max_bytes=100, wait_s=HUNG_S)
    assert (more["start"], _text(more)) == (8, "three\n")  # nothing twice, nothing lost
    # A bounded read returns a prefix; the next read starts exactly there.
    head = agent.ok("proc_read", process_id="web", cursor=0, max_bytes=5)
    assert (head["end"], _text(head)) == (5, "one\nt")


def test_a_waiter_queued_while_the_supervisor_takes_output_is_woken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lost wake-up: the supervisor's select returns with output, a waiter connects and finds the
    ring's header unchanged, then the supervisor appends and pokes the waiters it has. The one still in
    the listener's queue must be poked too, not left to sleep out its wait.

    Driven in this order with a hook: the supervisor runs forked from this test (``_op_start`` in process)
    with ``select`` wrapped, so it stops right after the select that returned the output, until the waiter
    (a thread here) has connected, checked the header and gone to sleep on its socket.
    """
    monkeypatch.setenv("SANDBOX_MCP_PROCESS_DIR", str(tmp_path / "procs"))
    for name in ("in", "paused", "go"):
        os.mkfifo(tmp_path / name)
    real_select = exec_agent.select.select
    test_pid = os.getpid()
    asleep = threading.Event()
    held = []

    def select_hook(rlist: list[Any], wlist: list[Any], xlist: list[Any], timeout: float | None = None) -> Any:
        if os.getpid() == test_pid:  # here: the waiter's select on its socket, after it checked the header
            if any(isinstance(r, socket.socket) for r in rlist):
                asleep.set()
            return real_select(rlist, wlist, xlist, timeout)
        ready = real_select(rlist, wlist, xlist, timeout)  # the supervisor (its fds 3+ are closed: fifos)
        if not held and ready[0] and not any(isinstance(r, socket.socket) for r in ready[0]):
            held.append(1)  # the first turn with something ready: the output, the waiter not yet queued
            with open(tmp_path / "paused", "w") as f:
                f.write("1")
            with open(tmp_path / "go") as f:
                f.read()
        return ready

    monkeypatch.setattr(exec_agent, "select", SimpleNamespace(select=select_hook, poll=select.poll))
    started = exec_agent._op_start({"process_id": "race", "command": "read x < in; echo out; exec sleep 3600",
                                    "cwd": str(tmp_path), "env": {}, "cap": 1 << 20})  # fmt: skip
    proc = exec_agent._Proc("race")
    try:
        with open(tmp_path / "in", "w") as f:
            f.write("go\n")
        with open(tmp_path / "paused") as f:
            assert f.read() == "1"  # the supervisor holds the output, its header still at 0
        assert proc.header()[0] == 0
        why: list[str] = []
        waiter = threading.Thread(target=lambda: why.append(proc.wait_change(0, time.monotonic() + HUNG_S)))
        waiter.start()
        assert asleep.wait(HUNG_S), "the waiter never went to sleep"
        with open(tmp_path / "go", "w") as f:
            f.write("1")
        waiter.join(HUNG_S)
        assert why == ["poked"]  # not "deadline": woken by the output it had not seen
        assert proc.read(0, 100)[2] == [[1, b"out\n"]]
    finally:
        with contextlib.suppress(OSError):
            os.killpg(started["pid"], signal.SIGKILL)
        with contextlib.suppress(OSError, TypeError):
            os.kill(proc.state["supervisor"], signal.SIGKILL)


def test_the_ring_keeps_the_last_bytes_and_counts_the_rest(agent: Agent) -> None:
    cap = exec_agent.OUTPUT_CAP_MIN
    agent.start("flood", f"head -c {10 * cap + 7} /dev/zero | tr '\\0' a; echo end >&2", cap=cap)
    done = agent.ok("proc_wait", process_id="flood", until="exit", timeout=HUNG_S)
    info = done["info"]
    total = 10 * cap + 7 + 4
    assert done["matched"] is True and info["exit"] == 0 and info["written"] == total
    assert info["dropped"] == total - cap
    tail = agent.ok("proc_read", process_id="flood", cursor=0, max_bytes=exec_agent.READ_MAX)
    assert tail["start"] == total - cap and tail["end"] == total
    assert [fd for fd, _ in tail["runs"]] == [1, 2] and _text(tail).endswith("a" * 100 + "end\n")
    result = processes.output_result("ws", tail, 0, exec_agent.READ_MAX)
    assert result.dropped_bytes == total - cap and result.next_cursor == total and result.stderr == "end\n"


def test_stop_ends_the_whole_tree_also_what_left_the_group(agent: Agent, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    # One child ignores TERM, one leaves the process group (setsid), one is orphaned (a double fork).
    agent.start("tree", f"trap '' TERM; (trap '' TERM; exec sleep 3601) & echo $! >> {pids}; "
                f"setsid sleep 3602 & echo $! >> {pids}; (sleep 3603 & echo $! >> {pids}) ; exec sleep 3604")  # fmt: skip
    wait_until_sync(lambda: pids.exists() and len(pids.read_text().split()) == 3, "the children started")
    children = [int(p) for p in pids.read_text().split()]
    stopped = agent.ok("proc_stop", process_id="tree", signal="TERM", grace=0.5)["info"]
    assert stopped["running"] is False and stopped["signal"] in ("TERM", "KILL")
    wait_until_sync(lambda: not any(process_alive(p) for p in children), "every process of the tree ended")
    again = agent.ok("proc_stop", process_id="tree", signal="TERM", grace=0.5)["info"]
    assert again == stopped  # stopping an ended process returns its state


def test_waits(agent: Agent) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    agent.start("srv", f"sleep 0.3; echo 'now listening'; exec {sys.executable} -m http.server {port} --bind 127.0.0.1")
    waited = agent.ok("proc_wait", process_id="srv", until=f"port:{port}", timeout=HUNG_S)
    assert waited["matched"] is True and waited["info"]["running"] is True
    line = agent.ok("proc_wait", process_id="srv", until="output:^now listen", timeout=HUNG_S)
    assert line["matched"] is True and line["next_cursor"] == len("now listening\n")
    missed = agent.ok("proc_wait", process_id="srv", until="output:never", timeout=0.2)
    assert missed["matched"] is False and missed["info"]["running"] is True
    assert agent.op("proc_wait", process_id="srv", until="output:(", timeout=1)["code"] == "invalid"
    agent.ok("proc_stop", process_id="srv", signal="INT", grace=5)
    short = agent.start("short", "exit 3")
    assert short["process_id"] == "short"
    ended = agent.ok("proc_wait", process_id="short", until="port:1", timeout=HUNG_S)
    assert ended["matched"] is False and ended["info"]["exit"] == 3  # it ended before anything listened


def test_refusals(agent: Agent, tmp_path: Path) -> None:
    assert agent.op("proc_read", process_id="ghost", cursor=0, max_bytes=10)["code"] == "not_found"
    assert agent.op("proc_read", process_id="../etc", cursor=0, max_bytes=10)["code"] == "invalid"
    assert agent.op("proc_start", process_id="x", command="true", cwd=str(tmp_path / "no"), env={},
                    cap=1 << 20)["code"] == "invalid"  # fmt: skip
    agent.start("dup", "exec sleep 3600")
    assert agent.op("proc_start", process_id="dup", command="true", cwd=str(tmp_path), env={},
                    cap=1 << 20)["code"] == "exists"  # fmt: skip
    assert agent.op("proc_stop", process_id="dup", signal="STOP", grace=1)["code"] == "invalid"
    agent.ok("proc_stop", process_id="dup", signal="KILL", grace=0)


def test_exec_streams_its_output_before_the_reply(agent: Agent, tmp_path: Path) -> None:
    agent.pipe.send(request(1, "for i in 1 2 3; do echo $i; sleep 0.1; done; echo e >&2", tmp_path, stream=True))
    streamed = []
    while True:
        m = agent.pipe.next_message()
        if m.get("id") == 1 and "out" in m:
            streamed.append((m["fd"], base64.b64decode(m["out"])))
        elif m.get("id") == 1 and "exit" in m:
            break
    assert len(streamed) >= 2  # as it ran, not all at the end
    assert b"".join(d for fd, d in streamed if fd == 1) == b"1\n2\n3\n"
    assert b"".join(d for fd, d in streamed if fd == 2) == b"e\n"


# The host's side ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("until", "parsed"),
    [("exit", "exit"), ("port:8000", "port:8000"), ("port:08000", "port:8000"), ("output:^Listen", "output:^Listen")],
)
def test_until_is_parsed_on_the_host(until: str, parsed: str) -> None:
    assert processes.parse_until(until) == parsed


@pytest.mark.parametrize(
    ("until", "error"),
    [("port:0", "1 to 65535"), ("port:65536", "1 to 65535"), ("port:x", "1 to 65535"), ("output:(", "does not compile"),
     ("output:", "needs a regex"), ("soon", "not understood"), ("output:" + "a" * 1001, "at most 1000")],
)  # fmt: skip
def test_a_bad_until_is_refused_on_the_host(until: str, error: str) -> None:
    with pytest.raises(InvalidSpec, match=re.escape(error)):
        processes.parse_until(until)


def _info(**over: Any) -> dict[str, Any]:
    return {"process_id": "web", "command": "x", "pid": 7, "running": True, "exit": None, "signal": None,
            "started_at": 1.0, "ended_at": None, "written": 10, "dropped": 0, **over}  # fmt: skip


def _read(start: int, end: int, runs: list[tuple[int, bytes]], **info: Any) -> dict[str, Any]:
    return {"start": start, "end": end, "runs": [[fd, base64.b64encode(d).decode()] for fd, d in runs],
            "info": _info(**info)}  # fmt: skip


def test_output_is_checked_and_a_cut_character_waits_for_the_next_read() -> None:
    ok = _read(0, 4, [(1, b"a"), (2, "é".encode()), (1, b"\xe2")], written=10)
    out = processes.output_result("ws", ok, 0, 100)
    assert (out.stdout, out.stderr, out.next_cursor, out.more) == ("a", "é", 3, True)  # "\xe2" is read again
    done = processes.output_result("ws", _read(3, 4, [(1, b"\xe2")], written=4, running=False, exit=0), 3, 100)
    assert done.stdout == "\ufffd" and done.next_cursor == 4  # ended: nothing will complete it
    for bad in [_read(0, 5, [(1, b"abc")]), _read(0, 3, [(1, b"abc")], written=2), {"start": 0},
                _read(0, 1, [(3, b"a")]), {**_read(0, 1, [(1, b"a")]), "runs": [[1, "!!"]]},
                _read(0, 1, [(1, b"a")], pid=True), _read(0, 1, [(1, b"a")], command="c" * 5000)]:  # fmt: skip
        with pytest.raises(SSHError):
            processes.output_result("ws", bad, 0, 100)
    with pytest.raises(SSHError):  # more than asked for
        processes.output_result("ws", _read(0, 3, [(1, b"abc")]), 0, 2)


def test_agent_errors_become_errors_that_say_what_to_do() -> None:
    with pytest.raises(processes.ProcessNotFound, match="list_processes"):
        processes.check_reply("ws", "p", {"error": "no such process", "code": "not_found"})
    with pytest.raises(InvalidSpec, match="already exists"):
        processes.check_reply("ws", "p", {"error": "", "code": "exists"})
    with pytest.raises(InvalidSpec, match="stop_process one"):
        processes.check_reply("ws", "p", {"error": "", "code": "limit"})
    with pytest.raises(SSHError, match="could not do it"):
        processes.check_reply("ws", "p", {"error": "x" * 10_000, "code": "weird"})
    with pytest.raises(InvalidSpec):
        processes.validate_process_id("-x")
    assert processes.validate_process_id(processes.new_process_id())


@pytest.mark.anyio
async def test_output_relay_sends_whole_lines_bounded() -> None:
    got: list[str] = []

    async def progress(message: str, fraction: float | None = None) -> None:
        got.append(message)

    relay = OutputRelay(progress, interval_s=0.01, message_max=64, pending_max=256)
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        relay.feed(1, b"one\ntw")
        await anyio.sleep(0.05)
        relay.feed(1, b"o\n")
        relay.feed(2, b"x" * 1000)  # beyond the bound: left out, and said so
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    await relay.close()
    text = "".join(got)
    assert got[0] == "one\n" and "two\n" in text
    assert "bytes of output not shown here" in text and text.count("x") <= 256


# Ports --------------------------------------------------------------------------------------------


def test_proc_net_address() -> None:
    assert proc_net_address("127.0.0.1", 8000) == "0100007F:1F40"


@pytest.mark.anyio
async def test_forwarder_lets_the_owner_through_and_refuses_others() -> None:
    async def echo(stream: Any) -> None:
        async with stream:
            async for data in stream:
                await stream.send(data.upper())

    upstream = await anyio.create_tcp_listener(local_host="127.0.0.1")
    up_port = upstream.extra(anyio.abc.SocketAttribute.local_port)
    async with anyio.create_task_group() as tg, PortForwarder(max_connections=2) as fwd:
        tg.start_soon(upstream.serve, echo)
        mine = await fwd.publish("ws", up_port, 0, "127.0.0.1", {os.geteuid()})
        async with await anyio.connect_tcp("127.0.0.1", mine) as conn:
            local = conn.extra(anyio.abc.SocketAttribute.local_address)
            assert peer_uid(local, ("127.0.0.1", mine)) == os.geteuid()
            # sock_diag and the /proc table agree (the latter is the fallback where netlink is missing).
            assert _diag_uid(local, ("127.0.0.1", mine)) == os.geteuid()
            assert _table_uid(local, ("127.0.0.1", mine), Path("/proc/net/tcp")) == os.geteuid()
            assert _diag_uid(("127.0.0.1", 1), ("127.0.0.1", 2)) is None
            await conn.send(b"hello")
            assert await conn.receive() == b"HELLO"
        with pytest.raises(Conflict, match="in use"):
            await fwd.publish("ws2", up_port, mine, "127.0.0.1", {os.geteuid()})
        theirs = await fwd.publish("other", up_port, 0, "127.0.0.1", {os.geteuid() + 4242})
        async with await anyio.connect_tcp("127.0.0.1", theirs) as conn:
            await conn.send(b"hello")
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError)):
                await conn.receive()  # closed without a byte
        # At most max_connections at a time: a third one is closed at once, the two open ones still work.
        async with await anyio.connect_tcp("127.0.0.1", mine) as a, await anyio.connect_tcp("127.0.0.1", mine) as b:
            for conn in (a, b):
                await conn.send(b"x")
                assert await conn.receive() == b"X"
            async with await anyio.connect_tcp("127.0.0.1", mine) as third:
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError)):
                    await third.send(b"x")
                    await third.receive()
            await a.send(b"y")
            assert await a.receive() == b"Y"
        assert await fwd.unpublish("ws", up_port) is True
        await anyio.lowlevel.checkpoint()
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", mine)) != 0
        tg.cancel_scope.cancel()
