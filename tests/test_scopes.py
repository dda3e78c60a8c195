"""The systemd-scope path for container cgroups (issue 9.1) and the choice between it and direct cgroups.

The systemd path is not run here: these machines have no systemd as PID 1, so ``systemd-run
--scope`` has no manager to talk to. What can be checked is checked: the exact argv, the unit
names, the choice and its setting, and the sd_booted test against real directories.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_mcp.config import load_settings
from sandbox_mcp.errors import BackendError, InvalidSpec
from sandbox_mcp.models import Limits
from sandbox_mcp.paths import WorkspacePaths
from sandbox_mcp.runtimes import check_settings
from sandbox_mcp.runtimes.nspawn import NspawnState, launch_argv, nspawn_argv, scopes
from sandbox_mcp.runtimes.nspawn.rootfs import RootMounts
from sandbox_mcp.runtimes.nspawn.settings import NspawnSettings
from sandbox_mcp.supervise import workspace_tag

LIMITS = Limits(cpus=1.5, memory_mib=512, tasks=4096)


def test_sd_booted_is_a_directory_test(tmp_path: Path) -> None:
    assert not scopes.systemd_booted(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    assert not scopes.systemd_booted(tmp_path / "file")
    (tmp_path / "system").mkdir()
    assert scopes.systemd_booted(tmp_path / "system")


@pytest.mark.parametrize(
    ("setting", "booted", "expected"),
    [("auto", True, "systemd"), ("auto", False, "direct"), ("direct", True, "direct"), ("direct", False, "direct"),
     ("systemd", True, "systemd")],
)
def test_the_choice(setting: str, booted: bool, expected: str) -> None:
    assert scopes.cgroup_manager(setting, booted) == expected


def test_forcing_systemd_without_it_says_what_to_do() -> None:
    with pytest.raises(BackendError, match="SANDBOX_MCP_CGROUPS=auto or direct"):
        scopes.cgroup_manager("systemd", booted=False)
    with pytest.raises(InvalidSpec):
        scopes.cgroup_manager("cgroupfs", booted=True)
    bad = scopes.manager_check("systemd", booted=False)
    assert not bad.ok and bad.fix == "set SANDBOX_MCP_CGROUPS=auto"
    assert scopes.manager_check("auto", booted=False).detail.startswith("direct:")
    assert "delegated scope" in scopes.manager_check("auto", booted=True).detail


def test_the_setting_is_validated(tmp_path: Path) -> None:
    none = tmp_path / "none.toml"
    def cgroups(env: dict[str, str]) -> str:
        settings = load_settings(env, none)
        check_settings(settings)  # what start-up does: each runtime checks its section
        return NspawnSettings.of(settings).cgroups

    assert cgroups({}) == "auto"
    assert cgroups({"SANDBOX_MCP_CGROUPS": "systemd"}) == "systemd"
    assert cgroups({"SANDBOX_MCP_RUNTIMES_NSPAWN_CGROUPS": "direct"}) == "direct"
    with pytest.raises(InvalidSpec, match=r"\[runtimes.nspawn\].*cgroups \(old name cgroups\)"):
        cgroups({"SANDBOX_MCP_CGROUPS": "cgroupfs"})


def test_scope_unit_names() -> None:
    unit = scopes.scope_unit(Path("/srv/state"), "web-1")
    assert unit == f"sandbox-mcp-web-1-{workspace_tag(Path('/srv/state'), 'web-1')[:8]}.scope"
    # Another server (state dir) never shares it; names are validated before they reach systemd.
    assert scopes.scope_unit(Path("/srv/other"), "web-1") != unit
    for bad in ("Web", "-x", "a;b", "abcdefghijklm", ""):
        with pytest.raises(InvalidSpec):
            scopes.scope_unit(Path("/srv/state"), bad)
    for bad_unit in ("sshd.service", "sandbox-mcp-web-1-XYZ.scope", "--user", "sandbox-mcp-web-1-0123abcd.service"):
        with pytest.raises(InvalidSpec):
            scopes.scope_argv(bad_unit, LIMITS, ["true"])
        with pytest.raises(InvalidSpec):
            scopes.stop_scope_argv(bad_unit)


def test_scope_and_stop_argv_are_exact() -> None:
    unit = "sandbox-mcp-web-0123abcd.scope"
    assert scopes.scope_argv(unit, LIMITS, ["systemd-nspawn", "--boot"]) == [
        "systemd-run", "--scope", "--quiet", "--collect", "--unit=sandbox-mcp-web-0123abcd.scope",
        "-p", "Delegate=yes", "-p", "MemoryMax=512M", "-p", "MemorySwapMax=0", "-p", "TasksMax=4096",
        "-p", "CPUQuota=150%", "--", "systemd-nspawn", "--boot",
    ]  # fmt: skip
    tiny = scopes.scope_argv(unit, Limits(cpus=0.001, memory_mib=128, tasks=64), ["true"])
    assert "CPUQuota=1%" in tiny and "TasksMax=64" in tiny
    assert scopes.stop_scope_argv(unit) == ["systemctl", "stop", unit]
    with pytest.raises(InvalidSpec):
        scopes.scope_argv(unit, LIMITS, [])


def test_nspawn_launch_in_a_scope_is_exact() -> None:
    # systemd-run --scope execs env, which execs nspawn: one PID.
    paths = WorkspacePaths.of(Path("/st"), "ws1")
    argv = nspawn_argv(name="ws1", image_root=Path("/img/k"), netns_path=None, paths=paths, user="agent",
                       uid_base=524288, mounts=RootMounts(paths.runtime / "mnt"), tag="0123abcd")
    assert "--keep-unit" in argv and "--register=no" in argv
    unit = "sandbox-mcp-ws1-0123abcd.scope"
    launched = launch_argv(argv, [], user_namespaced=True, scope=unit, limits=LIMITS)
    assert launched == [
        "systemd-run", "--scope", "--quiet", "--collect", f"--unit={unit}", "-p", "Delegate=yes",
        "-p", "MemoryMax=512M", "-p", "MemorySwapMax=0", "-p", "TasksMax=4096", "-p", "CPUQuota=150%", "--",
        "env", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1", *argv,
    ]  # fmt: skip
    with pytest.raises(InvalidSpec):  # one way or the other, never both
        launch_argv(argv, [Path("/cg/ws1/cgroup.procs")], user_namespaced=True, scope=unit, limits=LIMITS)


def test_the_state_remembers_the_manager() -> None:
    state = NspawnState.model_validate({"image": "k", "uid_base": 524288, "cgroups": "systemd"})
    assert state.cgroups == "systemd"
    assert NspawnState.model_validate({"image": "k"}).cgroups is None  # registries from before
