"""The qemu runtime's parts: exact commands, the guest's configuration, the accelerator choice,
QMP against a real qemu, the TAP on a real bridge (in private namespaces), and a real probe boot.

The whole VM lifecycle through the MCP client is in ``test_qemu_e2e.py``.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from sandbox_mcp.config import Settings
from sandbox_mcp.errors import BackendError, Conflict, InvalidSpec
from sandbox_mcp.images import DebianRoot, ImageStore
from sandbox_mcp.models import WorkspaceRecord
from sandbox_mcp.naming import BUILD_UID_BASE, LAST_UID_BASE, UID_RANGE, VM_UID_BASE, allocate_vm_uid
from sandbox_mcp.paths import WorkspacePaths
from sandbox_mcp.progress import no_progress
from sandbox_mcp.runtimes import runtime_class
from sandbox_mcp.runtimes.qemu import (
    LAUNCHER,
    QemuFds,
    QemuRuntime,
    QemuState,
    _share_maps,
    kernel_cmdline,
    launch_argv,
    overlay_argv,
    qemu_argv,
)
from sandbox_mcp.runtimes.qemu.accel import (
    SET_BY,
    choose_accelerator,
    kvm_groups,
    kvm_sign,
    probe_argv,
    probe_boot,
)
from sandbox_mcp.runtimes.qemu.image import (
    VmArtefacts,
    VmImage,
    extract_vmlinux,
    fstab,
    mkfs_argv,
    vm_image_key,
)
from sandbox_mcp.runtimes.qemu.qmp import CTRL_ALT_DEL, execute
from sandbox_mcp.runtimes.qemu.settings import QemuSettings

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")


FDS = QemuFds(kernel=10, initrd=11, disk=12, overlay=13, console=14, qmp=15, tap=16,
              shares={"workspace": 20, "claude-config": 21, "ssh-host-keys": 22, "guest-meta": 23})


def test_qemu_argv_exact() -> None:
    assert qemu_argv(
        name="ws1", accelerator="tcg", cpus=2, memory_mib=2048, fds=FDS, mac="02:aa:bb:cc:dd:ee",
        cmdline="console=ttyS0",
    ) == [
        "qemu-system-x86_64", "-name", "sbx-ws1", "-machine", "q35", "-accel", "tcg", "-cpu", "max",
        "-smp", "2", "-m", "2048", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-kernel", "/proc/self/fd/10", "-initrd", "/proc/self/fd/11", "-append", "console=ttyS0",
        "-add-fd", "fd=14,set=2", "-chardev", "file,id=console,path=/dev/fdset/2,append=on", "-serial", "chardev:console",
        "-add-fd", "fd=13,set=1",
        "-blockdev", "driver=raw,node-name=base,read-only=on,file.driver=file,file.filename=/proc/self/fd/12",
        "-blockdev", "driver=qcow2,node-name=root,backing=base,cache.no-flush=on,file.driver=file,"
                     "file.filename=/dev/fdset/1",
        "-device", "virtio-blk-pci,drive=root",
        "-netdev", "tap,id=net0,fd=16",
        "-device", "virtio-net-pci,netdev=net0,mac=02:aa:bb:cc:dd:ee",
        "-fsdev", "local,id=workspace,path=/proc/self/fd/20,security_model=none",
        "-device", "virtio-9p-pci,fsdev=workspace,mount_tag=workspace",
        "-fsdev", "local,id=claude-config,path=/proc/self/fd/21,security_model=none",
        "-device", "virtio-9p-pci,fsdev=claude-config,mount_tag=claude-config",
        "-fsdev", "local,id=ssh-host-keys,path=/proc/self/fd/22,security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=ssh-host-keys,mount_tag=ssh-host-keys",
        "-fsdev", "local,id=guest-meta,path=/proc/self/fd/23,security_model=none,readonly=on",
        "-device", "virtio-9p-pci,fsdev=guest-meta,mount_tag=guest-meta",
        "-chardev", "socket,id=qmp,fd=15,server=on,wait=off", "-mon", "chardev=qmp,mode=control",
    ]  # fmt: skip


def test_qemu_argv_names_no_host_path_of_ours() -> None:
    """qemu runs unprivileged and opens nothing by path but its firmware: everything else is an fd."""
    argv = qemu_argv(name="q", accelerator="tcg", cpus=1, memory_mib=512, fds=FDS, mac="02:00:00:00:00:01",
                     cmdline="x", firmware=Path("/usr/share/qemu/qboot.rom"))
    paths = [a for arg in argv for a in arg.replace(",", "=").split("=") if a.startswith("/")]
    assert all(p.startswith(("/proc/self/fd/", "/dev/fdset/")) for p in paths if p != "/usr/share/qemu/qboot.rom")


def test_launch_argv_exact() -> None:
    assert launch_argv(["qemu-system-x86_64", "-name", "sbx-q"], userns_fd=7, uid=1000, gid=1000, groups=[36]) == [
        sys.executable, "-I", "-S", str(LAUNCHER), "7", "1000", "1000", "36", "--", "qemu-system-x86_64", "-name",
        "sbx-q",
    ]  # fmt: skip
    assert launch_argv(["q"], userns_fd=3, uid=1001, gid=1002)[4:9] == ["3", "1001", "1002", "", "--"]


def test_qemu_argv_with_qboot_firmware() -> None:
    common = dict(name="q", accelerator="tcg", cpus=1, memory_mib=512, fds=FDS, mac="02:00:00:00:00:01", cmdline="x")
    plain = qemu_argv(**common)  # type: ignore[arg-type]
    with_fw = qemu_argv(**common, firmware=Path("/usr/share/qemu/qboot.rom"))  # type: ignore[arg-type]
    at = plain.index("-no-reboot") + 3
    assert with_fw == [*plain[:at], "-bios", "/usr/share/qemu/qboot.rom", *plain[at:]]


def test_qemu_argv_kvm_uses_the_host_cpu() -> None:
    argv = qemu_argv(name="k", accelerator="kvm", cpus=8, memory_mib=4096, fds=FDS, mac="02:00:00:00:00:01",
                     cmdline="x")
    assert argv[argv.index("-accel") + 1] == "kvm" and argv[argv.index("-cpu") + 1] == "host"
    assert argv[argv.index("-smp") + 1] == "8" and argv[argv.index("-m") + 1] == "4096"


def test_qemu_argv_refuses_commas_in_paths() -> None:
    with pytest.raises(InvalidSpec, match="SANDBOX_MCP_IMAGE_DIR"):
        qemu_argv(name="k", accelerator="tcg", cpus=1, memory_mib=512, fds=FDS, mac="02:00:00:00:00:01",
                  cmdline="x", firmware=Path("/fw,evil=on/qboot.rom"))


def test_vm_uids_are_one_range_of_their_own() -> None:
    assert allocate_vm_uid([]) == VM_UID_BASE
    assert allocate_vm_uid([VM_UID_BASE, VM_UID_BASE + 2]) == VM_UID_BASE + 1
    # Above every container range, below the image build's, below 2^31.
    assert LAST_UID_BASE + UID_RANGE <= VM_UID_BASE and VM_UID_BASE + UID_RANGE <= BUILD_UID_BASE < 2**31
    with pytest.raises(Conflict, match="destroy unused VM workspaces"):
        allocate_vm_uid(range(VM_UID_BASE, VM_UID_BASE + UID_RANGE))


def test_assign_gives_each_vm_its_own_uid(tmp_path: Path) -> None:
    from sandbox_mcp.runtimes import RuntimeContext

    s = Settings(state_dir=tmp_path, image_dir=tmp_path / "img", hosts_file="")
    rt = QemuRuntime(RuntimeContext.for_settings(s, "ssh-ed25519 AAAA test"))

    def rec(name: str) -> WorkspaceRecord:
        return WorkspaceRecord(name=name, type="vm", runtime="qemu", ip="192.168.83.10", mac="02:00:00:00:00:01",
                               cid=100, user="agent")

    a = rt.assign(rec("a"), [])
    b = rt.assign(rec("b"), [a])
    c = rt.assign(rec("c"), [a, b])
    uids = [rt.state(r).uid for r in (a, b, c)]
    assert len(set(uids)) == 3 and all(VM_UID_BASE <= u < VM_UID_BASE + UID_RANGE for u in uids)  # type: ignore
    assert a.isolation == "microvm"


def test_share_maps(tmp_path: Path) -> None:
    d = tmp_path / "ws"
    d.mkdir()
    q = VM_UID_BASE + 3
    if os.geteuid() == 0:
        os.chown(d, 1000, 1001)
        assert _share_maps(d, q, readonly=False) == ([(1000, q, 1)], [(1001, q, 1)])
        os.chown(d, 0, 0)
        with pytest.raises(BackendError, match="belongs to root"):
            _share_maps(d, q, readonly=False)
    assert _share_maps(d, q, readonly=True) == ([(0, q, 1)], [(0, q, 1)])  # root's keys, read-only
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(BackendError, match="not a directory"):
        _share_maps(tmp_path / "link", q, readonly=True)


def test_kvm_groups(tmp_path: Path) -> None:
    dev = tmp_path / "kvm"
    assert kvm_groups(dev) is None  # missing
    dev.touch()
    for mode, gid, want in ((0o666, 0, []), (0o660, 0, None), (0o600, 0, None), (0o660, 36, [36])):
        dev.chmod(mode)
        if gid and os.geteuid() == 0:
            os.chown(dev, 0, gid)
        elif gid:
            continue
        assert kvm_groups(dev) == want, oct(mode)


def test_kernel_cmdline_and_overlay() -> None:
    assert kernel_cmdline(name="ws1", ip="192.168.83.10", prefixlen=24, gateway="192.168.83.1").split() == [
        "console=ttyS0", "root=/dev/vda", "rw", "rootfstype=ext4", "panic=-1", "quiet",
        "systemd.show_status=1", "mitigations=off",
        "cryptomgr.notests", "net.ifnames=0", "fsck.mode=skip", "systemd.hostname=ws1", "sandbox_mcp.net=192.168.83.10/24,192.168.83.1",
    ]  # fmt: skip
    # The tasks limit: the guest kernel's threads-max, set before its init runs.
    assert kernel_cmdline(name="ws1", ip="192.168.83.10", prefixlen=24, gateway="192.168.83.1",
                          tasks=4096).split()[-1] == "sysctl.kernel.threads-max=4096"
    assert overlay_argv(Path("/img/root.raw"), Path("/st/o.qcow2")) == [
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/img/root.raw", "/st/o.qcow2",
    ]  # fmt: skip


def test_guest_fstab_and_mkfs() -> None:
    assert fstab("agent").splitlines()[1:] == [
        "workspace /home/agent/workspace 9p trans=virtio,version=9p2000.L,msize=262144 0 0",
        "claude-config /home/agent/claude-config 9p trans=virtio,version=9p2000.L,msize=262144 0 0",
        "ssh-host-keys /etc/ssh-host-keys 9p trans=virtio,version=9p2000.L,msize=262144,ro 0 0",
        "guest-meta /run/sandbox-mcp 9p trans=virtio,version=9p2000.L,msize=262144,ro 0 0",
    ]
    assert mkfs_argv(Path("/t/tree"), Path("/t/root.raw")) == [
        "mkfs.ext4", "-q", "-F", "-L", "sbx-root", "-i", "65536", "-E", "lazy_itable_init=0,lazy_journal_init=0",
        "-d", "/t/tree", "/t/root.raw",
    ]  # fmt: skip


def test_vm_image_key_follows_its_inputs() -> None:
    a = vm_image_key("bookworm-base-1", 8)
    assert a.startswith("vm-") and a == vm_image_key("bookworm-base-1", 8)
    assert len({a, vm_image_key("bookworm-base-2", 8), vm_image_key("bookworm-base-1", 16)}) == 3
    s = Settings(image_dir=Path("/nonexistent"), debian_suite="bookworm")
    vm = VmImage(s, ImageStore(s.image_dir))
    assert vm.key([]) != vm.key(["jq"])
    assert vm.key([]) == vm_image_key(DebianRoot(s, ImageStore(s.image_dir)).key([]), 8)


def test_extract_vmlinux_finds_the_xz_payload() -> None:
    elf = b"\x7fELF" + os.urandom(4096)
    bzimage = b"MZ" + b"\0" * 500 + b"HdrS" + b"\0" * 100 + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\0" * 64
    assert extract_vmlinux(bzimage) == elf
    assert extract_vmlinux(b"MZ no payload here") is None
    with pytest.raises(BackendError, match="corrupt"):
        extract_vmlinux(b"MZ" + b"\xfd7zXZ\x00" + b"garbage" * 20)


def test_kvm_sign(tmp_path: Path) -> None:
    dev, mods = tmp_path / "kvm", tmp_path / "module"
    mods.mkdir()
    assert kvm_sign(dev, mods).accelerator == "tcg"  # type: ignore[union-attr]
    assert "missing" in kvm_sign(dev, mods).reason  # type: ignore[union-attr]
    dev.touch(mode=0o600)
    sign = kvm_sign(dev, mods)  # only root may open it, and qemu runs unprivileged
    assert sign is not None and sign.accelerator == "tcg" and "only root may open" in sign.reason
    dev.chmod(0o666)
    assert kvm_sign(dev, mods) is None  # qemu may open it: only a test boot can tell
    (mods / "kvm_pvm").mkdir()
    sign = kvm_sign(dev, mods)
    assert sign is not None and sign.accelerator == "tcg" and "PVM" in sign.reason


@pytest.mark.anyio
async def test_choose_accelerator_honours_the_setting(tmp_path: Path) -> None:
    for accel in ("kvm", "tcg"):
        s = Settings(vm_accelerator=accel)  # the old name of [runtimes.qemu] accelerator
        choice = await choose_accelerator(QemuSettings.of(s).accelerator, tmp_path / "no-kernel", tmp_path / "cache.json")
        assert (choice.accelerator, choice.reason) == (accel, SET_BY)
    assert not (tmp_path / "cache.json").exists()


def test_probe_argv_exact() -> None:
    assert probe_argv(Path("/i/vmlinux"), "kvm", Path("/s/probe.console")) == [
        "qemu-system-x86_64", "-accel", "kvm", "-M", "q35", "-cpu", "host", "-smp", "1", "-m", "256",
        "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot", "-kernel", "/i/vmlinux",
        "-append", "console=ttyS0 panic=-1 root=/dev/sbx-none", "-serial", "file:/s/probe.console",
    ]  # fmt: skip


def test_runtime_is_registered_and_declares_itself() -> None:
    cls = runtime_class("qemu")
    assert cls is QemuRuntime
    assert cls.types == frozenset({"vm"}) and cls.modes == frozenset({"direct"}) and cls.host_network
    state = QemuState.model_validate({"image": "vm-x", "process": {"pid": 5, "start_time": 9}, "accelerator": "tcg"})
    assert state.process is not None and state.process.pid == 5


def test_runtime_state_round_trip_and_mark_stopped(tmp_path: Path) -> None:
    from sandbox_mcp.runtimes import RuntimeContext

    s = Settings(state_dir=tmp_path, image_dir=tmp_path / "img", hosts_file="")
    rt = QemuRuntime(RuntimeContext.for_settings(s, "ssh-ed25519 AAAA test"))
    rec = WorkspaceRecord(name="v", type="vm", runtime="qemu", ip="192.168.83.10", mac="02:00:00:00:00:01",
                          cid=100, user="agent")
    rec = rt.with_state(rec, QemuState(image="vm-x", process={"pid": 1, "start_time": 1}, accelerator="tcg"))
    assert json.loads(rec.model_dump_json())["runtime_state"]["accelerator"] == "tcg"
    stopped = rt.mark_stopped(rec)
    assert rt.state(stopped).process is None and rt.state(stopped).image == "vm-x"
    names = {c.name for c in rt.checks()}
    assert {"qemu-system-x86_64", "qemu-img", "VM accelerator", "VM image"} <= names
    assert all(not c.required for c in rt.checks())  # containers work without any of it


def test_validate_refuses_a_vm_without_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sandbox_mcp.runtimes import RuntimeContext

    s = Settings(state_dir=tmp_path, image_dir=tmp_path / "img", hosts_file="")
    rt = QemuRuntime(RuntimeContext.for_settings(s, "ssh-ed25519 AAAA test"))
    rec = WorkspaceRecord(name="v", type="vm", runtime="qemu", ip="192.168.83.10", mac="02:00:00:00:00:01",
                          cid=100, user="agent")
    monkeypatch.setenv("PATH", str(tmp_path))  # a host without qemu: an empty PATH, not a fake qemu
    with pytest.raises(InvalidSpec, match="apt-get install qemu-system-x86 qemu-utils"):
        rt.validate(rec)


def test_a_vm_gets_whole_vcpus_and_its_disk_as_limits(tmp_path: Path) -> None:
    """A fraction of a CPU would be reported but not held (the VM gets ceil(cpus) vCPUs): refused, saying
    what to ask for; the root disk's size is reported as disk_mib."""
    from sandbox_mcp.models import Limits
    from sandbox_mcp.runtimes import RuntimeContext

    s = Settings(state_dir=tmp_path, image_dir=tmp_path / "img", hosts_file="", vm_disk_gib=4)
    rt = QemuRuntime(RuntimeContext.for_settings(s, "ssh-ed25519 AAAA test"))
    rec = WorkspaceRecord(name="v", type="vm", runtime="qemu", ip="192.168.83.10", mac="02:00:00:00:00:01",
                          cid=100, user="agent", limits=Limits(cpus=0.5, memory_mib=1024, tasks=64))
    with pytest.raises(InvalidSpec, match="cpus=1"):
        rt.validate(rec)
    limits = rt.complete_limits(Limits(cpus=2, memory_mib=1024, tasks=64))
    assert (limits.disk_mib, limits.file_size) == (4096, "unlimited")


