"""VM memory snapshots, the parts that run without a VM: the qemu command with ``-incoming``, the guest
helper's command and replies, and the helper itself run for real on the host in a private mount
namespace (a tmpfs standing in for a 9p share): it refuses while a process holds the share, names
it and leaves the share mounted; otherwise it unmounts, and its waiter answers the server's token
over UDP (loopback). The whole flow in a guest: tests/test_snapshots_vm_e2e.py."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from sandbox_mcp.errors import BackendError, InvalidState
from sandbox_mcp.runtimes.qemu import memory, qemu_argv

from .test_qemu import FDS

pytestmark = pytest.mark.anyio


def test_qemu_argv_resumes_from_an_inherited_state_fd() -> None:
    common = dict(name="q", accelerator="tcg", cpus=1, memory_mib=512, mac="02:00:00:00:00:01", cmdline="x")
    plain = qemu_argv(fds=FDS, **common)  # type: ignore[arg-type]
    incoming = qemu_argv(fds=FDS.__class__(**{**FDS.__dict__, "incoming": 30}), **common)  # type: ignore[arg-type]
    assert incoming == [*plain, "-incoming", "fd:30"]


def test_helper_command_runs_the_helper_as_root_with_its_arguments() -> None:
    ticket = memory.MemoryTicket(port=45001, token="ab" * 16)
    argv = shlex.split(memory.helper_command(ticket, ["/etc/ssh-host-keys", "/home/u/workspace"]))
    assert argv == ["sudo", "-n", "/usr/bin/python3", "-I", "-c", memory.GUEST_HELPER, "45001", "ab" * 16,
                    str(int(memory.WAITER_TIMEOUT_S)), "/etc/ssh-host-keys", "/home/u/workspace"]
    compile(memory.GUEST_HELPER, "helper", "exec")
    t1, t2 = memory.new_ticket("tcg"), memory.new_ticket("tcg")
    assert t1.token != t2.token and 40000 <= t1.port < 60000


def test_helper_replies() -> None:
    assert memory.parse_helper_reply("w", 0, '{"unmounted": ["/a", "/b"]}\n', "") == ["/a", "/b"]
    busy = json.dumps({"busy": [{"pid": 42, "comm": "node", "path": "/home/u/workspace/app.log"}]})
    with pytest.raises(InvalidState) as refused:
        memory.parse_helper_reply("w", 3, busy, "")
    assert "pid 42 (node: /home/u/workspace/app.log)" in str(refused.value) and "memory=false" in str(refused.value)
    with pytest.raises(BackendError, match="sudo -n"):
        memory.parse_helper_reply("w", 1, "", "sudo: a password is required")


needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                reason="mounting a stand-in share needs root and unshare")


def _in_private_mounts(script: str, share: Path, *args: str) -> subprocess.Popen[str]:
    """``script`` (sh) in a private mount namespace with a tmpfs on ``share``; HELPER holds the helper."""
    env = {**os.environ, "HELPER": memory.GUEST_HELPER, "PY": sys.executable}
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs sbx-share {shlex.quote(str(share))} && {script}", "sh", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@needs_root
def test_helper_refuses_while_a_process_holds_the_share(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    script = ('cd "$1" && sleep 30 & holder=$!; sleep 0.3; cd /; "$PY" -I -c "$HELPER" 45002 tok 5 "$1"; echo "rc=$?"; '
              'mountpoint -q "$1" && echo still-mounted; kill $holder')
    proc = _in_private_mounts(script, share, str(share))
    out, err = proc.communicate(timeout=60)
    lines = out.splitlines()
    assert lines[-2:] == ["rc=3", "still-mounted"], (out, err)
    with pytest.raises(InvalidState) as refused:
        memory.parse_helper_reply("w", 3, lines[0], "")
    assert "(sleep: " + str(share) in str(refused.value)


@needs_root
async def test_helper_unmounts_and_its_waiter_answers_the_token(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    ticket = memory.new_ticket(None)
    # The waiter remounts through /etc/fstab, where this stand-in is not: its mount fails, its answer comes.
    script = (f'"$PY" -I -c "$HELPER" {ticket.port} {ticket.token} 30 "$1"; echo "rc=$?"; '
              'mountpoint -q "$1" || echo unmounted')
    proc = _in_private_mounts(script, share, str(share))
    try:
        out = await anyio.to_thread.run_sync(lambda: proc.stdout.readline() + proc.stdout.readline()  # type: ignore[union-attr]
                                             + proc.stdout.readline())  # type: ignore[union-attr]
        assert memory.parse_helper_reply("w", 0, out.splitlines()[0], "") == [str(share)]
        assert out.splitlines()[1:] == ["rc=0", "unmounted"], out
        with anyio.fail_after(30):
            await memory.remount("127.0.0.1", ticket, timeout_s=20)
    finally:
        proc.kill()
        proc.communicate()
    wrong = ticket.model_copy(update={"token": "0" * 32})
    with pytest.raises(BackendError, match="did not mount its shares"):
        await memory.remount("127.0.0.1", wrong, timeout_s=1)
