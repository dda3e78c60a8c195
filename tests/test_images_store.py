"""The image store: one build per key, nothing half-built, prune removes only what is stale."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from sandbox_mcp.errors import BackendError, InvalidSpec
from sandbox_mcp.images.store import ImageStore

pytestmark = pytest.mark.anyio


async def test_concurrent_ensures_build_once_and_the_result_appears_whole(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")
    builds = 0

    async def build(tmp: Path) -> None:
        nonlocal builds
        builds += 1
        assert not store.exists("k1")  # not visible while being built
        (tmp / "file").write_text("payload")
        await anyio.lowlevel.checkpoint()  # let the other caller reach the lock

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(store.ensure, "k1", build, {"recipe": "test", "version": 1})
    assert builds == 1
    assert (store.path("k1") / "file").read_text() == "payload"
    assert store.meta("k1")["recipe"] == "test"  # type: ignore[index]
    assert [m["key"] for m in store.list_images()] == ["k1"]


async def test_a_failed_or_cancelled_build_leaves_nothing(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")

    async def failing(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise RuntimeError("apt failed")

    with pytest.raises(RuntimeError):
        await store.ensure("k2", failing, {})
    started = anyio.Event()

    async def hanging(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tg:
        tg.start_soon(store.ensure, "k3", hanging, {})
        await started.wait()
        tg.cancel_scope.cancel()
    assert not store.exists("k2") and not store.exists("k3")
    assert [p.name for p in store.root.iterdir() if not p.name.startswith(".locks")] == []


async def test_prune_removes_stale_and_interrupted_and_never_follows_links(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")

    async def build(tmp: Path) -> None:
        (tmp / "f").write_text("x")

    await store.ensure("old", build, {"version": 1})
    await store.ensure("new", build, {"version": 2})
    await store.ensure("inuse", build, {"version": 1})
    dead = store.root / ".tmp-new-999999999"  # an interrupted build of a process that is gone
    dead.mkdir()
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep").write_text("mine")
    (store.root / "evil").symlink_to(outside)  # planted: prune must not follow it
    alive_tmp = store.root / f".tmp-x-{os.getpid()}"  # a build of a live process
    alive_tmp.mkdir()
    removed = store.prune(lambda meta: meta.get("version") == 2, keep=frozenset({"inuse"}))
    assert sorted(removed) == [".tmp-new-999999999", "old"]
    assert store.exists("new") and store.exists("inuse") and not store.exists("old")
    assert (outside / "keep").read_text() == "mine" and (store.root / "evil").is_symlink()
    assert alive_tmp.exists()


def test_keys_are_plain_names(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    for bad in ("../etc", "a/b", "", ".hidden", "A" * 200):
        with pytest.raises(InvalidSpec):
            store.path(bad)


async def test_a_held_image_outlives_prune_and_prune_never_waits_for_it(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images")

    async def build(tmp: Path) -> None:
        (tmp / "f").write_text("x")

    await store.ensure("vm-old", build, {"version": 1})
    await store.ensure("vm-old2", build, {"version": 1})
    with pytest.raises(BackendError, match="start the workspace again"):
        store.hold("vm-never-built")
    fd = store.hold("vm-old")  # what a running VM's qemu inherits
    # A child holds it too, as qemu does once the server has closed its own copy.
    child = subprocess.Popen(["sleep", "infinity"], pass_fds=[fd])
    os.close(fd)
    try:
        # Returns at once (a waiting prune would hang here for as long as the VM runs).
        assert store.prune(lambda meta: meta.get("version") == 2) == ["vm-old2"]
        assert store.exists("vm-old")
    finally:
        child.kill()
        child.wait()
    assert store.prune(lambda meta: meta.get("version") == 2) == ["vm-old"]  # the VM has ended
    with pytest.raises(BackendError, match="is gone"):
        store.hold("vm-old")
