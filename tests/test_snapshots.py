"""snapshots.py on real directories: names, the store (build aside, rename, delete, recover), the restore
journal under a crash at every step, owner shifting for forks, and reflink detection (on a btrfs loop
file where this host can make one)."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sandbox_mcp import snapshots
from sandbox_mcp.errors import Conflict, InvalidSpec, InvalidState, LimitExceeded
from sandbox_mcp.models import SnapshotInfo
from sandbox_mcp.paths import WorkspacePaths
from sandbox_mcp.snapshots import SnapshotStore

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="chown and trusted xattrs need root")


@pytest.mark.parametrize("good", ["a", "0", "before-migration", "v1.2_x", "a" * 40])
def test_good_snapshot_names(good: str) -> None:
    assert snapshots.validate_snapshot_name(good) == good


@pytest.mark.parametrize("bad", ["", ".tmp-x", "../x", "a/b", "A", "-x", "a" * 41, "x y", "é"])
def test_bad_snapshot_names(bad: str) -> None:
    with pytest.raises(InvalidSpec, match="snapshot name"):
        snapshots.validate_snapshot_name(bad)


def test_copy_argv() -> None:
    assert snapshots.copy_tree_argv(Path("/s/a"), Path("/d/b")) == [
        "cp", "-a", "--reflink=auto", "--no-target-directory", "--", "/s/a", "/d/b"]  # fmt: skip


def _info(name: str, snap: str) -> SnapshotInfo:
    return SnapshotInfo(name=name, snapshot=snap, created_at=datetime.now(UTC), size_bytes=1, method="copy",
                        source_state="running")  # fmt: skip


def test_store_builds_aside_and_renames(tmp_path: Path) -> None:
    store = SnapshotStore(WorkspacePaths(tmp_path / "ws"), "ws")
    (tmp_path / "ws").mkdir()
    assert store.list() == []
    tmp = store.aside("s1")
    assert tmp.name.startswith(".tmp-s1-") and store.list() == []  # nothing visible while it is built
    (tmp / "workspace").mkdir()
    store.commit(tmp, _info("ws", "s1"))
    assert [i.snapshot for i in store.list()] == ["s1"] and not tmp.exists()
    assert (store.root.stat().st_mode & 0o777) == 0o700
    with pytest.raises(Conflict, match="already has a snapshot 's1'"):
        store.check_free("s1")
    tmp2 = store.aside("s1")
    with pytest.raises(Conflict):
        store.commit(tmp2, _info("ws", "s1"))
    assert not tmp2.exists()
    with pytest.raises(InvalidState, match=r"has no snapshot 'nope' \(it has: s1\); call list_snapshots"):
        store.get("nope")
    # A crash while taking one, or while deleting one, leaves a .tmp- directory: recover removes it.
    store.aside("s2")
    store.recover()
    assert [p.name for p in store.root.iterdir()] == ["s1"]
    store.delete("s1")
    assert list(store.root.iterdir()) == []
    with pytest.raises(InvalidState):
        store.delete("s1")


def _workspace(root: Path, tag: str) -> WorkspacePaths:
    paths = WorkspacePaths(root)
    for part in snapshots.PARTS:
        d = snapshots.part_path(paths, part)
        d.mkdir(parents=True, exist_ok=True)
        (d / "f").write_text(f"{tag}-{part}")
    return paths


def _stage(paths: WorkspacePaths, tag: str) -> None:
    for part in snapshots.PARTS:
        d = snapshots.staging(paths, part)
        d.mkdir()
        (d / "f").write_text(f"{tag}-{part}")


def _contents(paths: WorkspacePaths) -> set[str]:
    return {(snapshots.part_path(paths, p) / "f").read_text() for p in snapshots.PARTS}


def _leftovers(paths: WorkspacePaths) -> list[str]:
    return sorted(p.name for p in paths.root.iterdir() if p.name.endswith((".restoring", ".old", ".json")))


class _Crash(BaseException):
    pass


@contextlib.contextmanager
def _crash_after(n: int) -> Iterator[None]:
    """os.rename and the journal write fail (as a killed process stops) after ``n`` of them succeeded."""
    real_rename, real_write = os.rename, snapshots.atomic_write
    count = 0

    def step() -> None:
        nonlocal count
        if count >= n:
            raise _Crash
        count += 1

    def rename(a, b):  # type: ignore[no-untyped-def]
        step()
        real_rename(a, b)

    def write(*args, **kwargs):  # type: ignore[no-untyped-def]
        step()
        real_write(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(snapshots.os, "rename", rename)
        mp.setattr(snapshots, "atomic_write", write)
        yield


@pytest.mark.parametrize("crash_at", range(8))
def test_restore_swap_is_all_or_nothing_under_a_crash(tmp_path: Path, crash_at: int) -> None:
    """Journal write, then two renames per part: killed after any step, recovery gives all-old or all-new."""
    paths = _workspace(tmp_path / "ws", "old")
    _stage(paths, "new")
    with _crash_after(crash_at):
        try:
            snapshots.restore_swap(paths)
            finished = True
        except _Crash:
            finished = False
    journaled = (paths.root / "restore.json").exists() or finished
    assert snapshots.recover_restore(paths) == (journaled and not finished)
    want = "new" if journaled else "old"
    assert _contents(paths) == {f"{want}-{p}" for p in snapshots.PARTS}, crash_at
    assert _leftovers(paths) == []
    assert not snapshots.recover_restore(paths)  # nothing more to do


def test_restore_swap_keeps_parts_without_a_staged_copy(tmp_path: Path) -> None:
    paths = _workspace(tmp_path / "ws", "old")
    d = snapshots.staging(paths, "workspace")
    d.mkdir()
    (d / "f").write_text("new-workspace")
    snapshots.restore_swap(paths)
    assert (paths.root / "workspace.old").is_dir()  # the replaced part, until drop_old
    snapshots.drop_old(paths)
    assert _contents(paths) == {"new-workspace", "old-claude-config", "old-root"}
    assert _leftovers(paths) == []


def _v3_caps(rootid: int) -> bytes:
    # magic_etc (v3, effective), permitted/inheritable low and high words, rootid: CAP_NET_RAW (13).
    return struct.pack("<IIIIII", 0x03000000 | 1, 1 << 13, 0, 0, 0, rootid)


@root_only
def test_shift_owners_moves_one_range_and_keeps_modes_and_caps(tmp_path: Path) -> None:
    old, new = 3 * 65536, 7 * 65536
    top = tmp_path / "t"
    (top / "etc").mkdir(parents=True)
    files = {
        top: (old, old),
        top / "etc": (old, old),
        top / "etc" / "conf": (old + 0, old + 0),
        top / "user.txt": (old + 1000, old + 1000),
        top / "hosts-own": (1000, 1000),  # a share's agent file (disk uid 1000): not in the range, kept
        top / "rootfile": (0, 0),
        top / "suid": (old, old + 5),
    }
    for path, (uid, gid) in files.items():
        if not path.exists():
            path.write_text("x")
        os.chown(path, uid, gid)
    os.chmod(top / "suid", 0o4755)
    os.setxattr(top / "suid", "security.capability", _v3_caps(old))
    outside = tmp_path / "outside"
    outside.write_text("y")
    os.chown(outside, old, old)
    os.symlink(outside, top / "link")
    os.lchown(top / "link", old + 2, old + 2)
    os.symlink(top / "etc", top / "dirlink")
    os.lchown(top / "dirlink", old + 3, old + 3)

    changed = snapshots.shift_owners([top], old, new)
    assert changed == 7

    def owner(p: Path) -> tuple[int, int]:
        st = os.lstat(p)
        return st.st_uid, st.st_gid

    def shift(i: int) -> int:
        return i - old + new if old <= i < old + 65536 else i

    for path, (uid, gid) in files.items():
        assert owner(path) == (shift(uid), shift(gid)), path
    assert owner(top / "link") == (new + 2, new + 2) and owner(top / "dirlink") == (new + 3, new + 3)
    assert owner(outside) == (old, old), "a symlink was followed out of the tree"
    assert (top / "suid").stat().st_mode & 0o7777 == 0o4755  # chown cleared it; put back
    caps = os.getxattr(top / "suid", "security.capability")
    assert struct.unpack_from("<I", caps, 20)[0] == new
    assert snapshots.shift_owners([top], new, new) == 0


def test_tree_size_counts_allocated_bytes_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 100_000)
    os.link(tmp_path / "a", tmp_path / "hard")
    size = snapshots.tree_size(tmp_path)
    assert 100_000 <= size < 200_000


@root_only
def test_copy_method_on_ext4_or_tmpfs_is_a_copy_and_on_btrfs_a_reflink(tmp_path: Path) -> None:
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(tmp_path)], capture_output=True, text=True).stdout.strip()
    if fstype in ("ext2/ext3", "tmpfs"):
        assert snapshots.copy_method(tmp_path) == "copy"
    with _btrfs(tmp_path) as mnt:
        assert snapshots.copy_method(mnt) == "reflink"
        assert [p.name for p in mnt.iterdir()] == []  # the probe files are gone


@contextlib.contextmanager
def _btrfs(tmp_path: Path) -> Iterator[Path]:
    if not shutil.which("mkfs.btrfs") or os.environ.get("SANDBOX_MCP_TEST_ISOLATED") != "1":
        pytest.skip("needs mkfs.btrfs and the private mount namespace of ./scripts/test")
    image, mnt = tmp_path / "btrfs.img", tmp_path / "mnt"
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot loop-mount here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_freeze_scope_argv() -> None:
    """Where systemd is PID 1 the scope is frozen by systemd (not run here: no systemd as PID 1)."""
    from sandbox_mcp.runtimes.nspawn.scopes import freeze_scope_argv

    unit = "sandbox-mcp-ws-0123abcd.scope"
    assert freeze_scope_argv(unit, True) == ["systemctl", "freeze", "--", unit]
    assert freeze_scope_argv(unit, False) == ["systemctl", "thaw", "--", unit]
    with pytest.raises(InvalidSpec):
        freeze_scope_argv("other.scope", True)


def test_check_bound_counts_the_owners_snapshots_and_the_new_one() -> None:
    snapshots.check_bound("w", "s", owner_bytes=3 << 20, adding=1 << 20, limit_bytes=4 << 20)  # exactly fits
    with pytest.raises(LimitExceeded) as refused:
        snapshots.check_bound("w", "s", owner_bytes=3 << 20, adding=(1 << 20) + 1, limit_bytes=4 << 20)
    message = str(refused.value)
    assert "3.0 MiB" in message and "4.0 MiB" in message and "uid_max_snapshot_mib" in message
    assert "delete_snapshot" in message


def test_store_total_bytes_sums_the_recorded_sizes(tmp_path: Path) -> None:
    paths = WorkspacePaths.of(tmp_path, "w")
    paths.root.mkdir()
    store = SnapshotStore(paths, "w")
    assert store.total_bytes() == 0
    for name, size in (("a", 100), ("b", 23)):
        tmp = store.aside(name)
        store.commit(tmp, SnapshotInfo(name="w", snapshot=name, created_at=datetime.now(UTC), size_bytes=size,
                                       method="copy", source_state="stopped"))
    store.aside("c")  # half-taken: not counted
    assert store.total_bytes() == 123
