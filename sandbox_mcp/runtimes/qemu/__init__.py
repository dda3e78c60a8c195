"""Direct-mode VM runtime: the server runs and supervises a qemu guest per workspace (``type="vm"``).

Per workspace, from the VM image derived from the Debian root (:mod:`.image`):

* the read-only root disk under a fresh qcow2 overlay per boot (``runtime/root.qcow2``, removed
  on stop), so a restart gives a clean root, like a container's ``--volatile=overlay``;
* the kernel and initrd passed directly (``-kernel/-initrd/-append``), no firmware boot menu;
* the workspace dir and Claude config (read-write) and the host keys (read-only) shared over
  virtio-9p with ``security_model=none``. 9p rather than virtiofs because qemu serves it itself
  (no daemon per share to supervise and clean up) and Debian bookworm ships no virtiofsd outside
  backports; the price is throughput, which a workspace dir rarely needs;
* a TAP ``vm-NAME`` on the workspace bridge; the guest sets its static address from the kernel
  command line (``sandbox_mcp.net=``), its name from ``systemd.hostname=``;
* the serial console in ``runtime/console.log`` (``workspace_logs``), its first
  ``console_log_mib`` MiB (:func:`sandbox_mcp.supervise.spawn_bounded_sink`), qemu's own messages in
  ``runtime/qemu.log``, and a QMP socket ``runtime/qmp.sock`` through which stop asks the
  guest to power off (Ctrl-Alt-Del, which the image maps to poweroff; the image runs no logind
  to act on an ACPI power button) before qemu is terminated.

**qemu runs unprivileged.** Each VM's qemu runs as a host uid (and gid) of its own,
``VM_UID_BASE + k`` (:func:`sandbox_mcp.naming.allocate_vm_uid`, allocated on create): a uid
that owns no file and no other process, so a qemu escape reaches nothing but this VM's open
files; not the workspace directory's owner (often a real user), not root. It has no
capabilities, ``no_new_privs`` and qemu's seccomp ``-sandbox``. It opens no host path of ours:
the server (root) opens everything and qemu inherits the fds (:mod:`.launch` enters its
user namespace, drops to its ids and execs qemu in place, keeping the supervised PID):

* kernel, initrd and base disk read-only (``/proc/self/fd/N``), the overlay and the console log
  through ``-add-fd`` fd sets, the QMP socket listening already (``-chardev socket,fd=``), the
  TAP attached already (``-netdev tap,fd=``: ``/dev/net/tun`` is 0600 on hosts without udev);
* each share as an idmapped copy of its directory's mount attached nowhere
  (:func:`sandbox_mcp.idmap.detached_idmapped_tree`, ``nosuid,nodev``), gone with qemu: the
  workspace dir and Claude config map their owner (the host user) to qemu's uid, the host keys
  and guest files (root's, 0600 keys) map root to it, read-only.

qemu's user namespace maps its uid to the workspace user's uid (as the image has it), so the
guest sees the agent's files as the agent's. With ``security_model=none`` (passthrough needs
root to chown) everything the guest writes lands on the host as the workspace dir's owner with
its real mode, also what root in the guest creates; a ``chown`` to another user fails (EINVAL:
no other id is mapped). Root in the guest therefore leaves no root-owned file, a setuid bit
makes at most a program setuid to the host user (as a container's agent can), ``mknod`` fails
(qemu lacks ``CAP_MKNOD``) and so does ``mkfifo`` there (qemu 7.2's 9p). ``mapped-xattr`` was
tried too (git, a .deb built and installed with apt, a build, all in the workspace dir): it
allows chown/mknod/mkfifo inside by keeping owners and modes in xattrs only, so on the host
every file it wrote was 0600 (dirs 0700), scripts built inside were not executable there and a
repo committed inside showed mode changes to git on the host.

qemu runs in its own session and outlives the server; the registry keeps its PID and start
time (:mod:`sandbox_mcp.supervise`). It holds a shared lock on its image (``ImageStore.hold``),
so ``image prune`` leaves the image alone while it runs. KVM is used where a probe says it works
and qemu's uid may open ``/dev/kvm`` (its group is passed on), TCG otherwise (:mod:`.accel`).
No vsock device is attached, so a VM asks for no CID (``network``: an address and a MAC):
readiness is the pinned SSH handshake, and hosts without ``vhost_vsock`` (like the project's)
could not offer one. (The NixOS module's microVMs have one: the nixos runtime asks for it.)
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import stat
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from pydantic import Field

from ... import claude_workspace, hostcmd, idmap, supervise
from ...checks import which_check
from ...egress import check_nat
from ...errors import BackendError, InvalidSpec, InvalidState
from ...fsutil import atomic_write
from ...identity import host_identity
from ...models import VM_MIN_MEMORY_MIB, Check, Limits, RuntimeDetail, WorkspaceRecord
from ...naming import UID_RANGE, VM_UID_BASE, allocate_vm_uid, tap_name
from ...paths import WorkspacePaths
from ...supervise import ProcessRef
from ..base import (
    ON_THE_SUBNET,
    GuestExec,
    ImageRootRuntime,
    ImageRootState,
    NetworkNeeds,
    Progress,
    RuntimeContext,
    hosts_file,
    log_tail_lines,
)
from . import memory, qmp
from .accel import (
    AccelChoice,
    Accelerator,
    cached_choice,
    choose_accelerator,
    configured,
    kvm_groups,
    kvm_sign,
)
from .image import GUEST_META_DIR, VmArtefacts, VmImage
from .settings import QemuSettings

__all__ = [
    "LAUNCHER",
    "SECURITY_MODEL",
    "QemuFds",
    "QemuRuntime",
    "QemuState",
    "kernel_cmdline",
    "launch_argv",
    "overlay_argv",
    "qboot",
    "qemu_argv",
    "vm_name",
]

LAUNCHER = Path(__file__).with_name("launch.py")
# How the 9p server maps guest file attributes (see the module docstring for why "none").
SECURITY_MODEL = "none"
# qemu's seccomp filter: no setuid/setgid, no fork/exec, no scheduler or resource changes.
_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_SHARE_ATTRS = idmap.MOUNT_ATTR_NOSUID | idmap.MOUNT_ATTR_NODEV

QBOOT_PATH = Path("/usr/share/qemu/qboot.rom")
_QEMU_MISSING = "install it (Debian/Ubuntu: apt-get install qemu-system-x86 qemu-utils) and run 'sandbox-mcp doctor'"


def vm_name(name: str) -> str:
    """qemu's ``-name``: also the marker that tells our qemu from a process that reused its PID."""
    return f"sbx-{name}"


