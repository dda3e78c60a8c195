"""The exec agent an image starts at boot, which waits on a socket for the server's first connection.

The agent side runs for real here (the agent file in ``--listen`` mode, a real Unix socket); the
end-to-end tests meet it in a container booted from the cached image, over sshd's direct-streamlocal
forwarding, and compare what a command sees under it with what it sees under an agent sshd started.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from sandbox_mcp import exec_agent
from sandbox_mcp.errors import SSHError
from sandbox_mcp.images.debootstrap import AGENT_SERVICE, EXEC_AGENT_SOURCE, POOL_SLOT_ARG, agent_service
from sandbox_mcp.models import CreateSpec
from sandbox_mcp.paths import AGENT_LISTEN_PATH, EXEC_AGENT_PATH


def test_the_paths_agree_and_the_unit_starts_the_installed_agent_as_the_user() -> None:
    assert exec_agent.LISTEN_PATH == AGENT_LISTEN_PATH  # the agent is self-contained: its own copy
    unit = agent_service("agent")
    assert f"ExecStart=/usr/bin/python3 -I -S -u {EXEC_AGENT_PATH} --listen {AGENT_LISTEN_PATH}\n" in unit
    assert "User=agent\n" in unit and "RuntimeDirectory=sandbox-mcp-agent\n" in unit
    assert f"ConditionKernelCommandLine=!{POOL_SLOT_ARG}\n" in unit  # what a pool slot's init is given
    assert "KillMode=process\n" in unit  # a start_process outlives the agent, as under sshd
    assert "OOMPolicy=continue\n" in unit  # an OOM-killed command does not stop the unit (its agent)


def _start(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, may_end: bool = False
) -> tuple[subprocess.Popen[bytes], Path]:
    """An agent waiting at ``tmp_path``/agent.sock, once its socket is there; ``may_end``: or once it ended
    (one told to wait 0 s may bind and leave between two looks)."""
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-u", str(EXEC_AGENT_SOURCE), "--listen", str(sock), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env)  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():
        if may_end and proc.poll() is not None:
            break
        assert proc.poll() is None and time.monotonic() < deadline, "the agent never bound its socket"
        time.sleep(0.01)
    return proc, sock


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes] | Path]]:
    """Agents a test started (killed if still there) and directories it made outside tmp_path (removed)."""
    procs: list[subprocess.Popen[bytes] | Path] = []
    yield procs
    for proc in procs:
        if isinstance(proc, Path):
            shutil.rmtree(proc, ignore_errors=True)
        elif proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _lines(conn: socket.socket) -> Iterator[dict[str, object]]:
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        yield json.loads(line)


def _environ_line(env: dict[str, str]) -> bytes:
    raw = b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items())
    return json.dumps({"environ": base64.b64encode(raw).decode()}).encode() + b"\n"


@pytest.mark.parametrize("locale_env", [{}, {"LANG": "C.UTF-8"}, {"LC_ALL": "C"}, {"LANG": "xx_NOWHERE.UTF-8"}],
                         ids=["no-locale", "lang", "lc-all", "not-installed"])  # fmt: skip
def test_it_serves_one_connection_with_the_environment_it_brings(
    tmp_path: Path, started: list, locale_env: dict[str, str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    outer = {**os.environ, "OUTER_ONLY": "the unit's environment"}
    proc, sock = _start(tmp_path, env=outer)
    started.append(proc)
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(30)
    conn.connect(str(sock))
    session = {"HOME": str(home), "PATH": os.environ["PATH"], "GREETING": "hello there", "_": "/usr/bin/env",
               **locale_env}  # fmt: skip
    conn.sendall(_environ_line(session))
    lines = _lines(conn)
    assert next(lines) == {"ready": 1, "version": exec_agent.PROTOCOL_VERSION}
    assert not sock.exists(), "one connection only: the socket is gone once it is taken"
    command = ("echo \"$GREETING\"; echo \"${OUTER_ONLY:-unset}\"; readlink /proc/$PPID/cwd; "
               "cut -d' ' -f41 /proc/$$/stat; grep 'Max nice' /proc/$$/limits | tr -s ' ' | cut -d' ' -f4,5; env")
    request = {"id": 1, "command": command, "cwd": str(tmp_path), "env": {}, "stdin": None, "timeout": 30, "cap": 65536}
    conn.sendall(json.dumps(request).encode() + b"\n")
    reply = next(m for m in lines if m.get("id") == 1 and "exit" in m)
    assert reply["exit"] == 0, base64.b64decode(str(reply["stderr"]))
    greeting, outer_only, agent_cwd, policy, nice_limit, *agent_env = (
        base64.b64decode(str(reply["stdout"])).decode().splitlines()
    )
    assert (greeting, outer_only) == ("hello there", "unset"), "the session's environment, not the unit's"
    assert (policy, nice_limit) == ("0", "0 0"), "the usual CPU policy (SCHED_OTHER) and RLIMIT_NICE"
    assert agent_cwd == str(home), "it works from HOME, where sshd starts a session"
    # The command's environment is what an agent started with the session's has (Python's start sets
    # LC_CTYPE where the locale is C: PEP 538), and no more; sh adds the directory it works in.
    started_so = subprocess.run([sys.executable, "-I", "-S", "-c",
                                 "import os, sys; print(repr((sys.executable, dict(os.environ))))"],
                                env=session, capture_output=True, text=True, check=True)  # fmt: skip
    python, reference = ast.literal_eval(started_so.stdout)
    expected = {**reference, "_": python, "PWD": str(tmp_path)}  # ``_``: what sh ran under sshd, python3
    assert ("LC_CTYPE" in expected) == (locale_env in ({}, {"LANG": "xx_NOWHERE.UTF-8"})), expected
    assert sorted(agent_env) == sorted(f"{k}={v}" for k, v in expected.items())
    # A command still running when the connection goes is killed with it, as under an agent sshd started.
    request = {"id": 2, "command": "sleep 300", "cwd": str(tmp_path), "env": {}, "stdin": None, "timeout": 600, "cap": 64}
    conn.sendall(json.dumps(request).encode() + b"\n")
    deadline = time.monotonic() + 30
    while not _children(proc.pid):
        assert time.monotonic() < deadline, "the command never started"
        time.sleep(0.01)
    conn.close()
    # Then the same process waits again, as started: the unit's environment and streams, the socket back.
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "it did not wait again"
        time.sleep(0.01)
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert cmdline[-4:] == [b"--listen", str(sock).encode(), b"900.0", b"900.0"]
    assert [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in (0, 1)] == ["/dev/null", "/dev/null"]
    assert not _children(proc.pid), "the killed command was reaped, not left a zombie of the next start"
    with socket.socket(socket.AF_UNIX) as again:
        again.settimeout(30)
        again.connect(str(sock))
        again.sendall(_environ_line({"HOME": str(tmp_path), "PATH": os.environ["PATH"]}))
        lines = _lines(again)
        assert next(lines) == {"ready": 1, "version": exec_agent.PROTOCOL_VERSION}
        request = {"id": 1, "command": 'echo "${GREETING:-unset} ${OUTER_ONLY:-unset}" $PPID; pwd', "cwd": str(home),
                   "env": {}, "stdin": None, "timeout": 30, "cap": 65536}  # fmt: skip
        again.sendall(json.dumps(request).encode() + b"\n")
        reply = next(m for m in lines if m.get("id") == 1 and "exit" in m)
        out = base64.b64decode(str(reply["stdout"])).decode().splitlines()
        # This connection's environment alone (neither the last one's nor the unit's), served by the same process.
        assert out == [f"unset unset {proc.pid}", str(home)]


def _children(pid: int) -> list[str]:
    """The processes whose parent is ``pid`` (zombies too)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                out.append(stat.parent.name)
        except (OSError, IndexError):
            pass
    return out


