"""The VM disk recipe: a kernel, an initrd and a read-only root disk, derived from the Debian root.

What a qemu workspace boots (``<image_dir>/<key>/``):

* ``vmlinux``: Debian's generic kernel (``linux-image-amd64``; the cloud flavour has no 9p),
  decompressed here once so the guest does not spend seconds of emulated CPU unpacking it on
  every boot (qemu loads the ELF through its PVH entry);
* ``initrd.cpio``: initramfs-tools with only the modules the root mount needs and no udev
  (the guest's devices are fixed: virtio block, net and 9p), uncompressed for the same reason;
* ``root.raw``: an ext4 filesystem made from the tree with ``mkfs.ext4 -d`` (no loop mount, no
  privileges beyond writing a file), sparse, ``disk_gib`` ([runtimes.qemu]) large: that size bounds the
  writable layer each boot gets (a fresh qcow2 overlay over this file, which is never written).

The guest is the container image with a VM's differences: the shares mounted from ``/etc/fstab``
(9p; see :mod:`sandbox_mcp.runtimes.qemu` for why not virtiofs), a static address from the kernel
command line set by a oneshot unit before sshd, ``/etc/hosts`` from a read-only share, and the
units a container skips anyway or that only slow an emulated boot (udev, networkd, logind)
masked. Ctrl-Alt-Del powers off, which is how the host asks for an orderly shutdown over QMP.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import lzma
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio

from ... import claude_workspace, hostcmd
from ...config import Settings
from ...errors import BackendError
from ...images.debootstrap import DebianRoot, apt_install_argv
from ...images.store import ImageStore
from ...progress import Progress, no_progress
from .settings import QemuSettings

__all__ = [
    "GUEST_META_DIR",
    "KERNEL_PACKAGE",
    "SHARES",
    "VM_MASKED_UNITS",
    "VM_RECIPE_VERSION",
    "VmArtefacts",
    "VmImage",
    "extract_vmlinux",
    "fstab",
    "initramfs_argv",
    "mkfs_argv",
    "vm_image_key",
]

# Bump when the recipe below changes, so cached VM disks are rebuilt.
VM_RECIPE_VERSION = 3

KERNEL_PACKAGE = "linux-image-amd64"

# Where the guest mounts the read-only share the host writes per boot files into (its /etc/hosts).
GUEST_META_DIR = "/run/sandbox-mcp"

# 9p mount tags; the runtime exports a host directory under each (see runtimes/qemu/__init__.py).
SHARES = ("workspace", "claude-config", "ssh-host-keys", "guest-meta")

# Modules the initrd loads before the root is mounted, and the 9p/net ones so they are there
# when systemd mounts the shares (no udev in the guest to load them on demand).
INITRD_MODULES = ("virtio_pci", "virtio_blk", "ext4", "virtio_net", "9pnet_virtio", "9p")

# initramfs-tools hooks and scripts a VM with fixed virtio devices does without (udev alone
# costs seconds of emulated boot).
_INITRAMFS_DROP = (
    "hooks/udev", "hooks/dmsetup", "hooks/resume", "hooks/thermal", "hooks/keymap",
    "scripts/init-top/udev", "scripts/init-top/keymap", "scripts/init-bottom/udev",
)  # fmt: skip

# Kernel module trees no VM of ours loads: dropped to keep the disk small.
_MODULE_TREES_DROPPED = (
    "sound", "drivers/gpu", "drivers/media", "drivers/net/wireless", "drivers/infiniband",
    "drivers/staging", "drivers/bluetooth", "drivers/iio", "drivers/usb", "drivers/hid",
    "drivers/input/touchscreen", "drivers/isdn", "drivers/mmc", "drivers/nfc", "net/wireless",
    "net/mac80211", "net/bluetooth",
)  # fmt: skip

VM_MASKED_UNITS = (
    # devices are fixed and their modules are in the initrd: no udev
    "systemd-udevd.service", "systemd-udevd-control.socket", "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service", "systemd-udev-settle.service", "systemd-hwdb-update.service",
    # the address comes from the kernel command line (sandbox-mcp-net.service)
    "systemd-networkd.service", "systemd-networkd.socket", "systemd-network-generator.service",
    # sshd runs without PAM; nobody logs in on a console
    "systemd-logind.service", "getty.target", "serial-getty@.service",
    # the root is a throw-away layer, mounted rw by the kernel: nothing to remount, seed or record
    "systemd-remount-fs.service", "systemd-random-seed.service", "systemd-machine-id-commit.service",
    "systemd-firstboot.service", "systemd-sysusers.service", "systemd-update-utmp.service",
    "systemd-update-utmp-runlevel.service", "systemd-journal-flush.service", "systemd-update-done.service",
    "ldconfig.service", "systemd-repart.service", "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service", "systemd-pstore.service", "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount", "systemd-modules-load.service", "kmod-static-nodes.service",
    "modprobe@.service", "sys-kernel-debug.mount", "sys-kernel-tracing.mount", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount",
    "systemd-ask-password-wall.path", "systemd-ask-password-console.path",
)  # fmt: skip

# systemd generators a VM does not need: each is a process started on every boot, before any unit
# (seconds under emulation). The fstab generator stays: it turns the 9p shares into mount units.
VM_DISABLED_GENERATORS = (
    "systemd-cryptsetup-generator", "systemd-debug-generator", "systemd-getty-generator",
    "systemd-gpt-auto-generator", "systemd-hibernate-resume-generator", "systemd-integritysetup-generator",
    "systemd-rc-local-generator", "systemd-run-generator", "systemd-system-update-generator",
    "systemd-sysv-generator", "systemd-veritysetup-generator",
)  # fmt: skip

# sshd's configuration is fixed in the image: no config test (one more sshd run) on every boot.
SSH_DROP_IN = """\
[Service]
ExecStartPre=
"""

NET_SCRIPT = """\
#!/bin/sh
# Written by sandbox-mcp: the VM's static address from the kernel command line
# (sandbox_mcp.net=IP/PREFIX,GATEWAY), set before sshd starts. No DHCP, no networkd.
set -eu
spec=
for arg in $(cat /proc/cmdline); do
    case "$arg" in sandbox_mcp.net=*) spec=${arg#sandbox_mcp.net=} ;; esac
done
[ -n "$spec" ] || { echo "sandbox-mcp-net: no sandbox_mcp.net= on the kernel command line" >&2; exit 1; }
ip link set lo up
ip link set eth0 up
ip addr add "${spec%,*}" dev eth0
ip route add default via "${spec#*,}" dev eth0
"""

NET_UNIT = """\
[Unit]
Description=Static network from the kernel command line (sandbox-mcp)
DefaultDependencies=no
Before=network.target network-online.target ssh.service
Wants=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/libexec/sandbox-mcp/vm-net

[Install]
WantedBy=sysinit.target
"""


def vm_image_key(root_key: str, disk_gib: int) -> str:
    """The store key of the VM disk derived from Debian root ``root_key``."""
    spec = {"recipe": VM_RECIPE_VERSION, "root": root_key, "disk_gib": disk_gib, "kernel": KERNEL_PACKAGE}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    return f"vm-{digest}"


def initramfs_argv(tree: Path, release: str) -> list[str]:
    """Rebuild the guest's module index and initrd for kernel ``release`` inside the build container:
    apt's flags (:func:`~sandbox_mcp.images.debootstrap.apt_install_argv`: a throwaway nspawn in the
    ``BUILD_UID_BASE`` user namespace on an idmapped mount of the tree, never host root in a chroot),
    without a network (nothing is fetched). The release is ``$1``, never part of the script."""
    flags = apt_install_argv(tree, [])
    flags = flags[: flags.index("--")]
    return [*flags, "--private-network", "--", "sh", "-c", 'depmod -a "$1" && update-initramfs -u -k "$1"', "sh",
            release]


def fstab(user: str) -> str:
    """The guest's /etc/fstab: the host shares over 9p (the root is mounted by the kernel)."""
    opts = "trans=virtio,version=9p2000.L,msize=262144"
    return (
        "# Written by sandbox-mcp: host directories shared over virtio-9p.\n"
        f"workspace {claude_workspace.workspace_dir_inside(user)} 9p {opts} 0 0\n"
        f"claude-config {claude_workspace.claude_config_dir_inside(user)} 9p {opts} 0 0\n"
        f"ssh-host-keys /etc/ssh-host-keys 9p {opts},ro 0 0\n"
        f"guest-meta {GUEST_META_DIR} 9p {opts},ro 0 0\n"
    )


