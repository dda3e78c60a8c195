# ruff: noqa: F811 - the test takes test_incus_e2e's fixtures by name
"""A branch per workspace in an Incus container: clone, diff and fetch over the exec channel, as for the
other runtimes (the Incus workspace directory is the instance's own, not a host bind)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from .test_git_e2e import host_git, make_host_repo
from .test_incus_e2e import call, firewall_retired, incusd, local, local_settings  # noqa: F401 - fixtures

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


async def test_repo_round_trip_in_incus(local: Any, tmp_path: Path) -> None:
    repo = make_host_repo(None, tmp_path)
    base = host_git(None, repo, "rev-parse", "HEAD").strip()
    ws = await call(local, "create_workspace", name="gitinc", type="incus", repo=str(repo))
    assert ws["repo"]["base"] == base
    r = await call(local, "exec", name="gitinc", command="echo inc > inc.txt && git add inc.txt && "
                                                        "git commit -qm 'in incus' && git rev-parse HEAD")  # fmt: skip
    assert r["exit_code"] == 0, r
    head = r["stdout"].strip()
    diff = await call(local, "workspace_diff", name="gitinc")
    assert [(f["path"], f["status"]) for f in diff["files"]] == [("inc.txt", "added")]
    fetched = await call(local, "fetch_workspace", name="gitinc")
    assert fetched["head"] == head == host_git(None, repo, "rev-parse", "sandbox/gitinc").strip()