def test_with_relisten_0_it_ends_with_its_connection(tmp_path: Path, started: list) -> None:
    proc, sock = _start(tmp_path, "120", "0")
    started.append(proc)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(str(sock))
        conn.sendall(_environ_line({"HOME": str(tmp_path)}))
        assert next(_lines(conn)) == {"ready": 1, "version": exec_agent.PROTOCOL_VERSION}
    assert proc.wait(timeout=30) == 0, "it ends with its connection, as an agent sshd started does"
    assert not sock.exists()


@pytest.mark.parametrize("wait_s", ["0.5", "0"])  # 0: the deadline is met at the first look
def test_unused_it_leaves_in_time_and_takes_its_socket_along(tmp_path: Path, started: list, wait_s: str) -> None:
    proc, sock = _start(tmp_path, wait_s, may_end=True)
    started.append(proc)
    assert proc.wait(timeout=30) == 0
    assert not sock.exists()


def test_a_connection_without_the_environment_line_ends_it(tmp_path: Path, started: list) -> None:
    proc, sock = _start(tmp_path)
    started.append(proc)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(str(sock))
        conn.sendall(b'{"id": 1, "command": "touch ran"}\n')
        assert conn.recv(100) == b"", "no ready line, nothing run"
    assert proc.wait(timeout=30) == 0 and not sock.exists()
    assert not (tmp_path / "ran").exists() and not Path("ran").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another uid needs root")
