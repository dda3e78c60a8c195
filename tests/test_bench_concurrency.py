"""The pure parts of the benchmark's concurrency section (the calls themselves are run by `sandbox-mcp bench`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sandbox_mcp.bench.concurrency import (
    _proc_cpu_s,
    _serve_child,
    _spawn_cpu_ms,
    _workspaces_cpu_s,
    format_concurrency,
)


def test_format_gives_each_path_against_the_baseline_and_where_its_cpu_went() -> None:
    row = {"per_s": 500.0, "p50_ms": 100.0, "p95_ms": 190.0, "wall_s": 0.4}
    text = format_concurrency({
        "setup": {"workspaces": 10.0, "calls": 200.0, "rounds": 5.0},
        "raw": {**row, "per_s": 250.0},
        "manager": {**row, "cpu_self_ms": 0.3, "cpu_workspaces_ms": 1.1},
        "mcp": {**row, "cpu_self_ms": 0.8},  # the workspaces' cgroups unreadable (a systemd scope)
        "stdio": {**row, "cpu_self_ms": 0.6, "cpu_serve_ms": 0.9, "cpu_workspaces_ms": 1.2},
        "floor": {"sh_cpu_ms": 0.81, "cores": 2.0},
    })  # fmt: skip
    assert "200 concurrent exec true over 10 workspaces (5 rounds, median round):" in text
    assert "one stdio serve (in process): 500 per second, p50 100.0 ms, p95 190.0 ms; 2.00x the baseline's rate" in text
    # 2 cores / 2.7 ms per call: 741 a second at most, whatever the concurrency
    assert "    CPU ms per call: this process 0.60, serve 0.90, workspaces 1.20; ceiling on 2 cores 741 per second" in text
    assert "    CPU ms per call: this process 0.80; ceiling on 2 cores 2500 per second\n" in text
    assert "  floor: one `sh -c true` started on this host costs 0.81 ms of CPU" in text
    assert "baseline, raw asyncssh session per command: 250 per second" in text


def test_cpu_readings(tmp_path: Path) -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.3: pass\nprint('done', flush=True)\ninput()", "serve"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    try:
        assert busy.stdout is not None and busy.stdout.readline() == b"done\n"
        assert _serve_child() == busy.pid  # a child of ours with "serve" among its arguments
        assert _proc_cpu_s(busy.pid) >= 0.2
    finally:
        busy.kill()
        busy.wait()
    assert _proc_cpu_s(busy.pid) == 0.0  # gone
    stat = tmp_path / "cpu.stat"
    stat.write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    assert _workspaces_cpu_s([stat, stat]) == 5.0
    assert _workspaces_cpu_s([stat, tmp_path / "missing"]) is None


def test_the_spawn_floor_is_a_positive_cpu_cost() -> None:
    ms = _spawn_cpu_ms(20)
    assert 0.0 < ms < 1000.0  # a shell's start costs something, and far less than a second
