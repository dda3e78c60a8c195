"""The exec agent lives in the image and is started by absolute path, never sent as ``python3 -c``.

The recipe's pieces run for real here (the copy, and the copied agent answering a request); the
end-to-end test looks inside a real container booted from the cached image.
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from sandbox_mcp import exec_agent
from sandbox_mcp.images.debootstrap import (
    CONTAINER_SKIPPED_UNITS,
    EXEC_AGENT_SOURCE,
    MASKED_UNITS,
    compile_exec_agent_argv,
    exec_agent_digest,
    image_key,
    install_exec_agent,
)
from sandbox_mcp.models import CreateSpec
from sandbox_mcp.paths import AGENT_LISTEN_PATH
from sandbox_mcp.ssh import EXEC_AGENT_PATH


def test_image_key_changes_with_the_exec_agent(tmp_path: Path) -> None:
    real = exec_agent_digest()
    assert real == exec_agent_digest(EXEC_AGENT_SOURCE) and len(real) == 64
    assert image_key("bookworm", "agent", 1000, []) == image_key("bookworm", "agent", 1000, [], real)
    edited = tmp_path / "exec_agent.py"
    edited.write_bytes(EXEC_AGENT_SOURCE.read_bytes() + b"\n# a change\n")
    other = exec_agent_digest(edited)
    assert other != real
    for packages in ([], ["jq"]):
        assert image_key("bookworm", "agent", 1000, packages, other) != image_key("bookworm", "agent", 1000, packages)


@pytest.mark.parametrize("compiled", [False, True], ids=["source", "bytecode"])
def test_installed_agent_is_root_owned_and_answers(tmp_path: Path, compiled: bool) -> None:
    root = tmp_path / "root"
    dest = install_exec_agent(root)
    assert dest == root / EXEC_AGENT_PATH.lstrip("/")
    assert dest.read_bytes() == EXEC_AGENT_SOURCE.read_bytes()
    python = shutil.which("python3")
    assert python is not None
    if compiled:  # as the recipe does with the image's python3 (here the host's, on the host path)
        subprocess.run(compile_exec_agent_argv([python], str(dest)), check=True)
        assert dest.with_name(dest.name + ".py").read_bytes() == EXEC_AGENT_SOURCE.read_bytes()
        assert dest.read_bytes()[:16] != EXEC_AGENT_SOURCE.read_bytes()[:16]  # bytecode at the path it runs by
    st = dest.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755 and (st.st_uid, st.st_gid) == (0, 0)
    assert stat.S_IMODE(dest.parent.stat().st_mode) == 0o755
    # The copy is a working agent: ready line, then one command and its reply.
    request = {"id": 7, "command": "echo hi; echo err >&2", "cwd": str(tmp_path), "env": {}, "stdin": None,
               "timeout": 30, "cap": 1024}
    proc = subprocess.Popen([python, "-I", "-S", "-u", str(dest)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # a broken agent fails the test instead of hanging it
    watchdog.start()
    lines = []
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        while line := proc.stdout.readline():
            lines.append(json.loads(line))
            if lines[-1].get("id") == 7 and "exit" in lines[-1]:
                break
    finally:
        watchdog.cancel()
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)
    assert lines[0] == {"ready": 1, "version": exec_agent.PROTOCOL_VERSION}
    reply = lines[-1]
    assert (reply["exit"], base64.b64decode(reply["stdout"]), base64.b64decode(reply["stderr"])) == (
        0, b"hi\n", b"err\n"
    )
    assert proc.returncode == 0  # it ends when its channel (here: stdin) closes


@pytest.mark.anyio
async def test_workspace_runs_the_installed_agent(manager: object) -> None:
    from sandbox_mcp.manager import WorkspaceManager

    assert isinstance(manager, WorkspaceManager)
    ws = await manager.create(CreateSpec(name="agentimg"))
    r = await manager.exec(ws.name, f"stat -c '%U %a' {EXEC_AGENT_PATH}; ps -eo user:20,args")
    assert r.exit_code == 0, r.stderr
    first, *procs = r.stdout.splitlines()
    assert first == "root 755"
    rows = [line.split(None, 1) + [""] for line in procs]
    agents = [[user, args] for user, args, *_ in rows if args.startswith("/usr/bin/python3")]
    # The one the image started at boot, which this connection met (tests/test_agent_at_boot.py).
    assert agents == [[ws.user, f"/usr/bin/python3 -I -S -u {EXEC_AGENT_PATH} --listen {AGENT_LISTEN_PATH}"]]
    assert not [line for line in procs if " -c " in line and "python3" in line]  # no source on a command line
    assert manager.ssh._entries[ws.name].agent is not None  # exec went through the agent
    # The recipe left bytecode of the image's own python3 there (no compile per start), the source beside it.
    check = "import importlib.util as u, sys; print(open(sys.argv[1], 'rb').read(4) == u.MAGIC_NUMBER)"
    r = await manager.exec(ws.name, f'python3 -I -c "{check}" {EXEC_AGENT_PATH} && test -s {EXEC_AGENT_PATH}.py')
    assert (r.exit_code, r.stdout) == (0, "True\n"), r.stderr
    # The boot started only what a workspace uses: no dbus-daemon until someone asks for it, none of the
    # masked units; and `systemctl` as the user still answers (dbus starts on its socket then).
    r = await manager.exec(ws.name, "sudo systemctl list-units --no-legend --plain --state=active | cut -d' ' -f1; "
                                    "echo ---; ps -eo comm")  # fmt: skip
    units, ps = r.stdout.split("---\n")
    assert "dbus-daemon" not in ps.split() and "dbus.service" not in units.split(), r.stdout
    assert not set(MASKED_UNITS) & set(units.split()), r.stdout
    assert {"ssh.service", "systemd-journald.service"} <= set(units.split()), r.stdout
    r = await manager.exec(ws.name, "systemctl is-system-running; systemctl is-active dbus.service")
    assert r.stdout.split() == ["running", "active"], (r.stdout, r.stderr)
    # Nothing a container cannot use ran (sysctls, device nodes, nologin), the journal's active file is
    # journald's least (it is allocated whole, in memory), and sshd does not re-execute per connection.
    assert not set(CONTAINER_SKIPPED_UNITS) & set(units.split()), r.stdout
    r = await manager.exec(ws.name, "sudo sh -c 'stat -c %s /run/log/journal/*/system.journal; "
                                    "test -e /run/nologin && echo nologin; ps -o args= -p $(cat /run/sshd.pid)'")
    size, title = r.stdout.split("\n", 1)
    assert int(size) <= 512 * 1024 and "nologin" not in r.stdout, r.stdout
    assert "/usr/sbin/sshd -D -r [listener]" in title, (r.stdout, r.stderr)
