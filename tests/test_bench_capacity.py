"""The pure parts of the benchmark's capacity section (the ramp itself is run by `sandbox-mcp bench`)."""

from __future__ import annotations

from pathlib import Path

from sandbox_mcp.bench.capacity import format_capacity, mem_available_mib, ramp_steps


def test_ramp_steps() -> None:
    assert ramp_steps(40) == [10, 20, 30, 40]
    assert ramp_steps(35) == [10, 20, 30, 35]
    assert ramp_steps(5) == [5]
    assert ramp_steps(0) == []


def test_mem_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684000 kB\nMemFree:        1000 kB\nMemAvailable:   2048000 kB\n")
    assert mem_available_mib(meminfo) == 2000.0
    assert mem_available_mib() > 0  # the real one


def test_format_says_where_the_ramp_stopped() -> None:
    ok = {"failed": 0, "first_error": None, "all_running_s": 12.5, "mib_per_idle_workspace": 24.6,
          "cgroup_mib_per_workspace": 20.25}
    text = format_capacity({
        "max_user_instances": 128, "parallel_max": 40,
        "unprivileged": [{"n": 10, **ok}, {"n": 20, **ok},
                         {"n": 30, "failed": 10, "first_error": "did not answer", "all_running_s": 90.0,
                          "mib_per_idle_workspace": 30.0}],
        "privileged": "skipped: set SANDBOX_MCP_ALLOW_PRIVILEGED=true to compare",
    })  # fmt: skip
    assert "fs.inotify.max_user_instances = 128" in text
    assert "unprivileged: all of 20 started; 10 of 30 failed (did not answer)" in text
    assert ("   20 at once: all running in 12.5 s, 24.6 MiB of host memory per idle workspace (MemAvailable), "
            "20.2 MiB charged to its cgroup") in text
    assert "privileged: skipped: set SANDBOX_MCP_ALLOW_PRIVILEGED=true" in text
