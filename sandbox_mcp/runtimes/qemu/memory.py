"""VM memory snapshots: save a running guest to a file and resume it from there later.

qemu saves a VM by migrating it, here to a file the server opens and hands over (QMP ``getfd``, then
``migrate fd:``); a restore starts qemu with the same devices and ``-incoming fd:N`` on that file.
virtio-9p refuses to migrate while the guest has a share mounted (qemu 7.2 adds a migration blocker
at the 9p attach and drops it when the root fid is clunked, i.e. at the unmount), and virtiofs
(vhost-user-fs) cannot migrate at all. So the guest unmounts its four shares for the save:

1. :data:`GUEST_HELPER` runs in the guest as root (``sudo -n``) with ``cwd=/``: it lists the processes
   that hold a file under a share (cwd, root, exe, open fds, mapped files) and refuses with them, then
   binds a UDP port, unmounts the shares, forks a waiter into a session of its own and answers
   ``{"unmounted": [...]}``;
2. the server pauses the VM, migrates it to the snapshot's ``memory.state`` and copies its disk layer;
3. it resumes the VM and sends the waiter a datagram holding a random token (and the host's clock):
   the waiter remounts the shares from ``/etc/fstab`` (host keys first, so SSH logs in again), sets
   the guest's clock when it is behind, and answers with the token. Repeated until answered.

A restored guest wakes inside step 2, its waiter still waiting: the restore sends the same datagram
(the token is in the snapshot's ``memory.json``), so the shares of the new qemu are mounted before
SSH is tried. A waiter never answered (a server killed mid-snapshot) remounts by itself after
:data:`WAITER_TIMEOUT_S` of guest time, which stands still while the VM is stopped.

The port and the token are fresh per snapshot; the datagram comes from the host's root (the only
one the host firewall lets reach a workspace besides its owner).
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel

from ...errors import BackendError, InvalidState
from . import qmp

__all__ = [
    "GUEST_HELPER",
    "MemoryTicket",
    "STATE_FILE",
    "TICKET_FILE",
    "WAITER_TIMEOUT_S",
    "helper_command",
    "migrate_to_fd",
    "new_ticket",
    "parse_helper_reply",
    "remount",
    "wait_incoming",
]

# In the snapshot's root part (beside root.qcow2), and in the workspace's root layer after a restore
# until the start that resumes from it has used them.
STATE_FILE = "memory.state"
TICKET_FILE = "memory.json"
# A waiter nobody wakes remounts the shares by itself after this much guest time.
WAITER_TIMEOUT_S = 300.0
_PORT_RANGE = (40000, 60000)
_MIGRATE_TIMEOUT_S = 1800.0

GUEST_HELPER = r'''
import json, os, socket, subprocess, sys, time
port, token, timeout = int(sys.argv[1]), sys.argv[2].encode(), float(sys.argv[3])
mounts = sys.argv[4:]
os.chdir("/")
me = {os.getpid(), os.getppid()}

def under(path):
    return any(path == m or path.startswith(m + "/") for m in mounts)

def holders():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        if int(pid) in me:
            continue
        paths = []
        for link in ("cwd", "root", "exe"):
            try:
                paths.append(os.readlink(f"/proc/{pid}/{link}"))
            except OSError:
                pass
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    paths.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
                except OSError:
                    pass
            with open(f"/proc/{pid}/maps") as f:
                paths += [line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6]
        except OSError:
            pass
        hit = next((p for p in paths if under(p)), None)
        if hit:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found.append({"pid": int(pid), "comm": comm, "path": hit})
    return found

busy = holders()
if busy:
    print(json.dumps({"busy": busy}))
    sys.exit(3)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("0.0.0.0", port))
done = []
for m in reversed(mounts):
    r = subprocess.run(["umount", m], capture_output=True, text=True)
    if r.returncode != 0:
        for d in reversed(done):
            subprocess.run(["mount", d])
        print(json.dumps({"busy": holders(), "error": r.stderr.strip()}))
        sys.exit(3)
    done.append(m)
sys.stdout.flush()
if os.fork():
    print(json.dumps({"unmounted": done}))
    sys.exit(0)
os.setsid()
null = os.open("/dev/null", os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
deadline = time.monotonic() + timeout
mounted = False
while True:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    sock.settimeout(left)
    try:
        data, peer = sock.recvfrom(256)
    except socket.timeout:
        break
    word, _, clock = data.partition(b" ")
    if word != token:
        continue
    if not mounted:
        for m in mounts:
            subprocess.run(["mount", m])
        mounted = True
        try:
            t = float(clock)
            if t > time.time() + 1:
                time.clock_settime(time.CLOCK_REALTIME, t)
        except (ValueError, OSError):
            pass
        deadline = time.monotonic() + 5  # answer retries a little longer, then go
    sock.sendto(b"mounted " + token, peer)
if not mounted:
    for m in mounts:
        subprocess.run(["mount", m])
'''


class MemoryTicket(BaseModel):
    """What wakes one snapshot's waiter in the guest: its UDP port and token (kept in ``memory.json``)."""

    port: int
    token: str
    accelerator: str | None = None


def new_ticket(accelerator: str | None) -> MemoryTicket:
    """A fresh port and token for one memory snapshot."""
    low, high = _PORT_RANGE
    return MemoryTicket(port=low + secrets.randbelow(high - low), token=secrets.token_hex(16),
                        accelerator=accelerator)


def helper_command(ticket: MemoryTicket, mounts: list[str]) -> str:
    """The guest command (as the workspace user, cwd ``/``) that unmounts ``mounts`` (in mount order) and
    leaves a waiter for ``ticket``."""
    return shlex.join(["sudo", "-n", "/usr/bin/python3", "-I", "-c", GUEST_HELPER, str(ticket.port), ticket.token,
                       str(int(WAITER_TIMEOUT_S)), *mounts])


