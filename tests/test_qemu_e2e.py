"""End to end: the MCP client drives a real qemu VM (``type="vm"``) booted here, under TCG on hosts
whose KVM cannot boot a guest (the accelerator probe decides).

One VM, two boots (create, then a restart), to keep CI time bounded: the whole lifecycle, the
escapes root in the VM tries (a setuid-root program and a device node in the host's workspace
dir; qemu itself must be an unprivileged uid without capabilities), a clean root after the
restart with the workspace dir kept, a timeout that kills the remote command, an orderly stop,
and nothing of the VM left on the host after destroy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client

from sandbox_mcp import supervise
from sandbox_mcp.config import Settings
from sandbox_mcp.images import ImageStore
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.naming import tap_name
from sandbox_mcp.runtimes.qemu.image import VmImage
from sandbox_mcp.server import build_server

from .conftest import destroy_all
from .processes_flow import web_server_flow
from .test_e2e import Session
from .test_egress_domains import world  # noqa: F401 - the stand-in internet, a fixture

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.vm]


@pytest.fixture
def vm_settings(settings: Settings) -> Settings:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("qemu-img") is None:
        pytest.skip("qemu is not installed (apt-get install qemu-system-x86 qemu-utils)")
    vm = VmImage(settings, ImageStore(settings.image_dir))
    if not vm.exists(vm.key([])):
        pytest.skip("the VM image is not cached; ./scripts/test builds it (sandbox-mcp image build --vm)")
    # A slow emulated boot on a busy machine must not fail the test; the bound only stops a hang.
    # NAT and the stand-in internet's DNS (tests/test_egress_domains.py's world) for the egress-by-domain check.
    return settings.model_copy(update={"boot_timeout_s": 600, "stop_timeout_s": 120, "nat": True,
                                       "egress_dns_upstreams": ["203.0.113.53"]})


@pytest.fixture
async def vm_session(vm_settings: Settings):  # type: ignore[no-untyped-def]
    server = build_server(vm_settings)
    try:
        async with Client(server) as client:
            yield Session(client)
    finally:
        async with WorkspaceManager(vm_settings) as m:
            await destroy_all(m)


def vm_leftovers(name: str, settings: Settings) -> dict[str, Any]:
    """What of VM ``name`` exists on the host: its processes (qemu, the console copier), its TAP, its runtime files."""
    links = subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout
    # By the workspace's tag, not by name: another test run on the host may have a VM of the same name.
    procs = [str(ref.pid) for ref in supervise.tagged(supervise.workspace_tag(settings.state_dir, name))]
    runtime = settings.state_dir / name / "runtime"
    return {
        "tap": tap_name(name) in {link["ifname"] for link in json.loads(links)},
        "processes": procs,
        "boot_files": sorted(p.name for p in (runtime.iterdir() if runtime.is_dir() else [])
                             if p.name in ("root.qcow2", "qmp.sock")),
    }


NOTHING_LEFT = {"tap": False, "processes": [], "boot_files": []}


def _proc_status(pid: int) -> dict[str, list[str]]:
    """/proc/PID/status as ``{"Uid": [real, effective, saved, fs], "CapEff": [hex], ...}``."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: rest.split() for key, _, rest in (line.partition(":") for line in lines)}


