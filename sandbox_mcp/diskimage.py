"""A bound on the host disk one workspace can fill: its state directory is a file system of its own.

Everything a workspace keeps on the host lives under ``<state>/<name>/``: the workspace dir, the
Claude config, a VM's qcow2 layer, a restored root layer, snapshots. With ``host_disk_mib`` set,
that directory is the mount point of a sparse ext4 image (``<state>/.disks/<name>.ext4``, root's,
0600 in a 0700 directory) of that size, loop-mounted ``nosuid,nodev``: a write past it fails with
ENOSPC inside the image, and the host's file system loses at most the image's size, inodes included
(the image has its own). Deleted files give their space back (``discard`` punches holes in the
image), and ``nosuid`` makes any setuid bit the agent leaves there inert on the host.

Why an image and not the file system's own quotas (measured on this project's CI kernel):

* btrfs qgroups do not hold: any user who may write a directory may make a subvolume there
  (``BTRFS_IOC_SUBVOL_CREATE`` needs only write permission, also through an idmapped mount), and a
  new subvolume's qgroup belongs to no limit, so the agent writes past it without bound.
* ext4 and xfs project quotas hold (only the initial user namespace may change a project id) but
  need a kernel with ``CONFIG_QFMT_V2`` / ``CONFIG_XFS_QUOTA`` and the file system made and mounted
  for them; the image works on every file system that holds a sparse file.

The server must be root (it mounts); in NixOS mode the bound is not applied (the module's units
use these directories at boot, before any server could mount them) and ``limits.host_disk_mib``
is null. Blocking: the manager calls these from a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from .errors import BackendError
from .fsutil import own_dir

__all__ = ["DISKS_DIR", "ensure", "image_path", "release", "size_mib", "unavailable"]

DISKS_DIR = ".disks"  # not a workspace name: names start with a letter
_TIMEOUT_S = 120
MIN_HOST_DISK_MIB = 32  # ext4's journal and metadata need a few MiB of it


def image_path(state_dir: Path, name: str) -> Path:
    """Where workspace ``name``'s disk image is (whether or not it has one)."""
    return state_dir / DISKS_DIR / f"{name}.ext4"


def size_mib(state_dir: Path, name: str) -> int | None:
    """The size of ``name``'s image in MiB (its bound), or None when it has none."""
    try:
        return image_path(state_dir, name).stat().st_size >> 20
    except FileNotFoundError:
        return None


def unavailable() -> str | None:
    """Why this process cannot give workspaces a disk image (None: it can)."""
    if os.geteuid() != 0:
        return "the server is not root (it mounts each workspace's image)"
    for tool, package in (("mkfs.ext4", "e2fsprogs"), ("mount", "mount"), ("umount", "mount")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install {package})"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control (modprobe loop)"
    return None


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT_S, stdin=subprocess.DEVNULL,
                              check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BackendError(f"{argv[0]} failed: {exc}") from exc
    return done


def _mount(image: Path, root: Path) -> None:
    root.mkdir(mode=0o711, exist_ok=True)
    done = _run(["mount", "-t", "ext4", "-o", "loop,nosuid,nodev,noatime,discard", "--", str(image), str(root)])
    if done.returncode != 0:
        raise BackendError(f"mounting the workspace's disk image {image} on {root} failed: "
                           f"{(done.stderr or done.stdout).strip()[-400:]}")  # fmt: skip
    with contextlib.suppress(OSError):  # mkfs's; fsck makes it again if it needs one
        (root / "lost+found").rmdir()


def ensure(state_dir: Path, name: str, limit_mib: int | None) -> int | None:
    """Have ``<state>/<name>`` on the workspace's image, mounted; returns its size in MiB, or None.

    An existing image (kept data, or a host that rebooted) is mounted whatever ``limit_mib`` is
    (its files are there). Otherwise, with ``limit_mib``, a new image of that size is made and
    mounted, unless ``<state>/<name>`` already holds files (kept data from before images: they are
    not hidden under a mount, and that workspace stays unbounded). Idempotent.

    Raises:
        BackendError: mkfs or mount failed (nothing is left behind of a new image).
    """
    image, root = image_path(state_dir, name), state_dir / name
    if image.exists():
        if not os.path.ismount(root):
            _mount(image, root)
        return size_mib(state_dir, name)
    if limit_mib is None or (root.exists() and any(root.iterdir())):
        return None
    own_dir(image.parent, 0, 0, 0o700)
    fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, limit_mib << 20)  # sparse: blocks are taken as the workspace writes
    finally:
        os.close(fd)
    try:
        # -m 0: nothing reserved for root (root inside is no root of this file system anyway).
        done = _run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "root_owner=0:0,nodiscard", "--", str(image)])
        if done.returncode != 0:
            raise BackendError(f"mkfs.ext4 of the workspace's disk image failed: {done.stderr.strip()[-400:]}")
        _mount(image, root)
    except BaseException:
        image.unlink(missing_ok=True)
        raise
    return limit_mib


def release(state_dir: Path, name: str, *, delete: bool) -> None:
    """Unmount ``name``'s image (lazily when something still has it open: the owner's shell in it)
    and, with ``delete``, remove it (its blocks go back when the last user lets go). No image: nothing."""
    image, root = image_path(state_dir, name), state_dir / name
    if not image.exists():
        return
    if os.path.ismount(root):
        done = _run(["umount", "--", str(root)])
        if done.returncode != 0 and os.path.ismount(root):
            done = _run(["umount", "-l", "--", str(root)])
            if done.returncode != 0 and os.path.ismount(root):
                raise BackendError(f"unmounting {root} failed: {done.stderr.strip()[-400:]}")
    if delete:
        with contextlib.suppress(FileNotFoundError):
            image.unlink()
        with contextlib.suppress(OSError):
            root.rmdir()  # the bare mount point

