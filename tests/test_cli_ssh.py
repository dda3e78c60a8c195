"""`sandbox-mcp ssh NAME ...`: the person's extra words cannot become OpenSSH options.

The exact argv, then the argv run by the real OpenSSH client against a real sshd on loopback:
an extra `-o ProxyCommand=...` must reach the remote side as a command, never run on this host.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sandbox_mcp.cli import build_parser, ssh_command_argv
from sandbox_mcp.ssh import SSHTarget, known_hosts_line, ssh_argv
from tests.test_ssh import Sshd, _start_sshd

_TARGET = SSHTarget(key="ws1", host="192.168.83.10", port=22, user="agent", host_key_path=Path("/s/hk"),
                    client_key_path=Path("/s/.server/client_ed25519_key"), workspace_dir="/home/agent/workspace")
_BASE = ssh_argv(_TARGET, Path("/s/ws1/runtime/known_hosts"))


@pytest.mark.parametrize(
    "typed, tail",
    [
        ([], ["192.168.83.10"]),
        (["ls", "-la"], ["192.168.83.10", "--", "ls", "-la"]),
        (["-o", "ProxyCommand=touch /tmp/pwned"], ["192.168.83.10", "--", "-o", "ProxyCommand=touch /tmp/pwned"]),
        (["--", "-t", "top"], ["192.168.83.10", "--", "-t", "top"]),  # a typed `--` is not doubled
    ],
)
def test_exact_argv(typed: list[str], tail: list[str]) -> None:
    # What argparse hands over for `sandbox-mcp ssh ws1 <typed...>`
    extra = build_parser().parse_args(["ssh", "ws1", *typed]).extra
    argv = ssh_command_argv(_TARGET, Path("/s/ws1/runtime/known_hosts"), extra)
    assert argv == _BASE[:-1] + tail
    assert argv.index("192.168.83.10") == len(_BASE) - 1  # every option of ours comes before the host


@pytest.fixture
def sshd(tmp_path: Path):  # type: ignore[no-untyped-def]
    if not shutil.which("ssh"):
        pytest.skip("OpenSSH client not installed")
    server = _start_sshd(tmp_path / "sshd")
    try:
        yield server
    finally:
        server.stop()


def test_proxy_command_does_not_run_on_the_host(sshd: Sshd, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    t = sshd.target(ws)
    kh = tmp_path / "known_hosts"
    kh.write_text(known_hosts_line(t.host, t.host_key_path, t.port) + "\n")
    marker = tmp_path / "proxy-command-ran"
    injected = ["-o", f"ProxyCommand=touch {marker}"]

    # The danger is real: placed after the host without `--`, OpenSSH takes it as an option.
    subprocess.run(ssh_argv(t, kh, injected), capture_output=True, timeout=60)
    assert marker.exists()
    marker.unlink()

    r = subprocess.run(ssh_command_argv(t, kh, injected), capture_output=True, text=True, timeout=60)
    assert not marker.exists()
    # It went to the workspace as the remote command line (a shell there fails to run `-o`).
    assert r.returncode not in (0, 255), r.stderr
    r = subprocess.run(ssh_command_argv(t, kh, ["echo", "remote-ok"]), capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "remote-ok\n"), r.stderr
