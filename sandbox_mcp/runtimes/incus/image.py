"""The Incus image recipe: the Debian root packed as a unified image tarball.

The artefact (in the :class:`~.store.ImageStore`, under a key derived from the root's key and
this recipe's version) is ``image.tar.zst``: ``metadata.yaml`` plus the root as ``rootfs/``, plus
a small boot unit that gives the instance its static address (Incus knows nothing of our
addressing: the address is pushed as ``/etc/sandbox-mcp/network.env`` before each start). The
store's metadata remembers the tarball's SHA-256, which is the fingerprint Incus gives the
image, so the runtime asks the server for that fingerprint and uploads only when it lacks it.
A changed root (recipe version, packages) gives a new key, a new tarball and a new fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import anyio

from ... import claude_workspace, hostcmd
from ...config import Settings
from ...images.debootstrap import DebianRoot
from ...images.store import ImageStore
from ...progress import Progress, no_progress

__all__ = ["INCUS_IMAGE_VERSION", "IncusImage", "SETUP_SCRIPT_PATH", "incus_image_key", "metadata_yaml",
           "pack_argv", "setup_script", "setup_unit"]

# Bump when what is packed changes (the unit, the script, metadata), so images are re-packed.
INCUS_IMAGE_VERSION = 1

TARBALL = "image.tar.zst"
SETUP_SCRIPT_PATH = "/usr/local/lib/sandbox-mcp/instance-setup"
SETUP_UNIT = "sandbox-mcp-instance.service"
NETWORK_ENV_PATH = "/etc/sandbox-mcp/network.env"


def incus_image_key(root_key: str) -> str:
    """The store key of the Incus image packed from root ``root_key``."""
    digest = hashlib.sha256(f"{INCUS_IMAGE_VERSION}\0{root_key}".encode()).hexdigest()[:12]
    return f"incus-{digest}"


def metadata_yaml(root_key: str, suite: str, created: int) -> str:
    """The image's ``metadata.yaml`` (JSON is YAML, and needs no YAML library)."""
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine(), platform.machine()
    )
    return json.dumps({
        "architecture": arch,
        "creation_date": created,
        "properties": {"os": "debian", "release": suite, "description": f"sandbox-mcp {root_key}"},
    }, indent=1) + "\n"  # fmt: skip


def setup_script(user: str) -> str:
    """Runs in the instance before sshd: the static address, and a fresh volume's ownership.

    ``network.env`` holds three values the runtime wrote from validated addresses.
    """
    ws = claude_workspace.workspace_dir_inside(user)
    return f"""#!/bin/sh
# Written by sandbox-mcp (Incus image): the address sandbox-mcp allocated, pushed before start.
set -eu
. {NETWORK_ENV_PATH}
ip link set dev "$IFACE" up
ip address replace "$ADDRESS" dev "$IFACE"
ip route replace default via "$GATEWAY" dev "$IFACE"
# A workspace on a fresh custom volume (remote servers) starts owned by root.
if [ "$(stat -c %u {ws})" = 0 ]; then chown {user}:{user} {ws}; fi
"""


def setup_unit() -> str:
    """The unit running :func:`setup_script` early, before the network and sshd come up."""
    return f"""[Unit]
Description=sandbox-mcp instance set-up (static address)
DefaultDependencies=no
After=local-fs.target
Before=network.target ssh.service
Wants=network.target
ConditionPathExists={NETWORK_ENV_PATH}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={SETUP_SCRIPT_PATH}

[Install]
WantedBy=multi-user.target
"""


def pack_argv(out: Path, store_root: Path, root_key: str, extra_dir: Path, extras: Sequence[str]) -> list[str]:
    """The tar command that packs root ``root_key`` as ``rootfs/`` with ``metadata.yaml`` and ``extras``.

    ``extra_dir`` holds ``metadata.yaml`` and the ``extras`` (paths under ``rootfs/``); the root
    is renamed on the fly (``--transform``), so it is never copied. zstd is fast to pack on a
    small machine and Incus unpacks it natively.
    """
    return [
        "tar", "--create", f"--file={out}", "--numeric-owner", "--xattrs", "--xattrs-include=*",
        "--use-compress-program=zstd -T0 -3", "--checkpoint=5000", "--checkpoint-action=echo=packed %u",
        f"--directory={extra_dir}", "metadata.yaml", *extras,
        f"--directory={store_root}", f"--transform=s,^{root_key},rootfs,S", root_key,
    ]  # fmt: skip


