"""`sandbox-mcp doctor`: each missing prerequisite is reported with its fix, and nothing is changed."""

from __future__ import annotations

from pathlib import Path

from sandbox_mcp.config import Settings
from sandbox_mcp.doctor import run_checks


def fake_proc(tmp_path: Path, filesystems: str, mountinfo: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self" / "ns").mkdir(parents=True)
    (proc / "self" / "ns" / "net").touch()
    (proc / "filesystems").write_text(filesystems)
    (proc / "self" / "mountinfo").write_text(mountinfo)
    return proc


def test_missing_kernel_features_are_reported_with_a_fix(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "deep" / "state", image_dir=tmp_path / "img")
    proc = fake_proc(tmp_path, "nodev\tproc\n", "25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    checks = {c.name: c for c in run_checks(settings, proc=proc)}
    assert not checks["overlayfs"].ok and "modprobe overlay" in (checks["overlayfs"].fix or "")
    assert not checks["cgroup v2"].ok and "cgroup2" in (checks["cgroup v2"].fix or "")
    assert checks["state dir"].ok  # writable: its nearest existing parent is
    assert not checks["root image"].ok and not checks["root image"].required
    assert not (tmp_path / "deep").exists()  # doctor only reads


def test_a_healthy_host(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", image_dir=tmp_path / "img")
    proc = fake_proc(tmp_path, "nodev\toverlay\n", "30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n")
    checks = {c.name: c for c in run_checks(settings, proc=proc)}
    assert checks["overlayfs"].ok and checks["cgroup v2"].ok and checks["network namespaces"].ok


def test_daemon_checks(tmp_path: Path) -> None:
    import grp
    import os
    import pwd
    import socket

    from sandbox_mcp.doctor import daemon_checks

    sock_path = tmp_path / "run" / "daemon.sock"
    group = grp.getgrgid(os.getegid()).gr_name  # a group this process is in
    settings = Settings(state_dir=tmp_path / "state", daemon_socket=sock_path, daemon_group=group)
    checks = {c.name: c for c in daemon_checks(settings)}
    assert not checks["daemon"].ok and "not running" in checks["daemon"].detail
    sock_path.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(sock_path))
        listener.listen(1)
        assert {c.name: c for c in daemon_checks(settings)}["daemon"].ok
    finally:
        listener.close()
    assert "stale" in {c.name: c for c in daemon_checks(settings)}["daemon"].detail  # the file stayed
    me = os.geteuid()
    if me != 0:
        assert {c.name: c for c in daemon_checks(settings)}["daemon group"].ok
    nobody = pwd.getpwnam("nobody")
    other = {c.name: c for c in daemon_checks(settings.model_copy(update={"daemon_group": "root"}), uid=nobody.pw_uid)}
    assert not other["daemon group"].ok and "usermod -aG root nobody" in (other["daemon group"].fix or "")
    missing = {c.name: c for c in daemon_checks(settings.model_copy(update={"daemon_group": "no-such-grp"}), uid=4321)}
    assert not missing["daemon group"].ok and "groupadd" in (missing["daemon group"].fix or "")


def test_host_services_down_or_not_needed(tmp_path: Path) -> None:
    from sandbox_mcp.doctor import host_services_check
    from sandbox_mcp.hostnet.resolver_service import ResolverService
    from sandbox_mcp.secrets.files import ClientFile
    from sandbox_mcp.secrets.service import SecretsService

    settings = Settings(state_dir=tmp_path / "state", image_dir=tmp_path / "img")
    check = host_services_check(settings)
    assert check.ok and check.detail.count("not needed") == 2, check
    # A workspace with a domain list and one with secrets, as the server records them, and neither process.
    ResolverService(settings)._write({"10.0.0.2": {"port": "sb-a", "set": "a", "domains": ["pypi.org"]}})
    paths = SecretsService(settings).paths
    paths.make()
    paths.write_client("10.0.0.3", ClientFile(workspace="b", secrets=[]))
    check = host_services_check(settings)
    assert not check.ok and not check.required, check
    assert "egress resolver DOWN: 1 workspace(s) with a domain list" in check.detail
    assert "secrets proxy DOWN: 1 workspace(s) with secrets" in check.detail
    assert check.fix is not None and "starts egress resolver and secrets proxy again within 5 s" in check.fix
    assert not (settings.state_dir / ".server" / f"resolver-{settings.bridge}.pid.json").exists()  # only reads
