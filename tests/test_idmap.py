"""Idmapped mounts: the maps exactly, and a real mount whose owners are shifted as documented."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from sandbox_mcp import idmap
from sandbox_mcp.errors import InvalidSpec

BASE = 0xA0000


def test_maps_are_exact() -> None:
    assert idmap.root_map(BASE) == [(0, BASE, 65536)]
    # Only the directory's owner (a daemon user, 1234:1235 on the host) maps, as the workspace user.
    assert idmap.share_map(BASE, (1234, 1235), (1000, 1000)) == ([(1234, BASE + 1000, 1)], [(1235, BASE + 1000, 1)])
    assert idmap.format_map(idmap.share_map(BASE, (1000, 100), (1000, 1000))[1]) == f"100 {BASE + 1000} 1\n"
    for bad in (0, 12345, 2**32):
        with pytest.raises(InvalidSpec):
            idmap.share_map(bad, (1000, 1000), (1000, 1000))
    for owner, inside in (((0, 1000), (1000, 1000)), ((1000, 0), (1000, 1000)), ((1000, 1000), (0, 1000)),
                          ((1000, 1000), (1000, 65536))):  # fmt: skip
        with pytest.raises(InvalidSpec):
            idmap.share_map(BASE, owner, inside)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_shared_dir_owners_shift_and_root_never_writes_as_host_root() -> None:
    # Not pytest's tmp_path: its parents are root-only, and the test writes as other uids.
    top = Path(tempfile.mkdtemp(prefix="sbx-idmap-"))
    top.chmod(0o755)
    try:
        _check_shared_dir(top)
    finally:
        shutil.rmtree(top)


def _check_shared_dir(top: Path) -> None:
    src, target = top / "src", top / "mnt"
    src.mkdir()
    target.mkdir()
    (src / "hostroot").write_text("x")
    (src / "agent").write_text("x")
    (src / "other").write_text("x")
    os.chown(src / "agent", 1234, 1235)
    os.chown(src / "other", 1000, 1000)  # another host user's file (someone else's uid 1000)
    os.chown(src, 1234, 1235)  # as the manager makes it: the workspace's owner (here 1234:1235)
    os.chmod(src, 0o777)
    uids, gids = idmap.share_map(BASE, (1234, 1235), (1000, 1000))
    idmap.idmapped_mount(src, target, uids, idmap.MOUNT_ATTR_NOSUID | idmap.MOUNT_ATTR_NODEV, gid_map=gids)
    try:
        st = (target / "agent").stat()
        assert (st.st_uid, st.st_gid) == (BASE + 1000, BASE + 1000)  # the container's uid 1000
        assert (target / "hostroot").stat().st_uid == 65534  # unmapped: nobody
        assert (target / "other").stat().st_uid == 65534
        mountinfo = Path("/proc/self/mountinfo").read_text()
        line = next(ln for ln in mountinfo.splitlines() if f" {target} " in ln)
        assert "nosuid" in line and "nodev" in line and "idmapped" in line

        def touch_as(uid: int, name: str) -> None:
            subprocess.run(
                ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "touch", str(target / name)],
                check=True,
            )

        with pytest.raises(subprocess.CalledProcessError):  # container root has no id on this mount
            touch_as(BASE, "by-container-root")
        touch_as(BASE + 1000, "by-agent")
        assert not (src / "by-container-root").exists()
        st = (src / "by-agent").stat()
        assert (st.st_uid, st.st_gid) == (1234, 1235)  # the host owner
        for uid, gid in ((BASE + 6, BASE + 6), (BASE + 1000, BASE + 6), (0, 0)):
            with pytest.raises(OSError):  # no other id can be given on the host
                os.chown(target / "by-agent", uid, gid)
        assert ((src / "by-agent").stat().st_uid, (src / "by-agent").stat().st_gid) == (1234, 1235)
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_mounts_with_the_same_maps_share_one_user_namespace() -> None:
    """UserNamespaces (a workspace's mounts): one namespace per distinct pair of maps, each mount still
    shifted by its own maps, and every namespace fd closed at the end."""
    top = Path(tempfile.mkdtemp(prefix="sbx-idmap-"))
    top.chmod(0o755)
    mounted: list[Path] = []
    try:
        src = top / "src"
        src.mkdir()
        (src / "f").write_text("x")
        os.chown(src / "f", 1234, 1235)
        share, root = idmap.share_map(BASE, (1234, 1235), (1000, 1000)), idmap.root_map(BASE)
        with idmap.UserNamespaces() as userns:
            first = userns.fd(*share)
            for i, (uids, gids) in enumerate((share, share, (root, root))):
                target = top / f"mnt{i}"
                target.mkdir()
                idmap.idmapped_mount(src, target, uids, gid_map=gids, namespaces=userns)
                mounted.append(target)
            assert userns.fd(*share) == first
            fds = [first, userns.fd(root)]
            assert fds[0] != fds[1] and os.readlink(f"/proc/self/fd/{fds[0]}") != os.readlink(f"/proc/self/fd/{fds[1]}")
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)  # closed
        owners = [((t / "f").stat().st_uid, (t / "f").stat().st_gid) for t in mounted]
        assert owners == [(BASE + 1000, BASE + 1000), (BASE + 1000, BASE + 1000), (1234 + BASE, 1235 + BASE)]
    finally:
        for target in mounted:
            subprocess.run(["umount", str(target)], check=False)
        shutil.rmtree(top)
