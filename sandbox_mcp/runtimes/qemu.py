"""Direct-mode VM runtime: the server runs and supervises a qemu guest per workspace (``type="vm"``).

Per workspace, from the VM image derived from the Debian root (:mod:`sandbox_mcp.images.vm`):

* the read-only root disk under a fresh qcow2 overlay per boot (``runtime/root.qcow2``, removed
  on stop), so a restart gives a clean root, like a container's ``--volatile=overlay``;
* the kernel and initrd passed directly (``-kernel/-initrd/-append``), no firmware boot menu;
* the workspace dir and Claude config (read-write) and the host keys (read-only) shared over
  virtio-9p with ``security_model=passthrough``: files land on the host with the guest's uid,
  exactly as with a container's bind mounts. 9p rather than virtiofs because qemu serves it
  itself (no daemon per share to supervise and clean up) and Debian bookworm ships no
  virtiofsd outside backports; the price is throughput, which a workspace dir rarely needs;
* a TAP ``vm-NAME`` on the workspace bridge; the guest sets its static address from the kernel
  command line (``sandbox_mcp.net=``), its name from ``systemd.hostname=``;
* the serial console in ``runtime/console.log`` (``workspace_logs``), qemu's own messages in
  ``runtime/qemu.log``, and a QMP socket ``runtime/qmp.sock`` through which stop asks the
  guest to power off (Ctrl-Alt-Del, which the image maps to poweroff; the image runs no logind
  to act on an ACPI power button) before qemu is terminated.

qemu runs in its own session and outlives the server; the registry keeps its PID and start
time (:mod:`sandbox_mcp.supervise`). KVM is used where a probe says it works, TCG otherwise
(:mod:`.qemu_accel`). The vsock CID is derived and collision-checked like the MAC, but no vsock
device is attached: readiness is the pinned SSH handshake, and hosts without ``vhost_vsock``
(like the project's) could not offer one.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
from pathlib import Path

import anyio
from pydantic import Field

from .. import hostcmd, supervise
from ..doctor import which_check
from ..errors import BackendError, InvalidSpec
from ..fsutil import atomic_write
from ..images.vm import VmArtefacts, VmImage
from ..models import Check, Limits, RuntimeDetail, WorkspaceRecord
from ..naming import tap_name
from ..paths import WorkspacePaths
from ..supervise import ProcessRef
from . import qmp
from .base import Progress, Runtime, RuntimeContext, RuntimeState
from .nspawn import hosts_file
from .qemu_accel import AccelChoice, Accelerator, cached_choice, choose_accelerator, kvm_sign

__all__ = ["QemuRuntime", "QemuState", "kernel_cmdline", "overlay_argv", "qboot", "qemu_argv", "vm_name"]

QBOOT_PATH = Path("/usr/share/qemu/qboot.rom")
_ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
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


def kernel_cmdline(*, name: str, ip: str, prefixlen: int, gateway: str) -> str:
    """The guest kernel's command line: root disk, serial console, quiet fast boot, name and address."""
    return " ".join([
        "console=ttyS0", "root=/dev/vda", "rw", "rootfstype=ext4", "panic=-1",
        "quiet", "systemd.show_status=1",  # the kernel's chatter off, the units' progress on: workspace_logs
        "mitigations=off",  # the host isolates the guest; in-guest mitigations only slow emulation
        "cryptomgr.notests",  # the crypto self-tests cost seconds of emulated CPU on every boot
        "net.ifnames=0",  # no udev in the guest: the NIC stays eth0, as vm-net expects
        "fsck.mode=skip", f"systemd.hostname={name}", f"sandbox_mcp.net={ip}/{prefixlen},{gateway}",
    ])  # fmt: skip


def _plain(path: Path) -> str:
    """``path`` as a qemu option value; qemu splits options at ','."""
    if "," in str(path):
        raise InvalidSpec(f"path {path} contains ','; set SANDBOX_MCP_STATE_DIR / SANDBOX_MCP_IMAGE_DIR to plain paths")
    return str(path)