def test_another_users_connection_is_turned_away(started: list) -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="sandbox-mcp-listen-"))  # pytest's own is root's alone (0700)
    started.append(tmp_path)
    tmp_path.chmod(0o755)
    proc, sock = _start(tmp_path, "120", "0")  # ends with the connection it serves
    started.append(proc)
    sock.chmod(0o666)  # past the file mode (0600): the agent checks who connects itself
    stranger = subprocess.run(
        ["python3", "-c", "import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(30); "
         "s.connect(sys.argv[1])\n"
         "try: s.sendall(sys.argv[2].encode()); print(repr(s.recv(100)))\n"
         "except (BrokenPipeError, ConnectionResetError): print(repr(b''))",
         str(sock), _environ_line({"HOME": "/"}).decode()],
        user=65534, group=65534, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert stranger.stdout.strip() == "b''", (stranger.stdout, stranger.stderr)
    assert proc.poll() is None and sock.exists(), "it still waits for its own user"
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(str(sock))
        conn.sendall(_environ_line({"HOME": str(tmp_path)}))
        assert next(_lines(conn)) == {"ready": 1, "version": exec_agent.PROTOCOL_VERSION}
    assert proc.wait(timeout=30) == 0


def _normalised(env: str) -> list[str]:
    """A command's environment with the client's port left out (a new connection has a new one)."""
    out = []
    for item in env.split("\0"):
        key, _, value = item.partition("=")
        if key == "SSH_CLIENT":
            value = value.split()[0]
        elif key == "SSH_CONNECTION":
            value = " ".join(value.split()[::2])
        out.append(f"{key}={value}")
    return sorted(out)


@pytest.mark.e2e
@pytest.mark.anyio
async def test_the_first_connection_meets_the_agent_started_at_boot(manager: object) -> None:
    from sandbox_mcp.manager import WorkspaceManager

    assert isinstance(manager, WorkspaceManager)
    ws = await manager.create(CreateSpec(name="bootagent"))
    who = "ps -o ppid=,args= -p $PPID; readlink /proc/$PPID/cwd; id -un"
    # Its commands are scheduled as under sshd (a unit could have set a policy or a limit of its own).
    scheduling = "cut -d' ' -f41 /proc/$$/stat; grep 'Max nice' /proc/$$/limits"
    first = await manager.exec(ws.name, f"{who}; test -e {AGENT_LISTEN_PATH} && echo left; setsid -f sleep 300")
    assert first.exit_code == 0, first.stderr
    agent, cwd, user = first.stdout.splitlines()
    sched_boot = (await manager.exec(ws.name, scheduling)).stdout
    assert sched_boot.split()[0] == "0", sched_boot  # SCHED_OTHER
    ppid, args = agent.split(None, 1)
    assert (ppid, args) == ("1", f"/usr/bin/python3 -I -S -u {EXEC_AGENT_PATH} --listen {AGENT_LISTEN_PATH}")
    assert (cwd, user) == (f"/home/{ws.user}", ws.user), "the user's agent, from HOME, as sshd starts it"
    env_boot = await manager.exec(ws.name, "env -0")

    main_pid = (await manager.exec(ws.name, f"systemctl show -P MainPID {AGENT_SERVICE}")).stdout.strip()
    assert main_pid == (await manager.exec(ws.name, "echo $PPID")).stdout.strip()  # the unit's own process

    # Its connection gone, the same process waits again, and the next connection (a server started again)
    # meets it; what the last connection's commands left running stays (as under sshd).
    await manager.ssh.drop(ws.name)
    again = await manager.exec(ws.name, f"{who}; echo $PPID; systemctl is-active {AGENT_SERVICE}; "
                                        "pgrep -x sleep >/dev/null && echo kept")  # fmt: skip
    agent, cwd, user, pid, state, kept = again.stdout.splitlines()
    ppid, args = agent.split(None, 1)
    assert (ppid, args) == ("1", f"/usr/bin/python3 -I -S -u {EXEC_AGENT_PATH} --listen {AGENT_LISTEN_PATH} "
                                 "900.0 900.0")  # fmt: skip
    assert (cwd, user, pid, state, kept) == (f"/home/{ws.user}", ws.user, main_pid, "active", "kept"), again.stdout
    assert _normalised((await manager.exec(ws.name, "env -0")).stdout) == _normalised(env_boot.stdout)

    # With no agent waiting (its unit stopped), a connection starts one in a session, the usual way. The stop
    # ends the agent that runs it, so it runs detached, a moment later; the pool starts a session's agent then.
    stop = f"setsid -f sh -c 'sleep 0.5; sudo systemctl stop {AGENT_SERVICE}' </dev/null >/dev/null 2>&1"
    assert (await manager.exec(ws.name, stop)).exit_code == 0
    state, deadline = "", time.monotonic() + 60
    while state != "inactive":
        assert time.monotonic() < deadline, f"the unit did not stop: {state!r}"
        await anyio.sleep(0.2)
        with contextlib.suppress(SSHError):  # the agent that ran it, ended mid-command
            state = (await manager.exec(ws.name, f"systemctl is-active {AGENT_SERVICE}")).stdout.strip()
    await manager.ssh.drop(ws.name)
    second = await manager.exec(ws.name, f"{who}; systemctl is-active {AGENT_SERVICE}; pgrep -x sleep >/dev/null && echo kept")
    agent, cwd, user, state, kept = second.stdout.splitlines()
    ppid, args = agent.split(None, 1)
    assert ppid != "1" and args == f"/usr/bin/python3 -I -S -u {EXEC_AGENT_PATH}", "started the usual way now"
    assert (cwd, user, state, kept) == (f"/home/{ws.user}", ws.user, "inactive", "kept"), second.stdout
    env_sshd = await manager.exec(ws.name, "env -0")
    assert (await manager.exec(ws.name, scheduling)).stdout == sched_boot
    # The same environment as a command under an agent sshd started (but for the client's port).
    assert _normalised(env_boot.stdout) == _normalised(env_sshd.stdout)
    assert "CLAUDE_CONFIG_DIR=" in env_boot.stdout and "SSH_CONNECTION=" in env_boot.stdout
