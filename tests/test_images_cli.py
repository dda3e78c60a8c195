"""`sandbox-mcp image ls` and `image prune` on a private image dir (never the shared cache).

Prune runs `rm -rf` under the image dir: it must remove Debian roots and VM disks of older recipe
versions and interrupted builds, keep current ones and those a registered workspace uses (a
running VM's held lock is tested in test_images_store.py), and never follow a symlink out of the
store, whether the link is an entry of the store or sits inside a root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sandbox_mcp.images import DebianRoot
from sandbox_mcp.images.debootstrap import IMAGE_RECIPE_VERSION
from sandbox_mcp.models import WorkspaceRecord
from sandbox_mcp.registry import Registry
from sandbox_mcp.runtimes.qemu.image import VM_RECIPE_VERSION, VmImage


def _cli(image_dir: Path, *args: str) -> str:
    env = {**os.environ, "SANDBOX_MCP_IMAGE_DIR": str(image_dir), "SANDBOX_MCP_CONFIG": "/nonexistent",
           "SANDBOX_MCP_STATE_DIR": str(image_dir.parent / "state")}
    proc = subprocess.run([sys.executable, "-m", "sandbox_mcp", "image", *args], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _artefact(image_dir: Path, key: str, meta: dict | None) -> Path:
    root = image_dir / key
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "os-release").write_text("ID=debian\n")
    if meta is not None:
        (image_dir / f"{key}.json").write_text(json.dumps({"key": key, **meta}))
    return root


def test_prune_removes_only_stale_entries_and_never_follows_links(tmp_path: Path) -> None:
    images = tmp_path / "images"
    outside = tmp_path / "outside"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc" / "passwd").write_text("precious\n")

    def root(version: int) -> dict:
        return {"recipe": DebianRoot.RECIPE, "version": version, "packages": []}

    _artefact(images, "bookworm-base-current", root(IMAGE_RECIPE_VERSION))
    old = _artefact(images, "bookworm-base-old", root(IMAGE_RECIPE_VERSION - 1))
    (old / "etc" / "passwd").symlink_to(outside / "etc" / "passwd")  # a link inside a stale root
    _artefact(images, "vm-disk", {"recipe": VmImage.RECIPE, "version": VM_RECIPE_VERSION})  # a current VM disk
    _artefact(images, "vm-disk-old", {"recipe": VmImage.RECIPE, "version": VM_RECIPE_VERSION - 1})
    _artefact(images, ".tmp-bookworm-pkgs-x-999999999", None)  # a build whose process is gone
    (images / "linked-old").symlink_to(outside)  # a stale entry that is a link out of the store
    (images / "linked-old.json").write_text(json.dumps({"key": "linked-old", **root(IMAGE_RECIPE_VERSION - 1)}))

    listed = [json.loads(line) for line in _cli(images, "ls").splitlines()]
    assert sorted(m["key"] for m in listed) == ["bookworm-base-current", "bookworm-base-old", "linked-old", "vm-disk",
                                                 "vm-disk-old"]

    out = _cli(images, "prune")
    removed = sorted(line.removeprefix(f"removed {images}/") for line in out.splitlines())
    assert removed == [".tmp-bookworm-pkgs-x-999999999", "bookworm-base-old", "linked-old", "vm-disk-old"]
    left = sorted(p.name for p in images.iterdir() if p.name != ".locks")
    assert left == ["bookworm-base-current", "bookworm-base-current.json", "vm-disk", "vm-disk.json"]
    # Nothing outside the store was touched through either link.
    assert (outside / "etc" / "passwd").read_text() == "precious\n"
    assert sorted(m["key"] for m in map(json.loads, _cli(images, "ls").splitlines())) == [
        "bookworm-base-current", "vm-disk"]
    assert _cli(images, "prune") == ""  # nothing stale is left


def test_ls_and_prune_of_a_missing_image_dir(tmp_path: Path) -> None:
    images = tmp_path / "never-made"
    assert _cli(images, "ls") == ""
    assert _cli(images, "prune") == ""
    assert not images.exists()


def test_prune_keeps_what_registered_workspaces_use(tmp_path: Path) -> None:
    """A stale image a registered workspace (running or stopped) is backed by stays; the others go."""
    images, state = tmp_path / "images", tmp_path / "state"

    def root(version: int) -> dict:
        return {"recipe": DebianRoot.RECIPE, "version": version, "packages": []}

    vm_old = {"recipe": VmImage.RECIPE, "version": VM_RECIPE_VERSION - 1}
    for key in ("bookworm-base-used", "bookworm-base-unused"):
        _artefact(images, key, root(IMAGE_RECIPE_VERSION - 1))
    for key in ("vm-used", "vm-unused"):
        _artefact(images, key, vm_old)
    registry = Registry(state / "registry.json")

    def record(name: str, type_: str, runtime: str, image: str) -> WorkspaceRecord:
        return WorkspaceRecord(name=name, type=type_, runtime=runtime, ip="192.168.83.10", mac="02:00:00:00:00:01",
                               cid=100, user="agent", runtime_state={"image": image})

    with registry.transaction_sync() as data:
        data.workspaces["c1"] = record("c1", "container", "nspawn", "bookworm-base-used")
        data.workspaces["v1"] = record("v1", "vm", "qemu", "vm-used")
    out = _cli(images, "prune")
    assert sorted(line.removeprefix(f"removed {images}/") for line in out.splitlines()) == [
        "bookworm-base-unused", "vm-unused"]
    assert sorted(m["key"] for m in map(json.loads, _cli(images, "ls").splitlines())) == [
        "bookworm-base-used", "vm-used"]
    with registry.transaction_sync() as data:  # destroyed: nothing holds them any more
        data.workspaces.clear()
    assert sorted(_cli(images, "prune").splitlines()) == [f"removed {images}/bookworm-base-used",
                                                          f"removed {images}/vm-used"]
