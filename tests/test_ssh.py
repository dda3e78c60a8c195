"""sandbox_mcp.ssh against a real OpenSSH sshd on loopback (no mocks), plus its pure builders."""

from __future__ import annotations

import base64
import os
import random
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from sandbox_mcp import exec_agent
from sandbox_mcp.errors import CommandTimeout, InvalidSpec, LimitExceeded, SSHError
from sandbox_mcp.ssh import (
    SSHPool,
    SSHTarget,
    build_exec_command,
    encode_chunk,
    ensure_client_key,
    ensure_host_key,
    host_key_fingerprint,
    known_hosts_line,
    resolve_path,
    ssh_argv,
    write_authorized_keys,
)
from sandbox_mcp.ssh.connect import ENCRYPTION_ALGS, open_connection

from . import agent_pipe
from .points import HUNG_S, cancel_after_points, wait_until

SSHD = "/usr/sbin/sshd"
# The exec agent as the pool runs it in a workspace, but from this checkout: the test sshd is the host's.
AGENT = str(Path(exec_agent.__file__).resolve())
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    """A running `sshd -D` on 127.0.0.1 and the keys to reach it."""

    dir: Path
    port: int
    host_key: Path
    client_key: Path
    proc: subprocess.Popen[bytes]

    def target(self, workspace: Path, key: str = "ws1") -> SSHTarget:
        return SSHTarget(
            key=key,
            host="127.0.0.1",
            port=self.port,
            user="root",
            host_key_path=self.host_key,
            client_key_path=self.client_key,
            workspace_dir=str(workspace),
        )

    def connection_pids(self) -> list[int]:
        """The per-connection sshd processes (children of the listener)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def log(self) -> str:
        return (self.dir / "sshd.log").read_text(errors="replace")

    def stop(self) -> None:
        for pid in self.connection_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def _start_sshd(d: Path, port: int | None = None, extra_config: str = "") -> Sshd:
    if os.geteuid() != 0:
        pytest.skip("needs root: the test sshd logs in as root")
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} not found (Debian package openssh-server)")
    d.mkdir(parents=True, exist_ok=True)
    host_key = d / "hostkeys" / "ssh_host_ed25519_key"
    client_key = d / "client" / "id_ed25519"
    ensure_host_key(host_key)
    write_authorized_keys(d / "authorized_keys", [ensure_client_key(client_key)])
    port = port or _free_port()
    sftp = SFTP_SERVER if os.access(SFTP_SERVER, os.X_OK) else "internal-sftp"
    (d / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\n"
        f"Port {port}\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "UsePAM no\n"
        "StrictModes no\n"
        "PidFile none\n"
        f"Subsystem sftp {sftp}\n" + extra_config
    )
    # sshd refuses to start without its privilege separation directory; Debian's boot creates it,
    # a machine without systemd may lack it. It is a standard, empty system directory: left in place.
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = open(d / "sshd.log", "wb")  # noqa: SIM115 - sshd writes it for the whole run
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    log.close()
    server = Sshd(d, port, host_key, client_key, proc)
    deadline = time.monotonic() + HUNG_S  # only a broken sshd takes this long
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}:\n{server.log()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"sshd did not listen on {port}:\n{server.log()}") from None
            time.sleep(0.01)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = _start_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def own_sshd(tmp_path: Path) -> Iterator[Sshd]:
    """An sshd for one test, for tests that count or kill its connections."""
    server = _start_sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "workspace"
    ws.mkdir()
    return ws


@pytest.fixture
def target(sshd: Sshd, workspace: Path) -> SSHTarget:
    return sshd.target(workspace)


@pytest.fixture(params=[True, False], ids=["agent", "session-per-command"])
async def pool(request: pytest.FixtureRequest) -> AsyncIterator[SSHPool]:
    p = SSHPool(exec_agent=request.param, agent_path=AGENT)
    try:
        yield p
    finally:
        await p.close()


def _marker() -> str:
    """A unique `sleep` argument, so pgrep finds exactly the processes of one test.

    An hour: a command whose kill was lost is still there when the test looks, however slow
    the machine.
    """
    return f"{3600 + random.random():.9f}"


def _sleepers(arg: str) -> list[int]:
    """PIDs of this test's `sleep ARG` processes (the test sshd runs on this host).

    "[s]leep" matches "sleep ..." but not pgrep's own command line.
    """
    out = subprocess.run(["pgrep", "-f", f"[s]leep {arg}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


async def _all_gone(arg: str) -> None:
    """Wait until no `sleep ARG` runs: a SIGKILL takes effect a moment after kill(2) returns.

    If some survive (a lost kill), kill them, the test's own processes, and fail.
    """
    try:
        await wait_until(lambda: not _sleepers(arg), f"every 'sleep {arg}' to be killed")
    finally:
        for pid in _sleepers(arg):
            os.kill(pid, signal.SIGKILL)


# --- pure builders --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "cwd", "env", "timeout_s", "expected"),
    [
        (
            "echo hi",
            "/home/agent/workspace",
            None,
            120,
            "printf 'SBXPID %s\\n' \"$$\" >&2; cd -- /home/agent/workspace && "
            "exec timeout --kill-after=2 120 sh -c 'echo hi'",
        ),
        (
            "echo \"$A\" 'q'",
            "/w/with space",
            {"A": "1", "B_2": "x y", "_c": "it's"},
            1.5,
            "printf 'SBXPID %s\\n' \"$$\" >&2; cd -- '/w/with space' && "
            "export A=1 B_2='x y' _c='it'\"'\"'s' && "
            "exec timeout --kill-after=2 1.5 sh -c 'echo \"$A\" '\"'\"'q'\"'\"''",
        ),
        (
            "true",
            "/",
            {},
            0.0001,
            "printf 'SBXPID %s\\n' \"$$\" >&2; cd -- / && exec timeout --kill-after=2 0.001 sh -c true",
        ),
    ],
)
def test_build_exec_command(command, cwd, env, timeout_s, expected) -> None:
    assert build_exec_command(command, cwd=cwd, env=env, timeout_s=timeout_s) == expected


@pytest.mark.parametrize("name", ["1A", "A-B", "A=B", "", "A B", "Ä", "A;rm"])
def test_build_exec_command_rejects_bad_env_names(name: str) -> None:
    with pytest.raises(InvalidSpec, match="environment variable name"):
        build_exec_command("true", cwd="/", env={name: "x"}, timeout_s=1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"command": "a\0b"},
        {"cwd": "/a\0"},
        {"env": {"A": "\0"}},
        {"timeout_s": 0},
        {"timeout_s": -1},
        {"timeout_s": float("nan")},
    ],
)
def test_build_exec_command_rejects(kwargs: dict) -> None:
    args = {"command": "true", "cwd": "/", "env": None, "timeout_s": 1} | kwargs
    with pytest.raises(InvalidSpec):
        build_exec_command(args.pop("command"), **args)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a", "/w/s/a"),
        ("a/b.txt", "/w/s/a/b.txt"),
        (".", "/w/s"),
        ("./a/./b/../c/", "/w/s/a/c"),
        ("../x", "/w/x"),
        ("../../../../x", "/x"),
        ("/etc/hosts", "/etc/hosts"),
        ("//etc//hosts", "/etc/hosts"),
        ("/", "/"),
    ],
)
def test_resolve_path(path: str, expected: str) -> None:
    assert resolve_path("/w/s", path) == expected


@pytest.mark.parametrize("path", ["", "   ", "a\0b"])
def test_resolve_path_rejects(path: str) -> None:
    with pytest.raises(InvalidSpec):
        resolve_path("/w", path)


@pytest.mark.parametrize(
    ("data", "at_eof", "expected"),
    [
        (b"hello", True, ("hello", "utf-8", 5)),
        (b"", True, ("", "utf-8", 0)),
        ("ab€".encode(), False, ("ab€", "utf-8", 5)),
        (b"ab\xe2\x82", False, ("ab", "utf-8", 2)),  # € cut after 2 of its 3 bytes
        (b"ab\xe2", False, ("ab", "utf-8", 2)),
        (b"ab\xf0\x9f\x98", False, ("ab", "utf-8", 2)),  # 😀 cut after 3 of 4
        (b"ab\xe2\x82", True, (base64.b64encode(b"ab\xe2\x82").decode(), "base64", 4)),  # file ends there
        (b"\xe2\x82", False, (base64.b64encode(b"\xe2\x82").decode(), "base64", 2)),  # would be empty
        (b"\xff\xfeab", False, (base64.b64encode(b"\xff\xfeab").decode(), "base64", 4)),
        (b"\x82\xacab", False, (base64.b64encode(b"\x82\xacab").decode(), "base64", 4)),  # starts mid-char
    ],
)
def test_encode_chunk(data: bytes, at_eof: bool, expected: tuple) -> None:
    assert encode_chunk(data, at_eof) == expected


def test_ssh_argv_exact(tmp_path: Path) -> None:
    t = SSHTarget(
        key="ws1",
        host="192.168.83.10",
        port=2222,
        user="agent",
        host_key_path=tmp_path / "hk.pub",
        client_key_path=Path("/state/client/id_ed25519"),
        workspace_dir="/home/agent/workspace",
    )
    assert ssh_argv(t, Path("/state/ws1/known_hosts"), ["-t", "ls -la"]) == [
        "ssh",
        "-F", "/dev/null",
        "-i", "/state/client/id_ed25519",
        "-p", "2222",
        "-l", "agent",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "UserKnownHostsFile=/state/ws1/known_hosts",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "UpdateHostKeys=no",
        "-o", "PasswordAuthentication=no",
        "-o", "KbdInteractiveAuthentication=no",
        "-o", "PreferredAuthentications=publickey",
        "-o", "BatchMode=yes",
        "192.168.83.10",
        "-t", "ls -la",
    ]  # fmt: skip
    with pytest.raises(InvalidSpec):
        ssh_argv(t, Path("/state/my ws/known_hosts"), [])
    with pytest.raises(InvalidSpec):
        ssh_argv(replace(t, client_key_path=Path("/k/%h")), Path("/kh"), [])


def test_ssh_target_validates(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec):
        SSHTarget("k", "h", "u", tmp_path, tmp_path, "relative/dir")
    with pytest.raises(InvalidSpec):
        SSHTarget("k", "h", "u", tmp_path, tmp_path, "/w", port=0)


# --- keys -----------------------------------------------------------------------------------------


def test_ensure_host_key_creates_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ws1" / "ssh-host-keys" / "ssh_host_ed25519_key"
    fp = ensure_host_key(path)
    pub = path.with_name(path.name + ".pub")
    assert fp.startswith("SHA256:")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o755 == 0o755
    assert pub.read_text().startswith("ssh-ed25519 ")
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, pub.name])  # no temp files
    # the same fingerprint as OpenSSH computes
    if shutil.which("ssh-keygen"):
        out = subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True)
        assert out.stdout.split()[1] == fp
    before = path.read_bytes()
    assert ensure_host_key(path) == fp
    assert path.read_bytes() == before
    pub.unlink()
    assert ensure_host_key(path) == fp  # the public half is rewritten from the private key
    assert host_key_fingerprint(pub) == host_key_fingerprint(path) == fp


def test_ensure_client_key_returns_public_line(tmp_path: Path) -> None:
    path = tmp_path / "client" / "id_ed25519"
    line = ensure_client_key(path)
    assert line.startswith("ssh-ed25519 ")
    assert line == path.with_name("id_ed25519.pub").read_text().strip()
    assert ensure_client_key(path) == line


def test_ensure_key_rejects_garbage(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_text("not a key\n")
    with pytest.raises(SSHError, match="cannot create or read"):
        ensure_host_key(path)
    assert path.read_text() == "not a key\n"  # never overwritten
    with pytest.raises(SSHError):
        host_key_fingerprint(tmp_path / "missing")


def test_write_authorized_keys(tmp_path: Path) -> None:
    a = ensure_client_key(tmp_path / "a")
    b = ensure_client_key(tmp_path / "b")
    path = tmp_path / "x" / "authorized_keys"
    write_authorized_keys(path, [a, b + "\n"])
    assert path.read_text() == f"{a}\n{b}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    for bad in ["", "ssh-ed25519 AAAA", f"{a}\n{b}"]:
        with pytest.raises(InvalidSpec):
            write_authorized_keys(path, [bad])
    assert path.read_text() == f"{a}\n{b}\n"


def test_known_hosts_line(tmp_path: Path) -> None:
    key = tmp_path / "hk"
    ensure_host_key(key)
    algo, b64 = key.with_name("hk.pub").read_text().split()[:2]
    assert known_hosts_line("192.168.83.10", key.with_name("hk.pub")) == f"192.168.83.10 {algo} {b64}"
    assert known_hosts_line("10.0.0.1", key, port=2222) == f"[10.0.0.1]:2222 {algo} {b64}"


def test_ssh_argv_runs_with_openssh(sshd: Sshd, workspace: Path, tmp_path: Path) -> None:
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    t = sshd.target(workspace)
    kh = tmp_path / "known_hosts"
    kh.write_text(known_hosts_line(t.host, t.host_key_path, t.port) + "\n")
    r = subprocess.run(ssh_argv(t, kh, ["echo", "pinned-ok"]), capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "pinned-ok\n"), r.stderr
    # the same argv with another key pinned is refused, not trusted
    other = tmp_path / "other"
    ensure_host_key(other)
    kh.write_text(known_hosts_line(t.host, other, t.port) + "\n")
    r = subprocess.run(ssh_argv(t, kh, ["echo", "nope"]), capture_output=True, text=True, timeout=30)
    assert r.returncode == 255 and r.stdout == ""
    assert "host key" in r.stderr.lower()


# --- exec -----------------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_exec_exit_codes_and_streams(pool: SSHPool, target: SSHTarget) -> None:
    r = await pool.exec(target, "true")
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.truncated) == (0, "", "", False, False)
    assert (await pool.exec(target, "exit 3")).exit_code == 3
    assert (await pool.exec(target, "false")).exit_code == 1
    r = await pool.exec(target, "echo out; echo err >&2; echo out2; printf 'err2' >&2; exit 7")
    assert (r.exit_code, r.stdout, r.stderr) == (7, "out\nout2\n", "err\nerr2")
    assert 0 < r.duration_ms  # measured (a sign, not a speed)
    r = await pool.exec(target, "echo before; kill -TERM $$")
    assert (r.exit_code, r.stdout, r.timed_out) == (None, "before\n", False)
    assert "killed by signal TERM" in r.stderr
    r = await pool.exec(target, "printf '\\377\\303\\251'")  # invalid UTF-8, then é
    assert r.stdout == "\ufffdé"


@pytest.mark.anyio
async def test_exec_cwd(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    assert (await pool.exec(target, "pwd")).stdout == f"{workspace}\n"
    (workspace / "sub dir").mkdir()
    assert (await pool.exec(target, "pwd", cwd="sub dir")).stdout == f"{workspace}/sub dir\n"
    assert (await pool.exec(target, "pwd", cwd="/tmp")).stdout == "/tmp\n"
    r = await pool.exec(target, "echo never", cwd="missing")
    assert r.exit_code != 0
    assert r.stdout == ""
    assert f"{workspace}/missing" in r.stderr


@pytest.mark.anyio
async def test_exec_env(pool: SSHPool, target: SSHTarget) -> None:
    value = "a b 'c' \"d\" $HOME `x` \\ ;|&\n"
    r = await pool.exec(target, 'printf %s "$FOO"; printf %s "$_bar2" >&2', env={"FOO": value, "_bar2": ""})
    assert (r.exit_code, r.stdout, r.stderr) == (0, value, "")
    with pytest.raises(InvalidSpec, match="environment variable name"):
        await pool.exec(target, "true", env={"BAD-NAME": "x"})


@pytest.mark.anyio
async def test_exec_stdin(pool: SSHPool, target: SSHTarget) -> None:
    assert (await pool.exec(target, "cat", stdin="hello\nwörld")).stdout == "hello\nwörld"
    r = await pool.exec(target, "wc -c", stdin=bytes(range(256)) * 4000)
    assert r.stdout.strip() == str(256 * 4000)
    # no stdin: the command sees EOF at once instead of hanging
    r = await pool.exec(target, "cat; echo done", timeout_s=60)
    assert (r.exit_code, r.stdout, r.timed_out) == (0, "done\n", False)  # a hang would time out


@pytest.mark.anyio
async def test_exec_timeout_kills_remote_process(pool: SSHPool, target: SSHTarget) -> None:
    arg = _marker()
    r = await pool.exec(target, f"echo started; sleep {arg}; echo not-reached", timeout_s=1)
    assert r.timed_out is True
    assert r.exit_code is None
    assert r.stdout == "started\n"
    await _all_gone(arg)  # killed, not left to sleep its hour


@pytest.mark.anyio
async def test_exec_timeout_kills_processes_ignoring_sigterm(pool: SSHPool, target: SSHTarget) -> None:
    arg = _marker()
    # both the shell and sleep ignore SIGTERM; a background child is in the same process group
    cmd = f"trap '' TERM; sleep {arg} & sleep {arg}; echo not-reached"
    r = await pool.exec(target, cmd, timeout_s=1)
    assert r.timed_out is True and r.exit_code is None
    assert "not-reached" not in r.stdout
    await _all_gone(arg)


@pytest.mark.anyio
async def test_exec_exit_124_is_not_a_timeout(pool: SSHPool, target: SSHTarget) -> None:
    r = await pool.exec(target, "exit 124", timeout_s=30)
    assert (r.exit_code, r.timed_out) == (124, False)


@pytest.mark.anyio
async def test_exec_cancellation_kills_remote_process(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    arg = _marker()
    started = workspace / "started"
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.exec, target, f"touch {started}; sleep {arg}")
        await wait_until(started.exists, "the command to start")  # cancelled while it runs
        tg.cancel_scope.cancel()
    await _all_gone(arg)
    # the pooled connection is still usable
    assert (await pool.exec(target, "echo ok")).stdout == "ok\n"


@pytest.mark.anyio
@pytest.mark.parametrize("points", [0, 1, 3, 10, 30, 100, 300, 1000])
async def test_exec_cancelled_early_still_kills(pool: SSHPool, target: SSHTarget, points: int) -> None:
    # Cancelled at successive points of the start (the request sent, the channel opening, the
    # PID or 'started' on its way): whatever was started must not survive.
    await pool.exec(target, "true")  # warm: the connection is not what is being cancelled
    arg = _marker()
    assert await cancel_after_points(points, lambda: pool.exec(target, f"sleep {arg}"))
    await _all_gone(arg)


@pytest.mark.anyio
async def test_exec_cancelled_right_after_the_request_never_survives(pool: SSHPool, target: SSHTarget) -> None:
    # The cancel follows the request at once (the caller's scope is already cancelled, so the
    # first await after sending it raises): with the exec agent it may reach the agent before
    # the command started, and must not be lost there. Many times, to meet every interleaving.
    await pool.exec(target, "true")
    arg = _marker()
    for _ in range(50):
        with anyio.CancelScope() as scope:
            scope.cancel()
            await pool.exec(target, f"sleep {arg}")
    assert (await pool.exec(target, "echo ok")).stdout == "ok\n"
    await _all_gone(arg)


@pytest.mark.anyio
async def test_exec_output_cap(pool: SSHPool, target: SSHTarget) -> None:
    # A stream past the cap keeps its head and its tail, says how much was left out (no saving asked for).
    cap = 64 * 1024
    r = await pool.exec(target, "head -c 5000000 /dev/zero | tr '\\0' a; echo z; echo tail >&2", output_cap=cap)
    assert (r.exit_code, r.truncated, r.timed_out) == (0, True, False)
    assert (r.stdout_bytes, r.stdout_omitted, r.stdout_path) == (5_000_002, 5_000_002 - cap, None)
    head, marker, tail = r.stdout.split("\n", 2)[0], *r.stdout.split("\n")[1:2], r.stdout.rsplit("\n", 2)[1]
    assert head == "a" * (cap // 2) and tail == "a" * (cap // 2 - 2) + "z"
    assert f"{5_000_002 - cap:,} bytes of stdout left out here" in marker and "not saved" in marker
    assert (r.stderr, r.stderr_bytes, r.stderr_omitted) == ("tail\n", 5, 0)
    r = await pool.exec(target, "head -c 100000 /dev/zero | tr '\\0' e >&2; echo out", output_cap=cap)
    assert (r.exit_code, r.truncated, r.stdout, r.stderr_omitted) == (0, True, "out\n", 100000 - cap)
    assert r.stderr.startswith("e" * (cap // 2) + "\n[sandbox-mcp: ") and r.stderr.endswith("]\n" + "e" * (cap // 2))
    r = await pool.exec(target, f"head -c {cap} /dev/zero | tr '\\0' a", output_cap=cap)
    assert (r.truncated, r.stdout, r.stdout_omitted) == (False, "a" * cap, 0)


@pytest.mark.anyio
async def test_exec_saves_long_output_whole(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    """With the agent, a stream past the cap is saved whole in the workspace and named in the result;
    output that fits is not saved. Without the agent nothing is saved and the result says so."""
    cap = 8192
    cmd = "seq 1 200000; seq 1 3 >&2"
    r = await pool.exec(target, cmd, output_cap=cap, save_max=64 << 20)
    whole = "".join(f"{i}\n" for i in range(1, 200001))
    assert (r.exit_code, r.truncated, r.stdout_bytes, r.stderr) == (0, True, len(whole), "1\n2\n3\n")
    assert r.stdout_omitted == len(whole) - cap and r.stderr_path is None
    assert r.stdout.startswith(whole[: cap // 2]) and r.stdout.endswith(whole[-cap // 2 :])
    saved_dir = workspace / ".sandbox-mcp" / "exec"
    if pool._use_agent:
        assert r.stdout_path is not None and r.stdout_path.startswith(str(saved_dir) + "/")
        assert Path(r.stdout_path).read_text() == whole
        assert f"the whole stdout is in {r.stdout_path} (read_file it from offset={cap // 2} " in r.stdout
        assert "*" in (saved_dir / ".gitignore").read_text().split()  # hidden from git
        # The saved output of the newest commands stays, older is pruned.
        for _ in range(10):
            assert (await pool.exec(target, "seq 1 5000", output_cap=1024, save_max=1 << 20)).stdout_path
        assert len(list(saved_dir.glob("*.stdout"))) == 8
        # Past save_over but within the cap: kept whole, and saved, for a cut to fit a result to name.
        r = await pool.exec(target, "seq 1 1500", output_cap=cap, save_max=1 << 20, save_over=cap // 4)
        assert (r.truncated, r.stdout_path, r.stdout) == (False, None, whole[: len(r.stdout)])
        saved = r.saved()["stdout"]
        assert Path(saved).read_text() == r.stdout
        from sandbox_mcp import budget

        cut = budget.fit(r, 8192)
        assert cut.truncated and cut.stdout_path == saved and f"the whole stdout is in {saved}" in cut.stdout
        # Bounded by save_max: the file holds the first save_max bytes.
        r = await pool.exec(target, "seq 1 100000", output_cap=1024, save_max=4096)
        assert r.stdout_path is not None and Path(r.stdout_path).read_text() == whole[:4096]
    else:
        assert r.stdout_path is None and "not saved" in r.stdout
        assert not saved_dir.exists()
    small = await pool.exec(target, "seq 1 10", output_cap=cap, save_max=64 << 20)
    assert (small.truncated, small.stdout_path, small.stdout_bytes) == (False, None, 21)


@pytest.mark.anyio
async def test_exec_background_process_holding_output(pool: SSHPool, target: SSHTarget) -> None:
    arg = _marker()
    r = await pool.exec(target, f"sleep {arg} & echo started", timeout_s=60)
    try:
        # Returned while the sleep (an hour) still holds the pipes: stopped reading, and said so.
        assert (r.exit_code, r.stdout, r.timed_out) == (0, "started\n", False)
        assert "background process" in r.stderr
        assert _sleepers(arg)
    finally:
        for pid in _sleepers(arg):
            os.kill(pid, signal.SIGKILL)  # this test's own background sleep


@pytest.mark.anyio
async def test_exec_more_concurrent_commands_than_sshd_sessions(pool: SSHPool, target: SSHTarget) -> None:
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        results[i] = (await pool.exec(target, f"sleep 0.2; echo {i}")).stdout

    async with anyio.create_task_group() as tg:
        for i in range(15):  # sshd allows 10 sessions per connection by default
            tg.start_soon(one, i)
    assert results == {i: f"{i}\n" for i in range(15)}


@pytest.mark.anyio
async def test_execs_on_one_workspace_all_run_at_once(target: SSHTarget, workspace: Path) -> None:
    """A barrier: each command marks itself and waits for all the others' marks, so it ends only if all
    of them ran at the same time (more than sshd's sessions per connection, on the one connection)."""
    n = 24
    p = SSHPool(agent_path=AGENT)
    barrier = f'touch "m.$I"; while [ "$(ls m.* | wc -l)" -lt {n} ]; do sleep 0.02; done; echo "$I"'
    results: dict[int, tuple[int | None, bool, str]] = {}

    async def one(i: int) -> None:
        r = await p.exec(target, barrier, env={"I": str(i)}, timeout_s=HUNG_S)
        results[i] = (r.exit_code, r.timed_out, r.stdout)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
    finally:
        await p.close()
    assert results == {i: (0, False, f"{i}\n") for i in range(n)}


@pytest.mark.anyio
async def test_an_exec_never_waits_for_one_on_another_workspace(pool: SSHPool, sshd: Sshd, tmp_path: Path) -> None:
    """One workspace's command blocks until a file appears that only a later call on the other workspace
    makes: it ends only if that call did not queue behind it (checked by order, not by time)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    ta, tb = sshd.target(a, key="wsa"), sshd.target(b, key="wsb")
    gate = b / "gate"
    outcome: list[tuple[int | None, bool, str]] = []

    async def blocked() -> None:
        r = await pool.exec(ta, f"touch started; while [ ! -e {gate} ]; do sleep 0.02; done; echo through",
                            timeout_s=HUNG_S)  # fmt: skip
        outcome.append((r.exit_code, r.timed_out, r.stdout))

    async with anyio.create_task_group() as tg:
        tg.start_soon(blocked)
        await wait_until(lambda: (a / "started").exists(), what="the blocking command to start")
        r = await pool.exec(tb, "touch gate && echo opened")  # the other workspace, while A's command blocks
        assert (r.exit_code, r.stdout) == (0, "opened\n")
    assert outcome == [(0, False, "through\n")]


def test_exec_agent_behind_sshd_never_starts_a_command_cancelled_in_its_write(
    sshd: Sshd, workspace: Path, tmp_path: Path
) -> None:
    """The agent as the pool runs it (python3 -I -S -u PATH over an SSH session), driven over the OpenSSH client."""
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    t = sshd.target(workspace)
    kh = tmp_path / "known_hosts"
    kh.write_text(known_hosts_line(t.host, t.host_key_path, t.port) + "\n")
    remote = shlex.join(agent_pipe.agent_command("python3"))
    agent = agent_pipe.AgentPipe(ssh_argv(t, kh, [remote]))
    marker = workspace / "ran"
    try:
        agent.send(agent_pipe.request(1, f"touch {marker}", workspace), {"cancel": 1})
        assert agent.reply(1)["cancelled"] is True
        agent.send(agent_pipe.request(2, "echo next", workspace))
        reply = agent.reply(2)
        assert (reply["exit"], base64.b64decode(reply["stdout"])) == (0, b"next\n")
    finally:
        agent.close()
    assert not marker.exists()


# --- connections ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_concurrent_first_calls_share_one_connection(own_sshd: Sshd, workspace: Path) -> None:
    pool = SSHPool(agent_path=AGENT)
    t = own_sshd.target(workspace)
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(pool.exec, t, "true")
        assert len(own_sshd.connection_pids()) == 1
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_reconnects_after_connection_dropped(own_sshd: Sshd, workspace: Path) -> None:
    pool = SSHPool(agent_path=AGENT)
    t = own_sshd.target(workspace)
    try:
        assert (await pool.exec(t, "echo one")).stdout == "one\n"
        (workspace / "f").write_text("x")
        assert (await pool.read_file(t, "f")).content == "x"
        for pid in own_sshd.connection_pids():
            os.kill(pid, signal.SIGKILL)  # the connection dies under the pool
        assert (await pool.exec(t, "echo two")).stdout == "two\n"
        for pid in own_sshd.connection_pids():
            os.kill(pid, signal.SIGKILL)
        assert (await pool.read_file(t, "f")).content == "x"  # SFTP reconnects too
        await pool.drop(t.key)
        assert (await pool.exec(t, "echo three")).stdout == "three\n"
        # with sshd gone for good the reconnect fails, and that error reaches the caller
        own_sshd.stop()
        with pytest.raises(SSHError, match="cannot reach SSH|broke"):
            await pool.exec(t, "echo four")
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_pinned_host_key_mismatch_fails_fast(
    pool: SSHPool, sshd: Sshd, workspace: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other_host_key"
    ensure_host_key(other)
    t = replace(sshd.target(workspace, key="impostor"), host_key_path=other.with_name("other_host_key.pub"))
    # Fails at the first answer, without retrying: a retry would wait out the hour (and the
    # upper bound would stop the test).
    with anyio.fail_after(HUNG_S), pytest.raises(SSHError, match="does not match the pinned key"):
        await pool.wait_ready(t, timeout_s=3600)
    with pytest.raises(SSHError, match="does not match the pinned key"):
        await pool.exec(t, "true")


@pytest.mark.anyio
async def test_a_target_looked_up_before_its_workspace_was_replaced_is_refused(
    pool: SSHPool, sshd: Sshd, workspace: Path, tmp_path: Path
) -> None:
    """The caller looked the workspace up (and checked its owner) when it had another host key: the
    name now holds a successor, with a new key at the same path. Neither a new connection nor the
    successor's pooled one may serve that call."""
    earlier = tmp_path / "earlier_host_key"
    stale = replace(sshd.target(workspace, key="replaced"), host_key_fingerprint=ensure_host_key(earlier))
    with pytest.raises(SSHError, match="was replaced"):
        await pool.exec(stale, "true")
    current = replace(stale, host_key_fingerprint=host_key_fingerprint(stale.host_key_path))
    assert (await pool.exec(current, "echo current")).stdout == "current\n"
    with pytest.raises(SSHError, match="was replaced"):
        await pool.exec(stale, "true")


@pytest.mark.anyio
async def test_unauthorized_client_key_is_refused(
    pool: SSHPool, sshd: Sshd, workspace: Path, tmp_path: Path
) -> None:
    stranger = tmp_path / "stranger"
    ensure_client_key(stranger)
    t = replace(sshd.target(workspace, key="stranger"), client_key_path=stranger)
    with pytest.raises(SSHError, match="refused"):
        await pool.exec(t, "true")


@pytest.mark.anyio
async def test_wait_ready_times_out_on_closed_port(pool: SSHPool, sshd: Sshd, workspace: Path) -> None:
    t = replace(sshd.target(workspace, key="closed"), port=_free_port())
    with pytest.raises(CommandTimeout, match="did not answer within 0.5 s") as info:
        await pool.wait_ready(t, timeout_s=0.5)
    assert "ConnectionRefused" in str(info.value)


@pytest.mark.anyio
async def test_wait_ready_reports_its_attempts(pool: SSHPool, sshd: Sshd, workspace: Path) -> None:
    t = replace(sshd.target(workspace, key="closed"), port=_free_port())
    reports: list[tuple[str, float | None]] = []
    with anyio.fail_after(HUNG_S), anyio.CancelScope() as scope:

        async def progress(message: str, fraction: float | None = None) -> None:
            reports.append((message, fraction))
            scope.cancel()  # one report is what this test is after

        await pool.wait_ready(t, timeout_s=3600, progress=progress)
    assert scope.cancelled_caught
    (message, fraction), = reports
    assert "waiting for SSH" in message and "attempts" in message and "ConnectionRefused" in message
    assert fraction is not None and 0 <= fraction < 1


@pytest.mark.anyio
async def test_wait_ready_keeps_trying_until_sshd_listens(tmp_path: Path, workspace: Path) -> None:
    port = _free_port()
    # keys first, so the target exists before sshd does
    probe = _start_sshd(tmp_path / "sshd", port=port)
    probe.stop()
    t = probe.target(workspace)
    pool = SSHPool(agent_path=AGENT)
    server: Sshd | None = None
    refused = anyio.Event()

    async def progress(message: str, fraction: float | None = None) -> None:
        refused.set()  # reported after attempts that failed: now let sshd come up

    try:
        with anyio.fail_after(HUNG_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.wait_ready, t, 3600.0, progress)
                await refused.wait()
                server = await anyio.to_thread.run_sync(_start_sshd, tmp_path / "sshd", port)
        assert len(server.connection_pids()) == 1
        # the connection made by wait_ready is the pooled one
        assert (await pool.exec(t, "echo ready")).stdout == "ready\n"
        assert len(server.connection_pids()) == 1
    finally:
        await pool.close()
        if server is not None:
            server.stop()


@pytest.mark.anyio
async def test_wait_ready_logs_in_on_the_connection_it_is_given(own_sshd: Sshd, workspace: Path) -> None:
    """A boot's poll (hostnet.listening) found sshd listening on a connection: the login goes on on that one,
    so sshd sees a single connection, not one dropped at once and then the login's."""
    from sandbox_mcp.hostnet.listening import connect_when_listening

    t = own_sshd.target(workspace)
    pool = SSHPool(agent_path=AGENT)
    try:
        sock = await connect_when_listening(t.host, t.port, HUNG_S)
        assert sock is not None
        local = sock.getsockname()
        await pool.wait_ready(t, HUNG_S, sock=sock)
        assert pool._entries[t.key].conn.get_extra_info("sockname") == local
        assert len(own_sshd.connection_pids()) == 1
        # And it stays the pooled one: the next command runs on it, not on a connection made again.
        assert (await pool.exec(t, "echo on-it")).stdout == "on-it\n"
        assert pool._entries[t.key].conn.get_extra_info("sockname") == local
        assert len(own_sshd.connection_pids()) == 1
        # With a connection there already, one given is closed unused.
        spare = await connect_when_listening(t.host, t.port, HUNG_S)
        assert spare is not None
        await pool.wait_ready(t, HUNG_S, sock=spare)
        assert spare.fileno() == -1
    finally:
        await pool.close()


@pytest.mark.anyio
async def test_wait_ready_falls_back_to_a_new_connection_when_the_given_one_fails(
    sshd: Sshd, workspace: Path
) -> None:
    """The given connection leads nowhere SSH answers (here: a listener that hangs up): the next attempt
    connects afresh, and the given one is closed."""
    from sandbox_mcp.hostnet.listening import connect_when_listening

    t = sshd.target(workspace, key="fallback")
    pool = SSHPool(agent_path=AGENT)
    with socket.create_server(("127.0.0.1", 0)) as other:
        try:
            sock = await connect_when_listening("127.0.0.1", other.getsockname()[1], HUNG_S)
            assert sock is not None
            conn, _ = other.accept()
            conn.close()  # hangs up before any banner
            with anyio.fail_after(HUNG_S):
                await pool.wait_ready(t, HUNG_S, sock=sock)
            assert sock.fileno() == -1
            assert (await pool.exec(t, "echo fresh")).stdout == "fresh\n"
        finally:
            await pool.close()


# --- SFTP -----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_binary_file_round_trip(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    data = bytes(range(256))
    w = await pool.write_file(target, "bin/all.bytes", data)
    assert (w.path, w.bytes_written) == (f"{workspace}/bin/all.bytes", 256)
    assert (workspace / "bin" / "all.bytes").read_bytes() == data
    r = await pool.read_file(target, "bin/all.bytes")
    assert (r.encoding, r.size, r.truncated, r.next_offset, r.offset) == ("base64", 256, False, None, 0)
    assert base64.b64decode(r.content) == data
    assert r.path == f"{workspace}/bin/all.bytes"


@pytest.mark.anyio
async def test_read_utf8_split_at_chunk_boundary(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    (workspace / "u.txt").write_bytes("ab€cd".encode())  # € = e2 82 ac at offsets 2..4
    r = await pool.read_file(target, "u.txt", limit=4)
    assert (r.content, r.encoding, r.truncated, r.next_offset, r.size) == ("ab", "utf-8", True, 2, 7)
    r = await pool.read_file(target, "u.txt", offset=2, limit=4)
    assert (r.content, r.encoding, r.truncated, r.next_offset) == ("€c", "utf-8", True, 6)
    r = await pool.read_file(target, "u.txt", offset=6, limit=4)
    assert (r.content, r.truncated, r.next_offset) == ("d", False, None)
    # a file that really ends in half a character is not text
    (workspace / "half.txt").write_bytes(b"ab\xe2\x82")
    r = await pool.read_file(target, "half.txt")
    assert (r.encoding, base64.b64decode(r.content)) == ("base64", b"ab\xe2\x82")


@pytest.mark.anyio
async def test_read_paging(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    (workspace / "ten").write_bytes(b"0123456789")
    pages = []
    offset: int | None = 0
    while offset is not None:
        r = await pool.read_file(target, f"{workspace}/ten", offset=offset, limit=4)
        pages.append((r.offset, r.content, r.truncated, r.next_offset, r.size))
        offset = r.next_offset
    assert pages == [
        (0, "0123", True, 4, 10),
        (4, "4567", True, 8, 10),
        (8, "89", False, None, 10),
    ]
    r = await pool.read_file(target, "ten", offset=50)
    assert (r.content, r.truncated, r.next_offset, r.size) == ("", False, None, 10)
    (workspace / "empty").write_bytes(b"")
    r = await pool.read_file(target, "empty")
    assert (r.content, r.encoding, r.size, r.truncated) == ("", "utf-8", 0, False)
    for bad in ({"offset": -1}, {"limit": 0}):
        with pytest.raises(InvalidSpec):
            await pool.read_file(target, "ten", **bad)


@pytest.mark.anyio
async def test_read_errors_say_what_to_do(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    with pytest.raises(InvalidSpec, match=r"nope\.txt: no such file.*call list_dir"):
        await pool.read_file(target, "nope.txt")
    (workspace / "d").mkdir()
    with pytest.raises(InvalidSpec, match="is a directory; call list_dir"):
        await pool.read_file(target, "d")
    with pytest.raises(InvalidSpec):
        await pool.read_file(target, "")


@pytest.mark.anyio
async def test_write_replace_append_mode(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    f = workspace / "notes.txt"
    await pool.write_file(target, "notes.txt", b"a\n")
    await pool.write_file(target, "notes.txt", b"b\n", append=True)
    assert f.read_bytes() == b"a\nb\n"
    await pool.write_file(target, "fresh.txt", b"new", append=True)  # append creates
    assert (workspace / "fresh.txt").read_bytes() == b"new"

    await pool.write_file(target, "run.sh", b"#!/bin/sh\necho hi\n", mode=0o750)
    assert stat.S_IMODE((workspace / "run.sh").stat().st_mode) == 0o750
    assert (await pool.exec(target, "./run.sh")).stdout == "hi\n"
    # replacing keeps the mode of the file it replaces
    await pool.write_file(target, "run.sh", b"#!/bin/sh\necho bye\n")
    assert stat.S_IMODE((workspace / "run.sh").stat().st_mode) == 0o750
    await pool.write_file(target, "notes.txt", b"c\n", append=True, mode=0o600)
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert f.read_bytes() == b"a\nb\nc\n"

    r = await pool.write_file(target, "deep/er/x.txt", b"x")
    assert r.path == f"{workspace}/deep/er/x.txt"
    assert (workspace / "deep" / "er" / "x.txt").read_bytes() == b"x"
    with pytest.raises(InvalidSpec, match="make_parents"):
        await pool.write_file(target, "nodir/x.txt", b"x", make_parents=False)
    with pytest.raises(InvalidSpec, match="is a directory"):
        await pool.write_file(target, "deep", b"x")
    with pytest.raises(InvalidSpec, match="not a directory"):
        await pool.write_file(target, "notes.txt/x", b"x")
    with pytest.raises(InvalidSpec):
        await pool.write_file(target, "m", b"x", mode=0o17777)
    # no temporary files left behind
    assert sorted(p.name for p in workspace.iterdir()) == ["deep", "fresh.txt", "notes.txt", "run.sh"]


@pytest.mark.anyio
async def test_write_is_atomic_replace(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    f = workspace / "big"
    f.write_bytes(b"old")
    inode = f.stat().st_ino
    data = os.urandom(3 << 20)
    await pool.write_file(target, "big", data)
    assert f.read_bytes() == data
    assert f.stat().st_ino != inode  # a new file was renamed over the old one


@pytest.mark.anyio
async def test_list_dir(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    (workspace / "b.txt").write_bytes(b"12345")
    (workspace / "a_dir").mkdir()
    (workspace / "c.link").symlink_to("b.txt")
    os.mkfifo(workspace / "d.fifo")
    listing = await pool.list_dir(target, ".")
    assert listing.path == str(workspace)
    got = [(e.name, e.type) for e in listing.entries]
    assert got == [("a_dir", "dir"), ("b.txt", "file"), ("c.link", "symlink"), ("d.fifo", "other")]
    b = listing.entries[1]
    assert b.size == 5
    assert b.mtime.tzinfo is not None and before <= b.mtime <= datetime.now(UTC)
    assert [e.name for e in (await pool.list_dir(target, "a_dir")).entries] == []
    with pytest.raises(InvalidSpec, match="no such file"):
        await pool.list_dir(target, "missing")
    with pytest.raises(InvalidSpec, match="call read_file"):
        await pool.list_dir(target, "b.txt")


@pytest.mark.anyio
async def test_list_dir_pages_and_bounds_what_it_keeps(pool: SSHPool, target: SSHTarget, workspace: Path) -> None:
    from sandbox_mcp.ssh import files

    many = workspace / "many"
    many.mkdir()
    names = [f"{i:04}" for i in range(1, 1201)]
    for name in reversed(names):
        (many / name).touch()
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = await pool.list_dir(target, "many", offset, 500)
        assert (page.total, page.offset, page.truncated) == (1200, offset, page.next_offset is not None)
        seen += [e.name for e in page.entries]
        offset = page.next_offset
    assert seen == names  # name order, every entry once
    # Past the bound on the bytes kept (a hostile server could send long names): total unknown, and
    # the pages end where the reading did.
    bounded = await pool._with_sftp(  # noqa: SLF001 - the pool's own SFTP channel, with a small bound
        target, "list", str(many), lambda sftp: files.list_directory(sftp, target, str(many), 0, 5000, max_bytes=100 * 68)
    )
    assert bounded.total is None and bounded.truncated and len(bounded.entries) == 100
    with pytest.raises(InvalidSpec, match="offset must be >= 0"):
        await pool.list_dir(target, "many", -1)


@pytest.mark.anyio
async def test_one_workspace_runs_at_most_max_execs_at_once_and_the_rest_in_turn(
    target: SSHTarget, workspace: Path
) -> None:
    """Five calls on a pool that runs two at once: two start and block on a gate, three wait in the pool
    (counted there, not run: no marker); with the gate open all five end. A sixth call that finds no place
    within its timeout_s is refused, saying why."""
    p = SSHPool(agent_path=AGENT, max_execs=2)
    results: list[int | None] = []

    async def one(i: int) -> None:
        r = await p.exec(target, f"touch m.{i}; while [ ! -e gate ]; do sleep 0.02; done", timeout_s=HUNG_S)
        results.append(r.exit_code)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(one, i)
            await wait_until(lambda: len(list(workspace.glob("m.*"))) == 2, what="two commands to start")
            agent = p._entries[target.key].agent  # noqa: SLF001 - the waiting calls are only visible there
            assert agent is not None
            await wait_until(lambda: agent.slots.statistics().tasks_waiting == 3, what="three calls to wait")
            assert len(list(workspace.glob("m.*"))) == 2
            with pytest.raises(LimitExceeded, match="the workspace already runs 2 commands at once"):
                await p.exec(target, "touch never", timeout_s=0.2)
            (workspace / "gate").touch()
        assert results == [0] * 5 and len(list(workspace.glob("m.*"))) == 5
        assert not (workspace / "never").exists()
    finally:
        await p.close()


@pytest.mark.anyio
async def test_connections_use_aes_gcm(target: SSHTarget) -> None:
    """OpenSSH offers ChaCha20-Poly1305 first; we ask for AES-GCM first (one OpenSSL call a packet in
    asyncssh, not several), and the real sshd agrees on it both ways."""
    conn = await open_connection(target, tcp_timeout_s=3, timeout_s=15, keepalive_interval_s=0)
    try:
        assert conn.get_extra_info("send_cipher") == conn.get_extra_info("recv_cipher") == ENCRYPTION_ALGS[0]
        assert ENCRYPTION_ALGS[0] == "aes128-gcm@openssh.com"
    finally:
        conn.close()
        await conn.wait_closed()