def qemu_argv(
    *,
    name: str,
    accelerator: Accelerator,
    cpus: int,
    memory_mib: int,
    image: VmArtefacts,
    paths: WorkspacePaths,
    mac: str,
    cmdline: str,
    firmware: Path | None = None,
) -> list[str]:
    """The exact qemu command that boots workspace ``name`` (``firmware``: a ``-bios``, e.g. qboot).

    Raises:
        InvalidSpec: a host path contains ',' (qemu's option separator).
    """
    files = _Files(paths)
    shares = [
        ("workspace", paths.workspace, False),
        ("claude-config", paths.claude_config, False),
        ("ssh-host-keys", paths.ssh_host_keys, True),
        ("guest-meta", files.guest_meta, True),
    ]
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
        *(["-bios", _plain(firmware)] if firmware else []),
        "-kernel", _plain(image.kernel),
        "-initrd", _plain(image.initrd),
        "-append", cmdline,
        "-chardev", f"file,id=console,path={_plain(files.console)}",
        "-serial", "chardev:console",
        "-drive", f"file={_plain(files.overlay)},format=qcow2,if=none,id=root,cache=unsafe",  # throw-away layer
        "-device", "virtio-blk-pci,drive=root",
        "-netdev", f"tap,id=net0,ifname={tap_name(name)},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=net0,mac={mac}",
    ]  # fmt: skip
    for tag, path, readonly in shares:
        argv += [
            "-fsdev", f"local,id={tag},path={_plain(path)},security_model=passthrough" + (",readonly=on" if readonly else ""),
            "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]  # fmt: skip
    argv += ["-qmp", f"unix:{_plain(files.qmp)},server=on,wait=off"]
    return argv


def qboot() -> Path | None:
    """qemu's minimal firmware, where installed: it hands over to ``-kernel`` at once, where SeaBIOS
    takes seconds under emulation (Debian ships it in qemu-system-data)."""
    path = QBOOT_PATH
    return path if path.is_file() else None


def overlay_argv(disk: Path, overlay: Path) -> list[str]:
    """``qemu-img`` making a fresh qcow2 overlay over the read-only raw root disk."""
    return ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(disk), str(overlay)]


class QemuState(RuntimeState):
    """What the qemu runtime remembers of a workspace: its VM image, and while it runs, qemu and how."""

    image: str | None = None
    process: ProcessRef | None = Field(default=None, description="qemu-system-x86_64")
    accelerator: Accelerator | None = None


