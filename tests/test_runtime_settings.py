"""Each runtime's own settings section, [runtimes.NAME]: the file, the environment, the old flat names and
tables still read into it, and mistakes refused at start-up naming the section and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox_mcp.config import Settings, load_settings
from sandbox_mcp.daemon_use import ignored_settings
from sandbox_mcp.errors import InvalidSpec
from sandbox_mcp.manager import WorkspaceManager
from sandbox_mcp.runtimes import RuntimeContext, build_runtimes, check_settings
from sandbox_mcp.runtimes.incus.settings import IncusSettings
from sandbox_mcp.runtimes.nixos.settings import NixosSettings
from sandbox_mcp.runtimes.nspawn.settings import NspawnSettings
from sandbox_mcp.runtimes.qemu import QemuRuntime
from sandbox_mcp.runtimes.qemu.settings import QemuSettings


def _load(tmp_path: Path, toml: str, env: dict[str, str] | None = None) -> Settings:
    cfg = tmp_path / "config.toml"
    cfg.write_text(toml)
    settings = load_settings(env or {}, cfg)
    check_settings(settings)
    return settings


def test_a_section_comes_from_the_file_and_the_environment_field_by_field(tmp_path: Path) -> None:
    s = _load(tmp_path, '[runtimes.qemu]\nmemory_mib = 4096\ndisk_gib = 4\n\n[runtimes.nspawn]\ncgroups = "direct"\n',
              {"SANDBOX_MCP_RUNTIMES_QEMU_MEMORY_MIB": "1024"})  # fmt: skip
    assert (QemuSettings.of(s).memory_mib, QemuSettings.of(s).disk_gib) == (1024, 4)  # the environment wins
    assert NspawnSettings.of(s).cgroups == "direct"
    qemu = QemuRuntime(RuntimeContext.for_settings(s, ""))
    assert (qemu.config.memory_mib, qemu.default_limits().memory_mib) == (1024, 1024)
    assert qemu.complete_limits(qemu.default_limits()).disk_mib == 4 << 10


def test_the_old_names_still_work_and_land_in_their_section(tmp_path: Path) -> None:
    s = _load(tmp_path, 'vm_memory_mib = 3072\nprivate_users = true\n[incus]\nproject = "team"\n[nixos]\nhost = "fry"\n',
              {"SANDBOX_MCP_VM_CPUS": "3", "SANDBOX_MCP_ALLOW_PRIVILEGED": "true",
               "SANDBOX_MCP_INCUS_STORAGE_POOL": "fast", "SANDBOX_MCP_NIXOS_ESCALATION": "doas"})  # fmt: skip
    assert (QemuSettings.of(s).memory_mib, QemuSettings.of(s).cpus) == (3072, 3)
    assert (NspawnSettings.of(s).private_users, NspawnSettings.of(s).allow_privileged) == (True, True)
    assert (IncusSettings.of(s).project, IncusSettings.of(s).storage_pool) == ("team", "fast")
    assert (NixosSettings.of(s).host, NixosSettings.of(s).escalation) == ("fry", "doas")
    # An old name in the environment overrides the new one in the file, as any variable overrides the file.
    s = _load(tmp_path, "[runtimes.qemu]\nmemory_mib = 4096\n", {"SANDBOX_MCP_VM_MEMORY_MIB": "512"})
    assert QemuSettings.of(s).memory_mib == 512
    # Keywords too, as tests and scripts write them; with_runtime changes one section of a copy.
    s = Settings(vm_disk_gib=5, incus=IncusSettings(project="p"))
    assert (QemuSettings.of(s).disk_gib, IncusSettings.of(s).project) == (5, "p")
    assert QemuSettings.of(s.with_runtime("qemu", disk_gib=6)).disk_gib == 6 and QemuSettings.of(s).disk_gib == 5
    copy = s.model_copy(update={"vm_cpus": 1, "private_users": False, "incus": IncusSettings(storage_pool="x")})
    assert (QemuSettings.of(copy).cpus, QemuSettings.of(copy).disk_gib) == (1, 5)  # one field changed, not the section
    assert (NspawnSettings.of(copy).private_users, IncusSettings.of(copy).storage_pool) == (False, "x")
    assert IncusSettings.of(copy).project == "p"


def test_one_source_naming_a_setting_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpec, match=r"vm_cpus is the old name of \[runtimes.qemu\] cpus; set only one"):
        _load(tmp_path, "vm_cpus = 2\n[runtimes.qemu]\ncpus = 3\n")
    with pytest.raises(InvalidSpec, match=r"incus.project is the old name of \[runtimes.incus\] project"):
        _load(tmp_path, "", {"SANDBOX_MCP_INCUS_PROJECT": "a", "SANDBOX_MCP_RUNTIMES_INCUS_PROJECT": "b"})


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("[runtimes.qemu]\nmemory_mib = 128\n", {},
         r"\[runtimes.qemu\] .*memory_mib (.*): Input should be greater than or equal to 256"),
        ("vm_memory_mib = 128\n", {}, r"\[runtimes.qemu\] .*memory_mib \(old name vm_memory_mib\)"),
        ("", {"SANDBOX_MCP_RUNTIMES_QEMU_ACCELERATOR": "hvf"},
         r"\[runtimes.qemu\] .*accelerator (.*): Input should be .auto., .kvm. or .tcg."),
        ("[runtimes.nspawn]\nprivate_user = false\n", {}, r"\[runtimes.nspawn\] .*private_user: Extra inputs"),
        ("[runtimes.qemuu]\ncpus = 2\n", {}, r"section \[runtimes.qemuu\], but no runtime is named 'qemuu'"),
        ("[runtimes.incus]\nurl = \"https://incus.example:8443\"\n", {}, r"\[runtimes.incus\] .*url needs client_cert"),
    ],
)
def test_a_bad_section_is_refused_naming_section_and_field(tmp_path: Path, toml: str, env: dict[str, str],
                                                           message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        _load(tmp_path, toml, env)


@pytest.mark.anyio
async def test_the_server_refuses_to_start_with_a_bad_section(tmp_path: Path) -> None:
    """Any mode's section is checked at start-up, also one this mode does not use (nixos's in direct mode)."""
    settings = Settings(mode="direct", state_dir=tmp_path / "state", image_dir=tmp_path / "img", hosts_file="",
                        runtimes={"nixos": {"escalation": "su"}})  # fmt: skip
    with pytest.raises(InvalidSpec, match=r"\[runtimes.nixos\] .*escalation \(old name nixos.escalation\)"):
        await WorkspaceManager(settings).open()
    assert not (tmp_path / "state" / "registry.json").exists()
    with pytest.raises(InvalidSpec, match=r"\[runtimes.nixos\]"):
        build_runtimes("direct", RuntimeContext.for_settings(settings, ""))


def test_a_section_given_to_a_daemon_client_is_named_as_ignored(tmp_path: Path) -> None:
    s = load_settings({"SANDBOX_MCP_RUNTIMES_QEMU_CPUS": "2", "SANDBOX_MCP_PRIVATE_USERS": "true"}, tmp_path / "none")
    assert ignored_settings(s) == ["SANDBOX_MCP_RUNTIMES_NSPAWN_PRIVATE_USERS", "SANDBOX_MCP_RUNTIMES_QEMU_CPUS"]
