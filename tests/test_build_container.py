"""The image build container: apt runs user-namespaced and installs only exact package names."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sandbox_mcp.images import DebianRoot, ImageStore
from sandbox_mcp.images.debootstrap import EXACT_NAMES_SH, apt_install_argv
from sandbox_mcp.naming import BUILD_UID_BASE
from sandbox_mcp.runtimes.qemu.image import initramfs_argv

from .conftest import e2e_settings, e2e_skip_reason

pytestmark = pytest.mark.e2e


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    reason = e2e_skip_reason()
    if reason:
        pytest.skip(reason)
    settings = e2e_settings(tmp_path / "state")
    store = DebianRoot(settings, ImageStore(settings.image_dir))
    if not store.exists(store.key(())):
        pytest.skip("the root image is not cached; ./scripts/test builds it")
    return store.path(store.key(()))


def build_container(image: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Output (stdout and stderr together, as nspawn passes them on). The build container's flags (from apt_install_argv) with another script; the shared image stays
    untouched (--read-only) and nothing is downloaded (the test netns has no way out)."""
    argv = apt_install_argv(image, ["jq"])
    flags = argv[: argv.index("--")]
    return subprocess.run([*flags, "--read-only", "--tmpfs=/tmp", "--", "sh", "-c", script, "sh", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)


def test_package_names_are_exact_not_patterns(base_image: Path) -> None:
    ok = build_container(base_image, EXACT_NAMES_SH, "jq", "libgcc-s1")
    assert ok.returncode == 0, ok.stdout
    for pattern in ("e..", "pyth.n3", "jq+"):
        bad = build_container(base_image, EXACT_NAMES_SH, "jq", pattern)
        assert bad.returncode == 100 and f"no package is called exactly {pattern}" in bad.stdout


def test_build_container_root_has_no_host_privileges(base_image: Path) -> None:
    r = build_container(
        base_image,
        "cat /proc/self/uid_map; mknod /tmp/m c 1 1 2>&1; "
        "mount -o remount,rw /proc/sys 2>&1; p=$(cat /proc/sys/kernel/core_pattern); "
        "printf %s \"$p\" > /proc/sys/kernel/core_pattern && echo WROTE",
    )
    assert r.stdout.split()[:3] == ["0", str(BUILD_UID_BASE), "65536"]  # root inside is no host uid 0
    assert "Operation not permitted" in r.stdout  # mknod
    assert "WROTE" not in r.stdout and "Permission denied" in r.stdout  # /proc/sys: host root's


def test_initramfs_hooks_run_in_the_build_container(base_image: Path, tmp_path: Path) -> None:
    """The VM image's initrd is rebuilt with initramfs_argv: the image's hooks (any package may ship one)
    run there, not as host root in a chroot, where /proc/1/root is the host's root and /proc/sys the host's.
    A hook's escapes, tried with the same flags (the shared image read-only):"""
    argv = initramfs_argv(base_image, "6.1.0-99-amd64")
    assert "chroot" not in argv and "--private-network" in argv
    assert argv[-2:] == ["sh", "6.1.0-99-amd64"]  # the release is "$1", never spliced into the script
    flags = argv[: argv.index("--")]
    marker = tmp_path / "escaped"
    hook = (f"id -u; cat /proc/self/uid_map; touch /proc/1/root{marker} 2>&1; "
            "echo core > /proc/sys/kernel/core_pattern 2>&1; mknod /tmp/m b 7 0 2>&1; "
            "ip -o link 2>/dev/null | grep -vc ': lo:' || true")
    r = subprocess.run([*flags, "--read-only", "--tmpfs=/tmp", "--", "sh", "-c", hook],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    lines = r.stdout.split("\n")
    assert lines[0] == "0" and lines[1].split()[:3] == ["0", str(BUILD_UID_BASE), "65536"], r.stdout
    assert not marker.exists(), r.stdout  # the host's filesystem is not there
    assert "core_pattern: Read-only file system" in r.stdout or "Permission denied" in r.stdout, r.stdout
    assert "mknod: /tmp/m: Operation not permitted" in r.stdout, r.stdout
    # A release with shell in it reaches the script as one argument: nothing runs it.
    bad = initramfs_argv(base_image, "x; touch /tmp/pwned")
    assert bad[-1] == "x; touch /tmp/pwned" and "pwned" not in bad[-3]
