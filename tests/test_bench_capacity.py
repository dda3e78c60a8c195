"""The pure parts of the benchmark's capacity section (the ramp itself is run by `sandbox-mcp bench`)."""

from __future__ import annotations

import os
from pathlib import Path

from sandbox_mcp.bench.capacity import (
    REST,
    busy_cpu_s,
    cpu_by_part,
    format_capacity,
    mem_available_mib,
    private_mib,
    ramp_steps,
)


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


def test_busy_cpu(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal: idle and iowait are the idle part
    stat.write_text("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n")
    busy, total = busy_cpu_s(stat)
    assert (busy, total) == (150 / os.sysconf("SC_CLK_TCK"), 1000 / os.sysconf("SC_CLK_TCK"))
    real_busy, real_total = busy_cpu_s()
    assert 0 <= real_busy <= real_total


def test_format_gives_creates_per_second_and_the_cpu_it_took() -> None:
    step = {"n": 30, "failed": 0, "first_error": None, "all_running_s": 8.0, "mib_per_idle_workspace": 14.0,
            "cgroup_mib_per_workspace": 12.5, "all_created_s": 7.5, "creates_per_s": 4.0,
            "cgroup_cpu_s_per_workspace": 0.2, "server_cpu_s_per_create": 0.05, "outside_mib_per_workspace": 0.25,
            "host_busy_cpu_s": 15.0, "host_cpu_s": 16.0}
    text = format_capacity({"max_user_instances": 1024, "parallel_max": 30, "unprivileged": [step],
                            "privileged": "skipped"})
    assert "all created (SSH answering) in 7.5 s: 4.0 creates per second" in text
    assert "12.8 MiB per idle workspace in its cgroup and its host processes outside it (0.25 MiB of those)" in text
    assert ("CPU: 0.200 s per workspace in its cgroup, 0.050 s per create in this process; the host was busy "
            "15.0 of 16.0 CPU-seconds (94%") in text
    assert "by part" not in text  # none read: no line
    assert "baseline" not in text  # none measured: no line
    step.update({"bare_all_answering_s": 2.5, "bare_per_s": 12.0, "bare_host_busy_cpu_s": 4.5, "bare_host_cpu_s": 5.0})
    text = format_capacity({"max_user_instances": 1024, "parallel_max": 30, "unprivileged": [step],
                            "privileged": "skipped"})
    assert ("baseline, the same 30 booted bare at once (network, nspawn, until sshd's banner): 2.5 s, 12.0 per "
            "second, host busy 90%; creates at 0.33x its rate") in text
    failed = {k: v for k, v in step.items() if not k.startswith("bare_")}
    failed.update({"bare_failed": 2, "bare_first_error": "no sshd banner from 10.0.0.3"})
    text = format_capacity({"max_user_instances": 1024, "parallel_max": 30, "unprivileged": [failed],
                            "privileged": "skipped"})
    assert "baseline, the same 30 booted bare at once: 2 failed (no sshd banner from 10.0.0.3)" in text
    step["cgroup_cpu_s_by_part"] = {"init.scope": 0.04, "ssh.service": 0.021, REST: 0.09,
                                    "sandbox-mcp-agent.service": 0.025}  # fmt: skip
    text = format_capacity({"max_user_instances": 1024, "parallel_max": 30, "unprivileged": [step],
                            "privileged": "skipped"})
    assert ("CPU per workspace by part: init.scope 40 ms, sandbox-mcp-agent.service 25 ms, ssh.service 21 ms, "
            "the rest 90 ms (") in text


def _cpu_stat(d: Path, usec: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "cpu.stat").write_text(f"usage_usec {usec}\nuser_usec {usec // 2}\nsystem_usec {usec // 2}\n")


def test_cpu_by_part_names_systemd_and_running_units_and_counts_the_rest(tmp_path: Path) -> None:
    # The shape of a container's tree in the unified hierarchy (tests/test_capacity.py reads a real one).
    ws = tmp_path / "ws1"
    _cpu_stat(ws, 170_000)
    _cpu_stat(ws / "supervisor", 1_000)
    _cpu_stat(ws / "payload", 160_000)
    _cpu_stat(ws / "payload" / "init.scope", 35_000)
    _cpu_stat(ws / "payload" / "system.slice", 75_000)
    _cpu_stat(ws / "payload" / "system.slice" / "ssh.service", 21_000)
    _cpu_stat(ws / "payload" / "system.slice" / "sandbox-mcp-agent.service", 25_000)
    _cpu_stat(ws / "payload" / "system.slice" / "system-getty.slice" / "getty@tty1.service", 2_000)
    parts = {k: round(v, 6) for k, v in cpu_by_part(ws).items()}
    # The getty's CPU is in the rest (a slice deeper), as are the supervisor's and what no cgroup holds now.
    assert parts == {"init.scope": 0.035, "ssh.service": 0.021, "sandbox-mcp-agent.service": 0.025, REST: 0.089}
    assert cpu_by_part(tmp_path / "gone") == {}
    (ws / "cpu.stat").write_text("nr_periods 0\n")  # not the format: nothing rather than a wrong figure
    assert cpu_by_part(ws) == {}


def test_private_memory_of_a_process() -> None:
    assert private_mib(os.getpid()) > 1  # this interpreter's own heap
    assert private_mib(2**22 + 12345) == 0  # above pid_max: no such process
