"""End to end: background processes, their output, published ports and exec's progress, for containers.

Through the MCP client, in process and through the daemon as an unprivileged user (the
``deployment`` fixture of test_e2e.py): the web-server story of processes_flow.py, with a server
(and daemon) restart in the middle; bad input that changes nothing; a process printing 1 GiB
(the server's memory stays flat, dropped_bytes adds up, the workspace holds only its ring); exec
progress notifications before the result; and, with the daemon, another user who can neither
connect to the owner's published port nor see or stop the owner's processes.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.exec_agent import OUTPUT_CAP_MIN
from sandbox_mcp.registry import Registry

from . import test_e2e
from .deploy import as_user, mcp_as
from .processes_flow import fetch, web_server_flow
from .test_e2e import Deployment, Session, ThroughDaemon

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

# test_e2e's fixtures: in process, and through a daemon child as an unprivileged user.
deployment = test_e2e.deployment
settings = test_e2e.settings


@pytest.fixture
async def session_factory(deployment: Deployment, settings: Settings):  # type: ignore[no-untyped-def]
    """Open sessions one after another (a restart in between); every workspace destroyed afterwards."""
    try:
        yield lambda: deployment.session(settings)
    finally:
        await deployment.clean(settings)


async def _restart(deployment: Deployment) -> None:
    await deployment.stop_server()
    deployment.start_server()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_web_server_story(session_factory: Any, deployment: Deployment, request: pytest.FixtureRequest) -> None:
    other_checks = None
    if isinstance(deployment, ThroughDaemon):
        accounts = request.getfixturevalue("accounts")
        owner, other = deployment.user, accounts.bob

        async def other_checks(s: Session, published: dict[str, Any]) -> None:
            url = f"{published['url']}/hello.txt"
            # setpriv runs the interpreter itself: a second exec (through env) would lose the search
            # right on a 0700 /root where pyenv keeps the venv's python.
            mine = await fetch(url, as_user(owner))
            assert mine.returncode == 0 and mine.stdout == "hello from web\n", mine.stderr
            theirs = await fetch(url, as_user(other))
            assert theirs.returncode != 0 and "hello" not in theirs.stdout  # closed before any byte
            assert "refused a connection to web:8000 from uid " + str(other.uid) in deployment.daemon.tail(200)
            async with mcp_as(other, deployment.daemon) as client:
                bob = Session(client)
                for tool, args in [("list_processes", {}), ("process_output", {"process_id": "web"}),
                                   ("stop_process", {"process_id": "web"}), ("unpublish_port", {"port": 8000}),
                                   ("publish_port", {"port": 8000})]:  # fmt: skip
                    assert "not found" in await bob.error(tool, name="web", **args), tool
            assert (await s.call("list_processes", name="web"))["processes"][0]["running"] is True

    await web_server_flow(session_factory, lambda: _restart(deployment), "web", "container", other_checks)


async def test_bad_input_changes_nothing(session_factory: Any, settings: Settings) -> None:
    async with session_factory() as s:
        await s.call("create_workspace", name="bad")
        await s.call("start_process", name="bad", command="exec sleep 600", process_id="sleeper")
        before = Registry(settings.registry_path).read_sync().workspaces["bad"]
        assert "list_processes" in await s.error("process_output", name="bad", process_id="nope")
        assert "list_processes" in await s.error("stop_process", name="bad", process_id="nope")
        assert "does not compile" in await s.error("wait_process", name="bad", process_id="sleeper", until="output:[")
        assert "1 to 65535" in await s.error("wait_process", name="bad", process_id="sleeper", until="port:0")
        assert "already exists" in await s.error("start_process", name="bad", command="true", process_id="sleeper")
        assert "no such directory" in await s.error("start_process", name="bad", command="true", cwd="/nowhere")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            assert "in use" in await s.error("publish_port", name="bad", port=8000, host_port=port)
        assert Registry(settings.registry_path).read_sync().workspaces["bad"].ports == before.ports == []
        listed = (await s.call("list_processes", name="bad"))["processes"]
        assert [(p["process_id"], p["running"]) for p in listed] == [("sleeper", True)]

        # A stopped workspace has no processes and publishes nothing; its ports do not come back on start.
        published = await s.call("publish_port", name="bad", port=8000)
        await s.call("stop_workspace", name="bad")
        assert "start_workspace" in await s.error("list_processes", name="bad")
        assert "start_workspace" in await s.error("start_process", name="bad", command="true")
        assert "start_workspace" in await s.error("publish_port", name="bad", port=8000)
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", published["host_port"])) != 0
        started = await s.call("start_workspace", name="bad")
        assert started["ports"] == []
        assert (await s.call("list_processes", name="bad"))["processes"] == []
        assert "list_processes" in await s.error("process_output", name="bad", process_id="sleeper")


async def test_a_gigabyte_of_output_stays_in_the_workspace(
    session_factory: Any, deployment: Deployment, settings: Settings
) -> None:
    server_pid = deployment.daemon.proc.pid if isinstance(deployment, ThroughDaemon) else os.getpid()
    async with session_factory() as s:
        await s.call("create_workspace", name="big")
        rss_before = _rss_kib(server_pid)
        await s.call("start_process", name="big", process_id="flood",
                     command="head -c 1073741824 /dev/zero | tr '\\0' x; echo; echo done >&2")  # fmt: skip
        # Read while it writes: each read is bounded, whatever was overwritten is counted as dropped.
        cursor = dropped = 0
        while True:
            out = await s.call("process_output", name="big", process_id="flood", cursor=cursor, wait_s=5,
                               max_bytes=1 << 20)  # fmt: skip
            assert len(out["stdout"]) + len(out["stderr"]) <= 1 << 20
            dropped += out["dropped_bytes"]
            assert out["next_cursor"] == cursor + out["dropped_bytes"] + len(out["stdout"]) + len(out["stderr"])
            cursor = out["next_cursor"]
            if not out["running"] and not out["more"]:
                break
        total = (1 << 30) + len("\n") + len("done\n")
        assert cursor == total and out["exit_code"] == 0 and out["stderr"].endswith("done\n")
        info = (await s.call("list_processes", name="big"))["processes"][0]
        assert info["output_bytes"] == total and info["dropped_bytes"] == total - settings.process_output_cap
        assert settings.process_output_cap >= OUTPUT_CAP_MIN
        # From the start again: exactly what is no longer kept is reported as dropped.
        first = await s.call("process_output", name="big", process_id="flood", cursor=0, max_bytes=10)
        assert first["dropped_bytes"] == total - settings.process_output_cap and first["stdout"] == "x" * 10
        # The server never held it: its memory is flat (a bound far below the output's size).
        assert _rss_kib(server_pid) - rss_before < 64 << 10
        # The workspace holds the ring only (header, output, tags), and nothing in it was killed for memory.
        r = await s.call("exec", name="big", command="stat -c %s ~/.cache/sandbox-mcp/processes/flood/ring; "
                         "grep oom_kill /sys/fs/cgroup/memory.events || echo oom_kill 0")  # fmt: skip
        size, oom = r["stdout"].split("\n", 1)
        assert int(size) == 16 + 2 * settings.process_output_cap
        assert re.search(r"^oom_kill 0$", oom, re.M), oom


async def test_exec_streams_progress_before_the_result(session_factory: Any) -> None:
    async with session_factory() as s:
        await s.call("create_workspace", name="chat")
        s.progress.clear()
        r = await s.call("exec", name="chat", command="for i in $(seq 1 30); do echo line $i; sleep 0.05; done; "
                         "echo err >&2")  # fmt: skip
        assert r["exit_code"] == 0 and r["stdout"] == "".join(f"line {i}\n" for i in range(1, 31))
        # Counted when the result is back: each came before it.
        messages = [m or "" for _, _, m in s.progress]
        assert len(messages) >= 3, messages
        assert "".join(messages).replace("err\n", "") == r["stdout"]  # whole lines, none lost or doubled
        values = [p for p, _, _ in s.progress]
        assert values == sorted(values) and len(set(values)) == len(values)
        # Without a progress token nothing is streamed (and the result is the same).
        plain = await s.client.call_tool("exec", {"name": "chat", "command": "echo quiet"})
        assert plain.structured_content["stdout"] == "quiet\n"


async def test_a_host_port_taken_while_the_server_was_down_is_dropped(
    session_factory: Any, deployment: Deployment
) -> None:
    """Whoever holds the host port now must not be taken for the workspace: the port is no longer listed."""
    async with session_factory() as s:
        await s.call("create_workspace", name="taken")
        kept = await s.call("publish_port", name="taken", port=8000)
        lost = await s.call("publish_port", name="taken", port=8001)
    await deployment.stop_server()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", lost["host_port"]))
        squatter.listen()
        deployment.start_server()
        async with session_factory() as s:
            assert (await s.call("workspace_status", name="taken"))["ports"] == [kept]
