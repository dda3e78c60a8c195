"""What doctor and the nspawn runtime read about user namespaces and kernel limits, from a given /proc."""

from __future__ import annotations

from pathlib import Path

from sandbox_mcp import sysctls
from sandbox_mcp.host.caps import isolation_checks, kernel_limits, userns_blockers

CGROUP2 = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"


def fake_proc(tmp_path: Path, *, max_ns: str = "1000", mounts: str = CGROUP2, fs: str = "nodev\toverlay\n",
              inotify: str = "128", watches: str = "192536", pid_max: str = "4194304") -> Path:
    proc = tmp_path / "proc"
    for rel, text in {
        "sys/user/max_user_namespaces": max_ns, "self/mounts": mounts, "filesystems": fs,
        "sys/fs/inotify/max_user_instances": inotify, "sys/fs/inotify/max_user_watches": watches,
        "sys/kernel/pid_max": pid_max,
        "sys/kernel/osrelease": "6.1.0-13-amd64", "self/ns/user": "",
    }.items():  # fmt: skip
        (proc / rel).parent.mkdir(parents=True, exist_ok=True)
        (proc / rel).write_text(text)
    return proc


def test_a_capable_host_has_no_blockers(tmp_path: Path) -> None:
    assert userns_blockers(fake_proc(tmp_path)) == []


def test_each_blocker_says_how_to_fix_it(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, max_ns="0", mounts="", fs="nodev\ttmpfs\n")
    blockers = userns_blockers(proc, release="5.10.0")
    assert len(blockers) == 4
    assert any("sysctl -w user.max_user_namespaces" in b for b in blockers)
    assert any("mount -t cgroup2" in b for b in blockers)
    assert any("5.12+" in b for b in blockers)
    assert any("modprobe overlay" in b for b in blockers)


def test_kernel_limits_say_how_many_workspaces_fit(tmp_path: Path) -> None:
    limits = {lim.sysctl: lim for lim in kernel_limits(fake_proc(tmp_path, pid_max="32768", watches="8192"))}
    inotify = limits["fs.inotify.max_user_instances"]
    # 128 instances at the measured 6 per idle workspace and 7 per booting one.
    assert (sysctls.INOTIFY_INSTANCES_IDLE, sysctls.INOTIFY_INSTANCES_BOOTING) == (6, 7)
    assert "about 21 workspaces, 18 created at once" in inotify.detail
    assert inotify.fix is not None and "scripts/setup" in inotify.fix and str(sysctls.CONF_PATH) in inotify.fix
    assert "fs.inotify.max_user_instances=1048576" in inotify.fix
    watches = limits["fs.inotify.max_user_watches"]
    assert watches.fix is not None and "scripts/setup" in watches.fix
    assert limits["kernel.pid_max"].fix == "sysctl -w kernel.pid_max=4194304"
    roomy = {lim.sysctl: lim for lim in kernel_limits(fake_proc(tmp_path / "r", inotify="1024"))}
    assert all(roomy[k].fix is None for k in ("fs.inotify.max_user_instances", "fs.inotify.max_user_watches",
                                              "kernel.pid_max"))


def test_doctor_checks_say_whether_privileged_is_the_fallback(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, max_ns="0")
    enforced = {"memory": "v1", "pids": "v2", "cpu": None}
    strict = {c.name: c for c in isolation_checks(private_users=True, allow_privileged=False, enforced=enforced,
                                                  proc=proc)}
    assert not strict["unprivileged containers"].ok and strict["unprivileged containers"].required
    assert "SANDBOX_MCP_ALLOW_PRIVILEGED=true" in (strict["unprivileged containers"].fix or "")
    assert not strict["resource limits"].ok and "cpu" in (strict["resource limits"].fix or "")
    lax = {c.name: c for c in isolation_checks(private_users=True, allow_privileged=True, enforced=enforced,
                                               proc=proc)}
    assert not lax["unprivileged containers"].required
    good = {c.name: c for c in isolation_checks(private_users=True, allow_privileged=False,
                                                enforced={"memory": "v2", "pids": "v2", "cpu": "v2"},
                                                proc=fake_proc(tmp_path / "ok"))}
    assert good["unprivileged containers"].ok and good["resource limits"].ok


def test_open_files_ceiling_is_what_a_child_can_get() -> None:
    """Where this process may not raise its hard RLIMIT_NOFILE (no CAP_SYS_RESOURCE, as in some
    sandboxes), a container's runtime clamps the limit to ours: that is what is reported."""
    import resource

    from sandbox_mcp.host.caps import open_files_ceiling

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 40
    assert open_files_ceiling(min(hard, 1024)) == min(hard, 1024)
    assert open_files_ceiling(hard + 1, status="CapEff:\t000001fffeffffff\n") == hard  # bit 24 cleared
    assert open_files_ceiling(hard + 1, status="CapEff:\t000001ffffffffff\n") == hard + 1
    try:  # the real thing: can this process raise it?
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard + 1))
        raised = True
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    except (ValueError, OSError):
        raised = False
    assert open_files_ceiling(hard + 1) == (hard + 1 if raised else hard)
