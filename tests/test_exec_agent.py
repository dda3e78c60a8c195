"""The exec agent as a real process, driven over its pipes: cancels that overtake their request, a
burst of requests; and how its replies share writes.

The SSH pool writes a request and, when the caller is cancelled, a cancel right behind it; the
agent may read both before the request's thread reached ``Popen``. These tests put the cancel
exactly there (in the same write as its request, or before it) and prove with a marker file,
which the command would have created, that it never ran.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from sandbox_mcp import exec_agent
from sandbox_mcp.exec_agent import CANCELLED_MAX

from .agent_pipe import AgentPipe, agent_command, request
from .points import HUNG_S, process_alive, wait_until_sync


@pytest.fixture
def agent() -> Iterator[AgentPipe]:
    pipe = AgentPipe(agent_command())
    try:
        yield pipe
    finally:
        pipe.close()


def test_a_cancel_in_the_same_write_as_its_request_wins(agent: AgentPipe, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    agent.send(request(1, f"touch {marker}; exec sleep 3600", tmp_path), {"cancel": 1})
    reply = agent.reply(1)
    assert reply["cancelled"] is True and reply["exit"] is None, reply
    assert not agent.started(1)
    assert not marker.exists()
    # The agent is still in service, and the id is spent: nothing else was refused.
    agent.send(request(2, "echo next", tmp_path))
    assert agent.reply(2)["exit"] == 0


def test_a_cancel_before_its_request_is_remembered(agent: AgentPipe, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    agent.send({"cancel": 7})
    # The agent handles lines in order: once request 6 is answered, the cancel of 7 was handled.
    agent.send(request(6, "true", tmp_path))
    assert agent.reply(6)["exit"] == 0
    agent.send(request(7, f"touch {marker}", tmp_path))
    assert agent.reply(7)["cancelled"] is True
    assert not marker.exists()


def test_remembered_cancels_are_bounded(agent: AgentPipe, tmp_path: Path) -> None:
    # Cancels for ids 1 .. CANCELLED_MAX + 1, a few lines per write; then the oldest is forgotten.
    ids = list(range(1, CANCELLED_MAX + 2))
    for i in range(0, len(ids), 100):
        agent.send(*({"cancel": rid} for rid in ids[i : i + 100]))
    last = ids[-1]
    agent.send(request(last, f"touch {tmp_path / 'newest'}", tmp_path))
    assert agent.reply(last)["cancelled"] is True
    agent.send(request(1, f"touch {tmp_path / 'oldest'}", tmp_path))
    assert agent.reply(1)["exit"] == 0
    assert (tmp_path / "oldest").exists() and not (tmp_path / "newest").exists()


def test_a_cancel_kills_a_started_command(agent: AgentPipe, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    agent.send(request(1, f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; exec sleep 3600", tmp_path))
    assert agent.next_message() == {"id": 1, "started": 1}
    wait_until_sync(pid_file.exists, "the command wrote its PID")
    agent.send({"cancel": 1})
    reply = agent.reply(1)
    assert (reply["exit"], reply["signal"], reply["cancelled"]) == (None, "KILL", False)
    assert not process_alive(int(pid_file.read_text()))  # the agent reaped it before replying


def test_closing_the_channel_kills_what_runs(tmp_path: Path) -> None:
    agent = AgentPipe(agent_command())
    pid_file = tmp_path / "pid"
    try:
        agent.send(request(1, f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}; exec sleep 3600",
                           tmp_path))
        wait_until_sync(pid_file.exists, "the command wrote its PID")
        pid = int(pid_file.read_text())
    finally:
        agent.close()
    assert agent.proc.returncode == 0
    try:
        wait_until_sync(lambda: not process_alive(pid), "the command to die with the agent's channel")
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)  # the test's own command, left behind


def test_a_burst_all_runs_at_once_and_each_started_line_comes_before_its_reply(
    agent: AgentPipe, tmp_path: Path
) -> None:
    # One command blocks until the others are answered: they never wait for it (a thread each, or an
    # idle one reused), and every line of one command keeps its order.
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    agent.send(request(1, f"read x < {gate}; echo late", tmp_path), *(request(i, f"echo {i}", tmp_path)
                                                                      for i in range(2, 21)))  # fmt: skip
    for i in range(2, 21):
        reply = agent.reply(i)
        assert (reply["exit"], reply["stdout"]) == (0, base64.b64encode(f"{i}\n".encode()).decode())
    assert not any(m.get("id") == 1 and "exit" in m for m in agent.messages)
    with open(gate, "w") as f:
        f.write("go\n")
    assert agent.reply(1)["exit"] == 0
    for i in range(1, 21):
        lines = [("started" in m) for m in agent.messages if m.get("id") == i]
        assert lines in ([True, False], [False]), (i, lines)  # a started line, if any, before the reply
    # Twice over, one after another: the threads of the burst serve them.
    for i in range(21, 31):
        agent.send(request(i, "true", tmp_path))
        assert agent.reply(i)["exit"] == 0


def test_lines_queued_during_a_write_go_out_together_without_started_lines_already_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The agent's stdout as a writer whose first write blocks until released: the lines sent meanwhile
    # (from the calling thread, which returns at once) go out in one more write, in order, and a started
    # line whose command's reply is among them is left out.
    writes: list[bytes] = []
    entered, release = threading.Event(), threading.Event()

    class Blocking:
        def write(self, data: bytes) -> None:
            writes.append(bytes(data))
            if len(writes) == 1:
                entered.set()
                release.wait(HUNG_S)

        def flush(self) -> None:
            pass

    monkeypatch.setattr(exec_agent, "sys", SimpleNamespace(stdout=SimpleNamespace(buffer=Blocking())))
    first = threading.Thread(target=exec_agent._send, args=({"id": 1, "started": 1}, "started"))
    first.start()
    assert entered.wait(HUNG_S)
    exec_agent._send({"id": 2, "started": 1}, "started")
    exec_agent._send({"id": 3, "started": 1}, "started")
    exec_agent._send({"id": 2, "out": "eA==", "fd": 1, "skipped": 0})
    exec_agent._send({"id": 1, "exit": 0}, "final")
    exec_agent._send({"id": 2, "exit": 0}, "final")
    assert len(writes) == 1  # all queued behind the write under way
    release.set()
    first.join(HUNG_S)
    assert [json.loads(line) for line in writes[1].splitlines()] == [
        {"id": 3, "started": 1}, {"id": 2, "out": "eA==", "fd": 1, "skipped": 0}, {"id": 1, "exit": 0},
        {"id": 2, "exit": 0},
    ]  # fmt: skip
    assert len(writes) == 2
    exec_agent._send({"id": 4, "started": 1}, "started")  # nothing under way now: written at once
    assert writes[2] == b'{"id":4,"started":1}\n'