def parse_helper_reply(name: str, exit_code: int | None, stdout: str, stderr: str) -> list[str]:
    """The shares the helper unmounted, from its output.

    Raises:
        InvalidState: processes hold files under a share (named, with what they hold).
        BackendError: the helper failed otherwise (no sudo, no python3 in the guest).
    """
    reply: dict[str, Any] = {}
    for line in reversed(stdout.splitlines()):
        try:
            reply = json.loads(line)
            break
        except ValueError:
            continue
    if exit_code == 0 and "unmounted" in reply:
        return list(reply["unmounted"])
    if "busy" in reply:
        held = ", ".join(f"pid {b['pid']} ({b['comm']}: {b['path']})" for b in reply["busy"][:8]) or reply.get(
            "error", "?")
        raise InvalidState(
            f"workspace {name!r} cannot take a memory snapshot now: the VM shares its workspace dir over 9p, "
            f"which qemu saves only unmounted, and these processes hold files there: {held}. End them, or start "
            "long-running processes from outside the shared dirs (e.g. cd /tmp first), or take a disk "
            "snapshot (memory=false)"
        )
    raise BackendError(
        f"workspace {name!r}: readying the guest for a memory snapshot failed (exit {exit_code}): "
        f"{(stderr or stdout).strip()[-500:]}; it needs root through 'sudo -n' and /usr/bin/python3 in the guest"
    )


async def migrate_to_fd(qmp_socket: Path, fd: int, timeout_s: float = _MIGRATE_TIMEOUT_S) -> None:
    """Save the (paused) VM's whole state into ``fd`` (a file open for writing): QMP migrate, then poll.

    Raises:
        BackendError: qemu refused (e.g. a migration blocker: a 9p share still mounted) or failed.
    """
    await qmp.execute(qmp_socket, [
        {"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1 << 40}},
        {"execute": "getfd", "arguments": {"fdname": "snapshot"}},
        {"execute": "migrate", "arguments": {"uri": "fd:snapshot"}},
    ], timeout_s=30, fds={1: [fd]})
    with anyio.move_on_after(timeout_s):
        while True:
            (answer,) = await qmp.execute(qmp_socket, [{"execute": "query-migrate"}], timeout_s=30)
            status = (answer or {}).get("status")
            if status == "completed":
                return
            if status in ("failed", "cancelled"):
                raise BackendError(f"saving the VM's memory failed: {answer.get('error-desc', status)}")
            await anyio.sleep(0.1)
    raise BackendError(f"saving the VM's memory took over {timeout_s:.0f} s")


async def wait_incoming(qmp_socket: Path, alive: Callable[[], bool], timeout_s: float = _MIGRATE_TIMEOUT_S) -> None:
    """Wait until a qemu started with ``-incoming`` has loaded its state, and let it run.

    The state was saved from a paused VM, and qemu keeps the source's run state: once loaded, it is
    'paused' until ``cont``.

    Raises:
        BackendError: qemu exited (the state did not fit these devices) or took longer than ``timeout_s``.
    """
    with anyio.move_on_after(timeout_s):
        while True:
            if not alive():
                raise BackendError("qemu exited while loading the VM's saved memory (see workspace_logs)")
            try:
                (answer,) = await qmp.execute(qmp_socket, [{"execute": "query-status"}], timeout_s=10)
            except BackendError:
                answer = None
            status = answer.get("status") if isinstance(answer, dict) else None
            if status == "running":
                return
            if status == "paused":  # loaded (still loading is 'inmigrate')
                await qmp.execute(qmp_socket, [{"execute": "cont"}], timeout_s=30)
                continue
            await anyio.sleep(0.1)
    raise BackendError(f"loading the VM's saved memory took over {timeout_s:.0f} s")


async def remount(ip: str, ticket: MemoryTicket, timeout_s: float = 120.0) -> None:
    """Wake the guest's waiter: it mounts the shares again and answers. Retries until it does.

    Raises:
        BackendError: no answer within ``timeout_s`` (the shares come back by themselves after
            :data:`WAITER_TIMEOUT_S` of guest time).
    """
    # No local_host: anyio would resolve it with AI_ADDRCONFIG, which fails where only loopback has an address.
    async with await anyio.create_udp_socket(family=socket.AF_INET) as sock:
        expected = b"mounted " + ticket.token.encode()
        with anyio.move_on_after(timeout_s):
            while True:
                await sock.sendto(f"{ticket.token} {time.time():.3f}".encode(), ip, ticket.port)
                with anyio.move_on_after(0.5):
                    while True:
                        data, _ = await sock.receive()
                        if data == expected:
                            return
    raise BackendError(
        f"the guest at {ip} did not mount its shares again within {timeout_s:.0f} s; they come back by "
        f"themselves within {WAITER_TIMEOUT_S:.0f} s, else stop_workspace and start_workspace"
    )


def write_ticket(directory: Path, ticket: MemoryTicket) -> None:
    """Keep ``ticket`` beside the saved state. Blocking."""
    fd = os.open(directory / TICKET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(ticket.model_dump_json())


def read_ticket(directory: Path) -> MemoryTicket | None:
    """The ticket of the state saved in ``directory``, or None when it holds no (whole) memory state. Blocking."""
    if not (directory / STATE_FILE).is_file():
        return None
    try:
        return MemoryTicket.model_validate_json((directory / TICKET_FILE).read_bytes())
    except (OSError, ValueError):
        return None


def drop_state(directory: Path) -> None:
    """Remove a saved memory state from ``directory`` (used once, or not wanted: a fork). Blocking."""
    for name in (STATE_FILE, TICKET_FILE):
        (directory / name).unlink(missing_ok=True)
