"""serve and the CLI never go through a daemon that would ignore settings given to them explicitly.

A real unix socket stands in for the daemon (all that decides the route is that it is there); the
real `sandbox-mcp serve` and `doctor` run as child processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox_mcp.config import load_settings
from sandbox_mcp.daemon_use import ignored_settings, use_daemon, where_serve_goes
from sandbox_mcp.errors import InvalidState


@pytest.fixture
def daemon_socket(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "daemon.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(1)
    try:
        yield path
    finally:
        sock.close()


def _env(sock: Path, **extra: str) -> dict[str, str]:
    return {"SANDBOX_MCP_CONFIG": "/nonexistent", "SANDBOX_MCP_DAEMON_SOCKET": str(sock), **extra}


def test_only_how_to_reach_the_daemon_goes_through(daemon_socket: Path) -> None:
    settings = load_settings(_env(daemon_socket, SANDBOX_MCP_DAEMON_GROUP="staff"))
    assert ignored_settings(settings) == [] and use_daemon(settings) is True
    assert where_serve_goes(settings) == f"through the daemon at {daemon_socket}: the daemon's settings apply"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"SANDBOX_MCP_STATE_DIR": "/tmp/elsewhere"}, "SANDBOX_MCP_STATE_DIR"),
        ({"SANDBOX_MCP_BRIDGE": "other-br", "SANDBOX_MCP_SUBNET": "10.9.0.0/24"}, "SANDBOX_MCP_BRIDGE, SANDBOX_MCP_SUBNET"),
        ({"SANDBOX_MCP_MODE": "direct"}, "SANDBOX_MCP_MODE"),
        ({"SANDBOX_MCP_RESULT_BUDGET_BYTES": "20000"}, "SANDBOX_MCP_RESULT_BUDGET_BYTES"),
    ],
)
def test_explicit_settings_are_refused_with_a_way_out(daemon_socket: Path, extra: dict[str, str], named: str) -> None:
    settings = load_settings(_env(daemon_socket, **extra))
    with pytest.raises(InvalidState) as err:
        use_daemon(settings)
    message = str(err.value)
    assert str(daemon_socket) in message and named in message and "--no-daemon" in message
    assert "SANDBOX_MCP_USE_DAEMON=false" in message


def test_a_config_file_counts_as_explicit(daemon_socket: Path, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'daemon_socket = "{daemon_socket}"\nstate_dir = "/srv/sandboxes"\n')
    settings = load_settings({"SANDBOX_MCP_CONFIG": str(config)})
    with pytest.raises(InvalidState, match="SANDBOX_MCP_STATE_DIR"):
        use_daemon(settings)


def test_no_daemon_works_in_process_as_root_only(daemon_socket: Path) -> None:
    settings = load_settings(_env(daemon_socket, SANDBOX_MCP_USE_DAEMON="false", SANDBOX_MCP_STATE_DIR="/tmp/x"))
    assert "in process (use_daemon is off)" in where_serve_goes(settings)
    if os.geteuid() == 0:
        assert use_daemon(settings) is False
    else:
        with pytest.raises(InvalidState, match="needs root"):
            use_daemon(settings)


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_MCP_")}
    return subprocess.run([sys.executable, "-m", "sandbox_mcp", *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)  # fmt: skip


def test_serve_refuses_and_says_how_to_run_in_process(daemon_socket: Path) -> None:
    r = _run("serve", env=_env(daemon_socket, SANDBOX_MCP_STATE_DIR="/tmp/elsewhere", SANDBOX_MCP_BRIDGE="x-br"))
    assert r.returncode == 2 and r.stdout == ""
    assert f"a sandbox-mcp daemon is at {daemon_socket}" in r.stderr
    assert "SANDBOX_MCP_BRIDGE, SANDBOX_MCP_STATE_DIR" in r.stderr and "--no-daemon" in r.stderr
    # The CLI alike.
    r = _run("ls", env=_env(daemon_socket, SANDBOX_MCP_STATE_DIR="/tmp/elsewhere"))
    assert r.returncode == 2 and "SANDBOX_MCP_STATE_DIR" in r.stderr


def test_doctor_says_where_serve_goes(daemon_socket: Path) -> None:
    r = _run("doctor", env=_env(daemon_socket))
    assert f"serve goes: through the daemon at {daemon_socket}" in r.stdout
    r = _run("doctor", env=_env(daemon_socket, SANDBOX_MCP_SUBNET="10.9.0.0/24"))
    assert "[warn] serve goes:" in r.stdout and "SANDBOX_MCP_SUBNET set here would be ignored" in r.stdout
    assert "--no-daemon" in r.stdout


def test_serve_through_the_daemon_loads_no_server_and_no_manager() -> None:
    """`serve` through the daemon is a byte bridge: what it imports to get there (the CLI with its parser,
    the bridge) leaves out the MCP SDK, the server, the manager and their libraries, ~1 s of imports that a
    client's session start would wait for (measured: initialize answered after 0.30 s, 1.03 s before)."""
    probe = (
        "import sys; from sandbox_mcp import bridge, cli; cli.build_parser(); "
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('mcp', 'asyncssh', 'pyroute2') "
        "or m in ('sandbox_mcp.server', 'sandbox_mcp.manager', 'sandbox_mcp.daemon_client'))))"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == ""
    # The test itself can see them: the same probe after an import of the manager names it.
    r = subprocess.run([sys.executable, "-c", "import sandbox_mcp.manager; " + probe], capture_output=True, text=True,
                       timeout=60, check=True)  # fmt: skip
    assert "sandbox_mcp.manager" in r.stdout.split() and "asyncssh" in r.stdout.split()
