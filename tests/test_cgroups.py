"""Per-workspace cgroups: the pure layout/limit builders exactly, and the real tree as root."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from sandbox_mcp.errors import InvalidSpec
from sandbox_mcp.host.cgroups import (
    CgroupHost,
    CgroupLayout,
    Limits,
    group_for,
    join_argv,
    limit_writes,
    parse_mounts,
    parse_proc_cgroup,
)

HYBRID_MOUNTS = """\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
"""
HYBRID_SELF = "9:name=systemd:/\n8:pids:/\n4:memory:/job/42\n1:cpu:/\n0::/\n"
LIMITS = Limits(cpus=1.5, memory_mib=256, tasks=300)


def test_parse_hybrid_host() -> None:
    unified, v1 = parse_mounts(HYBRID_MOUNTS)
    assert unified == Path("/sys/fs/cgroup/unified")
    assert v1 == {"cpu": Path("/sys/fs/cgroup/cpu"), "memory": Path("/sys/fs/cgroup/memory"),
                  "pids": Path("/sys/fs/cgroup/pids"), "name=systemd": Path("/sys/fs/cgroup/systemd")}
    layout = CgroupLayout(unified=unified, v1={c: (m, "/job") for c, m in v1.items()})
    assert layout.mirror_dir("web", "sandbox-mcp-x") == Path("/sys/fs/cgroup/systemd/job/sandbox-mcp-x/web")
    assert "name=systemd" not in layout.workspace_dirs("web")  # nspawn makes it; we only remove it
    assert parse_proc_cgroup(HYBRID_SELF) == {"name=systemd": "/", "pids": "/", "memory": "/job/42", "cpu": "/", "": "/"}


def test_hybrid_limits_go_to_v1_under_our_own_cgroup() -> None:
    layout = CgroupLayout(
        unified=Path("/u"), v1={"memory": (Path("/m"), "/job/42"), "pids": (Path("/p"), "/"), "cpu": (Path("/c"), "/")}
    )
    assert layout.workspace_dirs("web", "sandbox-mcp-x") == {
        "unified": Path("/u/sandbox-mcp-x/web"),
        "memory": Path("/m/job/42/sandbox-mcp-x/web"),
        "pids": Path("/p/sandbox-mcp-x/web"),
        "cpu": Path("/c/sandbox-mcp-x/web"),
    }
    assert limit_writes(LIMITS, layout) == [
        ("memory", "memory.limit_in_bytes", str(256 << 20)),
        ("memory", "memory.memsw.limit_in_bytes", str(256 << 20)),
        ("pids", "pids.max", "300"),
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "150000"),
    ]
    assert ("memory", "memory.memsw.limit_in_bytes", str(256 << 20)) not in limit_writes(LIMITS, layout, memsw=False)


def test_pure_v2_limits() -> None:
    layout = CgroupLayout(unified=Path("/sys/fs/cgroup"), v2_controllers=frozenset({"memory", "pids", "cpu"}))
    assert layout.workspace_dirs("web") == {"unified": Path("/sys/fs/cgroup/sandbox-mcp/web")}
    assert limit_writes(LIMITS, layout) == [
        ("unified", "memory.max", str(256 << 20)),
        ("unified", "memory.swap.max", "0"),
        ("unified", "pids.max", "300"),
        ("unified", "cpu.max", "150000 100000"),
    ]


def test_names_are_validated_and_groups_differ_per_state_dir() -> None:
    with pytest.raises(InvalidSpec):
        CgroupLayout(unified=Path("/u")).workspace_dirs("../etc")
    with pytest.raises(InvalidSpec):
        CgroupHost(group="../x", mounts=HYBRID_MOUNTS, own=HYBRID_SELF)
    assert group_for(Path("/a")) != group_for(Path("/b"))
    assert group_for(Path("/a")).startswith("sandbox-mcp-")


def test_join_argv_is_exact() -> None:
    argv = join_argv([Path("/u/g/w/cgroup.procs")], ["systemd-nspawn", "--boot"])
    assert argv[:2] == ["sh", "-c"]
    assert argv[3:] == ["sh", "/u/g/w/cgroup.procs", "--", "systemd-nspawn", "--boot"]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="making cgroups needs root")


@needs_root
def test_real_cgroup_limits_a_process_and_is_removed(tmp_path: Path) -> None:
    host = CgroupHost(group=group_for(tmp_path))
    if host.layout.unified is None:
        pytest.skip("no cgroup2 hierarchy mounted here")
    base = 0x7FFE0000  # the last workspace range: no running workspace has it
    procs = host.prepare("cgtest", base, LIMITS)
    dirs = host.layout.workspace_dirs("cgtest", host.group)
    proc = None
    try:
        assert dirs["unified"].stat().st_uid == base
        assert (dirs["unified"] / "cgroup.procs").stat().st_uid == base
        assert base in host.live_uid_bases()
        for hierarchy, fname, value in limit_writes(LIMITS, host.layout):
            assert (dirs[hierarchy] / fname).read_text().split() == value.split(), fname
        mirror = host.layout.mirror_dir("cgtest", host.group)
        if mirror is not None:  # what nspawn leaves there on hybrid hosts
            (mirror / "payload").mkdir(parents=True)
        proc = subprocess.Popen(join_argv(procs, ["sleep", "600"]))
        # The shell execs sleep once it has joined every cgroup: wait for the exec, not a time.
        while Path(f"/proc/{proc.pid}/comm").read_text().strip() != "sleep":
            assert proc.poll() is None, "joining the cgroups failed"
            os.sched_yield()
        for d in dirs.values():
            assert str(proc.pid) in (d / "cgroup.procs").read_text().split()
        assert host.usage("cgtest").get("tasks", 1) >= 1
    finally:
        host.remove("cgtest")  # kills what is left inside
        if proc is not None:
            proc.wait()
    assert not any(d.exists() for d in dirs.values())
    assert mirror is None or not mirror.parent.exists()
    assert not dirs["unified"].parent.exists()
    assert proc.returncode == -9