@pytest.mark.usefixtures("world")
async def test_vm_lifecycle(vm_session: Session, vm_settings: Settings) -> None:
    s, settings, user = vm_session, vm_settings, vm_settings.user

    ws = await s.call("create_workspace", name="vm1", type="vm")
    assert (ws["type"], ws["state"]) == ("vm", "running")
    assert ws["ssh"]["host_key_fingerprint"].startswith("SHA256:")
    assert f"{ws['ip']}\tworkspace-vm1" in settings.hosts_file.read_text()  # type: ignore[union-attr]

    logs = await s.call("workspace_logs", name="vm1", lines=200)
    assert "OpenBSD Secure Shell server" in logs["log"], logs["log"]  # the units' progress on the console

    status = await s.call("workspace_status", name="vm1")
    rt = status["runtime"]
    assert (rt["runtime"], rt["running"], rt["isolation"]) == ("qemu", True, "microvm")
    assert rt["accelerator"] in ("kvm", "tcg") and rt["pid"]
    if Path("/sys/module/kvm_pvm").exists() or not Path("/dev/kvm").exists():
        assert rt["accelerator"] == "tcg"

    # Its own kernel, the user, the name, the workspace dir as cwd, passwordless sudo.
    r = await s.call("exec", name="vm1", command="id -un; hostname; pwd; sudo -n id -u; uname -r")
    assert r["exit_code"] == 0, r
    out = r["stdout"].split()
    assert out[:4] == [user, "vm1", f"/home/{user}/workspace", "0"]
    assert out[4] != os.uname().release

    # Files persist on the host, owned by the workspace user's uid, as with containers.
    await s.call("write_file", name="vm1", path="notes/hello.txt", content="héllo\n")
    host_file = Path(ws["host_workspace_dir"]) / "notes" / "hello.txt"
    assert host_file.read_text() == "héllo\n"
    assert (host_file.stat().st_uid, host_file.stat().st_gid) == (settings.user_uid, settings.user_uid)
    host_file.with_name("from-host.txt").write_text("host side\n")
    got = await s.call("read_file", name="vm1", path="notes/from-host.txt")
    assert got["content"] == "host side\n"

    # The host keys are read-only, even for root inside; the Claude config is writable and seeded.
    r = await s.call("exec", name="vm1", command="sudo touch /etc/ssh-host-keys/x; echo $?; "
                     "touch \"$CLAUDE_CONFIG_DIR/probe\" && echo writable")
    assert r["stdout"].split() == ["1", "writable"], r
    assert not (settings.state_dir / "vm1" / "ssh-host-keys" / "x").exists()
    assert (settings.state_dir / "vm1" / "claude-config" / "probe").exists()

    # Escapes through the shares and through qemu (containers: test_escapes.py). Root in the VM tries to
    # leave a setuid-root program and a device node in the host's workspace dir; qemu itself must be an
    # unprivileged uid of its own without capabilities, so an escape from qemu is not root on the host.
    r = await s.call("exec", name="vm1", command="sudo install -o root -g root -m 4755 /bin/true suid-true; "
                     "sudo mknod cdev c 1 3; ls -ln suid-true cdev")
    host_dir = Path(ws["host_workspace_dir"])
    planted = host_dir.joinpath("suid-true").lstat()
    cdev = host_dir / "cdev"
    proc = _proc_status(rt["pid"])
    escapes = {
        "setuid-root file": planted.st_uid == 0 and bool(planted.st_mode & stat.S_ISUID),
        "root-owned file": planted.st_uid == 0 or planted.st_gid == 0,
        "device node": cdev.exists() and (stat.S_ISCHR(cdev.lstat().st_mode) or stat.S_ISBLK(cdev.lstat().st_mode)),
        "qemu runs as root": "0" in proc["Uid"] or "0" in proc["Gid"],
        "qemu has capabilities": int(proc["CapEff"][0], 16) != 0 or int(proc["CapPrm"][0], 16) != 0,
    }
    assert escapes == dict.fromkeys(escapes, False), (escapes, r)
    # What root leaves is the host user's, as the agent's files are; qemu's uid is the VM's own.
    assert (planted.st_uid, planted.st_gid) == (settings.user_uid, settings.user_uid)
    vm_uid = json.loads(settings.registry_path.read_text())["workspaces"]["vm1"]["runtime_state"]["uid"]
    assert set(proc["Uid"]) == set(proc["Gid"]) == {str(vm_uid)} and vm_uid not in (0, settings.user_uid)
    assert proc["NoNewPrivs"] == ["1"] and int(proc["CapBnd"][0], 16) == 0

    # The same network policy as a container's: no host service is reachable from inside.
    with socket.create_server((str(settings.host_ip), 0)) as service:
        port = service.getsockname()[1]
        r = await s.call("exec", name="vm1", command=f"timeout 4 bash -c '</dev/tcp/{settings.host_ip}/{port}' "
                         "&& echo open || echo closed")
        service.setblocking(False)
        with pytest.raises(BlockingIOError):
            service.accept()
    assert r["stdout"] == "closed\n", r

    # Egress by domain, set on the running VM: its DNS goes to the egress resolver whatever its resolv.conf
    # names (the firewall redirects it), and only what a listed name resolved to connects.
    await s.call("set_egress", name="vm1", egress=["*.allowed.test"])
    r = await s.call("exec", name="vm1", command="getent ahostsv4 api.allowed.test | awk 'NR==1{print $1}'; "
                     "curl -s --max-time 30 http://api.allowed.test/; echo; "
                     "getent ahostsv4 web.other.test || echo unresolved; "
                     "curl -s --max-time 3 http://203.0.113.11/ || echo failed")
    assert r["stdout"].splitlines() == ["203.0.113.10", "hello from 203.0.113.10", "unresolved", "failed"], r
    assert (await s.call("set_egress", name="vm1", egress="none"))["egress"] == "none"
    r = await s.call("exec", name="vm1", command="curl -s --max-time 3 http://203.0.113.10/ || echo failed")
    assert r["stdout"] == "failed\n", r

    # A timeout kills the remote command, not only the wait.
    r = await s.call("exec", name="vm1", command="echo started; exec sleep 3600", timeout_s=3)
    assert r["timed_out"] is True and r["stdout"] == "started\n"
    r = await s.call("exec", name="vm1", command="pgrep -x sleep; echo $?")
    assert r["stdout"].split()[-1] == "1", r

    # A restart gives a fresh root while the workspace dir persists.
    await s.call("exec", name="vm1", command="sudo touch /etc/dirty && touch keep.txt")
    stopped = await s.call("stop_workspace", name="vm1")
    assert stopped["state"] == "stopped"
    assert vm_leftovers("vm1", settings) == NOTHING_LEFT
    logs = await s.call("workspace_logs", name="vm1", lines=50)
    assert "Power down" in logs["log"], logs["log"]  # the guest shut down in order, not killed
    # As a VM registered before qemu ran unprivileged: no uid of its own. Start assigns one.
    registry = json.loads(settings.registry_path.read_text())
    del registry["workspaces"]["vm1"]["runtime_state"]["uid"]
    settings.registry_path.write_text(json.dumps(registry))
    started = await s.call("start_workspace", name="vm1")
    assert started["state"] == "running"
    new_uid = json.loads(settings.registry_path.read_text())["workspaces"]["vm1"]["runtime_state"]["uid"]
    status = await s.call("workspace_status", name="vm1")
    assert set(_proc_status(status["runtime"]["pid"])["Uid"]) == {str(new_uid)} and new_uid not in (0, settings.user_uid)
    r = await s.call("exec", name="vm1", command="test -e /etc/dirty; echo $?; ls keep.txt")
    assert r["stdout"] == "1\nkeep.txt\n"

    done = await s.call("destroy_workspace", name="vm1")
    assert done == {"name": "vm1", "destroyed": True, "kept_data": False}
    assert vm_leftovers("vm1", settings) == NOTHING_LEFT
    assert not (settings.state_dir / "vm1").exists()
    assert "workspace-vm1" not in settings.hosts_file.read_text()  # type: ignore[union-attr]
    assert (await s.call("list_workspaces"))["workspaces"] == []


async def test_vm_processes_and_ports(vm_settings: Settings) -> None:
    """The web-server story (tests/processes_flow.py) in a VM; each session is a new server on the same state."""

    @contextlib.asynccontextmanager
    async def session() -> AsyncIterator[Session]:
        async with Client(build_server(vm_settings)) as client:
            yield Session(client)

    async def restart() -> None:
        """Nothing more: the next session's server is a new one, which finds the process and the port again."""

    try:
        await web_server_flow(session, restart, "vmweb", "vm")
    finally:
        async with WorkspaceManager(vm_settings) as m:
            await destroy_all(m)
