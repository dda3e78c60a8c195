"""The host-disk section of ``sandbox-mcp bench``: what HOST_DISK_MIB costs, against the same run without it.

- create_workspace → first exec of a container whose state dir is its own ext4 image (mkfs, loop
  mount), against a plain create → first exec, alternated;
- writing N MiB into the workspace dir (``dd … conv=fsync`` inside, 64 MiB by default) on the image
  against the same on the state dir's own file system;
- what an empty image takes of the host's disk (its journal and metadata).

Runs inside the benchmark's private namespaces (see :mod:`.bench`); every workspace is destroyed again.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from ..config import Settings
from ..manager import WorkspaceManager
from ..models import CreateSpec

__all__ = ["format_host_disk", "run_host_disk"]

Figures = dict[str, float]


async def _create_exec_ms(manager: WorkspaceManager, name: str) -> float:
    t0 = time.monotonic()
    await manager.create(CreateSpec(name=name))
    await manager.exec(name, "true")
    return (time.monotonic() - t0) * 1000


async def _write_ms(manager: WorkspaceManager, name: str, mib: int) -> float:
    t0 = time.monotonic()
    r = await manager.exec(name, f"dd if=/dev/zero of=fill bs=1M count={mib} conv=fsync status=none && rm fill")
    if r.exit_code != 0:
        raise RuntimeError(f"writing {mib} MiB failed: {r.stderr}")
    return (time.monotonic() - t0) * 1000


async def run_host_disk(settings: Settings, state: Path, runs: int, write_mib: int = 64) -> Figures:
    """Alternate plain and bounded creates (``runs`` each); returns p50s in ms, their ratios, MiB."""
    plain = settings.model_copy(update={"state_dir": state / "plain", "host_disk_mib": None})
    bounded = settings.model_copy(update={"state_dir": state / "bounded", "host_disk_mib": max(1024, write_mib * 4)})
    create: dict[str, list[float]] = {"plain": [], "bounded": []}
    write: dict[str, list[float]] = {"plain": [], "bounded": []}
    empty_mib = 0.0
    async with WorkspaceManager(plain) as mp, WorkspaceManager(bounded) as mb:
        for i in range(runs):
            for kind, m in (("plain", mp), ("bounded", mb)):
                name = f"hd{kind[0]}{i}"
                try:
                    create[kind].append(await _create_exec_ms(m, name))
                    if kind == "bounded":
                        image = bounded.state_dir / ".disks" / f"{name}.ext4"
                        empty_mib = image.stat().st_blocks * 512 / (1 << 20)
                    write[kind].append(await _write_ms(m, name, write_mib))
                finally:
                    await m.destroy(name)
    p = {k: statistics.median(v) for k, v in create.items()}
    w = {k: statistics.median(v) for k, v in write.items()}
    return {
        "create_exec_plain_ms": round(p["plain"], 1),
        "create_exec_bounded_ms": round(p["bounded"], 1),
        "create_ratio": round(p["bounded"] / p["plain"], 2),
        "write_mib": float(write_mib),
        "write_plain_ms": round(w["plain"], 1),
        "write_bounded_ms": round(w["bounded"], 1),
        "write_ratio": round(w["bounded"] / w["plain"], 2),
        "image_mib": float(bounded.host_disk_mib or 0),
        "empty_image_takes_mib": round(empty_mib, 1),
    }


def format_host_disk(f: Figures) -> str:
    """The section as the benchmark prints it."""
    return (
        "host disk bound (HOST_DISK_MIB: the state dir as its own ext4 image)\n"
        f"  create -> first exec   plain {f['create_exec_plain_ms']:.0f} ms   bounded "
        f"{f['create_exec_bounded_ms']:.0f} ms   ratio {f['create_ratio']:.2f}\n"
        f"  write {f['write_mib']:.0f} MiB (fsync)   plain {f['write_plain_ms']:.0f} ms   bounded "
        f"{f['write_bounded_ms']:.0f} ms   ratio {f['write_ratio']:.2f}\n"
        f"  an empty {f['image_mib']:.0f} MiB image takes {f['empty_image_takes_mib']:.1f} MiB of the host's disk"
    )
