"""The host-made root of a user-namespaced container: parsing exactly, and the real mounts as root."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from sandbox_mcp.errors import InvalidSpec
from sandbox_mcp.images import DebianRoot, ImageStore
from sandbox_mcp.runtimes.nspawn.rootfs import (
    RootMounts,
    mount_all,
    mounted_under,
    overlay_options,
    unmount_all,
)

from .conftest import e2e_settings

BASE = 0x7FFD0000

MOUNTINFO = """\
22 1 8:1 / / rw - ext4 /dev/vda rw
90 22 8:1 /img /st/w/runtime/mnt/lower ro,idmapped - ext4 /dev/vda rw
91 22 0:50 / /st/w/runtime/mnt/rw rw - tmpfs tmpfs rw
92 22 0:51 / /st/w/runtime/mnt/root rw - overlay overlay rw
93 22 8:1 / /st/w/runtime/mntx rw - ext4 /dev/vda rw
"""


def test_mounted_under_lists_only_that_tree_in_mount_order() -> None:
    assert mounted_under(Path("/st/w/runtime/mnt"), MOUNTINFO) == [
        Path("/st/w/runtime/mnt/lower"), Path("/st/w/runtime/mnt/rw"), Path("/st/w/runtime/mnt/root"),
    ]


def test_overlay_options_refuse_separators() -> None:
    m = RootMounts(Path("/st/w/runtime/mnt"))
    assert overlay_options(m) == (
        "lowerdir=/st/w/runtime/mnt/lower,upperdir=/st/w/runtime/mnt/rw/upper,workdir=/st/w/runtime/mnt/rw/work"
    )
    with pytest.raises(InvalidSpec, match="SANDBOX_MCP_STATE_DIR"):
        overlay_options(RootMounts(Path("/odd,dir/mnt")))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_real_root_is_shifted_writable_bounded_and_leaves_the_image_alone(tmp_path: Path) -> None:
    settings = e2e_settings(tmp_path / "state")
    images = DebianRoot(settings, ImageStore(settings.image_dir))
    image = images.path(images.key(()))
    if not images.exists(images.key(())):
        pytest.skip("the root image is not cached; ./scripts/test builds it")
    top = Path(tempfile.mkdtemp(prefix="sbx-rootfs-"))
    m = RootMounts(top / "mnt")
    try:
        for d in ("ws", "claude", "keys"):
            (top / d).mkdir()
        os.chown(top / "ws", 1000, 1000)
        mount_all(m, image=image, workspace=top / "ws", claude_config=top / "claude", host_keys=top / "keys",
                  uid_base=BASE, root_layer_mib=64)
        assert (m.root / "etc").stat().st_uid == BASE and m.root.stat().st_uid == BASE
        assert (m.workspace).stat().st_uid == BASE + 1000
        (m.root / "etc" / "planted").write_text("x")
        assert (m.rw / "upper" / "etc" / "planted").exists()
        assert not (image / "etc" / "planted").exists()
        with pytest.raises(OSError):  # the bound on the writable layer
            (m.root / "big").write_bytes(b"\0" * (65 << 20))
        with pytest.raises(OSError):
            (m.keys / "x").write_text("x")
        assert len(mounted_under(m.top)) == 6
    finally:
        unmount_all(m)
        assert mounted_under(m.top) == []
        shutil.rmtree(top)
