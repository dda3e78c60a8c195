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
    assert idmap.share_map(BASE) == [(1, BASE + 1, 65535), (BASE, BASE, 1)]
    assert idmap.format_map(idmap.share_map(BASE)) == f"1 {BASE + 1} 65535\n{BASE} {BASE} 1\n"
    for bad in (0, 12345, 2**32):
        with pytest.raises(InvalidSpec):
            idmap.share_map(bad)


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
    os.chown(src / "agent", 1000, 1000)
    os.chown(src, 1000, 1000)  # as the manager makes it; a directory owned by an unmapped id is read-only
    os.chmod(src, 0o777)
    idmap.idmapped_mount(src, target, idmap.share_map(BASE), idmap.MOUNT_ATTR_NOSUID | idmap.MOUNT_ATTR_NODEV)
    try:
        assert (target / "agent").stat().st_uid == BASE + 1000  # the container's uid 1000
        assert (target / "hostroot").stat().st_uid == 65534  # unmapped: nobody
        mountinfo = Path("/proc/self/mountinfo").read_text()
        line = next(ln for ln in mountinfo.splitlines() if f" {target} " in ln)
        assert "nosuid" in line and "nodev" in line and "idmapped" in line

        def touch_as(uid: int, name: str) -> None:
            subprocess.run(
                ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "touch", str(target / name)],
                check=True,
            )

        touch_as(BASE, "by-container-root")
        touch_as(BASE + 1000, "by-agent")
        assert (src / "by-container-root").stat().st_uid == BASE  # never host root
        assert (src / "by-agent").stat().st_uid == 1000  # the host user
    finally:
        subprocess.run(["umount", str(target)], check=True)
