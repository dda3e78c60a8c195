"""NixOS guests carry the exec agent: the module links it and python3 where the server starts them,
and starts it at boot with the Debian images' unit.

Nothing NixOS is built here, so what the module would build and set runs for real instead: the
derivation's build script (nix/modules/exec-agent.nix) compiles this checkout's agent with this
host's python3, and the compiled agent answers, on a pipe and on the socket the unit gives it; the
guest's tmpfiles lines are applied by the real ``systemd-tmpfiles`` under a temporary root; and the
unit's settings are compared with the Debian images' unit, key by key.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox_mcp import exec_agent
from sandbox_mcp.images.debootstrap import EXEC_AGENT_SOURCE, agent_service
from sandbox_mcp.paths import AGENT_LISTEN_PATH, EXEC_AGENT_PATH
from sandbox_mcp.ssh.commands import PYTHON_PATH

from .agent_pipe import AgentPipe, request
from .points import HUNG_S
from .test_nix import EVAL_MISSING, INCUS_HOST, NIX_INSTANTIATE, REPO, THREE, evaluate, settings

AGENT_NIX = REPO / "nix" / "modules" / "exec-agent.nix"
UNIT = "sandbox-mcp-agent"


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The three backends' guests with the default (the agent on) and with ``execAgent.enable = false``."""
    if EVAL_MISSING:
        pytest.skip(EVAL_MISSING)
    tmp = tmp_path_factory.mktemp("nix-agent")
    on = evaluate(tmp, {"settings": settings(THREE), "host": INCUS_HOST})["guests"]
    off = evaluate(tmp, {"settings": settings(THREE, execAgent={"enable": False}), "host": INCUS_HOST})["guests"]
    return {"on": on, "off": off}


def _debian_unit(user: str) -> dict[str, str]:
    """``agent_service(user)`` as key -> value, comments left out (each key occurs once)."""
    lines = [line for line in agent_service(user).splitlines() if line and not line.startswith(("#", "["))]
    return dict(line.split("=", 1) for line in lines)


def _links(rules: list[str]) -> dict[str, str]:
    """The guest's ``L+`` tmpfiles lines as link -> target."""
    return {fields[1]: fields[6] for fields in (rule.split() for rule in rules) if fields[0] == "L+"}


def test_every_guest_starts_the_agent_as_the_debian_images_do(guests: dict[str, Any]) -> None:
    debian = _debian_unit("agent")
    debian_exec = debian.pop("ExecStart").split()
    assert debian_exec == [PYTHON_PATH, "-I", "-S", "-u", EXEC_AGENT_PATH, "--listen", AGENT_LISTEN_PATH]
    wanted_by = debian.pop("WantedBy")
    # The container's and the VM's guests (an Incus image is built from the same base.nix, evaluated
    # inside its image derivation, which the stand-ins do not show).
    assert sorted(guests["on"]) == ["sbx-vm1", "sbx-web"]
    for name, guest in guests["on"].items():
        unit = guest["services"][UNIT]
        assert unit["wantedBy"] == [wanted_by], name
        assert unit["description"] == debian["Description"], name
        config = unit["serviceConfig"]
        for key in ("User", "RuntimeDirectory", "RuntimeDirectoryMode", "KillMode", "OOMPolicy"):
            assert config[key] == debian[key], (name, key)
        # The same arguments, the store's paths for the two the Debian image has at fixed places.
        python, *flags, agent, listen, path = config["ExecStart"].split()
        assert [*flags, listen, path] == [*debian_exec[1:4], "--listen", AGENT_LISTEN_PATH], name
        assert re.fullmatch(r"/nix/store/[^/ ]+/bin/python3(\.\d+)?", python), python
        assert agent.startswith("/nix/store/") and agent.endswith("-sandbox-mcp-exec-agent"), agent
        # The server's session start finds the same two at the Debian paths.
        assert _links(guest["tmpfiles"]) == {EXEC_AGENT_PATH: agent, PYTHON_PATH: python}, name
        # A pool slot's kernel argument does not exist in nixos mode: the condition is the one difference.
        assert "ConditionKernelCommandLine" not in json.dumps(unit)


def test_turned_off_a_guest_has_neither_the_unit_nor_the_links(guests: dict[str, Any]) -> None:
    for name, guest in guests["off"].items():
        assert UNIT not in guest["services"], name
        assert _links(guest["tmpfiles"]) == {}, name
        assert not [rule for rule in guest["tmpfiles"] if "sandbox-mcp" in rule], name
        # The rest of the guest is as before: the workspace user's mount points are still made.
        assert any("/home/agent/workspace" in rule for rule in guest["tmpfiles"]), name


