"""The exec agent as a real process, driven over its pipes: cancels that overtake their request, a
burst of requests; and how its replies share writes.

The SSH pool writes a request and, when the caller is cancelled, a cancel right behind it; the
agent may read both before the request's thread reached ``Popen``. These tests put the cancel
exactly there (in the same write as its request, or before it) and prove with a marker file,
which the command would have created, that it never ran.
"""

from __future__ import annotations

import base64
import fcntl
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


# How commands start (os.posix_spawn, not subprocess.Popen): what Popen did must still hold.


def _out(reply: dict[str, object], name: str = "stdout") -> str:
    return base64.b64decode(str(reply[name])).decode()


def test_the_agent_starts_commands_without_importing_subprocess(tmp_path: Path) -> None:
    # ~2 ms of every agent's start and 0.3-0.7 MiB of its memory: this catches an import that brings it back.
    python, *rest = agent_command()
    pipe = AgentPipe([python, "-X", "importtime", *rest])
    try:
        pipe.send(request(1, "echo hi", tmp_path))
        assert _out(pipe.reply(1)) == "hi\n"
        err = pipe.stderr_after_exit()
    finally:
        pipe.close()
    imported = [line.rsplit("|", 1)[-1].strip() for line in err.splitlines() if line.startswith("import time:")]
    assert "json" in imported, err[-500:]  # the listing is there at all
    assert not {"subprocess", "selectors", "locale"} & set(imported)


def test_a_command_gets_sigpipe_as_the_default(agent: AgentPipe, tmp_path: Path) -> None:
    # Python ignores SIGPIPE; a command must not inherit that, or `yes | head` ends in write errors.
    agent.send(request(1, "yes | head -n 2", tmp_path))
    reply = agent.reply(1)
    assert (reply["exit"], _out(reply), _out(reply, "stderr")) == (0, "y\ny\n", "")


def test_concurrent_commands_each_run_in_their_own_directory(agent: AgentPipe, tmp_path: Path) -> None:
    # The start sets the agent's working directory for a moment, under a lock: 24 at once, each in a
    # directory of its own, each reports its own twice (once all of them have started, and after), and the
    # agent's own is what it was.
    before = os.readlink(f"/proc/{agent.proc.pid}/cwd")
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    os.mkfifo(gate)
    marks.mkdir()
    dirs = [tmp_path / f"d{i}" for i in range(24)]
    for d in dirs:
        d.mkdir()
    command = f"pwd; touch {marks}/$$; read x < {gate}; pwd"
    agent.send(*(request(i, command, dirs[i]) for i in range(12)))
    agent.send(*(request(i, command, dirs[i]) for i in range(12, 24)))
    wait_until_sync(lambda: len(os.listdir(marks)) == 24, "all 24 commands started")
    writer = os.open(gate, os.O_WRONLY)  # open once a reader is there; held until all have read their line
    try:
        os.write(writer, b"go\n" * 24)  # `read` takes one line each, whenever each comes to it
        for i, d in enumerate(dirs):
            assert _out(agent.reply(i)) == f"{d}\n{d}\n"
    finally:
        os.close(writer)
    assert os.readlink(f"/proc/{agent.proc.pid}/cwd") == before


def test_sh_is_found_on_the_commands_own_path(agent: AgentPipe, tmp_path: Path) -> None:
    # As Popen looked it up: the PATH of the command's environment, not the agent's.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "sh"
    fake.write_text("#!/bin/sh\necho this-sh \"$@\"\n")
    fake.chmod(0o755)
    agent.send(request(1, "echo real", tmp_path, env={"PATH": f"{bin_dir}:/usr/bin:/bin"}))
    assert _out(agent.reply(1)) == "this-sh -c echo real\n"
    agent.send(request(2, "echo real", tmp_path))
    assert _out(agent.reply(2)) == "real\n"
    # None there: the command does not start (a ./sh in its directory is never taken instead).
    (tmp_path / "sh").write_text(fake.read_text())
    (tmp_path / "sh").chmod(0o755)
    agent.send(request(3, "echo real", tmp_path, env={"PATH": str(tmp_path / "nothing-here")}))
    reply = agent.reply(3)
    assert (reply["exit"], _out(reply)) == (126, "")
    assert "No such file or directory" in _out(reply, "stderr")


def test_a_command_inherits_no_descriptor_of_the_agents(tmp_path: Path) -> None:
    # Popen closed every descriptor above 2 in the child; posix_spawn closes only close-on-exec ones,
    # so the agent makes all it was given close-on-exec. Here it is given an inheritable one.
    r, w = os.pipe()
    given = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 20)  # above what the shell below opens itself
    try:
        pipe = AgentPipe(agent_command(), pass_fds=(given,))
    finally:
        for fd in (r, w, given):
            os.close(fd)
    try:
        assert str(given) in os.listdir(f"/proc/{pipe.proc.pid}/fd")  # the agent holds it
        # The shell's own descriptors, listed by the shell (3: the directory its glob reads).
        pipe.send(request(1, 'for f in /proc/$$/fd/*; do printf "%s " "${f##*/}"; done', tmp_path))
        assert _out(pipe.reply(1)).split() == ["0", "1", "2", "3"]
    finally:
        pipe.close()


def test_a_detached_commands_pipes_stay_open_until_they_end(agent: AgentPipe, tmp_path: Path) -> None:
    # A background process holding the pipes: the reply says "detached" and a thread drains them. The
    # agent keeps both pipes open until they end (then closes them), so that thread never polls numbers a
    # later command's pipes may have taken; the later commands' output is all theirs.
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    fds = lambda: len(os.listdir(f"/proc/{agent.proc.pid}/fd"))  # noqa: E731
    baseline = fds()
    agent.send(request(1, f"(read x < {gate}; echo late) & echo first", tmp_path))
    reply = agent.reply(1)
    assert (reply["detached"], _out(reply)) == (True, "first\n")
    assert fds() == baseline + 2
    for i in range(2, 12):
        agent.send(request(i, f"echo out-{i}", tmp_path))
        assert _out(agent.reply(i)) == f"out-{i}\n"
    with open(gate, "w") as f:
        f.write("go\n")
    wait_until_sync(lambda: fds() == baseline, "the detached command's pipes closed at their end")
