"""What a workspace sends back is read with a bound, and no file call can hang: against a real sshd.

The workspace side is real programs run by the real OpenSSH sshd of ``test_ssh``: the exec agent
from this checkout, fake agents that misbehave, FIFOs, device nodes, sockets and sparse files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from sandbox_mcp import processes
from sandbox_mcp.errors import CommandTimeout, InvalidSpec, SSHError, clip, clip_repr
from sandbox_mcp.ssh import EXEC_AGENT_PATH, SSHPool, SSHTarget, agent_command
from sandbox_mcp.ssh.agent import reply_limit
from sandbox_mcp.ssh.agent_ops import agent_op
from sandbox_mcp.ssh.files import MAX_NAME_BYTES, entry_name
from sandbox_mcp.ssh.lines import LineBuffer, LineTooLong
from tests.test_ssh import AGENT, Sshd, _start_sshd

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    return ws


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[Sshd]:
    (tmp_path / "bash_env").write_text("")  # the user's shell start-up file; one test makes it noisy
    server = _start_sshd(tmp_path / "sshd", extra_config=f"SetEnv BASH_ENV={tmp_path / 'bash_env'}\n")
    try:
        yield server
    finally:
        for pid in _descendants(server.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # the programs this test's sshd ran
        server.stop()


@pytest.fixture
def target(own_sshd: Sshd, workspace: Path) -> SSHTarget:
    return own_sshd.target(workspace)


@pytest.fixture
async def pool() -> AsyncIterator[SSHPool]:
    p = SSHPool(agent_path=AGENT)
    try:
        yield p
    finally:
        await p.close()


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        out += children
        todo += children
    return out


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except (FileNotFoundError, ProcessLookupError):
        return []


# --- pure parts -----------------------------------------------------------------------------------


def test_line_buffer_splits_and_bounds() -> None:
    buf = LineBuffer(8)
    assert list(buf.feed(b"ab")) == []
    assert list(buf.feed(b"c\nde\n\nf")) == [b"abc", b"de", b""]
    assert buf.pending == 1
    assert list(buf.feed(b"gh\n")) == [b"fgh"]
    lines = []
    with pytest.raises(LineTooLong) as info:
        for line in buf.feed(b"ok\n" + b"x" * 100):
            lines.append(line)
    assert lines == [b"ok"]  # what came before the long line still counts
    assert (info.value.length, info.value.limit) == (100, 8)
    assert buf.high_water <= 8 and buf.pending == 0
    buf.raise_limit(200)
    buf.raise_limit(50)  # never shrinks
    assert list(buf.feed(b"y" * 150 + b"\n")) == [b"y" * 150]


def test_reply_limit_fits_the_largest_honest_reply() -> None:
    cap = 1 << 20
    b64 = 4 * ((cap + 2) // 3)
    honest = json.dumps({"id": 1, "exit": 0, "signal": None, "stdout": "A" * b64, "stderr": "A" * b64,
                         "truncated": True, "timed_out": False, "detached": False})
    assert len(honest) < reply_limit(cap) < 3 * cap


def test_agent_command_is_absolute_and_exact() -> None:
    assert agent_command() == f"exec /usr/bin/python3 -I -S -u {EXEC_AGENT_PATH}"
    assert EXEC_AGENT_PATH == "/usr/local/libexec/sandbox-mcp/exec-agent"
    for bad in ["exec-agent", "/a b", "/a;reboot", "/x/../../etc/agent", "$HOME/agent", ""]:
        with pytest.raises(InvalidSpec, match="plain absolute path"):
            agent_command(bad)
    with pytest.raises(InvalidSpec):
        SSHPool(agent_path="relative/agent")


def test_entry_name_is_bounded() -> None:
    assert entry_name(b"ok.txt") == "ok.txt"
    assert entry_name(b"bad\xff") == "bad\ufffd"
    assert len(entry_name(b"n" * 5000).encode()) == MAX_NAME_BYTES


def test_clip_cuts_echoed_input() -> None:
    huge = "x" * (1 << 20)
    assert clip_repr("short") == "'short'"
    shown = clip_repr(huge)
    assert len(shown) < 300 and "1048576 characters in all" in shown
    assert "1048576 characters in all" in clip(huge) and len(clip(huge)) < 300
    assert clip("fine") == "fine"


def test_public_surface_and_asyncssh_stays_inside() -> None:
    import sandbox_mcp
    from sandbox_mcp import ssh

    assert set(ssh.__all__) == {
        "DEFAULT_LIST_PAGE", "EXEC_AGENT_PATH", "EXEC_SAVE_DIR", "PID_MARKER", "SSHPool", "SSHTarget",
        "agent_command", "build_exec_command",
        "encode_chunk", "ensure_client_key", "ensure_host_key", "host_key_fingerprint", "known_hosts_line",
        "resolve_path", "ssh_argv", "write_authorized_keys",
    }  # fmt: skip
    assert all(hasattr(ssh, name) for name in ssh.__all__)
    package = Path(sandbox_mcp.__file__).parent
    importers = sorted(
        str(p.relative_to(package)) for p in package.rglob("*.py")
        if "import asyncssh" in p.read_text() or "from asyncssh" in p.read_text()
    )
    assert importers and all(p.startswith("ssh/") for p in importers), importers
    # One concern each; the pool (connections, agent, exec with saving, git streams, SFTP paging) is the largest
    # (440 lines until its login took over the boot poll's connection).
    assert all(sum(1 for _ in p.open()) <= 450 for p in (package / "ssh").glob("*.py"))


# --- the exec agent -------------------------------------------------------------------------------


async def test_agent_runs_by_absolute_path(pool: SSHPool, own_sshd: Sshd, target: SSHTarget) -> None:
    assert (await pool.exec(target, "echo via-agent")).stdout == "via-agent\n"
    assert pool._entries[target.key].agent is not None  # the agent ran it, not a session
    agents = [p for p in _descendants(own_sshd.proc.pid) if _cmdline(p)[:4] == ["/usr/bin/python3", "-I", "-S", "-u"]]
    assert [_cmdline(p) for p in agents] == [["/usr/bin/python3", "-I", "-S", "-u", AGENT]]  # no `-c SOURCE`


async def test_the_agent_can_start_ahead_of_the_first_command(
    pool: SSHPool, own_sshd: Sshd, target: SSHTarget
) -> None:
    """start_agent_soon (a create calls it once SSH answers): the agent runs before any command is sent,
    and the first command uses that one; without a connection, or twice, it starts nothing more."""
    pool.start_agent_soon(target)  # no connection yet: nothing to start on
    assert not pool._starting
    await pool.wait_ready(target, 10)
    pool.start_agent_soon(target)
    pool.start_agent_soon(target)  # the second waits for the first's agent and starts none of its own
    entry = pool._entries[target.key]
    assert len(pool._starting) == 2
    with anyio.fail_after(10):
        for task in list(pool._starting):
            await task
    started = entry.agent
    assert started is not None
    assert (await pool.exec(target, "echo first")).stdout == "first\n"
    assert pool._entries[target.key].agent is started
    agents = [p for p in _descendants(own_sshd.proc.pid) if _cmdline(p)[:4] == ["/usr/bin/python3", "-I", "-S", "-u"]]
    assert len(agents) == 1
    assert not pool._starting  # the task is gone once done


async def test_missing_agent_falls_back_to_a_session_per_command(own_sshd: Sshd, target: SSHTarget) -> None:
    pool = SSHPool(agent_path="/nonexistent/sandbox-mcp/exec-agent")
    try:
        r = await pool.exec(target, "echo out; echo err >&2; exit 3")
        assert (r.exit_code, r.stdout, r.stderr) == (3, "out\n", "err\n")
        entry = pool._entries[target.key]
        assert entry.agent is None and entry.agent_unavailable
        r = await pool.exec(target, "sleep 30", timeout_s=0.5)
        assert r.timed_out
        # Processes need the agent: the error names it, and where NixOS turns it on, and what works instead.
        with pytest.raises(SSHError) as caught:
            await agent_op(pool, target, processes.list_request(), timeout_s=10, reply_cap=1024, retry=True)
        message = str(caught.value)
        assert EXEC_AGENT_PATH in message and "sandboxed-workspace.execAgent.enable" in message
        assert "redirects its output to a file" in message
    finally:
        await pool.close()


def _fake_agent(path: Path, after_request: str) -> str:
    """A program that starts like the agent, then does ``after_request`` (Python) with the request ``req``."""
    path.write_text(
        "import json, sys\n"
        "sys.stdout.write(json.dumps({'ready': 1}) + '\\n'); sys.stdout.flush()\n"
        "req = json.loads(sys.stdin.readline())\n"
        "out = sys.stdout.buffer\n"
        f"{after_request}\n"
        "sys.stdin.read()  # until the channel closes\n"
    )
    return str(path)


async def test_agent_streaming_without_newline_is_cut_off(
    own_sshd: Sshd, target: SSHTarget, tmp_path: Path
) -> None:
    # 64 MiB without a newline; the host must hold no more than the reply bound of it.
    fake = _fake_agent(
        tmp_path / "flood-agent",
        "try:\n"
        "    for _ in range(1024):\n"
        "        out.write(b'A' * 65536); out.flush()\n"
        "except OSError:\n"
        "    sys.exit(0)",
    )
    pool = SSHPool(agent_path=fake)
    cap = 64 * 1024
    try:
        await pool.wait_ready(target, timeout_s=30)
        entry = pool._entries[target.key]
        with pytest.raises(SSHError, match="broke the protocol.*without a newline.*connection was dropped"):
            await pool.exec(target, "true", output_cap=cap)
        assert entry.agent is not None
        lines = entry.agent.lines
        assert lines.limit == reply_limit(cap)
        assert 0 < lines.high_water <= lines.limit < 1 << 20  # of 64 MiB sent
        assert target.key not in pool._entries  # dropped: the next call connects afresh
        with anyio.fail_after(10):
            await entry.conn.wait_closed()
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("after_request", "match"),
    [
        ("out.write(b'this is not json\\n'); out.flush()", "malformed line"),
        ("out.write(b'[1, 2]\\n'); out.flush()", "malformed line"),
        ("out.write(json.dumps({'id': req['id'], 'exit': 'zero', 'stdout': '', 'stderr': ''}).encode() + b'\\n');"
         " out.flush()", "exit status is not an integer"),
        ("out.write(json.dumps({'id': req['id'], 'exit': 0, 'stdout': '%%%', 'stderr': ''}).encode() + b'\\n');"
         " out.flush()", "stdout is not base64"),
    ],
    ids=["not-json", "not-an-object", "bad-exit", "bad-base64"],
)
async def test_malformed_agent_replies_are_errors(
    own_sshd: Sshd, target: SSHTarget, tmp_path: Path, after_request: str, match: str
) -> None:
    pool = SSHPool(agent_path=_fake_agent(tmp_path / "bad-agent", after_request))
    try:
        with pytest.raises(SSHError, match=f"broke the protocol: .*{match}"):
            await pool.exec(target, "true")
    finally:
        await pool.close()


async def test_agent_output_beyond_the_cap_is_cut(own_sshd: Sshd, target: SSHTarget, tmp_path: Path) -> None:
    cap = 4096
    fake = _fake_agent(
        tmp_path / "chatty-agent",
        "import base64\n"
        "big = base64.b64encode(b'x' * (2 * req['cap'])).decode()\n"
        "out.write(json.dumps({'id': req['id'], 'exit': 0, 'stdout': big, 'stderr': ''}).encode() + b'\\n')\n"
        "out.flush()",
    )
    pool = SSHPool(agent_path=fake)
    try:
        r = await pool.exec(target, "true", output_cap=cap)
        assert (r.exit_code, r.stdout, r.truncated) == (0, "x" * cap, True)
    finally:
        await pool.close()


@pytest.mark.parametrize("use_agent", [True, False], ids=["agent", "session-per-command"])
async def test_shell_startup_noise_is_bounded(
    own_sshd: Sshd, target: SSHTarget, tmp_path: Path, use_agent: bool
) -> None:
    # The user's shell prints 5 MB to stderr before our command starts (sshd sets BASH_ENV).
    (tmp_path / "bash_env").write_text("head -c 5000000 /dev/zero | tr '\\0' r >&2\n")
    pool = SSHPool(agent_path=AGENT, exec_agent=use_agent)
    cap = 64 * 1024
    try:
        r = await pool.exec(target, "echo out", output_cap=cap)
        assert (r.exit_code, r.stdout) == (0, "out\n")
        if use_agent:
            assert len(r.stderr) <= cap
            assert pool._entries[target.key].agent is not None
            assert len(pool._entries[target.key].agent.stderr) <= 4096
        else:  # the shell's noise is the command's stderr: its head and tail, and how much was left out
            head, marker, tail = r.stderr.split("\n", 2)[0], r.stderr.split("\n")[1], r.stderr.rsplit("\n", 1)[-1]
            assert r.truncated and set(head + tail) == {"r"} and len(head + tail) <= cap
            assert f"{r.stderr_omitted:,} bytes of stderr left out" in marker and r.stderr_omitted > 4_000_000
    finally:
        await pool.close()


# --- files ----------------------------------------------------------------------------------------


async def _still_works(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    (workspace / "plain.txt").write_text("plain")
    assert (await pool.read_file(target, "plain.txt")).content == "plain"
    assert (await pool.write_file(target, "plain.txt", b"again", append=True)).bytes_written == 5
    assert "plain.txt" in [e.name for e in (await pool.list_dir(target, ".")).entries]


async def test_fifo_is_refused_and_nothing_hangs(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    assert (await pool.exec(target, "mkfifo p")).exit_code == 0
    assert stat.S_ISFIFO((workspace / "p").stat().st_mode)
    with pytest.raises(InvalidSpec, match=r"it is a named pipe \(FIFO\); read_file handles regular files only"):
        await pool.read_file(target, "p")
    for append in (True, False):
        with pytest.raises(InvalidSpec, match=r"it is a named pipe \(FIFO\); write_file"):
            await pool.write_file(target, "p", b"x", append=append)
    assert stat.S_ISFIFO((workspace / "p").stat().st_mode)  # not replaced either
    # through a symlink too (the type of what it points at counts)
    (workspace / "to-p").symlink_to("p")
    with pytest.raises(InvalidSpec, match="named pipe"):
        await pool.read_file(target, "to-p")
    await _still_works(pool, target, workspace)


async def test_devices_and_sockets_are_refused(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    for dev in ("/dev/null", "/dev/zero"):
        with pytest.raises(InvalidSpec, match="it is a character device"):
            await pool.read_file(target, dev)
        with pytest.raises(InvalidSpec, match="it is a character device"):
            await pool.write_file(target, dev, b"x", append=True)
    os.mknod(workspace / "null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # this test's own device node
    with pytest.raises(InvalidSpec, match="it is a character device"):
        await pool.read_file(target, "null2")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(workspace / "sock"))
        with pytest.raises(InvalidSpec, match="it is a socket"):
            await pool.read_file(target, "sock")
    await _still_works(pool, target, workspace)


async def test_huge_sparse_file_reads_a_chunk(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    size = 1 << 40  # 1 TiB, no blocks
    fd = os.open(workspace / "sparse", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, b"end", size - 3)
    finally:
        os.close(fd)
    r = await pool.read_file(target, "sparse", limit=1 << 20)
    assert (r.size, r.truncated, r.next_offset, r.encoding) == (size, True, 1 << 20, "utf-8")
    assert r.content == "\0" * (1 << 20)
    r = await pool.read_file(target, "sparse", offset=size - 5, limit=1 << 20)
    assert (r.content, r.truncated, r.next_offset) == ("\0\0end", False, None)
    await _still_works(pool, target, workspace)


async def test_blocked_sftp_call_times_out_and_the_next_call_gets_a_fresh_channel(
    own_sshd: Sshd, target: SSHTarget, workspace: Path
) -> None:
    # The type check is the first defence; this is the second: a FIFO opened anyway (as if swapped
    # in after the check) blocks the sftp-server for good, and only the timeout ends the call.
    fifo = workspace / "late.fifo"
    os.mkfifo(fifo)
    pool = SSHPool(agent_path=AGENT, sftp_timeout_s=0.5)
    try:
        await _still_works(pool, target, workspace)
        entry = pool._entries[target.key]
        first = entry.sftp
        with pytest.raises(CommandTimeout, match="did not finish within 0.5 s.*next file call opens a new one"):
            await pool._with_sftp(target, "read", str(fifo), lambda sftp: sftp.open(str(fifo), "rb"))
        assert entry.sftp is None
        await _still_works(pool, target, workspace)
        assert entry.sftp is not None and entry.sftp is not first
        assert pool._entries[target.key] is entry  # the SSH connection itself was kept
        assert (await pool.exec(target, "echo alive")).stdout == "alive\n"
    finally:
        # release the old sftp-server, still blocked in open(): a writer lets open() return
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        await pool.close()


async def test_list_dir_entry_count_is_bounded(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    d = workspace / "many"
    d.mkdir()
    for i in range(120):
        (d / f"f{i:03}").touch()
    from sandbox_mcp.ssh import files

    full = await pool.list_dir(target, "many")
    assert (len(full.entries), full.truncated, full.total) == (120, False, 120)
    # Past the entry bound a listing keeps what it read, sorted, and says it does not know the total.
    path = str(workspace / "many")
    cut = await pool._with_sftp(  # noqa: SLF001 - the pool's own SFTP channel, with a small bound
        target, "list", path, lambda sftp: files.list_directory(sftp, target, path, max_entries=50)
    )
    assert (len(cut.entries), cut.truncated, cut.total) == (50, True, None)
    assert {e.name for e in cut.entries} <= {e.name for e in full.entries}
    assert [e.name for e in cut.entries] == sorted(e.name for e in cut.entries)


async def test_file_errors_clip_long_paths(pool: SSHPool, target: SSHTarget) -> None:
    with pytest.raises(InvalidSpec) as info:
        await pool.read_file(target, "d/" * 20000 + "missing")
    assert len(str(info.value)) < 1000 and "characters in all" in str(info.value)


async def test_a_file_call_cancelled_midway_leaves_the_pool_usable(
    own_sshd: Sshd, target: SSHTarget, workspace: Path
) -> None:
    # Cancelled while the sftp-server is stuck in a request: that channel must not serve the next
    # call (it would wait behind the stuck request until the SFTP timeout).
    fifo = workspace / "wait.fifo"
    os.mkfifo(fifo)
    pool = SSHPool(agent_path=AGENT, sftp_timeout_s=5)
    try:
        await _still_works(pool, target, workspace)  # the channel exists before the blocked call
        async with anyio.create_task_group() as tg:

            async def blocked() -> None:
                await pool._with_sftp(target, "read", str(fifo), lambda sftp: sftp.open(str(fifo), "rb"))

            tg.start_soon(blocked)
            await anyio.wait_all_tasks_blocked()  # the open request is out, waiting for its reply
            tg.cancel_scope.cancel()
        await _still_works(pool, target, workspace)
    finally:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # release the stuck sftp-server
        await pool.close()


# --- process requests (start_process and its siblings) to a hostile agent ----------------------------


def _fake_agent_v2(path: Path, after_request: str) -> str:
    """Like _fake_agent, but it says it speaks protocol 2 (process requests)."""
    _fake_agent(path, after_request)
    path.write_text(path.read_text().replace("{'ready': 1}", "{'ready': 1, 'version': 2}"))
    return str(path)


_INFO = {"process_id": "web", "command": "x", "pid": 7, "running": True, "exit": None, "signal": None,
         "started_at": 1.0, "ended_at": None, "written": 3, "dropped": 0}  # fmt: skip


async def test_an_agent_without_processes_is_named(own_sshd: Sshd, target: SSHTarget, tmp_path: Path) -> None:
    pool = SSHPool(agent_path=_fake_agent(tmp_path / "old-agent", "pass"))
    try:
        with pytest.raises(SSHError, match="older than this server.*stop_workspace, start_workspace"):
            await agent_op(pool, target, processes.list_request(), timeout_s=10, reply_cap=1024, retry=True)
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        ({"start": 0, "end": 3, "runs": [[1, "QUFB"]], "info": {**_INFO, "pid": -1}}, "malformed reply"),
        ({"start": 0, "end": 3, "runs": [[7, "QUFB"]], "info": _INFO}, "malformed reply"),
        ({"start": 0, "end": 9, "runs": [[1, "QUFB"]], "info": _INFO}, "does not add up"),
        ({"start": 0, "end": 3, "runs": [[1, "%%%%"]], "info": _INFO}, "not base64"),
        ({"start": 0, "end": 3, "runs": [[1, "QUFB"]], "info": {**_INFO, "command": "c" * 100_000}}, "malformed reply"),
    ],
    ids=["bad-pid", "bad-stream", "bad-count", "bad-base64", "huge-command"],
)
async def test_malformed_process_replies_are_errors(
    own_sshd: Sshd, target: SSHTarget, tmp_path: Path, reply: dict[str, object], match: str
) -> None:
    fake = _fake_agent_v2(tmp_path / "bad-agent", f"out.write(json.dumps({{'id': req['id'], 'ok': {reply!r}}})"
                          ".encode() + b'\\n'); out.flush()")  # fmt: skip
    pool = SSHPool(agent_path=fake)
    request = processes.read_request("web", 0, 100, 0)
    try:
        reply = await agent_op(pool, target, request, timeout_s=10, reply_cap=processes.reply_cap(request), retry=True)
        ok = processes.check_reply("ws", "web", reply)
        with pytest.raises(SSHError, match=match):
            processes.output_result("ws", ok, 0, 100)
    finally:
        await pool.close()


async def test_a_process_reply_past_its_bound_drops_the_connection(
    own_sshd: Sshd, target: SSHTarget, tmp_path: Path
) -> None:
    fake = _fake_agent_v2(tmp_path / "flood-agent", "try:\n    for _ in range(256):\n"
                          "        out.write(b'A' * 65536); out.flush()\nexcept OSError:\n    sys.exit(0)")  # fmt: skip
    pool = SSHPool(agent_path=fake)
    request = processes.read_request("web", 0, 100, 0)
    try:
        await pool.wait_ready(target, timeout_s=30)
        entry = pool._entries[target.key]
        with pytest.raises(SSHError, match="broke the protocol.*without a newline"):
            await agent_op(pool, target, request, timeout_s=30, reply_cap=processes.reply_cap(request), retry=True)
        assert entry.agent is not None and entry.agent.lines.high_water <= reply_limit(processes.reply_cap(request))
        assert target.key not in pool._entries
    finally:
        await pool.close()


async def test_streamed_output_that_is_not_base64_breaks_the_protocol(
    own_sshd: Sshd, target: SSHTarget, tmp_path: Path
) -> None:
    fake = _fake_agent_v2(tmp_path / "bad-stream", "out.write(json.dumps({'id': req['id'], 'out': '%%%', 'fd': 1})"
                          ".encode() + b'\\n'); out.flush()")  # fmt: skip
    pool = SSHPool(agent_path=fake)
    got: list[bytes] = []
    try:
        with pytest.raises(SSHError, match="broke the protocol: .*malformed line"):
            await pool.exec(target, "true", on_output=lambda fd, data, skipped: got.append(data))
        assert got == []
    finally:
        await pool.close()
