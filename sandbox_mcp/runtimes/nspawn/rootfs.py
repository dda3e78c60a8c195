"""The mounts a user-namespaced container boots from, made on the host before nspawn starts.

Under ``<state>/<name>/runtime/mnt``::

    lower/      the shared image, idmapped (root_map), read-only: never written, never chowned
    rw/         tmpfs of ``root_layer_mib`` (the bound on the writable root layer): upper/ and work/
    root/       overlay of lower + rw/upper: the container's /; nspawn gets --directory=root
    workspace/  <state>/<name>/workspace, idmapped (share_map: only its owner, as the workspace user), nosuid,nodev
    claude/     <state>/<name>/claude-config, likewise
    keys/       <state>/<name>/ssh-host-keys, idmapped (root_map), read-only

The tmpfs pages are charged to the memory cgroup of whoever writes them (the container), so
the writable layer also counts against the workspace's ``memory_mib``. nspawn binds these
into the container; mounts copied into the container's less privileged mount namespace are
locked, so a read-only one cannot be remounted read-write from inside.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ... import idmap
from ...errors import BackendError, InvalidSpec
from ...snapshots import copy_tree_argv

__all__ = ["RootMounts", "mount_all", "mounted_under", "overlay_options", "unmount_all"]

_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_MS_NOSUID = 0x2
_MS_NODEV = 0x4


@dataclass(frozen=True)
class RootMounts:
    """Where the pieces are mounted for one workspace (see the module docstring)."""

    top: Path

    @property
    def lower(self) -> Path:
        return self.top / "lower"

    @property
    def rw(self) -> Path:
        return self.top / "rw"

    @property
    def root(self) -> Path:
        return self.top / "root"

    @property
    def workspace(self) -> Path:
        return self.top / "workspace"

    @property
    def claude(self) -> Path:
        return self.top / "claude"

    @property
    def keys(self) -> Path:
        return self.top / "keys"

    def order(self) -> list[Path]:
        """Mount order; unmount in reverse."""
        return [self.lower, self.rw, self.root, self.workspace, self.claude, self.keys]


def overlay_options(m: RootMounts) -> str:
    """The overlay mount's data string.

    Raises:
        InvalidSpec: a path holds ',' or ':' (overlay's separators).
    """
    for p in (m.lower, m.rw):
        if "," in str(p) or ":" in str(p):
            raise InvalidSpec(f"state path {p} contains ',' or ':'; set SANDBOX_MCP_STATE_DIR to a plain path")
    return f"lowerdir={m.lower},upperdir={m.rw}/upper,workdir={m.rw}/work"


def _mount(source: str, target: Path, fstype: str, flags: int, data: str) -> None:
    if _libc.mount(source.encode(), bytes(target), fstype.encode(), flags, data.encode()) != 0:
        code = ctypes.get_errno()
        raise BackendError(f"mounting {fstype} on {target} failed: {os.strerror(code)}; run 'sandbox-mcp doctor'")


def mount_all(
    m: RootMounts,
    *,
    image: Path,
    workspace: Path,
    claude_config: Path,
    host_keys: Path,
    uid_base: int,
    root_layer_mib: int,
    seed: Path | None = None,
    user_ids: tuple[int, int],
) -> None:
    """Make every mount of :class:`RootMounts` (after removing leftovers); undo them all on failure.

    ``seed``: a root layer saved earlier (a restored snapshot, a fork's copy; owners already in
    ``uid_base``'s range) copied into the fresh upper dir before the overlay is mounted, so the
    container boots with what was installed then. Without it the root starts clean.
    ``user_ids`` are the workspace user's uid and gid in the image: the shared directories' owner
    on the host appears as them, and no other id is mapped there (see :func:`idmap.share_map`).

    Raises:
        InvalidSpec: a path holds a separator, or ``uid_base`` is not a 65536-aligned base.
        BackendError: the kernel refused a mount (no idmapped mounts, no overlayfs).
    """
    unmount_all(m)
    opts = overlay_options(m)
    root_mode = image.stat().st_mode & 0o7777
    try:
        for d in m.order():
            d.mkdir(parents=True, exist_ok=True)
        # Two id maps (the image's and host keys', the shared directories'): a user namespace each, not a mount each.
        with idmap.UserNamespaces() as userns:
            root_map = idmap.root_map(uid_base)
            idmap.idmapped_mount(image, m.lower, root_map, idmap.MOUNT_ATTR_RDONLY, namespaces=userns)
            _mount("tmpfs", m.rw, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={root_layer_mib}m,mode=0755")
            for sub in ("upper", "work"):
                (m.rw / sub).mkdir()
                os.chown(m.rw / sub, uid_base, uid_base)  # the container's root owns its /
            if seed is not None:
                _seed_upper(seed, m.rw / "upper", root_layer_mib)
                os.chown(m.rw / "upper", uid_base, uid_base)
            os.chmod(m.rw / "upper", root_mode)
            _mount("overlay", m.root, "overlay", 0, opts)
            nosuid = idmap.MOUNT_ATTR_NOSUID | idmap.MOUNT_ATTR_NODEV
            for source, target in ((workspace, m.workspace), (claude_config, m.claude)):
                uids, gids = idmap.share_map(uid_base, _owner_of(source), user_ids)
                idmap.idmapped_mount(source, target, uids, nosuid, gid_map=gids, namespaces=userns)
            idmap.idmapped_mount(host_keys, m.keys, root_map, nosuid | idmap.MOUNT_ATTR_RDONLY, namespaces=userns)
    except BaseException:
        unmount_all(m)
        raise


def _seed_upper(seed: Path, upper: Path, root_layer_mib: int) -> None:
    done = subprocess.run(copy_tree_argv(seed, upper), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackendError(
            f"copying the saved root layer into the workspace's {root_layer_mib} MiB root layer failed: "
            f"{done.stderr.strip()[-500:]}; if it does not fit, raise SANDBOX_MCP_ROOT_LAYER_MIB"
        )


def _owner_of(directory: Path) -> tuple[int, int]:
    """The uid and gid owning ``directory`` (never through a symlink).

    Raises:
        BackendError: it is not a directory.
    """
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise BackendError(f"{directory} is not a directory; stop the workspace, move it away and start again")
    return st.st_uid, st.st_gid


def mounted_under(top: Path, mountinfo: str | None = None) -> list[Path]:
    """Mount points at or below ``top`` (from /proc/self/mountinfo), deepest last."""
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    prefix = str(top).rstrip("/") + "/"
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = fields[4].replace("\\040", " ")
            if point == str(top) or point.startswith(prefix):
                out.append(Path(point))
    return out


def unmount_all(m: RootMounts) -> None:
    """Detach every mount under ``m.top`` (leftovers of a crash too); nothing if none.

    Raises:
        BackendError: a mount could not be detached.
    """
    for point in reversed(mounted_under(m.top)):
        if _libc.umount2(bytes(point), _MNT_DETACH) != 0:
            code = ctypes.get_errno()
            if code not in (errno.EINVAL, errno.ENOENT):
                raise BackendError(f"unmounting {point} failed: {os.strerror(code)}")
