# ruff: noqa: F811 - the test takes test_qemu_e2e's fixtures by name
"""A branch per workspace in a VM (``type="vm"``): the clone and the fetch go over the exec channel, so
they work the same through the VM's 9p workspace share. One boot, under TCG here."""

from __future__ import annotations

from pathlib import Path

import pytest

from .test_e2e import Session
from .test_git_e2e import host_git, make_host_repo, sh
from .test_qemu_e2e import vm_session, vm_settings  # noqa: F401 - fixtures

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.vm]


async def test_repo_round_trip_in_a_vm(vm_session: Session, tmp_path: Path) -> None:
    s = vm_session
    repo = make_host_repo(None, tmp_path)
    base = host_git(None, repo, "rev-parse", "HEAD").strip()
    ws = await s.call("create_workspace", name="gitvm", type="vm", repo=str(repo))
    assert ws["repo"]["base"] == base and ws["isolation"] == "microvm"
    head = (await sh(s, "gitvm", "echo vm > vm.txt && git add vm.txt && git commit -qm 'in the vm' && "
                                 "git rev-parse HEAD")).strip()  # fmt: skip
    diff = await s.call("workspace_diff", name="gitvm")
    assert [(f["path"], f["status"]) for f in diff["files"]] == [("vm.txt", "added")] and diff["commits"] == 1
    fetched = await s.call("fetch_workspace", name="gitvm")
    assert fetched["head"] == head == host_git(None, repo, "rev-parse", "sandbox/gitvm").strip()
    assert host_git(None, repo, "show", "sandbox/gitvm:vm.txt") == "vm\n"