def mkfs_argv(source: Path, image: Path) -> list[str]:
    """``mkfs.ext4`` filling ``image`` (an existing sparse file) from the tree ``source``, without a mount.

    Inode tables and journal are written now (``lazy_*_init=0``), so the guest never spends
    emulated CPU time on background initialisation.
    """
    return [
        "mkfs.ext4", "-q", "-F", "-L", "sbx-root", "-i", "65536",
        "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", str(source), str(image),
    ]  # fmt: skip


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside an xz-compressed bzImage, or None if it is not one.

    Raises:
        BackendError: the xz stream is corrupt.
    """
    start = bzimage.find(b"\xfd7zXZ\x00")
    if start < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError as exc:
        raise BackendError(f"the kernel image's xz payload is corrupt ({exc}); run 'sandbox-mcp image prune'") from exc
    return elf if elf.startswith(b"\x7fELF") else None


@dataclass(frozen=True)
class VmArtefacts:
    """The files of one built VM image."""

    kernel: Path
    initrd: Path
    disk: Path

    @classmethod
    def at(cls, directory: Path) -> VmArtefacts:
        return cls(directory / "vmlinux", directory / "initrd.cpio", directory / "root.raw")


class VmImage:
    """The VM disk recipe over an image store, derived from the :class:`DebianRoot` with the same packages."""

    RECIPE = "vm-disk"

    def __init__(
        self,
        settings: Settings,
        store: ImageStore,
        root: DebianRoot | None = None,
        config: QemuSettings | None = None,
    ) -> None:
        """``config``: the qemu runtime's section; default ``[runtimes.qemu]`` of ``settings``.

        Raises:
            InvalidSpec: that section does not validate.
        """
        self.settings = settings
        self.store = store
        self.root = root or DebianRoot(settings, store)
        self.disk_gib = (config or QemuSettings.of(settings)).disk_gib

    def key(self, packages: Sequence[str]) -> str:
        """The store key of the VM image for ``packages``."""
        return vm_image_key(self.root.key(packages), self.disk_gib)

    def exists(self, key: str) -> bool:
        return self.store.exists(key)

    def artefacts(self, key: str) -> VmArtefacts:
        return VmArtefacts.at(self.store.path(key))

    @classmethod
    def is_current(cls, meta: dict[str, object]) -> bool:
        """False for VM images of an older recipe version (``prune`` removes those)."""
        return meta.get("recipe") != cls.RECIPE or meta.get("version") == VM_RECIPE_VERSION

    async def ensure(self, packages: Sequence[str], progress: Progress = no_progress) -> str:
        """Return the key of a VM image with ``packages``, building it (and its Debian root) if needed.

        Raises:
            CommandFailed: apt-get, update-initramfs or mkfs.ext4 failed (with their output tail).
            BackendError: a tool is missing, or the kernel package holds no usable kernel.
        """
        key = self.key(packages)
        if self.store.exists(key):
            return key
        root_key = await self.root.ensure(packages, progress)
        meta = {"recipe": self.RECIPE, "version": VM_RECIPE_VERSION, "root": root_key,
                "disk_gib": self.disk_gib, "packages": sorted(packages)}
        await self.store.ensure(key, lambda tmp: self._build(root_key, tmp, progress), meta)
        return key

    async def _build(self, root_key: str, tmp: Path, progress: Progress) -> None:
        tree = tmp / "tree"
        await progress("building the VM image: copying the root (once per package set)", 0.0)
        await hostcmd.run(["cp", "-a", "--reflink=auto", str(self.root.path(root_key)), str(tree)], timeout_s=600)
        await anyio.to_thread.run_sync(_prepare_initramfs, tree)
        await progress(f"building the VM image: installing {KERNEL_PACKAGE}", 0.2)
        await hostcmd.run(apt_install_argv(tree, [KERNEL_PACKAGE]), timeout_s=1800)
        await progress("building the VM image: configuring the guest", 0.6)
        release = await anyio.to_thread.run_sync(self._customise, tree)
        # In the user-namespaced build container, as apt ran the kernel's own hooks: initramfs-tools runs
        # the image's hook scripts, which must never run as host root (a plain chroot would).
        await hostcmd.run(initramfs_argv(tree, release), timeout_s=900)
        await anyio.to_thread.run_sync(_export_boot_files, tree, release, tmp)
        await progress("building the VM image: writing the root disk (mkfs.ext4 -d)", 0.8)
        disk = VmArtefacts.at(tmp).disk
        await anyio.to_thread.run_sync(_sparse_file, disk, self.disk_gib << 30)
        await hostcmd.run(mkfs_argv(tree, disk), timeout_s=1800)
        disk.chmod(0o444)  # never written: every boot writes to its own overlay
        await anyio.to_thread.run_sync(shutil.rmtree, tree)
        await progress("VM image ready", 1.0)

    def _customise(self, tree: Path) -> str:
        """Turn the container root in ``tree`` into a VM guest; return the kernel release installed."""
        releases = sorted(p.name for p in (tree / "lib/modules").iterdir()) if (tree / "lib/modules").is_dir() else []
        if not releases:
            raise BackendError(f"{KERNEL_PACKAGE} installed no kernel modules; run 'sandbox-mcp image prune' and retry")
        release = releases[-1]
        (tree / "etc/fstab").write_text(fstab(self.settings.user))
        libexec = tree / "usr/local/libexec/sandbox-mcp"
        libexec.mkdir(parents=True, exist_ok=True)
        (libexec / "vm-net").write_text(NET_SCRIPT)
        (libexec / "vm-net").chmod(0o755)
        system = tree / "etc/systemd/system"
        (system / "sandbox-mcp-net.service").write_text(NET_UNIT)
        (system / "ssh.service.d").mkdir(exist_ok=True)
        (system / "ssh.service.d/sandbox-mcp-vm.conf").write_text(SSH_DROP_IN)
        wants = system / "sysinit.target.wants"
        wants.mkdir(exist_ok=True)
        _symlink(wants / "sandbox-mcp-net.service", "/etc/systemd/system/sandbox-mcp-net.service")
        for unit in VM_MASKED_UNITS:
            _symlink(system / unit, "/dev/null")
        generators = tree / "etc/systemd/system-generators"
        generators.mkdir(parents=True, exist_ok=True)
        for generator in VM_DISABLED_GENERATORS:
            _symlink(generators / generator, "/dev/null")
        # dbus stays socket-activated for whoever needs it, but is not started at boot.
        (tree / "lib/systemd/system/multi-user.target.wants/dbus.service").unlink(missing_ok=True)
        # QMP's send-key ctrl-alt-delete is the host's "shut down now, cleanly".
        _symlink(system / "ctrl-alt-del.target", "/lib/systemd/system/poweroff.target")
        _symlink(tree / "etc/hosts", f"{GUEST_META_DIR}/hosts")
        for rel in _INITRAMFS_DROP:  # installed with the kernel; the initrd is rebuilt without them
            with contextlib.suppress(FileNotFoundError):
                (tree / "usr/share/initramfs-tools" / rel).unlink()
        for sub in _MODULE_TREES_DROPPED:
            shutil.rmtree(tree / "lib/modules" / release / "kernel" / sub, ignore_errors=True)
        return release

    def prune(self, keep: Sequence[str] = ()) -> list[str]:
        """Remove VM images of older recipe versions; return what was removed."""
        return self.store.prune(self.is_current, frozenset(keep))


def _sparse_file(path: Path, size: int) -> None:
    """A file of ``size`` bytes that takes no space until written (mkfs writes only what it needs)."""
    with open(path, "wb") as f:
        f.truncate(size)


def _symlink(link: Path, target: str) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(target)


def _prepare_initramfs(tree: Path) -> None:
    """initramfs-tools settings written before the kernel is installed (its postinst builds the initrd)."""
    conf = tree / "etc/initramfs-tools"
    (conf / "conf.d").mkdir(parents=True, exist_ok=True)
    (conf / "conf.d/sandbox-mcp.conf").write_text("MODULES=list\nCOMPRESS=gzip\nRESUME=none\n")
    (conf / "modules").write_text("".join(m + "\n" for m in INITRD_MODULES))


def _export_boot_files(tree: Path, release: str, out: Path) -> None:
    """Write ``vmlinux`` and ``initrd.cpio`` (both uncompressed) from the tree's /boot into ``out``."""
    art = VmArtefacts.at(out)
    bzimage = (tree / f"boot/vmlinuz-{release}").read_bytes()
    elf = extract_vmlinux(bzimage)
    art.kernel.write_bytes(elf if elf is not None else bzimage)  # qemu boots a bzImage too, only slower
    initrd = (tree / f"boot/initrd.img-{release}").read_bytes()
    art.initrd.write_bytes(gzip.decompress(initrd) if initrd[:2] == b"\x1f\x8b" else initrd)
    os.chmod(art.kernel, 0o444)
    os.chmod(art.initrd, 0o444)