def test_doctor_says_which_accelerator(tmp_path: Path) -> None:
    from sandbox_mcp.doctor import run_checks

    def accel(**kw: Any) -> str:
        s = Settings(mode="direct", state_dir=tmp_path, image_dir=tmp_path / "img", hosts_file="", **kw)
        [check] = [c for c in run_checks(s) if c.name == "VM accelerator"]
        return check.detail

    assert accel(vm_accelerator="kvm") == f"KVM ({SET_BY})"
    assert accel(runtimes={"qemu": {"accelerator": "kvm"}}) == f"KVM ({SET_BY})"
    assert accel(vm_accelerator="tcg").startswith("VMs run under TCG, software emulation")
    sign = kvm_sign()
    if sign is not None:  # on the project's machines: kvm_pvm, so TCG, and doctor says why
        assert accel().startswith("VMs run under TCG") and sign.reason in accel()


# -- QMP against a real qemu (no guest: machine 'none') --------------------------------------------------


@needs_qemu
@pytest.mark.anyio
async def test_qmp_talks_to_a_real_qemu(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [QEMU, "-M", "none", "-display", "none", "-nodefaults", "-no-user-config", "-S",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        with anyio.fail_after(30):
            while not sock.exists():
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                await anyio.sleep(0.02)
        [status] = await execute(sock, [{"execute": "query-status"}])
        assert status["status"] == "prelaunch" and status["running"] is False
        with pytest.raises(BackendError, match="QMP no-such-command"):
            await execute(sock, [{"execute": "no-such-command"}])
        assert await execute(sock, [CTRL_ALT_DEL, {"execute": "query-status"}]) == [{}, status]
        await execute(sock, [{"execute": "quit"}])
        assert await anyio.to_thread.run_sync(lambda: proc.wait(timeout=60)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    with pytest.raises(BackendError, match="QMP on"):
        await execute(tmp_path / "absent.sock", [{"execute": "query-status"}])


# -- the TAP on a real bridge, in private namespaces -----------------------------------------------------


def _scenario_tap() -> dict[str, Any]:
    from sandbox_mcp.hostnet import HostNetwork

    async def run() -> dict[str, Any]:
        net = HostNetwork(Settings(bridge="sbxq-br", hosts_file=""))
        out: dict[str, Any] = {"made": await net.attach_tap("tapws")}
        links = json.loads(subprocess.run(["ip", "-j", "-d", "link", "show", "vm-tapws"], capture_output=True,
                                          text=True, check=True).stdout)[0]
        out["master"], out["up"] = links.get("master"), "UP" in links["flags"]
        out["kind"] = links.get("linkinfo", {}).get("info_kind")
        out["leftovers"] = await net.tap_leftovers()
        fd = net.open_tap("tapws")  # what qemu inherits: the TAP gets its carrier while it is open
        try:
            flags = json.loads(subprocess.run(["ip", "-j", "link", "show", "vm-tapws"], capture_output=True,
                                              text=True, check=True).stdout)[0]["flags"]
            out["carrier_while_open"] = "NO-CARRIER" not in flags
        finally:
            os.close(fd)
        try:
            net.open_tap("absent")
        except Exception as exc:  # never a new TAP on no bridge
            out["absent"] = (type(exc).__name__, subprocess.run(["ip", "link", "show", "vm-absent"],
                                                                capture_output=True).returncode)
        out["again"] = await net.attach_tap("tapws")  # replaces an earlier run's TAP
        await net.detach_tap("tapws")
        await net.detach_tap("tapws")  # idempotent
        out["after"] = await net.tap_leftovers()
        subprocess.run(["ip", "link", "add", "vm-notap", "type", "bridge"], check=True)
        try:
            await net.detach_tap("notap")
        except Exception as exc:  # a foreign link of that name is not ours
            out["foreign"] = type(exc).__name__
        out["foreign_kept"] = subprocess.run(["ip", "link", "show", "vm-notap"], capture_output=True).returncode == 0

        # Reconcile after a crash: a stopped VM's TAP and boot files go; another server's TAP stays.
        from sandbox_mcp.runtimes import RuntimeContext

        with tempfile.TemporaryDirectory() as state:
            settings = Settings(bridge="sbxq-br", hosts_file="", state_dir=Path(state), image_dir=Path(state) / "i")
            rt = QemuRuntime(RuntimeContext(settings, net, ImageStore(settings.image_dir), "key"))
            runtime_dir = WorkspacePaths.of(settings.state_dir, "crashed").runtime
            runtime_dir.mkdir(parents=True)
            (runtime_dir / "root.qcow2").write_bytes(b"x")
            (runtime_dir / "console.log").write_bytes(b"kept for workspace_logs")
            await net.attach_tap("crashed")
            await net.attach_tap("foreign")
            dead = WorkspaceRecord(name="crashed", type="vm", runtime="qemu", ip="192.168.83.10",
                                   mac="02:00:00:00:00:01", cid=100, user="agent", state="running",
                                   runtime_state={"process": {"pid": os.getpid(), "start_time": 1}})
            await rt.reconcile([dead])
            out["after_reconcile"] = await net.tap_leftovers()
            out["runtime_files"] = sorted(p.name for p in runtime_dir.iterdir())
            await net.detach_tap("foreign")
        return out

    return anyio.run(run)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates a bridge and a TAP")
def test_tap_on_the_bridge() -> None:
    from .test_net import isolated

    r = isolated(_scenario_tap)
    assert r["made"] == r["again"] == "vm-tapws"
    assert (r["master"], r["up"], r["kind"]) == ("sbxq-br", True, "tun")
    assert r["leftovers"] == ["tapws"] and r["after"] == []
    assert r["carrier_while_open"] and r["absent"] == ("BackendError", 1)
    assert r["foreign"] == "Conflict" and r["foreign_kept"]
    assert r["after_reconcile"] == ["foreign"] and r["runtime_files"] == ["console.log"]


# -- a real probe boot (TCG: the kernel runs, panics at the missing root, qemu exits) --------------------


def _vm_image() -> VmArtefacts | None:
    image_dir = Path(os.environ.get("SANDBOX_MCP_IMAGE_DIR", "/var/cache/sandbox-mcp/images"))
    s = Settings(image_dir=image_dir)
    vm = VmImage(s, ImageStore(image_dir))
    key = vm.key([])
    return vm.artefacts(key) if vm.exists(key) else None


@pytest.mark.vm
@needs_qemu
@pytest.mark.anyio
async def test_probe_boot_runs_the_kernel_to_its_root_mount(tmp_path: Path) -> None:
    image = _vm_image()
    if image is None:
        pytest.skip("the VM image is not cached; ./scripts/test builds it (sandbox-mcp image build --vm)")
    console = tmp_path / "probe.console"
    # Bounded only so a broken qemu cannot hang the suite; a healthy boot ends by itself.
    assert await probe_boot(image.kernel, "tcg", console, timeout_s=600)
    assert "Linux version" in console.read_text(errors="replace")
    assert not await probe_boot(tmp_path / "no-such-kernel", "tcg", tmp_path / "c2", timeout_s=600)



@pytest.mark.anyio
async def test_start_refuses_a_vm_without_its_own_uid(tmp_path: Path) -> None:
    """A VM registered before qemu ran unprivileged has no uid: it is not assigned, and the runtime
    alone refuses to start it (the manager assigns one first: test_qemu_e2e), before touching the
    network or the image."""
    from sandbox_mcp.runtimes import RuntimeContext

    s = Settings(state_dir=tmp_path, image_dir=tmp_path / "img", hosts_file="")
    rt = QemuRuntime(RuntimeContext.for_settings(s, "ssh-ed25519 AAAA test"))
    rec = WorkspaceRecord(name="old", type="vm", runtime="qemu", ip="192.168.83.10", mac="02:00:00:00:00:01",
                          cid=100, user="agent", runtime_state={"image": "vm-x"})
    assert not rt.assigned(rec)
    assert rt.assigned(rt.assign(rec, []))
    with pytest.raises(BackendError, match="no uid of its own.*assigns one"):
        await rt.start(rec, no_progress)
    assert not (tmp_path / "old").exists()


def _launched_status(groups: list[int]) -> dict[str, str]:
    """/proc/PID/status (host view) of `sleep` started through runtimes/qemu/launch.py as qemu would be."""
    from sandbox_mcp import idmap, supervise

    q = VM_UID_BASE + UID_RANGE - 1  # the last VM uid: no VM of a test run has it
    userns = idmap.userns_with_map([(1000, q, 1)], [(1000, q, 1), *((g, g, 1) for g in groups)])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            ref = supervise.spawn(launch_argv(["sleep", "600"], userns_fd=userns, uid=1000, gid=1000, groups=groups),
                                  Path(tmp) / "log", pass_fds=[userns])
        finally:
            os.close(userns)
        try:
            while Path(f"/proc/{ref.pid}/comm").read_text().strip() != "sleep":  # wait for the exec
                assert supervise.alive(ref), (Path(tmp) / "log").read_text()
                os.sched_yield()
            text = Path(f"/proc/{ref.pid}/status").read_text()
        finally:
            anyio.run(supervise.kill, ref)
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes a user namespace with a map")
def test_launcher_drops_to_the_vm_uid_without_capabilities() -> None:
    """runtimes/qemu/launch.py for real, with `sleep` in qemu's place: seen from the host, the process is the VM's
    uid and gid only (plus /dev/kvm's group when asked), with no capability in any set and no_new_privs."""
    q = str(VM_UID_BASE + UID_RANGE - 1)
    status = _launched_status([])
    assert status["Uid"].split() == status["Gid"].split() == [q] * 4
    assert status["Groups"] == ""
    caps = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
    assert {k: int(status[k], 16) for k in caps} == dict.fromkeys(caps, 0)
    assert status["NoNewPrivs"] == "1"
    with_kvm = _launched_status([36])  # a kvm group, as kvm_groups() finds it for a 0660 /dev/kvm
    assert with_kvm["Groups"] == "36" and with_kvm["Gid"].split() == [q] * 4
    bad = subprocess.run(launch_argv(["sleep", "1"], userns_fd=99, uid=1000, gid=1000), capture_output=True, text=True)
    assert bad.returncode == 111 and "setns" in bad.stderr
