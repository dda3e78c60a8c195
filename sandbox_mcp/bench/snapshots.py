"""The pause/snapshot/fork section of ``sandbox-mcp bench``: figures against baselines of the same run.

- pause_workspace and resume_workspace p50 through the MCP tools, against ``exec true`` (a tool
  round trip that does nothing);
- snapshot_workspace and restore_workspace of a container whose workspace dir holds N MiB (100 by
  default; ``--snapshot-mib 100,1024``), against ``cp -a`` of the same directory (and ``cp
  --reflink=always`` where the filesystem has clones), on the state dir's own filesystem and, where
  ``mkfs.btrfs`` and loop devices work, on a btrfs loop file (reflinks);
- restore_workspace → first exec against stop + start → first exec (the restart a restore includes);
- fork_workspace → first exec in the fork, against create_workspace → first exec;
- with ``--snapshot-vm``: a VM's (512 MiB, 1 vCPU) memory snapshot and its restore → first exec,
  against a disk snapshot of the same VM and its restore → first exec (a boot).

Runs inside the benchmark's private namespaces (see :mod:`.bench`); every workspace and mount it
makes is removed again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import anyio

from ..config import Settings
from ..manager import WorkspaceManager
from .calls import tool_caller

__all__ = ["format_snapshots", "run_snapshots"]

Figures = dict[str, float | str]


@contextlib.contextmanager
def _btrfs_dir(parent: Path, size_gib: int) -> Iterator[Path | None]:
    """A directory on a fresh btrfs loop file (sparse), or None where this host cannot make one."""
    if not shutil.which("mkfs.btrfs"):
        yield None
        return
    image, mnt = parent / "btrfs.img", parent / "btrfs"
    with open(image, "wb") as f:
        f.truncate(size_gib << 30)
    mnt.mkdir()
    made = subprocess.run(["mkfs.btrfs", "-q", str(image)], capture_output=True).returncode == 0
    if not made or subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True).returncode:
        image.unlink(missing_ok=True)
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        image.unlink(missing_ok=True)


def _fill(directory: Path, mib: int, uid: int) -> None:
    """``mib`` MiB of random data in 1 MiB files (a source tree's worth of files, not one blob)."""
    sub = directory / "data"
    sub.mkdir(exist_ok=True)
    for i in range(mib):
        (sub / f"f{i:05d}").write_bytes(os.urandom(1 << 20))
    for p in [sub, *sub.iterdir()]:
        os.chown(p, uid, uid)


def _timed_cp(args: list[str]) -> float | None:
    t0 = time.monotonic()
    done = subprocess.run(args, capture_output=True)
    return time.monotonic() - t0 if done.returncode == 0 else None


async def _section(settings: Settings, sizes: list[int], label: str) -> dict[str, Figures]:
    from mcp import Client

    from ..server import build_server

    out: dict[str, Figures] = {}
    async with Client(build_server(settings)) as client:

        call = tool_caller(client)

        for mib in sizes:
            name = f"snap{mib}"
            ws = await call("create_workspace", name=name)
            host_dir = Path(ws["host_workspace_dir"])
            await anyio.to_thread.run_sync(_fill, host_dir, mib, settings.user_uid)
            # On disk, as a workspace's files mostly are: a clone of data still in the page cache waits for
            # its writeback, which would be charged to the first copy (ours) and not to the baselines after it.
            await anyio.to_thread.run_sync(os.sync)
            t0 = time.monotonic()
            await call("stop_workspace", name=name)
            await call("start_workspace", name=name)
            await call("exec", name=name, command="true")
            restart_s = time.monotonic() - t0
            t0 = time.monotonic()
            info = await call("snapshot_workspace", name=name, snapshot="s")
            snap_s = time.monotonic() - t0
            await call("exec", name=name, command="echo later > later.txt")
            t0 = time.monotonic()
            await call("restore_workspace", name=name, snapshot="s")
            await call("exec", name=name, command="true")
            restore_s = time.monotonic() - t0
            scratch = settings.state_dir / f"cp-{mib}"
            cp_s = _timed_cp(["cp", "-a", "--", str(host_dir), str(scratch)])
            shutil.rmtree(scratch, ignore_errors=True)
            reflink_s = _timed_cp(["cp", "-a", "--reflink=always", "--", str(host_dir), str(scratch)])
            shutil.rmtree(scratch, ignore_errors=True)
            await call("destroy_workspace", name=name)
            figures: Figures = {"fs": label, "mib": float(mib), "method": info["method"], "snapshot_s": snap_s,
                                "restore_to_exec_s": restore_s, "restart_to_exec_s": restart_s,
                                "cp_a_s": cp_s or float("nan"),
                                "snapshot_mb_s": mib * 1.048576 / snap_s}  # fmt: skip
            if reflink_s is not None:
                figures["cp_reflink_s"] = reflink_s
            out[f"{label}_{mib}"] = figures
    return out


async def _vm_memory(settings: Settings) -> Figures:
    """Memory snapshot save and restore of one small VM, against a disk snapshot's (see the module docstring)."""
    from mcp import Client

    from ..server import build_server

    async with Client(build_server(settings)) as client:

        call = tool_caller(client)

        ws = await call("create_workspace", name="vmem", type="vm", memory_mib=512, cpus=1)
        try:
            await call("exec", name="vmem", command="cd /tmp && setsid nohup sleep 100000 >/dev/null 2>&1 &",
                       timeout_s=300)
            timed: dict[str, float] = {}
            for memory in (False, True):
                snap = "mem" if memory else "disk"
                t0 = time.monotonic()
                info = await call("snapshot_workspace", name="vmem", snapshot=snap, memory=memory)
                timed[f"{snap}_snapshot_s"] = time.monotonic() - t0
                timed[f"{snap}_size_mb"] = info["size_bytes"] / 1e6
            for snap in ("disk", "mem"):
                t0 = time.monotonic()
                await call("restore_workspace", name="vmem", snapshot=snap)
                await call("exec", name="vmem", command="true", timeout_s=300)
                timed[f"{snap}_restore_to_exec_s"] = time.monotonic() - t0
            return {"accelerator": (await call("workspace_status", name="vmem"))["runtime"].get("accelerator") or "?",
                    "memory_mib": float(ws["limits"]["memory_mib"]), **timed}  # fmt: skip
        finally:
            await call("destroy_workspace", name="vmem")


async def run_snapshots(settings: Settings, state: Path, sizes: list[int], runs: int,
                        vm: bool = False) -> dict[str, Figures]:
    """Every figure of the section (see the module docstring); ``vm``: the VM memory figures too."""
    from mcp import Client

    from ..server import build_server

    results: dict[str, Figures] = {}
    async with Client(build_server(settings)) as client:

        call = tool_caller(client)

        await call("create_workspace", name="pz")
        pauses, resumes, noops = [], [], []
        for _ in range(20):
            t0 = time.perf_counter()
            await call("pause_workspace", name="pz")
            pauses.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            await call("resume_workspace", name="pz")
            resumes.append((time.perf_counter() - t0) * 1000)
            t0 = time.perf_counter()
            await call("exec", name="pz", command="true")
            noops.append((time.perf_counter() - t0) * 1000)
        results["pause_resume_ms"] = {"pause_p50": statistics.median(pauses), "resume_p50": statistics.median(resumes),
                                      "exec_true_p50": statistics.median(noops)}  # fmt: skip

        forks, creates = [], []
        await call("exec", name="pz", command="sudo sh -c 'echo x > /etc/marker'; echo y > file")
        for i in range(runs):
            t0 = time.monotonic()
            await call("fork_workspace", name="pz", new_name=f"pzf{i}")
            await call("exec", name=f"pzf{i}", command="cat file /etc/marker")
            forks.append(time.monotonic() - t0)
            await call("destroy_workspace", name=f"pzf{i}")
            t0 = time.monotonic()
            await call("create_workspace", name=f"pzc{i}")
            await call("exec", name=f"pzc{i}", command="true")
            creates.append(time.monotonic() - t0)
            await call("destroy_workspace", name=f"pzc{i}")
        results["fork_to_first_exec_s"] = {"p50": statistics.median(forks), "create_p50": statistics.median(creates),
                                           "runs": float(runs)}  # fmt: skip
        await call("destroy_workspace", name="pz")

    if vm:
        results["vm_memory_snapshot"] = await _vm_memory(settings)
    fstype = (await anyio.run_process(["stat", "-f", "-c", "%T", str(state)])).stdout.decode().strip()
    results |= await _section(settings, sizes, fstype or "statefs")
    async with WorkspaceManager(settings) as m:  # nothing may hold the loop mount below
        for name in list((await m.registry.read()).workspaces):
            await m.destroy(name)
    with _btrfs_dir(state, max(2, (3 * max(sizes)) // 1024 + 2)) as btrfs:
        if btrfs is not None:
            on_btrfs = settings.model_copy(update={"state_dir": btrfs / "state"})
            try:
                results |= await _section(on_btrfs, sizes, "btrfs")
            finally:
                async with WorkspaceManager(on_btrfs) as m:
                    for name in list((await m.registry.read()).workspaces):
                        await m.destroy(name)
    return results


def format_snapshots(results: dict[str, Figures]) -> str:
    """The section's lines for people (the JSON follows them)."""
    p = results["pause_resume_ms"]
    lines = [f"pause_workspace p50 {p['pause_p50']:.2f} ms, resume_workspace p50 {p['resume_p50']:.2f} ms",
             f"  baseline, exec true via the tool: p50 {p['exec_true_p50']:.2f} ms"]
    f = results["fork_to_first_exec_s"]
    lines += [f"fork_workspace -> first exec in the fork (container): p50 {f['p50']:.3f} s ({f['runs']:.0f} runs)",
              f"  baseline, create_workspace -> first exec: p50 {f['create_p50']:.3f} s; "
              f"ratio {float(f['p50']) / float(f['create_p50']):.2f}x"]
    v = results.get("vm_memory_snapshot")
    if v is not None:
        lines += [f"VM ({v['accelerator']}, {float(v['memory_mib']):.0f} MiB) memory snapshot: save "
                  f"{float(v['mem_snapshot_s']):.2f} s ({float(v['mem_size_mb']):.0f} MB), restore -> exec "
                  f"{float(v['mem_restore_to_exec_s']):.2f} s (no boot)",
                  f"  baseline, disk snapshot of the same VM: {float(v['disk_snapshot_s']):.2f} s "
                  f"({float(v['disk_size_mb']):.0f} MB), restore -> exec {float(v['disk_restore_to_exec_s']):.2f} s "
                  f"(a boot); memory restore / disk restore "
                  f"{float(v['mem_restore_to_exec_s']) / float(v['disk_restore_to_exec_s']):.2f}x"]
    for key, r in results.items():
        if not key.endswith(tuple(f"_{n}" for n in range(1, 100000))) or "snapshot_s" not in r:
            continue
        base = f"cp -a {float(r['cp_a_s']):.3f} s"
        if "cp_reflink_s" in r:
            base += f", cp --reflink=always {float(r['cp_reflink_s']):.3f} s"
        lines.append(f"{r['fs']}, {float(r['mib']):.0f} MiB workspace dir: snapshot {float(r['snapshot_s']):.3f} s "
                     f"({r['method']}, {float(r['snapshot_mb_s']):.0f} MB/s), restore -> exec "
                     f"{float(r['restore_to_exec_s']):.3f} s")
        lines.append(f"  baseline, {base}; snapshot/cp -a {float(r['snapshot_s']) / float(r['cp_a_s']):.2f}x; "
                     f"stop + start -> exec {float(r['restart_to_exec_s']):.3f} s (what a restore adds: "
                     f"{float(r['restore_to_exec_s']) - float(r['restart_to_exec_s']):.3f} s)")
    return "\n".join(lines)
