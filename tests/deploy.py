"""The real deployment for tests: throw-away user accounts, a root `sandbox-mcp daemon` child process,
and clients (`sandbox-mcp serve` over stdio, the CLI) running as one of those users.

Accounts are made with useradd and removed again (see the ``accounts`` fixture in conftest.py);
each user's side runs as that user (setpriv drops to their uid, gid and groups), exactly as Claude
Code would start it. Everything here cleans up after itself, also when a test fails.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
from mcp import Client, StdioServerParameters

from sandbox_mcp.config import Settings
from sandbox_mcp.manager import WorkspaceManager

from .conftest import destroy_all

__all__ = ["Account", "Accounts", "Daemon", "as_user", "cli_as", "make_accounts", "mcp_as", "running_daemon"]


@dataclass
class Account:
    name: str
    uid: int
    gid: int
    home: Path


@dataclass
class Accounts:
    group: str
    gid: int
    alice: Account  # in the group
    bob: Account  # in the group too
    carol: Account  # not in the group


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def missing_account_tools() -> str | None:
    for tool in ("useradd", "userdel", "groupadd", "groupdel", "setpriv"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    return None


@contextlib.contextmanager
def make_accounts() -> Iterator[Accounts]:
    """A fresh group and three users (two in it), removed with their homes afterwards."""
    suffix = secrets.token_hex(3)
    group = f"sbxg{suffix}"
    made: list[str] = []
    homes: list[Path] = []
    try:
        _sh("groupadd", group)
        accounts: dict[str, Account] = {}
        for role, member in (("alice", True), ("bob", True), ("carol", False)):
            name = f"sbx{role[0]}{suffix}"
            _sh("useradd", "-M", "-N", "-s", "/usr/sbin/nologin", *(["-G", group] if member else []), name)
            made.append(name)
            entry = pwd.getpwnam(name)
            home = Path(tempfile.mkdtemp(prefix=f"{name}-"))
            homes.append(home)
            os.chown(home, entry.pw_uid, entry.pw_gid)
            accounts[role] = Account(name, entry.pw_uid, entry.pw_gid, home)
        yield Accounts(group, grp.getgrnam(group).gr_gid, **accounts)
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False, capture_output=True)
        subprocess.run(["groupdel", group], check=False, capture_output=True)
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)


class Daemon:
    """`sandbox-mcp daemon` as a child process with ``settings``' state, restartable."""

    def __init__(self, settings: Settings, group: str, socket: Path) -> None:
        self.settings = settings
        self.group = group
        self.socket = socket
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []
        self._seen = 0  # log lines wait_for has looked at
        self._cond = threading.Condition()

    @property
    def client_env(self) -> dict[str, str]:
        """The environment of a client of this daemon (none of the caller's SANDBOX_MCP_* settings)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_MCP_")}
        s = self.settings
        return {**env, "SANDBOX_MCP_CONFIG": "/nonexistent", "SANDBOX_MCP_MODE": "direct", "SANDBOX_MCP_BRIDGE": s.bridge,
                "SANDBOX_MCP_SUBNET": str(s.subnet), "SANDBOX_MCP_DAEMON_SOCKET": str(self.socket),
                "SANDBOX_MCP_DAEMON_GROUP": self.group}  # fmt: skip

    @property
    def env(self) -> dict[str, str]:
        s = self.settings
        return {**self.client_env, "SANDBOX_MCP_STATE_DIR": str(s.state_dir), "SANDBOX_MCP_IMAGE_DIR": str(s.image_dir),
                "SANDBOX_MCP_HOSTS_FILE": str(s.hosts_file), "SANDBOX_MCP_BOOT_TIMEOUT_S": f"{s.boot_timeout_s:g}",
                "SANDBOX_MCP_GIT_FETCH_MAX_BYTES": str(s.git_fetch_max_bytes)}  # fmt: skip

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "sandbox_mcp", "daemon"], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        # Drain its log all the time (a full pipe would stall the daemon), keeping the lines.
        with self._cond:
            self._seen = len(self.log)  # only this process's lines from here on
        self._drainer = threading.Thread(target=self._drain, args=(self.proc,), daemon=True)
        self._drainer.start()
        self.wait_for("listening on")

    def _drain(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._cond:
                self.log.append(line)
                self._cond.notify_all()
        with self._cond:
            self.log.append("<exited>\n")
            self._cond.notify_all()

    def wait_for(self, text: str) -> str:
        """Wait until a new line of the daemon's log holds ``text`` (however long that takes)."""
        with self._cond:
            while True:
                while self._seen < len(self.log):
                    line = self.log[self._seen]
                    self._seen += 1
                    if text in line:
                        return line
                    if line == "<exited>\n":
                        raise AssertionError(f"daemon exited before logging {text!r}:\n{''.join(self.log)}")
                self._cond.wait()

    def tail(self, lines: int = 40) -> str:
        return "".join(self.log[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self._drainer.join()
        self.proc = None


@contextlib.contextmanager
def running_daemon(settings: Settings, group: str) -> Iterator[Daemon]:
    """A daemon over ``settings``' state dir; afterwards stopped, and whatever it left destroyed."""
    run_dir = Path(tempfile.mkdtemp(prefix="sbxd-run-"))  # users must reach the socket: 0755, not pytest's 0700
    os.chmod(run_dir, 0o755)
    daemon = Daemon(settings, group, run_dir / "sandbox-mcp" / "daemon.sock")
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        anyio.run(_destroy_leftovers, settings)


async def _destroy_leftovers(settings: Settings) -> None:
    async with WorkspaceManager(settings) as m:
        await destroy_all(m)


def as_user(user: Account, *argv: str) -> list[str]:
    """``argv`` run as ``user``: their uid, gid and supplementary groups, nothing of root's."""
    return ["setpriv", "--reuid", str(user.uid), "--regid", str(user.gid), "--init-groups", "--", *argv]


def user_env(user: Account, daemon: Daemon) -> dict[str, str]:
    return {**daemon.client_env, "HOME": str(user.home), "USER": user.name}


@contextlib.asynccontextmanager
async def mcp_as(user: Account, daemon: Daemon) -> AsyncIterator[Client]:
    """An MCP client session with `sandbox-mcp serve` (stdio) running as ``user``, as Claude Code starts it."""
    argv = as_user(user, sys.executable, "-m", "sandbox_mcp", "serve")
    params = StdioServerParameters(command=argv[0], args=argv[1:], env=user_env(user, daemon), cwd=str(user.home))
    async with Client(params) as client:
        yield client


def cli_as(user: Account, daemon: Daemon, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """The CLI run as ``user`` against ``daemon``."""
    return subprocess.run(as_user(user, sys.executable, "-W", "error", "-m", "sandbox_mcp", *args), env=user_env(user, daemon),
                          cwd=str(user.home), capture_output=True, text=True, timeout=timeout)  # fmt: skip
