"""``sandbox-mcp bench``: figures from one run, each against a baseline measured in the same run.

- create → first exec through the MCP tools (cached image) against a bare boot: the same
  network setup and systemd-nspawn command, polled until sshd sends its banner (``--create only``:
  this alone, ``--runs`` times, without a warm pool);
- ``exec true`` p50/p95 through the MCP tool against one ``ssh`` client process per command;
- writing and reading files of 16 and 256 MiB (and ``--file-mib``) through the MCP tools against
  ``ssh cat`` (the large one fails where the workspace bounds file sizes, as issue 28 did at 16 MiB);
- for VMs (``type="vm"``, when qemu and the VM image are there): create → first exec against a bare
  boot of the same qemu command (TAP, overlay, qemu), polled until sshd sends its banner;
- the daemon's hop: ``exec true`` from an MCP client on the daemon's socket against the
  in-process client, and ``sandbox-mcp serve`` over stdio bridged to the daemon against the
  same ``serve`` working in process;
- Incus (:mod:`.incus`): create → first exec of ``type="incus"`` against a bare instance
  launch → sshd banner, on a private incusd (``--incus only|no``);
- processes, published ports and exec progress (:mod:`.processes`): start_process → first
  byte and the process_output long-poll against exec round trips, a published port against a
  direct connection to the workspace IP, notifications per second during a chatty exec;
- git (:mod:`.git`): create with ``repo=`` (10,000 files) against a plain create, and
  fetch_workspace of 100 commits against a host-local fetch (``--git only|no``);
- pause/resume, snapshot/restore against ``cp -a`` (and reflinks on btrfs), fork → first exec,
  and with ``--snapshot-vm`` a VM memory snapshot's save and restore against a disk snapshot's
  (:mod:`.snapshots`, ``--snapshots only|no``, ``--snapshot-mib``);
- concurrency (:mod:`.concurrency`): 200 ``exec true`` at once over 10 workspaces through one stdio
  ``serve``, the in-process client and the manager, against raw asyncssh to the same sshds
  (``--concurrency only|no``);
- the egress resolver (:mod:`.egress`): its answer time for allowed (new and repeated) and refused
  names against a direct query to the same stand-in upstream (``--egress only|no``);
- capacity (:mod:`.capacity`): how many containers start at once (a ramp up to
  ``--parallel-max``) and MiB of host memory per idle one, unprivileged and, where allowed,
  privileged (``--capacity only|no``).
- the warm pool (:mod:`.pool`): create → first exec claiming a booted slot, against the cold path and a bare
  boot, the refill's time and a slot's memory (``--pool only|no``, ``--pool-creates``, ``--pool-size``);
- the secrets proxy (:mod:`.secrets`): a small request's latency and a download's throughput through
  the proxy against the same requests straight to a stand-in HTTPS service, on loopback
  (``--secrets only|no``, ``--secrets-requests``).

It runs in a private network and mount namespace (re-executing itself under ``unshare``), with
its own state directory and bridge, so it neither touches the host's workspaces nor sends
traffic anywhere but to the containers it boots.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio

from ..config import Settings
from ..hostnet import HostNetwork
from ..images import DebianRoot, ImageStore
from ..manager import WorkspaceManager
from ..progress import no_progress
from .bare import bare_boot
from .calls import tool_caller
from .capacity import format_capacity, run_capacity
from .concurrency import format_concurrency, run_concurrency, serve_env
from .egress import format_egress, run_egress
from .figures import pct
from .incus import format_incus, run_incus
from .processes import format_processes, run_processes
from .secrets import format_secrets, run_secrets_bench
from .snapshots import format_snapshots, run_snapshots

__all__ = ["run_bench"]

_ISOLATED = "SANDBOX_MCP_BENCH_ISOLATED"


def _reexec_isolated() -> int:
    argv = [sys.executable, "-m", "sandbox_mcp", *sys.argv[1:]]
    # /run/netns on a tmpfs of its own: the host's is shared with every other namespace's cleanup.
    script = ('mkdir -p /run/netns && mount -t tmpfs -o mode=0755 sandbox-mcp-bench-netns /run/netns && '
              'ip link set lo up && exec env ' + _ISOLATED + '=1 "$@"')
    return subprocess.call(["unshare", "--net", "--mount", "--propagation", "private", "--", "sh", "-c", script,
                            "sh", *argv])


def _vm_ready(settings: Settings) -> bool:
    from ..runtimes.qemu.image import VmImage

    vm = VmImage(settings, ImageStore(settings.image_dir))
    return bool(shutil.which("qemu-system-x86_64")) and vm.exists(vm.key(()))


async def run_bench(settings: Settings, args: argparse.Namespace) -> int:
    """Run the benchmark and print its figures. Needs root and systemd-nspawn."""
    if os.environ.get(_ISOLATED) != "1":
        root = DebianRoot(settings, ImageStore(settings.image_dir))
        if not root.exists(root.key(())):
            print("building the root image first (network needed once)...", file=sys.stderr)
            await root.ensure((), no_progress)
        if args.vm_runs > 0 and shutil.which("qemu-system-x86_64"):
            from ..runtimes.qemu.image import VmImage

            vm = VmImage(settings, ImageStore(settings.image_dir))
            if not vm.exists(vm.key(())):
                print("building the VM image first (network needed once)...", file=sys.stderr)
                await vm.ensure((), no_progress)
        return _reexec_isolated()

    from mcp import Client

    from ..server import build_server

    state = Path(tempfile.mkdtemp(prefix="sandbox-mcp-bench-"))
    # No warm pool but the pool section's own: the other figures are of the cold path, on a quiet host.
    bench_settings = settings.model_copy(
        update={"state_dir": state, "bridge": "sbxbench-br", "mode": "direct", "hosts_file": None, "pool_size": 0}
    )
    results: dict[str, dict[str, float]] = {}
    proc_results: dict[str, dict[str, float]] = {}
    incus_mode = getattr(args, "incus", "no")
    capacity_mode = getattr(args, "capacity", "no")
    git_mode = getattr(args, "git", "no")
    if git_mode == "only":
        return await _git_section(bench_settings, args, state)
    if incus_mode == "only":
        return _print_incus(await run_incus(bench_settings, args.runs))
    if capacity_mode == "only":
        return await _capacity(bench_settings, args.parallel_max, state)
    if getattr(args, "create", "also") == "only":
        return await _create_only(bench_settings, args.runs, state)
    snapshots_mode = getattr(args, "snapshots", "no")
    if snapshots_mode == "only":
        return await _snapshots(bench_settings, args, state)
    concurrency_mode = getattr(args, "concurrency", "no")
    if concurrency_mode == "only":
        return await _concurrency(bench_settings, args, state)
    if getattr(args, "host_disk", "no") == "only":
        return await _host_disk(bench_settings, args, state)
    egress_mode = getattr(args, "egress", "no")
    if egress_mode == "only":
        return await _egress(bench_settings, args, state)
    secrets_mode = getattr(args, "secrets", "no")
    if secrets_mode == "only":
        state.rmdir()  # loopback only: no state dir
        return _secrets(args)
    pool_mode = getattr(args, "pool", "no")
    if pool_mode == "only":
        return await _pool(bench_settings, args, state)
    try:
        async with Client(build_server(bench_settings)) as client:

            call = tool_caller(client)

            # 1. create -> first exec, against a bare boot of the same image.
            results.update(await _create_section(call, bench_settings, args.runs))

            # 2. exec latency: the MCP tool on the pooled connection vs an ssh process per command.
            await call("start_workspace", name="bench0")
            await call("exec", name="bench0", command="true")
            tool_ms = []
            for _ in range(args.execs):
                t0 = time.perf_counter()
                await call("exec", name="bench0", command="true")
                tool_ms.append((time.perf_counter() - t0) * 1000)
            ssh_argv = await _ssh_argv(bench_settings, "bench0")
            ssh_ms = []
            for _ in range(max(20, args.execs // 5)):
                t0 = time.perf_counter()
                await anyio.run_process([*ssh_argv, "true"])
                ssh_ms.append((time.perf_counter() - t0) * 1000)
            results["exec_true_ms"] = {
                "tool_p50": statistics.median(tool_ms), "tool_p95": pct(tool_ms, 0.95),
                "ssh_p50": statistics.median(ssh_ms), "ssh_p95": pct(ssh_ms, 0.95),
                "ssh_over_tool_p50": statistics.median(ssh_ms) / statistics.median(tool_ms),
            }

            # 3. Files of 16 and 256 MiB (and --file-mib) through write_file/read_file vs ssh cat: the large
            #    one so a bound on file size in the workspace (issue 28: 16 MiB) shows here as a failure.
            for mib in sorted({16, 256, args.file_mib}):
                figures = await _file_figures(call, ssh_argv, "bench0", mib)
                results[f"file_{mib}mib_s"] = figures
                if mib == args.file_mib:
                    results["file_s"] = figures
            results["daemon_hop_exec_true_ms"] = await _daemon_hop(bench_settings, state, args.execs, client)
            if getattr(args, "process_runs", 0) > 0:
                ws = await call("workspace_status", name="bench0")
                proc_results = await run_processes(client, "bench0", Path(ws["host_workspace_dir"]), ws["ip"],
                                                   args.process_runs)  # fmt: skip
            await call("destroy_workspace", name="bench0")

            # 4. VMs: create -> first exec, against a bare boot of the same qemu command.
            if args.vm_runs > 0 and _vm_ready(bench_settings):
                vcreates, vbares, accel = [], [], ""
                for i in range(args.vm_runs):
                    name = f"benchvm{i}"
                    t0 = time.monotonic()
                    await call("create_workspace", name=name, type="vm")
                    await call("exec", name=name, command="true")
                    vcreates.append(time.monotonic() - t0)
                    accel = (await call("workspace_status", name=name))["runtime"].get("accelerator") or ""
                    await call("stop_workspace", name=name)
                    async with WorkspaceManager(bench_settings) as m:
                        vbares.append(await bare_boot(m, name, timeout_s=600))
                    await call("destroy_workspace", name=name)
                results["vm_create_to_first_exec_s"] = {"p50": statistics.median(vcreates), "min": min(vcreates),
                                                        "max": max(vcreates), "runs": float(len(vcreates))}
                results["vm_bare_boot_to_sshd_s"] = {"p50": statistics.median(vbares), "min": min(vbares),
                                                     "tcg": float(accel == "tcg")}
    finally:
        await _tear_down(bench_settings, state)
    _print(results)
    if proc_results:
        print(format_processes(proc_results))
        print(json.dumps(proc_results))
    if git_mode == "also":
        await _git_section(bench_settings, args, Path(tempfile.mkdtemp(prefix="sandbox-mcp-bench-")))
    if concurrency_mode == "also":
        await _concurrency(bench_settings, args, state)
    if snapshots_mode == "also":
        await _snapshots(bench_settings, args, state)
    if egress_mode == "also":
        await _egress(bench_settings, args, Path(tempfile.mkdtemp(prefix="sandbox-mcp-bench-")))
    if secrets_mode == "also":
        _secrets(args)
    if pool_mode == "also":
        await _pool(bench_settings, args, state)
    if capacity_mode == "also":
        await _capacity(bench_settings, args.parallel_max, state)
    if incus_mode == "also":
        return _print_incus(await run_incus(bench_settings, args.runs))
    return 0


async def _create_section(call: Any, settings: Settings, runs: int) -> dict[str, dict[str, float]]:
    """create -> first exec through the tools, ``runs`` times, each against a bare boot of the same workspace
    (stopped for it); stop and destroy of a running one too. Leaves ``bench0`` stopped, the others destroyed."""
    creates, bares, stops, destroys = [], [], [], []
    for i in range(runs):
        t0 = time.monotonic()
        await call("create_workspace", name=f"bench{i}")
        await call("exec", name=f"bench{i}", command="true")
        creates.append(time.monotonic() - t0)
        t0 = time.monotonic()
        await call("stop_workspace", name=f"bench{i}")
        stops.append(time.monotonic() - t0)
        async with WorkspaceManager(settings) as m:
            bares.append(await bare_boot(m, f"bench{i}"))
        if i:
            await call("start_workspace", name=f"bench{i}")
            t0 = time.monotonic()
            await call("destroy_workspace", name=f"bench{i}")
            destroys.append(time.monotonic() - t0)
    results = {
        "create_to_first_exec_s": {"p50": statistics.median(creates), "min": min(creates), "max": max(creates),
                                   "runs": float(len(creates))},
        "bare_boot_to_sshd_s": {"p50": statistics.median(bares), "min": min(bares)},
        "stop_s": {"p50": statistics.median(stops), "max": max(stops)},
    }
    if destroys:
        results["destroy_running_s"] = {"p50": statistics.median(destroys), "max": max(destroys)}
    return results


async def _create_only(settings: Settings, runs: int, state: Path) -> int:
    """The create section alone (``--create only``): its figures, then everything removed."""
    from mcp import Client

    from ..server import build_server

    settings = settings.model_copy(update={"pool_size": 0})  # the cold path: every create boots
    try:
        async with Client(build_server(settings)) as client:
            results = await _create_section(tool_caller(client), settings, max(1, runs))
    finally:
        await _tear_down(settings, state)
    print(_format_create(results))
    print(json.dumps(results))
    return 0


def _format_create(results: dict[str, dict[str, float]]) -> str:
    c, b, st = results["create_to_first_exec_s"], results["bare_boot_to_sshd_s"], results["stop_s"]
    lines = [
        f"create -> first exec (cached image): p50 {c['p50']:.3f} s  (min {c['min']:.3f}, max {c['max']:.3f}, "
        f"{c['runs']:.0f} runs)",
        f"  baseline, bare nspawn boot -> sshd banner: p50 {b['p50']:.3f} s; ratio {c['p50'] / b['p50']:.2f}x",
        f"stop_workspace (running, idle): p50 {st['p50']:.3f} s, max {st['max']:.3f} s",
    ]
    if "destroy_running_s" in results:
        d = results["destroy_running_s"]
        lines.append(f"destroy_workspace (running, idle): p50 {d['p50']:.3f} s, max {d['max']:.3f} s")
    return "\n".join(lines)


async def _file_figures(call: Any, ssh_argv: list[str], name: str, mib: int) -> dict[str, float]:
    """Write and read back ``mib`` MiB through the file tools (write_file in chunks under its payload cap;
    read_file asked for 4 MiB at a time, of which each call returns what fits one result, RESULT_BUDGET_BYTES:
    tens of KB of base64, so thousands of calls for a large file: large files belong to `sandbox-mcp ssh`
    or scp) and through ``ssh cat``; seconds of each, and the ratios.

    Raises:
        RuntimeError: a tool failed (a file-size bound in the workspace fails here), or what came back differs.
    """
    data = os.urandom(mib << 20)
    chunk = 32 << 20  # under write_file's default payload cap (64 MiB decoded)
    t0 = time.perf_counter()
    for offset in range(0, len(data), chunk):
        await call("write_file", name=name, path="big.bin", encoding="base64", append=offset > 0,
                   content=base64.b64encode(data[offset:offset + chunk]).decode())
    tool_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    digest, offset = hashlib.sha256(), 0
    while True:
        r = await call("read_file", name=name, path="big.bin", offset=offset, limit=4 << 20)
        digest.update(base64.b64decode(r["content"]))
        if not r["truncated"]:
            break
        offset = r["next_offset"]
    tool_read = time.perf_counter() - t0
    if digest.digest() != hashlib.sha256(data).digest():
        raise RuntimeError(f"the {mib} MiB file read back through read_file differs")
    t0 = time.perf_counter()
    await anyio.run_process([*ssh_argv, "cat > workspace/big2.bin"], input=data)
    ssh_write = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = (await anyio.run_process([*ssh_argv, "cat workspace/big2.bin"])).stdout
    ssh_read = time.perf_counter() - t0
    if out != data:
        raise RuntimeError(f"the {mib} MiB file read back through ssh cat differs")
    await call("exec", name=name, command="rm -f big.bin big2.bin")
    return {"mib": float(mib), "tool_write": tool_write, "tool_read": tool_read, "ssh_cat_write": ssh_write,
            "ssh_cat_read": ssh_read, "tool_over_ssh_write": tool_write / ssh_write,
            "tool_over_ssh_read": tool_read / ssh_read}


async def _git_section(settings: Settings, args: argparse.Namespace, state: Path) -> int:
    """The git section (:mod:`.git`) through the MCP tools, in its own state dir; everything removed after."""
    from mcp import Client

    from ..server import build_server
    from .git import format_git, run_git_bench

    settings = settings.model_copy(update={"state_dir": state})
    try:
        async with Client(build_server(settings)) as client:

            call = tool_caller(client)

            results = await run_git_bench(call, settings, max(1, args.runs), args.git_files, args.git_commits)
    finally:
        await _tear_down(settings, state)
    print(format_git(results))
    print(json.dumps(results))
    return 0


async def _tear_down(settings: Settings, state: Path) -> None:
    """After a section: every workspace it left destroyed (a pool's slots go with the manager that keeps them,
    or with this one's start), the bridge and the state dir removed."""
    async with WorkspaceManager(settings) as m:
        for name, record in (await m.registry.read()).workspaces.items():
            if not record.pooled:
                await m.destroy(name)
    await HostNetwork(settings).remove_bridge()
    shutil.rmtree(state, ignore_errors=True)


@contextlib.asynccontextmanager
async def _own_state(settings: Settings, state: Path) -> AsyncIterator[Path]:
    """A section's state dir, removed after with the bridge, whatever the section did."""
    state.mkdir(parents=True, exist_ok=True)
    try:
        yield state
    finally:
        await HostNetwork(settings).remove_bridge()
        shutil.rmtree(state, ignore_errors=True)


def _report(text: str, results: object) -> int:
    """A section's table, then its figures as one JSON line (for scripts that compare runs)."""
    print(text)
    print(json.dumps(results))
    return 0


async def _snapshots(settings: Settings, args: argparse.Namespace, state: Path) -> int:
    """The pause/snapshot/fork section (:mod:`.snapshots`) in its own state dir; the bridge removed after."""
    sizes = [int(x) for x in str(getattr(args, "snapshot_mib", "100")).split(",") if x.strip()]
    async with _own_state(settings, state):
        results = await run_snapshots(settings, state, sizes, max(1, args.runs),
                                      vm=bool(getattr(args, "snapshot_vm", False)))
    return _report(format_snapshots(results), results)


async def _concurrency(settings: Settings, args: argparse.Namespace, state: Path) -> int:
    """The concurrency section (:mod:`.concurrency`) in its own state dir; the bridge removed after."""
    async with _own_state(settings, state):
        results = await run_concurrency(settings.model_copy(update={"state_dir": state}), state,
                                        args.concurrent_workspaces, args.concurrent_calls, args.concurrent_rounds)
    return _report(format_concurrency(results), results)


async def _host_disk(settings: Settings, args: argparse.Namespace, state: Path) -> int:
    """The host-disk section (:mod:`.hostdisk`) in its own state dirs; the bridge removed after."""
    from .hostdisk import format_host_disk, run_host_disk

    async with _own_state(settings, state):
        results = await run_host_disk(settings, state, max(1, args.runs))
    print(format_host_disk(results))
    return 0


async def _egress(settings: Settings, args: argparse.Namespace, state: Path) -> int:
    """The egress resolver section (:mod:`.egress`) in the state dir ``state``; it and the bridge removed after."""
    settings = settings.model_copy(update={"state_dir": state})
    async with _own_state(settings, state):
        results = await run_egress(settings, max(20, getattr(args, "dns_queries", 200)))
    return _report(format_egress(results), results)


async def _capacity(settings: Settings, parallel_max: int, state: Path) -> int:
    """The capacity section (:mod:`.capacity`) in its own state dir; the bridge removed after."""
    async with _own_state(settings, state):
        results = await run_capacity(settings, parallel_max)
    return _report(format_capacity(results), results)


async def _pool(settings: Settings, args: argparse.Namespace, state: Path) -> int:
    """The warm pool section (:mod:`.pool`) in its own state dirs; the bridge removed after."""
    from .pool import format_pool, run_pool

    async with _own_state(settings, state):
        results = await run_pool(settings, state, max(1, getattr(args, "pool_creates", 20)),
                                 max(1, getattr(args, "pool_size", 2)), max(1, args.runs))
    return _report(format_pool(results), results)


def _secrets(args: argparse.Namespace) -> int:
    """The secrets proxy section (:mod:`.secrets`): loopback only, nothing of the bridge."""
    results = run_secrets_bench(getattr(args, "secrets_requests", 300))
    return _report(format_secrets(results), results)


def _print_incus(results: dict[str, dict[str, float]] | str) -> int:
    print(format_incus(results))
    if not isinstance(results, str):
        print(json.dumps(results))
    return 0


async def _interleaved_exec_ms(clients: dict[str, object], n: int) -> dict[str, list[float]]:
    """``exec true`` on bench0 through each client in turn, ``n`` rounds: load that drifts during the
    run then weighs on every path alike."""
    out: dict[str, list[float]] = {name: [] for name in clients}
    for client in clients.values():
        await client.call_tool("exec", {"name": "bench0", "command": "true"})  # type: ignore[attr-defined]
    for _ in range(n):
        for name, client in clients.items():
            t0 = time.perf_counter()
            r = await client.call_tool("exec", {"name": "bench0", "command": "true"})  # type: ignore[attr-defined]
            out[name].append((time.perf_counter() - t0) * 1000)
            if r.is_error:
                raise RuntimeError(f"exec via {name}: {r.content}")
    return out


async def _daemon_hop(settings: Settings, state: Path, n: int, in_process: object) -> dict[str, float]:
    """``exec true`` through a `sandbox-mcp daemon` child (a socket client; stdio serve bridged to it) against
    the in-process client and stdio serve working in process, interleaved call by call."""
    from mcp import Client, StdioServerParameters

    from ..daemon_client import socket_transport

    sock = state / "run" / "daemon.sock"
    serve = [sys.executable, "-m", "sandbox_mcp", "serve"]
    local_env = serve_env(settings, state / "run" / "none.sock")  # no daemon: in process
    env = serve_env(settings, sock)
    # A client of the daemon gets only how to reach it (it refuses settings the daemon would ignore).
    client_env = {k: v for k, v in env.items() if not k.startswith("SANDBOX_MCP_")}
    client_env.update({k: env[k] for k in ("SANDBOX_MCP_DAEMON_SOCKET", "SANDBOX_MCP_DAEMON_GROUP", "SANDBOX_MCP_CONFIG")})
    log = open(state / "daemon.log", "wb")  # noqa: ASYNC230, SIM115 - the child writes it
    daemon = await anyio.open_process([sys.executable, "-m", "sandbox_mcp", "daemon"], env=env,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip
    log.close()
    try:
        while not sock.is_socket():  # the daemon binds once its manager is open
            if daemon.returncode is not None:
                raise RuntimeError(f"the daemon exited: {(state / 'daemon.log').read_text()[-2000:]}")
            await anyio.sleep(0.05)
        async with (
            Client(StdioServerParameters(command=serve[0], args=serve[1:], env=local_env)) as stdio_local,
            Client(StdioServerParameters(command=serve[0], args=serve[1:], env=client_env)) as stdio_daemon,
            Client(socket_transport(sock, "root"), mode="legacy") as socket_client,
        ):
            ms = await _interleaved_exec_ms({"in_process": in_process, "socket": socket_client,
                                             "stdio_local": stdio_local, "stdio_daemon": stdio_daemon}, n)
    finally:
        daemon.terminate()
        await daemon.wait()
    out = {f"{k}_p50": statistics.median(v) for k, v in ms.items()}
    out |= {f"{k}_p95": pct(v, 0.95) for k, v in ms.items()}
    out["hop_p50"] = out["stdio_daemon_p50"] - out["stdio_local_p50"]
    return out


async def _ssh_argv(settings: Settings, name: str) -> list[str]:
    """The OpenSSH client command for the baseline: same host, user, keys and pinned host key."""
    from .. import ssh
    from ..paths import WorkspacePaths

    async with WorkspaceManager(settings) as m:
        target = await m.ssh_target(name)
    known = WorkspacePaths.of(settings.state_dir, name).runtime / "known_hosts"
    known.write_text(ssh.known_hosts_line(target.host, target.host_key_path) + "\n")
    return ssh.ssh_argv(target, known)


def _print(results: dict[str, dict[str, float]]) -> None:
    e = results["exec_true_ms"]
    print(_format_create(results))
    print(f"exec true via MCP tool: p50 {e['tool_p50']:.2f} ms, p95 {e['tool_p95']:.2f} ms")
    print(f"  baseline, ssh process per command: p50 {e['ssh_p50']:.2f} ms, p95 {e['ssh_p95']:.2f} ms; "
          f"tool is {e['ssh_over_tool_p50']:.1f}x faster")
    for key in sorted((k for k in results if k.startswith("file_") and k.endswith("mib_s")),
                      key=lambda k: results[k]["mib"]):
        f = results[key]
        print(f"{f['mib']:.0f} MiB file via tools: write {f['tool_write']:.3f} s, read {f['tool_read']:.3f} s")
        print(f"  baseline ssh cat: write {f['ssh_cat_write']:.3f} s, read {f['ssh_cat_read']:.3f} s; "
              f"ratios {f['tool_over_ssh_write']:.2f}x / {f['tool_over_ssh_read']:.2f}x")
    if "vm_create_to_first_exec_s" in results:
        v, vb = results["vm_create_to_first_exec_s"], results["vm_bare_boot_to_sshd_s"]
        accel = "TCG, software emulation" if vb["tcg"] else "KVM"
        print(f"VM create -> first exec ({accel}): p50 {v['p50']:.3f} s  (min {v['min']:.3f}, max {v['max']:.3f}, "
              f"{v['runs']:.0f} runs)")
        print(f"  baseline, bare qemu boot -> sshd banner: p50 {vb['p50']:.3f} s; ratio {v['p50'] / vb['p50']:.2f}x")
    d = results["daemon_hop_exec_true_ms"]
    print(f"exec true via the daemon (interleaved): socket client p50 {d['socket_p50']:.2f} ms (in-process client "
          f"{d['in_process_p50']:.2f} ms); stdio serve bridged to the daemon p50 {d['stdio_daemon_p50']:.2f} ms, "
          f"p95 {d['stdio_daemon_p95']:.2f} ms")
    print(f"  baseline, stdio serve in process: p50 {d['stdio_local_p50']:.2f} ms, p95 {d['stdio_local_p95']:.2f} ms; "
          f"the daemon hop costs {d['hop_p50']:.2f} ms at p50")
    print(json.dumps(results))
