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