class IncusImage:
    """The Incus image recipe over an image store: pack the Debian root once per root key."""

    RECIPE = "incus-image"

    def __init__(self, settings: Settings, store: ImageStore) -> None:
        self.settings = settings
        self.store = store
        self.root = DebianRoot(settings, store)

    def key(self, packages: Sequence[str]) -> str:
        """The store key of the image of the root with ``packages``."""
        return incus_image_key(self.root.key(packages))

    def tarball(self, key: str) -> Path:
        """The unified tarball of image ``key``."""
        return self.store.path(key) / TARBALL

    def fingerprint(self, key: str) -> str | None:
        """The Incus fingerprint of image ``key`` (its tarball's SHA-256), once built."""
        meta = self.store.meta(key) or {}
        fp = meta.get("fingerprint")
        return fp if isinstance(fp, str) and self.store.exists(key) else None

    @classmethod
    def is_current(cls, meta: dict[str, object]) -> bool:
        """False for images of an older recipe version (``prune`` removes those)."""
        return meta.get("recipe") != cls.RECIPE or meta.get("version") == INCUS_IMAGE_VERSION

    async def ensure(self, packages: Sequence[str], progress: Progress = no_progress) -> str:
        """The key of the packed image of the root with ``packages``, building root and tarball if needed.

        Raises:
            CommandFailed: debootstrap, apt-get or tar failed (with their output tail).
            BackendError: a host tool is missing.
        """
        root_key = await self.root.ensure(packages, progress)
        key = incus_image_key(root_key)
        if self.store.exists(key):
            return key
        # The store writes the metadata after the build; the build fills in the fingerprint.
        meta: dict[str, object] = {"recipe": self.RECIPE, "version": INCUS_IMAGE_VERSION, "root": root_key,
                                   "packages": sorted(packages)}
        await self.store.ensure(key, lambda tmp: self._pack(root_key, tmp, meta, progress), meta)
        return key

    async def _pack(self, root_key: str, tmp: Path, meta: dict[str, object], progress: Progress) -> None:
        await progress("packing the root as an Incus image (once per image; about 10 s)", 0.0)
        extras = await anyio.to_thread.run_sync(self._write_extras, tmp / "extra", root_key)
        last = [0.0]

        async def on_line(line: str) -> None:
            # tar's checkpoint: 5000 records of 10 KiB read so far.
            if line.startswith("tar: packed ") and time.monotonic() - last[0] > 1:
                last[0] = time.monotonic()
                done = int(line.rsplit(" ", 1)[-1]) * 10240
                await progress(f"packing the image ({done >> 20} MiB read)", None)

        out = tmp / TARBALL
        await hostcmd.run(pack_argv(out, self.store.root, root_key, tmp / "extra", extras),
                          timeout_s=1800, on_line=on_line)
        await anyio.to_thread.run_sync(shutil.rmtree, tmp / "extra")
        meta["fingerprint"] = await anyio.to_thread.run_sync(_sha256, out)
        meta["size"] = out.stat().st_size
        await progress("Incus image packed", 1.0)

    def _write_extras(self, extra: Path, root_key: str) -> list[str]:
        """metadata.yaml and the set-up unit, laid out as they go into the tarball; their tar paths."""
        user = self.settings.user
        files = {
            "rootfs" + SETUP_SCRIPT_PATH: (setup_script(user), 0o755),
            f"rootfs/etc/systemd/system/{SETUP_UNIT}": (setup_unit(), 0o644),
        }
        (extra / "rootfs/etc/sandbox-mcp").mkdir(parents=True)
        (extra / "metadata.yaml").write_text(metadata_yaml(root_key, self.root.suite, int(time.time())))
        for rel, (text, mode) in files.items():
            path = extra / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(mode)
        wants = extra / "rootfs/etc/systemd/system/multi-user.target.wants" / SETUP_UNIT
        wants.parent.mkdir(parents=True, exist_ok=True)
        wants.symlink_to(f"/etc/systemd/system/{SETUP_UNIT}")
        return [*files, "rootfs/etc/sandbox-mcp", str(wants.relative_to(extra))]

    def prune(self, keep: Sequence[str] = ()) -> list[str]:
        """Remove packed images of older recipe versions or whose root is gone; return what was removed.

        Prune the roots first (:meth:`DebianRoot.prune`), so images of pruned roots go too.
        """

        def current(meta: dict[str, object]) -> bool:
            root = meta.get("root")
            return self.is_current(meta) and (
                meta.get("recipe") != self.RECIPE or isinstance(root, str) and self.store.exists(root)
            )

        return self.store.prune(current, frozenset(keep))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