class QemuRuntime(Runtime):
    """VMs booted by qemu on this host: KVM where it works, software emulation elsewhere."""

    name = "qemu"
    types = frozenset({"vm"})
    modes = frozenset({"direct"})
    package_flavour = "debian"
    host_network = True
    State = QemuState

    def __init__(self, ctx: RuntimeContext) -> None:
        super().__init__(ctx)
        self.network = ctx.network
        self.images = VmImage(ctx.settings, ctx.images)
        self._accel: AccelChoice | None = None

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
        choice = self._accel or (kvm_sign() if self.settings.vm_accelerator == "auto" else AccelChoice(
            accelerator=self.settings.vm_accelerator, reason="set by vm_accelerator"))
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
        """A VM's size when create gives none: the vm_* settings (its own kernel needs more memory)."""
        return Limits(cpus=self.settings.vm_cpus, memory_mib=self.settings.vm_memory_mib, tasks=self.settings.tasks_max)

    def assign(self, record: WorkspaceRecord, others: list[WorkspaceRecord]) -> WorkspaceRecord:
        return record.model_copy(update={"isolation": "microvm"})

    def validate(self, record: WorkspaceRecord) -> None:
        """Refuse a VM on a host that cannot run one, before anything is made.

        Raises:
            InvalidSpec: qemu, qemu-img or /dev/net/tun is missing (the message says what to install), or
                egress is asked for where NAT is off.
        """
        missing = [p for p in ("qemu-system-x86_64", "qemu-img", "mkfs.ext4") if shutil.which(p) is None]
        if missing:
            raise InvalidSpec(f"type 'vm' needs {', '.join(missing)} on this host; install them (Debian/Ubuntu: "
                              f"apt-get install qemu-system-x86 qemu-utils e2fsprogs) or use type 'container'")
        if not Path("/dev/net/tun").exists():
            raise InvalidSpec("type 'vm' needs /dev/net/tun for its network (modprobe tun), or use type 'container'")
        if record.egress == "internet" and not self.settings.nat:
            raise InvalidSpec(
                "egress='internet' needs outbound NAT, which is off on this host; the host's owner turns it on "
                "with SANDBOX_MCP_NAT=true (IP forwarding plus an nftables masquerade). Use egress='none', or "
                "list the packages you need in create_workspace's packages"
            )

    async def addresses_in_use(self) -> set[str]:
        return await self.network.live_addresses()

    async def _accelerator(self, kernel: Path) -> AccelChoice:
        if self._accel is None:
            self._accel = await choose_accelerator(self.settings, kernel, self._accel_cache)
        return self._accel

    # -- lifecycle ------------------------------------------------------------------------------

    async def prepare(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        key = await self.images.ensure(record.packages, progress)
        return self.with_state(record, self.state(record).model_copy(update={"image": key}))

    async def start(self, record: WorkspaceRecord, progress: Progress) -> WorkspaceRecord:
        if self._running(record):
            return record
        state = self.state(record)
        if not state.image or not self.images.exists(state.image):
            record = await self.prepare(record, progress)  # cache cleared or recipe changed since create
            state = self.state(record)
        assert state.image is not None
        image = self.images.artefacts(state.image)
        accel = await self._accelerator(image.kernel)
        paths = self._paths(record)
        files = _Files(paths)
        subnet = self.settings.subnet
        argv = qemu_argv(
            name=record.name,
            accelerator=accel.accelerator,
            cpus=math.ceil(record.limits.cpus) if record.limits else self.settings.vm_cpus,
            memory_mib=record.limits.memory_mib if record.limits else self.settings.vm_memory_mib,
            image=image,
            paths=paths,
            mac=record.mac,
            cmdline=kernel_cmdline(name=record.name, ip=record.ip, prefixlen=subnet.prefixlen,
                                   gateway=str(self.settings.host_ip)),
            firmware=qboot(),
        )
        files.guest_meta.mkdir(parents=True, exist_ok=True)
        atomic_write(files.guest_meta / "hosts", hosts_file(record.name, str(self.settings.host_ip)))
        self._remove_boot_files(files)
        await hostcmd.run(overlay_argv(image.disk, files.overlay), timeout_s=60)
        await progress("setting up the network", None)
        await self.network.ensure()
        try:
            tap = await self.network.attach_tap(record.name)
            # The same policy as a container's: this port may send only as the VM's MAC and IP.
            await self.network.admit(tap, record.ip, record.mac, egress=record.egress == "internet")
            await progress(f"booting the VM ({accel.accelerator})", None)
            process = await anyio.to_thread.run_sync(
                lambda: supervise.spawn(argv, files.qemu_log, tag=self._tag(record), missing_hint=_QEMU_MISSING)
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.network.revoke(tap_name(record.name))
                await self.network.detach_tap(record.name)
                self._remove_boot_files(files)
            raise
        return self.with_state(
            record, state.model_copy(update={"process": process, "accelerator": accel.accelerator})
        )

    @staticmethod
    def _remove_boot_files(files: _Files) -> None:
        for path in (files.overlay, files.qmp):
            path.unlink(missing_ok=True)

    async def stop(self, record: WorkspaceRecord) -> None:
        state = self.state(record)
        files = _Files(self._paths(record))
        marker = self._marker(record)
        if supervise.alive(state.process, marker):
            asked = False
            with contextlib.suppress(BackendError):
                await qmp.execute(files.qmp, [qmp.CTRL_ALT_DEL, {"execute": "system_powerdown"}])
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
        return RuntimeDetail(
            runtime=self.name,
            running=running,
            pid=state.process.pid if running and state.process else None,
            uptime_s=supervise.uptime_s(state.process) if running and state.process else None,
            accelerator=state.accelerator,
            isolation="microvm",
            detail=f"qemu -name {vm_name(record.name)}" + (f" ({state.accelerator})" if state.accelerator else "")
            + (f" image {state.image}" if state.image else ""),
        )

    async def logs(self, record: WorkspaceRecord, lines: int) -> str:
        files = _Files(self._paths(record))

        def _tail() -> str:
            parts = []
            for path, prefix in ((files.console, ""), (files.qemu_log, "qemu: ")):
                try:
                    with open(path, "rb") as f:
                        f.seek(0, os.SEEK_END)
                        f.seek(max(0, f.tell() - 256 * 1024))
                        text = f.read().decode("utf-8", "replace")
                except FileNotFoundError:
                    continue
                text = _ANSI_RE.sub("", text).replace("\r", "")
                parts += [prefix + line for line in text.splitlines()]
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

