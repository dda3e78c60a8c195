"""The web-server story every workspace type must pass, through a real MCP client (tests for container, vm, incus).

start_process `python3 -m http.server 8000` -> wait_process until port:8000 -> publish_port -> fetch a
file over the host's loopback -> read the access log with a cursor (each request line exactly
once) -> restart the server -> read on from the same cursor -> stop_process -> the port closes.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio

from .points import HUNG_S

__all__ = ["fetch", "read_until", "web_server_flow"]

FETCH = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode())"


async def fetch(url: str, prefix: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """GET ``url`` from a separate process (``prefix``: e.g. setpriv as another user), over the host's loopback."""
    argv = [*prefix, sys.executable, "-I", "-c", FETCH, url]
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=HUNG_S)
    )


async def read_until(
    s: Any, name: str, process_id: str, cursor: int, pattern: str, count: int, max_bytes: int = 40
) -> tuple[str, int]:
    """Read output from ``cursor`` in small pieces until ``pattern`` has matched ``count`` times; (text, next cursor)."""
    text = ""
    with anyio.fail_after(5 * HUNG_S):  # only a hang: a VM under emulation answers slowly
        while len(re.findall(pattern, text)) < count:
            out = await s.call("process_output", name=name, process_id=process_id, cursor=cursor, wait_s=10,
                               max_bytes=max_bytes)  # fmt: skip
            assert out["next_cursor"] >= cursor and out["dropped_bytes"] == 0, out
            assert len((out["stdout"] + out["stderr"]).encode()) == out["next_cursor"] - cursor, out
            text += out["stdout"] + out["stderr"]
            cursor = out["next_cursor"]
    return text, cursor


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def web_server_flow(
    session: Callable[[], AbstractAsyncContextManager[Any]],
    restart: Callable[[], Awaitable[None]],
    name: str,
    type: str,
    while_published: Callable[[Any, dict[str, Any]], Awaitable[None]] | None = None,
) -> None:
    """The story above; ``while_published(session, published)`` adds checks while the port is published."""
    async with session() as s:
        await s.call("create_workspace", name=name, type=type)
        await s.call("exec", name=name, command=f"mkdir -p site && echo 'hello from {name}' > site/hello.txt")
        started = await s.call("start_process", name=name, command="exec python3 -u -m http.server 8000",
                               cwd="site", process_id="web")  # fmt: skip
        assert started["process_id"] == "web" and started["state"] == "running" and started["pid"] > 1
        waited = await s.call("wait_process", name=name, process_id="web", until="port:8000", timeout_s=300)
        assert waited["matched"] is True and waited["running"] is True, waited
        ready = await s.call("wait_process", name=name, process_id="web", until="output:^Serving HTTP", timeout_s=60)
        assert ready["matched"] is True and ready["next_cursor"] > 0, ready
        published = await s.call("publish_port", name=name, port=8000)
        assert published["host"] == "127.0.0.1" and published["url"] == f"http://127.0.0.1:{published['host_port']}"
        assert await s.call("publish_port", name=name, port=8000) == published  # again: the same
        assert (await s.call("workspace_status", name=name))["ports"] == [published]
        assert [w["ports"] for w in (await s.call("list_workspaces"))["workspaces"] if w["name"] == name] == [
            [published]
        ]
        for n in range(3):
            got = await fetch(f"{published['url']}/hello.txt?n={n}")
            assert got.returncode == 0 and got.stdout == f"hello from {name}\n", got.stderr
        if while_published is not None:
            await while_published(s, published)
        text, cursor = await read_until(s, name, "web", 0, r"GET /hello\.txt\?n=\d", 3)
        requests = re.findall(r"GET /hello\.txt\?n=(\d)", text)
        assert requests == ["0", "1", "2"], text  # each once, in order
        assert "Serving HTTP on" in text

    await restart()  # a new server (and daemon) on the same state: the process and its output live on

    async with session() as s:
        assert (await s.call("workspace_status", name=name))["ports"] == [published]
        got = await fetch(f"{published['url']}/hello.txt?n=3")  # the listener is back
        assert got.returncode == 0, got.stderr
        text, cursor = await read_until(s, name, "web", cursor, r"GET /hello\.txt\?n=\d", 1)
        assert re.findall(r"GET /hello\.txt\?n=(\d)", text) == ["3"], text  # nothing twice, nothing lost
        listed = (await s.call("list_processes", name=name))["processes"]
        assert [(p["process_id"], p["running"]) for p in listed] == [("web", True)]

        stopped = await s.call("stop_process", name=name, process_id="web")
        assert stopped["running"] is False and stopped["signal"] == "TERM", stopped
        assert (await s.call("list_processes", name=name))["processes"][0]["running"] is False
        gone = await fetch(f"{published['url']}/hello.txt?n=4")
        assert gone.returncode != 0  # nothing answers behind the published port any more
        final = await s.call("process_output", name=name, process_id="web", cursor=cursor)
        assert final["running"] is False and "n=4" not in final["stderr"]

        assert await s.call("unpublish_port", name=name, port=8000) == {"port": 8000, "published": False}
        assert (await s.call("workspace_status", name=name))["ports"] == []
        assert _refused(published["host_port"])
        await s.call("destroy_workspace", name=name)