class _Files:
    """What a VM keeps in its workspace's runtime dir (regenerated on every start)."""

    def __init__(self, paths: WorkspacePaths) -> None:
        self.overlay = paths.runtime / "root.qcow2"
        self.qmp = paths.runtime / "qmp.sock"
        self.console = paths.console_log
        self.qemu_log = paths.runtime / "qemu.log"
        self.guest_meta = paths.runtime / "guest"
        # A memory snapshot's ticket while the guest's shares are unmounted (see prepare_memory).
        self.pending_ticket = paths.runtime / "memory-ticket.json"


def kernel_cmdline(*, name: str, ip: str, prefixlen: int, gateway: str, tasks: int | None = None) -> str:
    """The guest kernel's command line: root disk, serial console, quiet fast boot, name and address, and
    ``tasks`` as the guest's threads-max (the whole VM's processes and threads, as a container's pids.max)."""
    return " ".join([
        "console=ttyS0", "root=/dev/vda", "rw", "rootfstype=ext4", "panic=-1",
        "quiet", "systemd.show_status=1",  # the kernel's chatter off, the units' progress on: workspace_logs
        "mitigations=off",  # the host isolates the guest; in-guest mitigations only slow emulation
        "cryptomgr.notests",  # the crypto self-tests cost seconds of emulated CPU on every boot
        "net.ifnames=0",  # no udev in the guest: the NIC stays eth0, as vm-net expects
        "fsck.mode=skip", f"systemd.hostname={name}", f"sandbox_mcp.net={ip}/{prefixlen},{gateway}",
        *([f"sysctl.kernel.threads-max={int(tasks)}"] if tasks is not None else []),
    ])  # fmt: skip


def _plain(path: Path) -> str:
    """``path`` as a qemu option value; qemu splits options at ','."""
    if "," in str(path):
        raise InvalidSpec(f"path {path} contains ','; set SANDBOX_MCP_IMAGE_DIR to a plain path")
    return str(path)


# The 9p shares, in device order: mount tag, read-only.
_SHARES = (("workspace", False), ("claude-config", False), ("ssh-host-keys", True), ("guest-meta", True))


@dataclass(frozen=True)
class QemuFds:
    """The fds the server opens for qemu, by their numbers in qemu's process (they are inherited)."""

    kernel: int
    initrd: int
    disk: int  # the image's root disk, read-only
    overlay: int  # this boot's qcow2 layer, read-write
    console: int  # a pipe into runtime/console.log, bounded, write-only
    qmp: int  # the QMP socket, listening
    tap: int  # attached to the TAP vm-NAME
    shares: Mapping[str, int]  # 9p mount tag -> a detached idmapped mount of its directory
    incoming: int | None = None  # a saved memory state to resume from, read-only (-incoming)


