"""The processes, ports and exec-progress section of ``sandbox-mcp bench``, on a running container.

Each figure has a baseline measured in the same run:

- ``start_process`` → first byte of its output (a ``process_output`` long-poll returning it),
  against ``exec echo`` (one tool round trip that runs a command and returns its output);
- ``process_output`` long-poll latency: output written into the process (through a FIFO in the
  workspace directory, from the host) → the waiting call's result, against ``exec true``;
- a published port against a direct connection to the workspace's IP: bytes per second of a
  64 MiB download, and the round trip of one byte on an open connection (and connect → first byte);
- notifications per second during a chatty ``exec`` (a line every 5 ms for about 2 s), and that
  exec's duration against the same exec without a progress token.
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from .calls import tool_caller

__all__ = ["format_processes", "run_processes"]

Call = Callable[..., Awaitable[dict[str, Any]]]

_SERVER = r"""
import socket, sys, threading
def serve(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(16)
    while True:
        c, _ = s.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
def source(c):
    block = b"\0" * 65536
    with c:
        for _ in range(int(sys.argv[1]) // 65536):
            c.sendall(block)
def echo(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while (d := c.recv(65536)):
            c.sendall(d)
threading.Thread(target=serve, args=(9001, source), daemon=True).start()
serve(9002, echo)
"""

DOWNLOAD_BYTES = 64 << 20


def _download(host: str, port: int) -> float:
    """Seconds to read everything the source server sends."""
    t0 = time.perf_counter()
    got = 0
    with socket.create_connection((host, port), timeout=60) as s:
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    elapsed = time.perf_counter() - t0
    if got != DOWNLOAD_BYTES:
        raise RuntimeError(f"downloaded {got} bytes of {DOWNLOAD_BYTES} from {host}:{port}")
    return elapsed


def _ping_ms(host: str, port: int, rounds: int) -> tuple[float, list[float]]:
    """(connect → first echoed byte in ms, per-round one-byte round trips in ms) on one connection."""
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        s.recv(1)
        first = (time.perf_counter() - t0) * 1000
        rtts = []
        for _ in range(rounds):
            t = time.perf_counter()
            s.sendall(b"x")
            if s.recv(1) != b"x":
                raise RuntimeError("echo broke")
            rtts.append((time.perf_counter() - t) * 1000)
    return first, rtts


async def run_processes(client: Any, name: str, host_dir: Path, ip: str, runs: int) -> dict[str, dict[str, float]]:
    """The figures above, on the running container ``name`` (``host_dir``: its workspace dir on the host)."""

    call = tool_caller(client)

    out: dict[str, dict[str, float]] = {}

    # 1. start_process -> first byte, against exec echo.
    first, execs = [], []
    for i in range(runs):
        t0 = time.perf_counter()
        await call("start_process", name=name, command="echo hi", process_id=f"fb{i}")
        while not (await call("process_output", name=name, process_id=f"fb{i}", wait_s=10))["stdout"]:
            pass
        first.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        await call("exec", name=name, command="echo hi")
        execs.append((time.perf_counter() - t0) * 1000)
    out["start_process_first_byte_ms"] = {"p50": statistics.median(first), "max": max(first),
                                          "exec_echo_p50": statistics.median(execs)}  # fmt: skip

    # 2. long-poll latency: a write into the process's FIFO from the host -> the waiting call returns.
    fifo = host_dir / "bench.fifo"
    await call("exec", name=name, command="rm -f bench.fifo && mkfifo -m 666 bench.fifo")
    await call("start_process", name=name, command="exec 3<>bench.fifo; exec cat <&3", process_id="poll")
    cursor, polls, trues = 0, [], []
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # read-write: never blocks, never EOF for cat
    try:
        for _ in range(runs):
            result: dict[str, Any] = {}
            async def waiter(result: dict[str, Any] = result, cursor: int = cursor) -> None:
                result.update(await call("process_output", name=name, process_id="poll", cursor=cursor, wait_s=30))
                result["t"] = time.perf_counter()

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.sleep(0.2)  # the call is waiting inside the workspace by now
                sent = time.perf_counter()
                os.write(writer, b"x\n")
            cursor = result["next_cursor"]
            polls.append((result["t"] - sent) * 1000)
            t0 = time.perf_counter()
            await call("exec", name=name, command="true")
            trues.append((time.perf_counter() - t0) * 1000)
    finally:
        os.close(writer)
    out["process_output_long_poll_ms"] = {"p50": statistics.median(polls), "max": max(polls),
                                          "exec_true_p50": statistics.median(trues)}  # fmt: skip

    # 3. A published port against the workspace's IP: throughput and latency.
    await call("write_file", name=name, path="bench_server.py", content=_SERVER)
    await call("start_process", name=name, command=f"exec python3 bench_server.py {DOWNLOAD_BYTES}", process_id="srv")
    await call("wait_process", name=name, process_id="srv", until="port:9002", timeout_s=60)
    src = (await call("publish_port", name=name, port=9001))["host_port"]
    echo = (await call("publish_port", name=name, port=9002))["host_port"]
    fwd_s, direct_s = [], []
    fwd_first, direct_first, fwd_rtt, direct_rtt = [], [], [], []
    for _ in range(3):  # interleaved, so drifting load weighs on both alike
        fwd_s.append(await anyio.to_thread.run_sync(_download, "127.0.0.1", src))
        direct_s.append(await anyio.to_thread.run_sync(_download, ip, 9001))
        f, r = await anyio.to_thread.run_sync(_ping_ms, "127.0.0.1", echo, 200)
        fwd_first.append(f)
        fwd_rtt += r
        f, r = await anyio.to_thread.run_sync(_ping_ms, ip, 9002, 200)
        direct_first.append(f)
        direct_rtt += r
    mib = DOWNLOAD_BYTES / (1 << 20)
    out["port_forward"] = {
        "forward_mib_s": mib / statistics.median(fwd_s), "direct_mib_s": mib / statistics.median(direct_s),
        "forward_rtt_p50_ms": statistics.median(fwd_rtt), "direct_rtt_p50_ms": statistics.median(direct_rtt),
        "forward_first_byte_ms": statistics.median(fwd_first), "direct_first_byte_ms": statistics.median(direct_first),
    }  # fmt: skip
    await call("stop_process", name=name, process_id="srv", grace_s=1)
    await call("stop_process", name=name, process_id="poll", grace_s=1)

    # 4. Notifications per second during a chatty exec, and what streaming costs that exec.
    chatty = "i=0; while [ $i -lt 400 ]; do echo line $i; i=$((i+1)); sleep 0.005; done"
    seen: list[float] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append(time.perf_counter())

    t0 = time.perf_counter()
    streamed = await call("exec", progress=progress, name=name, command=chatty)
    with_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = await call("exec", name=name, command=chatty)
    without_s = time.perf_counter() - t0
    if streamed["stdout"] != plain["stdout"]:
        raise RuntimeError("the streamed exec's result differs")
    out["exec_progress"] = {"notifications": float(len(seen)), "per_s": len(seen) / with_s, "exec_s": with_s,
                            "exec_without_progress_s": without_s}  # fmt: skip
    return out


def format_processes(r: dict[str, dict[str, float]]) -> str:
    """The section's lines for the bench report."""
    fb, lp, pf, ep = r["start_process_first_byte_ms"], r["process_output_long_poll_ms"], r["port_forward"], r["exec_progress"]
    return "\n".join([
        f"start_process -> first byte of output: p50 {fb['p50']:.1f} ms (max {fb['max']:.1f})",
        f"  baseline, exec echo (one round trip): p50 {fb['exec_echo_p50']:.1f} ms; ratio "
        f"{fb['p50'] / fb['exec_echo_p50']:.2f}x",
        f"process_output long-poll, new output -> result: p50 {lp['p50']:.1f} ms (max {lp['max']:.1f})",
        f"  baseline, exec true: p50 {lp['exec_true_p50']:.1f} ms; ratio {lp['p50'] / lp['exec_true_p50']:.2f}x",
        f"published port: {pf['forward_mib_s']:.0f} MiB/s, one-byte round trip p50 {pf['forward_rtt_p50_ms']:.3f} ms, "
        f"connect -> first byte {pf['forward_first_byte_ms']:.2f} ms",
        f"  baseline, direct to the workspace IP: {pf['direct_mib_s']:.0f} MiB/s, round trip p50 "
        f"{pf['direct_rtt_p50_ms']:.3f} ms, connect -> first byte {pf['direct_first_byte_ms']:.2f} ms; the forward "
        f"adds {pf['forward_rtt_p50_ms'] - pf['direct_rtt_p50_ms']:.3f} ms per round trip and runs at "
        f"{pf['forward_mib_s'] / pf['direct_mib_s']:.2f}x the throughput",
        f"exec with a progress token (a line every 5 ms): {ep['notifications']:.0f} notifications, "
        f"{ep['per_s']:.1f}/s; exec took {ep['exec_s']:.2f} s",
        f"  baseline, the same exec without progress: {ep['exec_without_progress_s']:.2f} s; ratio "
        f"{ep['exec_s'] / ep['exec_without_progress_s']:.2f}x",
    ])
