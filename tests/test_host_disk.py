"""A workspace's host disk bound (HOST_DISK_MIB), tried for real: the agent fills it every way it can.

Its state dir is a loop-mounted ext4 image of that size (sandbox_mcp/diskimage.py). One container
is made and reused for every check (each boot costs seconds); the checks run in the order a user's
day would: fill it, free it, try around it, take a snapshot on a full disk, keep it, destroy it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from mcp import Client

from sandbox_mcp import diskimage
from sandbox_mcp.config import Settings
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.server import build_server

from .conftest import destroy_all
from .test_e2e import Session

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

LIMIT_MIB = 64


def taken_mib(image: Path) -> float:
    """What the image takes of the host's disk (its allocated blocks), MiB."""
    return image.stat().st_blocks * 512 / (1 << 20)


@pytest.fixture
async def session(settings: Settings):  # type: ignore[no-untyped-def]
    bounded = settings.model_copy(update={"host_disk_mib": LIMIT_MIB})
    try:
        async with Client(build_server(bounded)) as client:
            yield Session(client), bounded
    finally:
        async with WorkspaceManager(bounded) as m:
            await destroy_all(m)
        for image in (bounded.state_dir / diskimage.DISKS_DIR).glob("*.ext4"):  # a failed test's kept image
            diskimage.release(bounded.state_dir, image.stem, delete=True)
    assert f" {bounded.state_dir}/" not in Path("/proc/self/mountinfo").read_text()


async def test_a_workspace_cannot_fill_the_host_past_its_bound(session: tuple[Session, Settings]) -> None:
    s, settings = session
    ws = await s.call("create_workspace", name="dsk")
    assert ws["limits"]["host_disk_mib"] == LIMIT_MIB, ws["limits"]
    root, image = settings.state_dir / "dsk", diskimage.image_path(settings.state_dir, "dsk")
    assert os.path.ismount(root)
    st = image.stat()
    assert (st.st_uid, st.st_mode & 0o777, image.parent.stat().st_mode & 0o777) == (0, 0o600, 0o700)
    flags = os.statvfs(root).f_flag
    assert flags & os.ST_NOSUID and flags & os.ST_NODEV
    # Its own inode table: empty files use up the image's inodes, never the host's.
    assert os.statvfs(root).f_files < os.statvfs(settings.state_dir).f_files

    # Straight writes, preallocation and the Claude config (the same image) all stop at the bound.
    r = await s.call("exec", name="dsk", command="dd if=/dev/zero of=big bs=1M count=200 conv=fsync; "
                                                  "fallocate -l 1G pre; echo x > small; "
                                                  "dd if=/dev/zero of=$HOME/claude-config/big bs=1M count=50 conv=fsync")
    assert r["exit_code"] != 0 and "No space left on device" in r["stderr"], r
    assert "fallocate: fallocate failed: No space left on device" in r["stderr"], r
    assert taken_mib(image) <= LIMIT_MIB, taken_mib(image)
    assert f"host_disk_mib={LIMIT_MIB} MiB" in r["hint"], r  # the hint names the bound it ran into

    # Deleting gives the space back to the host (discard punches holes in the image).
    full = taken_mib(image)
    r = await s.call("exec", name="dsk", command="rm -f big pre $HOME/claude-config/big && sync && "
                                                  "dd if=/dev/zero of=again bs=1M count=20 conv=fsync")
    assert r["exit_code"] == 0, r
    assert taken_mib(image) < full - 10, (taken_mib(image), full)

    # Root inside tries around it: a loop device of its own, a bigger remount, a hard link to a file
    # outside, the image itself: each refused, and nothing grows past the bound. (A tmpfs it mounts
    # in its own namespace is memory, counted in memory_mib.)
    r = await s.call("exec", name="dsk", command=(
        "sudo -n losetup -f 2>/dev/null; echo rc=$?; sudo -n mount -o remount,size=1G $PWD 2>/dev/null; echo rc=$?; "
        f"echo x > /tmp/own; ln /tmp/own ./hl 2>&1 | grep -c 'Invalid cross-device link'; ls {image} 2>/dev/null; echo rc=$?"))
    assert r["stdout"].split() == ["rc=1", "rc=32", "1", "rc=2"], r
    assert not (root / "workspace" / "hl").exists()
    assert diskimage.size_mib(settings.state_dir, "dsk") == LIMIT_MIB

    # A setuid program the agent leaves runs without its bit on the host (nosuid), for anyone.
    r = await s.call("exec", name="dsk", command="cp /usr/bin/id ./ownid && sudo -n chmod 4755 ownid && ls -l ownid")
    assert r["stdout"].startswith("-rwsr-xr-x"), r
    fd = os.open(root / "workspace" / "ownid", os.O_RDONLY)
    try:  # by descriptor: another user could not reach it through the 0700 dir anyway
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"/proc/self/fd/{fd}",
                               "-u"], pass_fds=(fd,), capture_output=True, text=True, timeout=30, check=False)
    finally:
        os.close(fd)
    assert done.stdout.strip() == "65534", (done.stdout, done.stderr)

    # A snapshot of a nearly full workspace would not fit: refused cleanly, the workspace goes on.
    r = await s.call("exec", name="dsk", command="dd if=/dev/zero of=big bs=1M count=40 conv=fsync; echo")
    error = await s.error("snapshot_workspace", name="dsk", snapshot="s1")
    assert "space" in error.lower() or "quota" in error.lower(), error
    assert taken_mib(image) <= LIMIT_MIB
    listed = await s.call("list_snapshots", name="dsk")
    assert listed["snapshots"] == [], listed
    r = await s.call("exec", name="dsk", command="rm big && echo ok > after && cat after")
    assert r["stdout"].strip() == "ok", r

    # Kept data keeps its image (unmounted); the next create of the name mounts it again.
    await s.call("destroy_workspace", name="dsk", keep_data=True)
    assert image.exists() and not os.path.ismount(root)
    ws = await s.call("create_workspace", name="dsk")
    assert os.path.ismount(root) and ws["limits"]["host_disk_mib"] == LIMIT_MIB
    r = await s.call("exec", name="dsk", command="cat after")
    assert r["stdout"].strip() == "ok", r
    await s.call("destroy_workspace", name="dsk")
    assert not image.exists() and not root.exists()


def test_unbounded_without_the_setting(tmp_path: Path) -> None:
    """No setting, no image: ensure makes nothing, and doctor says why the host disk is unbounded."""
    from sandbox_mcp.doctor import host_disk_check

    assert diskimage.ensure(tmp_path, "ws", None) is None and not (tmp_path / diskimage.DISKS_DIR).exists()
    off = host_disk_check(Settings(state_dir=tmp_path), None)
    assert not off.ok and not off.required and "HOST_DISK_MIB is not set" in off.detail
    cannot = host_disk_check(Settings(state_dir=tmp_path, host_disk_mib=64), "the server is not root (it mounts)")
    assert not cannot.ok and "but the server is not root" in cannot.detail
    assert host_disk_check(Settings(state_dir=tmp_path, host_disk_mib=64), None).ok