def qemu_argv(
    *,
    name: str,
    accelerator: Accelerator,
    cpus: int,
    memory_mib: int,
    fds: QemuFds,
    mac: str,
    cmdline: str,
    firmware: Path | None = None,
) -> list[str]:
    """The exact qemu command that boots workspace ``name`` from the inherited ``fds`` (``firmware``: a
    ``-bios``, e.g. qboot). qemu opens no path of ours: see the module docstring.

    Raises:
        InvalidSpec: the firmware path contains ',' (qemu's option separator).
    """
    argv = [
        "qemu-system-x86_64",
        "-name", vm_name(name),
        "-machine", "q35",
        "-accel", accelerator,
        "-cpu", "host" if accelerator == "kvm" else "max",
        "-smp", str(cpus),
        "-m", str(memory_mib),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot",  # a reboot inside ends the VM; the next start gives a clean root
        "-sandbox", _SANDBOX,
        *(["-bios", _plain(firmware)] if firmware else []),
        "-kernel", f"/proc/self/fd/{fds.kernel}",
        "-initrd", f"/proc/self/fd/{fds.initrd}",
        "-append", cmdline,
        "-add-fd", f"fd={fds.console},set=2",
        "-chardev", "file,id=console,path=/dev/fdset/2,append=on",  # a pipe: append, since O_TRUNC would ftruncate it
        "-serial", "chardev:console",
        "-add-fd", f"fd={fds.overlay},set=1",
        "-blockdev", f"driver=raw,node-name=base,read-only=on,file.driver=file,file.filename=/proc/self/fd/{fds.disk}",
        # The throw-away layer: no flushes (cache=unsafe); its backing is the fd, not the path in its header.
        "-blockdev", "driver=qcow2,node-name=root,backing=base,cache.no-flush=on,"
                     "file.driver=file,file.filename=/dev/fdset/1",
        "-device", "virtio-blk-pci,drive=root",
        "-netdev", f"tap,id=net0,fd={fds.tap}",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac}",
    ]  # fmt: skip
    for tag, readonly in _SHARES:
        argv += [
            "-fsdev", f"local,id={tag},path=/proc/self/fd/{fds.shares[tag]},security_model={SECURITY_MODEL}"
                      + (",readonly=on" if readonly else ""),
            "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]  # fmt: skip
    argv += ["-chardev", f"socket,id=qmp,fd={fds.qmp},server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
    if fds.incoming is not None:  # the same devices, their state loaded from a memory snapshot; runs once loaded
        argv += ["-incoming", f"fd:{fds.incoming}"]
    return argv


def launch_argv(argv: list[str], *, userns_fd: int, uid: int, gid: int, groups: Iterable[int] = ()) -> list[str]:
    """``argv`` started through :mod:`.launch`: in the user namespace ``userns_fd`` as ``uid``:``gid``
    there (plus ``groups``, e.g. /dev/kvm's), with no capabilities."""
    return [sys.executable, "-I", "-S", str(LAUNCHER), str(userns_fd), str(uid), str(gid),
            ",".join(str(g) for g in groups), "--", *argv]


def qboot() -> Path | None:
    """qemu's minimal firmware, where installed: it hands over to ``-kernel`` at once, where SeaBIOS
    takes seconds under emulation (Debian ships it in qemu-system-data)."""
    path = QBOOT_PATH
    return path if path.is_file() else None


def overlay_argv(disk: Path, overlay: Path) -> list[str]:
    """``qemu-img`` making a fresh qcow2 overlay over the read-only raw root disk."""
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(disk), str(overlay)]


class QemuState(ImageRootState):
    """What the qemu runtime remembers of a workspace: its VM image and qemu's uid, and while it runs,
    qemu and how."""

    uid: int | None = Field(default=None, description="qemu's host uid and gid (allocate_vm_uid)")
    process: ProcessRef | None = Field(default=None, description="qemu-system-x86_64")
    accelerator: Accelerator | None = None


class QemuRuntime(ImageRootRuntime):
    """VMs booted by qemu on this host: KVM where it works, software emulation elsewhere."""

    name = "qemu"
    types = frozenset({"vm"})
    modes = frozenset({"direct"})
    package_flavour = "debian"
    host_network = True
    own_kernel = True
    has_snapshots = True
    has_memory_snapshots = True
    State = QemuState
    Config = QemuSettings
    config: QemuSettings
    image_kind = "VM image"
    sync_before_capture = True  # the guest's page cache holds what the host cannot see: flush it first

    def network_needs(self, type_: str) -> NetworkNeeds:
        """A TAP on the bridge: the name's MAC and an address on the subnet (no vsock device, so no CID)."""
        return ON_THE_SUBNET

    def __init__(self, ctx: RuntimeContext) -> None:
        super().__init__(ctx)
        self.network = ctx.network
        self.images = VmImage(ctx.settings, ctx.images, config=self.config)
        self._accel: AccelChoice | None = None

    def min_memory_mib(self, type_: str) -> int:
        """A VM boots its own kernel: less than this does not come up."""
        return VM_MIN_MEMORY_MIB

    @property
    def _accel_cache(self) -> Path:
        return self.settings.state_dir / ".server" / "accelerator.json"

    def state(self, record: WorkspaceRecord) -> QemuState:
        return QemuState.model_validate(record.runtime_state)

    def _paths(self, record: WorkspaceRecord) -> WorkspacePaths:
        return WorkspacePaths.of(self.settings.state_dir, record.name)

    @staticmethod
    def _marker(record: WorkspaceRecord) -> bytes:
        return vm_name(record.name).encode()

    def _tag(self, record: WorkspaceRecord) -> str:
        return supervise.workspace_tag(self.settings.state_dir, record.name)

    def _running(self, record: WorkspaceRecord) -> bool:
        return supervise.alive(self.state(record).process, self._marker(record))

    def mark_stopped(self, record: WorkspaceRecord) -> WorkspaceRecord:
        return self.with_state(record, self.state(record).model_copy(update={"process": None}))

    # -- host -----------------------------------------------------------------------------------

    def checks(self) -> list[Check]:
        checks = [
            which_check("qemu-system-x86_64", "qemu-system-x86", "runs VM workspaces", required=False),
            which_check("qemu-img", "qemu-utils", "makes each VM boot's throw-away layer", required=False),
            which_check("mkfs.ext4", "e2fsprogs", "writes the VM root disk once", required=False),
            which_check("nft", "nftables", "enforces the workspace network policy", required=False),
        ]
        choice = self._accel or configured(self.config.accelerator) or kvm_sign()
        choice = choice or cached_choice(self._accel_cache)
        if choice is None:
            detail = "KVM is offered; a test boot on the first VM start decides between KVM and TCG"
        elif choice.accelerator == "kvm":
            detail = f"KVM ({choice.reason})"
        else:
            detail = (f"VMs run under TCG, software emulation: they work, but boot in tens of seconds and run "
                      f"several times slower ({choice.reason})")
        checks.append(Check(name="VM accelerator", ok=True, detail=detail, required=False))
        key = self.images.key(())
        built = self.images.exists(key)
        checks.append(Check(
            name="VM image",
            ok=built,
            detail=f"cached at {self.images.store.path(key)}" if built else "not built yet",
            fix="the first create_workspace with type 'vm' builds it (about two minutes); "
            "or run 'sandbox-mcp image build --vm'",
            required=False,
        ))  # fmt: skip
        return checks

    def default_limits(self) -> Limits:
        """A VM's size when create gives none: [runtimes.qemu] cpus and memory_mib (a kernel needs more)."""
        return Limits(cpus=self.config.cpus, memory_mib=self.config.memory_mib, tasks=self.settings.tasks_max)

    def complete_limits(self, limits: Limits) -> Limits:
        """The root disk's size (``disk_gib``): it bounds what the guest writes outside the workspace dir."""
        if limits.disk_mib is not None:
            return limits
        return limits.model_copy(update={"disk_mib": self.config.disk_gib << 10})

    def assigned(self, record: WorkspaceRecord) -> bool:
        """A VM registered before qemu ran unprivileged has no uid of its own yet."""
        return self.state(record).uid is not None

    def assign(self, record: WorkspaceRecord, others: list[WorkspaceRecord]) -> WorkspaceRecord:
        """The isolation, and qemu's own host uid: none another registered VM or a live process has.

        Raises:
            Conflict: every VM uid is taken.
        """
        taken = {u for r in others if r.runtime == self.name and (u := self.state(r).uid) is not None}
        uid = allocate_vm_uid(taken | _live_vm_uids())
        record = record.model_copy(update={"isolation": "microvm"})
        return self.with_state(record, self.state(record).model_copy(update={"uid": uid}))

    def validate(self, record: WorkspaceRecord) -> None:
        """Refuse a VM on a host that cannot run one, before anything is made.

        Raises:
            InvalidSpec: qemu, qemu-img or /dev/net/tun is missing (the message says what to install),
                ``cpus`` is a fraction (a VM has whole vCPUs; nothing would hold it to the fraction), or
                egress is asked for where NAT is off.
        """
        if record.limits is not None and not float(record.limits.cpus).is_integer():
            raise InvalidSpec(f"cpus={record.limits.cpus:g}: a VM gets whole vCPUs; ask for "
                              f"cpus={max(1, math.ceil(record.limits.cpus))}, or use type 'container' or 'incus' "
                              "for a fraction of a CPU")
        missing = [p for p in ("qemu-system-x86_64", "qemu-img", "mkfs.ext4") if shutil.which(p) is None]
        if missing:
            raise InvalidSpec(f"type 'vm' needs {', '.join(missing)} on this host; install them (Debian/Ubuntu: "
                              f"apt-get install qemu-system-x86 qemu-utils e2fsprogs) or use type 'container'")
        if not Path("/dev/net/tun").exists():
            raise InvalidSpec("type 'vm' needs /dev/net/tun for its network (modprobe tun), or use type 'container'")
        check_nat(record.egress, self.settings.nat)

    async def set_egress(self, record: WorkspaceRecord) -> None:
        """The VM's port gets the new policy; its DNS to any address goes to the egress resolver when it has a
        list (redirected by the firewall), so nothing inside changes."""
        await self.network.admit(tap_name(record.name), record.ip, record.mac, egress=record.egress,
                                 owner=host_identity(self.settings, record)[0])

    async def addresses_in_use(self) -> set[str]:
        return await self.network.live_addresses()

    async def _accelerator(self, kernel: Path) -> AccelChoice:
        if self._accel is None:
            self._accel = await choose_accelerator(self.config.accelerator, kernel, self._accel_cache)
        return self._accel

    # -- lifecycle ------------------------------------------------------------------------------

    async def prepare(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        key = await self.images.ensure(record.packages, progress)
        return self.with_state(record, self.state(record).model_copy(update={"image": key}))

    async def start(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        if self._running(record):
            return record
        state = self.state(record)
        uid = state.uid
        if uid is None:  # the manager assigns one first (see assigned); a caller that did not
            raise BackendError(
                f"VM '{record.name}' has no uid of its own to run qemu as; start it through the manager "
                "(sandbox-mcp start), which assigns one"
            )
        if not state.image or not self.images.exists(state.image):
            record = await self.prepare(record, progress)  # cache cleared or recipe changed since create
            state = self.state(record)
        key = state.image
        assert key is not None
        image = self.images.artefacts(key)
        accel = await self._accelerator(image.kernel)
        groups = kvm_groups() if accel.accelerator == "kvm" else []
        if groups is None:
            raise BackendError("only root may open /dev/kvm and qemu runs unprivileged; make /dev/kvm 0660 with "
                               "group kvm (or 0666), or set SANDBOX_MCP_VM_ACCELERATOR=tcg")
        paths = self._paths(record)
        files = _Files(paths)
        files.guest_meta.mkdir(parents=True, exist_ok=True)
        atomic_write(files.guest_meta / "hosts", hosts_file(record.name, str(self.settings.host_ip)))
        self._remove_boot_files(files)
        saved = paths.root_layer / "root.qcow2"
        ticket = memory.read_ticket(paths.root_layer) if saved.is_file() else None
        if saved.is_file():  # a restored snapshot's or a fork's layer: boot with what it holds
            await hostcmd.run(["cp", "--reflink=auto", "--", str(saved), str(files.overlay)], timeout_s=3600)
        else:
            await hostcmd.run(overlay_argv(image.disk, files.overlay), timeout_s=60)
        await progress("setting up the network", None)
        await self.network.ensure()
        try:
            await self.network.attach_tap(record.name)
            # The same policy as a container's: this port may send only as the VM's MAC and IP.
            await self.network.admit(tap_name(record.name), record.ip, record.mac, egress=record.egress,
                                     owner=host_identity(self.settings, record)[0])
            await progress(f"booting the VM ({accel.accelerator})", None)
            incoming = paths.root_layer / memory.STATE_FILE if ticket is not None else None
            process = await anyio.to_thread.run_sync(
                lambda: self._spawn(record, uid, key, image, accel.accelerator, groups, incoming)
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.network.revoke(tap_name(record.name))
                await self.network.detach_tap(record.name)
                self._remove_boot_files(files)
            raise
        record = self.with_state(record, state.model_copy(update={"process": process, "accelerator": accel.accelerator}))
        if ticket is not None:
            await self._resume_memory(record, ticket, progress)
        if record.limits is not None:  # a record made before disk_mib existed gets it now
            record = record.model_copy(update={"limits": self.complete_limits(record.limits)})
        return record

    async def _resume_memory(self, record: WorkspaceRecord, ticket: memory.MemoryTicket, progress: Progress) -> None:
        """After a start from a memory snapshot: wait until qemu has loaded it, then wake the guest's waiter
        (it mounts this qemu's shares). The state is used once: the next start boots the disk layer.

        Raises:
            BackendError: the state did not load (qemu is stopped; start_workspace boots the snapshot's disk).
        """
        paths = self._paths(record)
        try:
            await progress("loading the saved memory", None)
            await memory.wait_incoming(_Files(paths).qmp, lambda: self._running(record))
            await memory.remount(record.ip, ticket)
        except BackendError as exc:
            with anyio.CancelScope(shield=True):
                await self.stop(record, force=True)
            raise BackendError(
                f"{exc}; the saved memory is dropped (it fits only the qemu, accelerator "
                f"({ticket.accelerator or '?'}) and VM size it was taken with): start_workspace boots the "
                "snapshot's disk state"
            ) from exc
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.stop(record, force=True)
            raise
        finally:
            await anyio.to_thread.run_sync(memory.drop_state, paths.root_layer)

    def _spawn(self, record: WorkspaceRecord, uid: int, key: str, image: VmArtefacts, accelerator: Accelerator,
               groups: list[int], incoming: Path | None = None) -> ProcessRef:
        """Open everything qemu needs, start it unprivileged through the launcher, close our copies."""
        paths = self._paths(record)
        files = _Files(paths)
        inside = self.settings.user_uid  # the workspace user's uid in the image, and qemu's in its namespace
        opened: list[int] = []

        def keep(fd: int) -> int:
            opened.append(fd)
            return fd

        qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            shares = {}
            for tag, readonly in _SHARES:
                source = {"workspace": paths.workspace, "claude-config": paths.claude_config,
                          "ssh-host-keys": paths.ssh_host_keys, "guest-meta": files.guest_meta}[tag]
                uids, gids = _share_maps(source, uid, readonly)
                attrs = _SHARE_ATTRS | (idmap.MOUNT_ATTR_RDONLY if readonly else 0)
                shares[tag] = keep(idmap.detached_idmapped_tree(source, uids, attrs, gid_map=gids))
            keep(self.images.store.hold(key))  # qemu inherits it: prune leaves the image alone while it runs
            ro = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
            fds = QemuFds(
                kernel=keep(os.open(image.kernel, ro)),
                initrd=keep(os.open(image.initrd, ro)),
                disk=keep(os.open(image.disk, ro)),
                overlay=keep(os.open(files.overlay, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)),
                console=keep(self._console_sink(record, files)),
                qmp=qmp.fileno(),
                tap=keep(self.network.open_tap(record.name)),
                shares=shares,
                incoming=keep(os.open(incoming, ro)) if incoming is not None else None,
            )
            qmp.bind(str(files.qmp))
            qmp.listen(4)
            argv = qemu_argv(
                name=record.name,
                accelerator=accelerator,
                cpus=math.ceil(record.limits.cpus) if record.limits else self.config.cpus,
                memory_mib=record.limits.memory_mib if record.limits else self.config.memory_mib,
                fds=fds,
                mac=record.mac,
                cmdline=kernel_cmdline(name=record.name, ip=record.ip, prefixlen=self.settings.subnet.prefixlen,
                                       gateway=str(self.settings.host_ip),
                                       tasks=record.limits.tasks if record.limits else self.settings.tasks_max),
                firmware=qboot(),
            )
            userns = keep(idmap.userns_with_map([(inside, uid, 1)], [(inside, uid, 1), *((g, g, 1) for g in groups)]))
            return supervise.spawn(
                launch_argv(argv, userns_fd=userns, uid=inside, gid=inside, groups=groups),
                files.qemu_log,
                tag=self._tag(record),
                missing_hint=_QEMU_MISSING,
                pass_fds=[*opened, qmp.fileno()],
            )
        finally:
            qmp.close()
            for fd in opened:
                os.close(fd)

    def _console_sink(self, record: WorkspaceRecord, files: _Files) -> int:
        """The write end qemu's serial console goes to: the log keeps its first ``console_log_mib``
        MiB and drops the rest, so a guest flooding its console cannot fill the host's disk."""
        _, write_end = supervise.spawn_bounded_sink(files.console, self.settings.console_log_mib << 20,
                                                    tag=self._tag(record))
        return write_end

    @staticmethod
    def _remove_boot_files(files: _Files) -> None:
        for path in (files.overlay, files.qmp):
            path.unlink(missing_ok=True)

    async def stop(self, record: WorkspaceRecord, *, force: bool = False) -> None:
        state = self.state(record)
        files = _Files(self._paths(record))
        marker = self._marker(record)
        if force:
            await supervise.kill(state.process, marker)
        if supervise.alive(state.process, marker):
            asked = False
            with contextlib.suppress(BackendError):
                # "cont" first: a paused guest would not see the power-off request.
                await qmp.execute(files.qmp, [{"execute": "cont"}, qmp.CTRL_ALT_DEL, {"execute": "system_powerdown"}])
                asked = True
            # The guest powers off cleanly and qemu exits; if it does not in time, SIGTERM, then SIGKILL.
            if not (asked and await supervise.wait_gone(state.process, self.settings.stop_timeout_s, marker)):
                await supervise.terminate(state.process, grace_s=5, marker=marker)
        # A qemu a killed server spawned but never recorded: found by the workspace's tag.
        await supervise.kill_tagged(self._tag(record))
        await self.network.revoke(tap_name(record.name))
        await self.network.detach_tap(record.name)
        await anyio.to_thread.run_sync(self._remove_boot_files, files)

    async def destroy(self, record: WorkspaceRecord) -> None:
        await self.network.detach_tap(record.name)

    async def status(self, record: WorkspaceRecord) -> RuntimeDetail:
        state = self.state(record)
        running = self._running(record)
        paused = False
        if running and record.state == "paused":  # a QMP round trip only where it may be so (status is polled)
            with contextlib.suppress(BackendError):
                (answer,) = await qmp.execute(_Files(self._paths(record)).qmp, [{"execute": "query-status"}], 2.0)
                paused = isinstance(answer, dict) and answer.get("status") == "paused"
        return RuntimeDetail(
            runtime=self.name,
            running=running,
            paused=paused,
            pid=state.process.pid if running and state.process else None,
            uptime_s=supervise.uptime_s(state.process) if running and state.process else None,
            accelerator=state.accelerator,
            isolation="microvm",
            detail=f"qemu -name {vm_name(record.name)}" + (f" ({state.accelerator})" if state.accelerator else "")
            + (f" as uid {state.uid}" if state.uid is not None else "")
            + (f" image {state.image}" if state.image else ""),
        )

    # -- pause and snapshots ----------------------------------------------------------------------

    async def pause(self, record: WorkspaceRecord) -> None:
        """QMP ``stop``: the vCPUs halt; qemu drains and flushes the disk layer as it stops them."""
        await self._qmp_run_state(record, "stop")

    async def resume(self, record: WorkspaceRecord) -> None:
        await self._qmp_run_state(record, "cont")
        await self._wake_pending(record)  # shares a killed server's memory snapshot left unmounted, if any

    async def _qmp_run_state(self, record: WorkspaceRecord, command: str) -> None:
        if not self._running(record):
            raise InvalidState(f"workspace {record.name!r} is not running; call start_workspace")
        await qmp.execute(_Files(self._paths(record)).qmp, [{"execute": command}], timeout_s=30)

    async def capture_root(self, record: WorkspaceRecord, dest: Path) -> None:
        """The VM's qcow2 layer (the manager paused it: QMP stop flushed qemu's caches to the file), else the
        saved one its next start boots from. A disk state: like a power cut, the guest's journal replays."""
        paths = self._paths(record)
        live = _Files(paths).overlay
        src = live if self._running(record) else paths.root_layer / "root.qcow2"
        dest.mkdir(mode=0o700)
        if src.is_file():
            await hostcmd.run(["cp", "--reflink=auto", "--", str(src), str(dest / "root.qcow2")], timeout_s=3600)

    def _share_mounts(self, record: WorkspaceRecord) -> list[str]:
        """The guest's mount points of the 9p shares, in the order they are mounted (host keys first)."""
        return ["/etc/ssh-host-keys", GUEST_META_DIR, claude_workspace.workspace_dir_inside(record.user),
                claude_workspace.claude_config_dir_inside(record.user)]

    async def prepare_memory(self, record: WorkspaceRecord, guest: GuestExec) -> memory.MemoryTicket:
        """Unmount the guest's 9p shares (qemu migrates no VM with one mounted), leaving a waiter that mounts
        them again when :meth:`release_memory` (or a restore) wakes it. See :mod:`.memory`.

        Raises:
            InvalidState: processes hold files under a share (the message names them).
            BackendError: the guest could not be readied.
        """
        ticket = memory.new_ticket(self.state(record).accelerator)
        pending = _Files(self._paths(record)).pending_ticket
        # Kept until the shares are back: a server killed meanwhile has the next resume or start-up wake them.
        await anyio.to_thread.run_sync(lambda: atomic_write(pending, ticket.model_dump_json(), mode=0o600))
        try:
            result = await guest(memory.helper_command(ticket, self._share_mounts(record)))
            memory.parse_helper_reply(record.name, result.exit_code, result.stdout, result.stderr)
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        return ticket

    async def save_memory(self, record: WorkspaceRecord, ticket: memory.MemoryTicket, dest: Path) -> None:
        """Save the paused VM's memory and device state into directory ``dest`` (with the ticket that wakes it).

        Raises:
            BackendError: qemu could not save it.
        """
        fd = os.open(dest / memory.STATE_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            await memory.migrate_to_fd(_Files(self._paths(record)).qmp, fd)
        finally:
            os.close(fd)
        await anyio.to_thread.run_sync(memory.write_ticket, dest, ticket)

    async def release_memory(self, record: WorkspaceRecord, ticket: memory.MemoryTicket) -> None:
        """Wake the guest's waiter after the save (the VM runs again): its shares are mounted again.

        Raises:
            BackendError: it did not answer (it remounts by itself later).
        """
        pending = _Files(self._paths(record)).pending_ticket
        if pending.exists():  # else the resume after the save woke the waiter already
            await memory.remount(record.ip, ticket)
            pending.unlink(missing_ok=True)

    async def _wake_pending(self, record: WorkspaceRecord) -> None:
        """Mount the shares a memory snapshot left unmounted when the server was killed during it."""
        pending = _Files(self._paths(record)).pending_ticket
        try:
            ticket = memory.MemoryTicket.model_validate_json(pending.read_bytes())
        except (OSError, ValueError):
            return
        with contextlib.suppress(BackendError):
            await memory.remount(record.ip, ticket, timeout_s=30)
            pending.unlink(missing_ok=True)

    async def adopt_files(self, source: WorkspaceRecord, target: WorkspaceRecord, trees: list[Path]) -> None:
        """A fork boots from the disk layer: a saved memory state belongs to the source's address and name."""
        for tree in trees:
            await anyio.to_thread.run_sync(memory.drop_state, tree)

    async def logs(self, record: WorkspaceRecord, lines: int) -> str:
        files = _Files(self._paths(record))

        def _tail() -> str:
            parts = []
            for path, prefix in ((files.console, ""), (files.qemu_log, "qemu: ")):
                parts += [prefix + line for line in log_tail_lines(path) or []]
            return "\n".join(parts[-lines:])

        return await anyio.to_thread.run_sync(_tail)

    async def reconcile(self, records: list[WorkspaceRecord]) -> None:
        """Remove TAPs and boot files of VMs that are not running (a crashed server's leftovers)."""
        running = {r.name for r in records if self._running(r)}
        ours = {r.name for r in records}  # another server's VMs on this host are not ours to touch
        for name in await self.network.tap_leftovers():
            if name in ours and name not in running:
                await self.network.revoke(tap_name(name))
                await self.network.detach_tap(name)
        for r in records:
            if r.name not in running:
                self._remove_boot_files(_Files(self._paths(r)))
                _Files(self._paths(r)).pending_ticket.unlink(missing_ok=True)
            elif r.state == "running":
                await self._wake_pending(r)


def _share_maps(source: Path, uid: int, readonly: bool) -> tuple[idmap.IdMap, idmap.IdMap]:
    """The uid and gid maps of share ``source`` for a qemu running as host ``uid``.

    Read-write shares map their directory's owner (the host user the workspace belongs to) to
    qemu's uid, so what the guest writes lands as that user; read-only ones map root.

    Raises:
        BackendError: the directory is a symlink or not a directory, or a read-write share is root's
            (whatever qemu wrote there would be root's: setuid-root programs one chmod away).
    """
    st = os.lstat(source)
    if not stat.S_ISDIR(st.st_mode):
        raise BackendError(f"{source} is not a directory; stop the workspace, move it away and start again")
    if readonly:
        return [(0, uid, 1)], [(0, uid, 1)]
    if st.st_uid == 0 or st.st_gid == 0:
        raise BackendError(f"{source} belongs to root; chown it to the workspace user before starting the VM")
    return [(st.st_uid, uid, 1)], [(st.st_gid, uid, 1)]


def _live_vm_uids() -> set[int]:
    """Real uids in the VM range of the processes live on this host (another server's VMs included)."""
    found = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        uid = int(line.split()[1])
                        if VM_UID_BASE <= uid < VM_UID_BASE + UID_RANGE:
                            found.add(uid)
                        break
        except (OSError, ValueError):
            continue
    return found