@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles not installed")
def test_the_guests_tmpfiles_lines_make_the_links(guests: dict[str, Any], tmp_path: Path) -> None:
    rules = [rule for rule in guests["on"]["sbx-web"]["tmpfiles"] if "sandbox-mcp" in rule or PYTHON_PATH in rule]
    assert len(rules) == 3
    conf = tmp_path / "agent.conf"
    conf.write_text("\n".join(rules) + "\n")
    root = tmp_path / "root"
    root.mkdir()
    # Twice: a reboot applies them again (L+ replaces what is there).
    for _ in range(2):
        subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}", str(conf)], check=True, capture_output=True)
    links = _links(rules)
    for link, target in links.items():
        made = root / link.lstrip("/")
        assert made.is_symlink() and os.readlink(made) == target, link
    libexec = root / EXEC_AGENT_PATH.lstrip("/")
    assert oct(libexec.parent.stat().st_mode & 0o7777) == "0o755" and libexec.parent.stat().st_uid == 0


def _derivation(tmp_path: Path) -> dict[str, Any]:
    """exec-agent.nix evaluated with stand-ins for the two builders and this host's python3: its name,
    build script (``text``) and the source it is given."""
    assert NIX_INSTANTIATE is not None
    expr = """{ file, interpreter }:
      let
        drv = import (/. + file) {
          pkgs = {
            runCommand = name: env: text: { inherit name env text; };
            writeText = name: text: { inherit name text; };
          };
          python = { inherit interpreter; };
        };
      in { inherit (drv) name text; source = drv.env.source; }"""
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--eval", "--strict", "--json", "-E", expr,
         "--argstr", "file", str(AGENT_NIX), "--argstr", "interpreter", sys.executable],
        capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.skipif(NIX_INSTANTIATE is None, reason="nix-instantiate not found (Debian package nix-bin)")
def test_the_derivation_compiles_this_checkouts_agent_and_it_answers(tmp_path: Path) -> None:
    drv = _derivation(tmp_path)
    assert drv["name"] == "sandbox-mcp-exec-agent"
    assert drv["source"]["text"] == EXEC_AGENT_SOURCE.read_text(), "the guest's agent is this checkout's"
    # Run the build script as the builder would: bash -e, a scratch directory, $source and $out set.
    source = tmp_path / "source"
    source.write_text(drv["source"]["text"])
    build, out = tmp_path / "build", tmp_path / "out"
    build.mkdir()
    env = {"PATH": os.environ["PATH"], "source": str(source), "out": str(out)}
    subprocess.run(["bash", "-e", "-c", drv["text"]], cwd=build, env=env, check=True, timeout=120)
    assert out.read_bytes()[:4] == importlib.util.MAGIC_NUMBER, "bytecode of the python3 that built it"
    # On a pipe, as the server's session start runs it.
    pipe = AgentPipe([sys.executable, "-I", "-S", "-u", str(out)])
    try:
        assert pipe.messages[0] == {"ready": 1, "version": exec_agent.PROTOCOL_VERSION}
        pipe.send(request(1, "echo from-bytecode", tmp_path))
        reply = pipe.reply(1)
        assert (reply["exit"], base64.b64decode(reply["stdout"])) == (0, b"from-bytecode\n")
    finally:
        pipe.close()
    # And waiting on a socket, as the unit runs it; the first connection brings the session's environment.
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-u", str(out), "--listen", str(sock)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + HUNG_S
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the agent never bound its socket"
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(HUNG_S)
            conn.connect(str(sock))
            environ = base64.b64encode(f"HOME={tmp_path}\0PATH={os.environ['PATH']}\0".encode()).decode()
            conn.sendall(json.dumps({"environ": environ}).encode() + b"\n")
            conn.sendall(json.dumps(request(2, "pwd", tmp_path / "build")).encode() + b"\n")
            data = b""
            while b'"exit"' not in data:
                chunk = conn.recv(65536)
                assert chunk, f"the agent closed the connection: {data!r}"
                data += chunk
        ready, *rest = (json.loads(line) for line in data.splitlines())
        assert ready == {"ready": 1, "version": exec_agent.PROTOCOL_VERSION}
        reply = next(m for m in rest if m.get("id") == 2 and "exit" in m)
        assert (reply["exit"], base64.b64decode(reply["stdout"])) == (0, f"{tmp_path / 'build'}\n".encode())
        # Its connection gone, the bytecode starts again as itself and waits for the next one.
        deadline = time.monotonic() + HUNG_S
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "it did not wait again"
            time.sleep(0.01)
        assert Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")[4] == str(out).encode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=HUNG_S)
