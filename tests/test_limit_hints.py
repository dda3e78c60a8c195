"""limit_hints: which limit an exec result ran into, and the OOM counters read from cgroup files.

The real OOM kills and full disks are made in tests/test_real_work.py, in every workspace type."""

from __future__ import annotations

from pathlib import Path

from sandbox_mcp import limit_hints
from sandbox_mcp.host.cgroups import oom_kills_in
from sandbox_mcp.models import ExecResult, Limits

LIMITS = Limits(cpus=1, memory_mib=1024, tasks=64, disk_mib=512)


def _result(**kw: object) -> ExecResult:
    return ExecResult(**{"exit_code": 0, "stdout": "", "stderr": "", "duration_ms": 1.0, **kw})  # type: ignore[arg-type]


def test_which_results_may_be_oom_kills() -> None:
    assert limit_hints.maybe_oom_killed(_result(exit_code=None))  # killed by a signal
    assert limit_hints.maybe_oom_killed(_result(exit_code=137))  # a shell reporting its child's SIGKILL
    assert not limit_hints.maybe_oom_killed(_result(exit_code=None, timed_out=True))  # our timeout killed it
    assert not limit_hints.maybe_oom_killed(_result(exit_code=1))


def test_hints_name_the_limit() -> None:
    assert "memory_mib=1024" in limit_hints.oom_hint(1, LIMITS)
    hint = limit_hints.disk_hint("head: error writing 'x': No space left on device\n", LIMITS)
    assert hint is not None and "disk_mib=512" in hint
    assert limit_hints.disk_hint("cp: Disk quota exceeded", None) is not None
    assert limit_hints.disk_hint("permission denied", LIMITS) is None
    bounded = limit_hints.disk_hint("No space left on device", LIMITS.model_copy(update={"host_disk_mib": 64}))
    assert bounded is not None and "host_disk_mib=64 MiB" in bounded and "(the host's disk)" not in bounded


def test_the_timeout_hint_says_what_to_do_instead() -> None:
    hint = limit_hints.timeout_hint(1.5)
    assert hint.startswith("timed out after 1.5 s (timeout_s)")
    assert "larger timeout_s" in hint and "start_process" in hint and "wait_process" in hint
    assert "after 120 s" in limit_hints.timeout_hint(120.0)


def test_the_vm_probe_is_parsed_strictly() -> None:
    assert limit_hints.parse_oom_probe("oom_kill 3\n") == 3
    assert limit_hints.parse_oom_probe("") is None
    assert limit_hints.parse_oom_probe("oom_kill 3\nrest") is None


def test_oom_counters_v2_and_v1(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n")
    assert oom_kills_in(v2, v2=True) == 2  # hierarchical already: the top's file only
    v1 = tmp_path / "v1"
    (v1 / "system.slice" / "x.service").mkdir(parents=True)
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    (v1 / "system.slice" / "x.service" / "memory.oom_control").write_text("oom_kill_disable 0\noom_kill 2\n")
    assert oom_kills_in(v1, v2=False) == 3  # v1 counts in the victim's own cgroup: the subtree is summed
    assert oom_kills_in(tmp_path / "absent", v2=False) is None
    assert oom_kills_in(tmp_path / "absent", v2=True) is None
