"""The NixOS module (nix/) and flake.nix: every file parses; the module evaluates.

Parsing needs ``nix-instantiate`` (Debian's ``nix-bin``). Evaluation needs three public sources,
each named by a variable (``.ci/run`` unpacks them from ``../shared/nix``):

- ``SANDBOX_MCP_NIXPKGS_LIB``: a nixpkgs or nixpkgs.lib checkout (or its ``lib/``);
- ``SANDBOX_MCP_CONTAINERS_NIX``: nixpkgs' ``nixos/modules/virtualisation/nixos-containers.nix``
  (found inside the nixpkgs checkout when that variable names a full nixpkgs);
- ``SANDBOX_MCP_MICROVM_NIX``: a microvm.nix checkout (with ``nixos-modules/host``).

Nothing is built, so no store or binary cache is needed. The module is evaluated with
``lib.evalModules`` together with the real nixos-containers.nix and the real microvm.nix host
module (and its guest options), so the options the module sets there exist with the types it
gives them; stub modules (tests/fixtures/nix/stubs.nix) declare, loosely typed, the rest of NixOS,
and a stand-in ``eval-config.nix`` evaluates the guests as nixpkgs would. Without the sources the
evaluation tests skip and say which variable is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pytest

from sandbox_mcp import hostcmd, sysctls
from sandbox_mcp.config import Settings, load_settings
from sandbox_mcp.errors import InvalidSpec
from sandbox_mcp.models import WorkspaceRecord
from sandbox_mcp.naming import cid_for, mac_for, validate_name
from sandbox_mcp.progress import no_progress
from sandbox_mcp.runtimes.base import RuntimeContext
from sandbox_mcp.runtimes.nixos import NixosRuntime, unit_for
from sandbox_mcp.runtimes.nixos import commands as nixos_commands
from sandbox_mcp.runtimes.nixos.settings import NixosSettings

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "nix"
EVAL_NIX = FIXTURES / "eval.nix"
NAMING_NIX = FIXTURES / "naming.nix"
LIB_ENV = "SANDBOX_MCP_NIXPKGS_LIB"
CONTAINERS_ENV = "SANDBOX_MCP_CONTAINERS_NIX"
MICROVM_ENV = "SANDBOX_MCP_MICROVM_NIX"
_CONTAINERS_IN_NIXPKGS = Path("nixos/modules/virtualisation/nixos-containers.nix")

NIX_INSTANTIATE = shutil.which("nix-instantiate")
needs_nix = pytest.mark.skipif(
    NIX_INSTANTIATE is None, reason="nix-instantiate not found (Debian package nix-bin)"
)


def _nix_files() -> list[Path]:
    skip = {".git", ".venv", "node_modules", "result"}
    return sorted(
        p for p in REPO.rglob("*.nix") if not any(part in skip for part in p.relative_to(REPO).parts)
    )


def _find_lib() -> tuple[str | None, str]:
    """The nixpkgs lib directory from the environment, or None and why not."""
    raw = os.environ.get(LIB_ENV)
    if not raw:
        return None, (
            f"{LIB_ENV} is not set; point it at a nixpkgs or nixpkgs.lib checkout (or its lib/ folder) "
            f"to run the NixOS module's evaluation tests (.ci/run unpacks one from ../shared/nix)"
        )
    root = Path(raw).expanduser()
    for cand in (root / "lib", root):
        if (cand / "default.nix").is_file() and (cand / "modules.nix").is_file():
            return str(cand), ""
    return None, f"{LIB_ENV}={raw} holds no nixpkgs lib (no lib/default.nix with modules.nix beside it)"


def _find_containers_module() -> tuple[str | None, str]:
    """nixpkgs' nixos-containers.nix: from its variable, else inside a full nixpkgs checkout."""
    raw = os.environ.get(CONTAINERS_ENV)
    if raw:
        path = Path(raw).expanduser()
        if path.is_file():
            return str(path.resolve()), ""
        return None, f"{CONTAINERS_ENV}={raw} is not a file (nixpkgs' nixos-containers.nix)"
    lib_root = os.environ.get(LIB_ENV)
    if lib_root:
        for root in (Path(lib_root), Path(lib_root).parent):
            if (root / _CONTAINERS_IN_NIXPKGS).is_file():
                return str((root / _CONTAINERS_IN_NIXPKGS).resolve()), ""
    return None, (
        f"{CONTAINERS_ENV} is not set; point it at nixpkgs' {_CONTAINERS_IN_NIXPKGS} "
        f"(.ci/run takes it from ../shared/nix)"
    )


def _find_microvm() -> tuple[str | None, str]:
    """The microvm.nix checkout from the environment, or None and why not."""
    raw = os.environ.get(MICROVM_ENV)
    if not raw:
        return None, (
            f"{MICROVM_ENV} is not set; point it at a microvm.nix checkout "
            f"(.ci/run unpacks one from ../shared/nix)"
        )
    root = Path(raw).expanduser()
    if (root / "nixos-modules" / "host" / "default.nix").is_file():
        return str(root.resolve()), ""
    return None, f"{MICROVM_ENV}={raw} holds no microvm.nix (no nixos-modules/host/default.nix)"


LIB, LIB_MISSING = _find_lib()
CONTAINERS_NIX, CONTAINERS_MISSING = _find_containers_module()
MICROVM_NIX, MICROVM_MISSING = _find_microvm()
needs_lib = pytest.mark.skipif(NIX_INSTANTIATE is None or LIB is None, reason=LIB_MISSING or "no nix")
EVAL_MISSING = (
    "nix-instantiate not found (Debian package nix-bin)"
    if NIX_INSTANTIATE is None
    else "; ".join(m for m in (LIB_MISSING, CONTAINERS_MISSING, MICROVM_MISSING) if m)
)
# The module evaluation tests: nixpkgs lib, nixos-containers.nix and microvm.nix.
needs_eval = pytest.mark.skipif(bool(EVAL_MISSING), reason=EVAL_MISSING)


def _instantiate(expr_file: Path, args: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    assert NIX_INSTANTIATE is not None and LIB is not None
    # The stand-in eval-config.nix finds nixpkgs' lib through this search path entry.
    argv = [NIX_INSTANTIATE, "--eval", "--strict", "--json", "-I", f"sandbox-mcp-nixpkgs-lib={LIB}"]
    argv.append(str(expr_file))
    for key, value in args.items():
        argv += ["--argstr", key, value]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)


def _write_json(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / f"input-{uuid.uuid4().hex[:8]}.json"
    path.write_text(json.dumps(data))
    return path


def _eval_args(tmp_path: Path, case: dict[str, Any]) -> dict[str, str]:
    assert LIB is not None and CONTAINERS_NIX is not None and MICROVM_NIX is not None
    return {
        "libPath": LIB,
        "inputFile": str(_write_json(tmp_path, case)),
        "containersModule": CONTAINERS_NIX,
        "microvmSource": MICROVM_NIX,
    }


def evaluate(tmp_path: Path, case: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the module for ``case`` (see eval.nix); fail the test with nix's stderr on error."""
    proc = _instantiate(EVAL_NIX, _eval_args(tmp_path, case))
    if proc.returncode != 0:
        pytest.fail(f"evaluation failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def evaluate_error(tmp_path: Path, case: dict[str, Any]) -> str:
    """Evaluate ``case``, expecting nix to refuse it; returns the error text."""
    proc = _instantiate(EVAL_NIX, _eval_args(tmp_path, case))
    assert proc.returncode != 0, f"evaluation unexpectedly succeeded: {proc.stdout[:2000]}"
    return proc.stderr


def settings(workspaces: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"enable": True, "workspaces": workspaces, **extra}


def _ws(type_: str, ip: str, **kw: Any) -> dict[str, Any]:
    return {"type": type_, "ip": ip, **kw}


INCUS_HOST = {"virtualisation": {"incus": {"enable": True}}}
THREE = {
    "web": {"type": "container", "ip": "192.168.83.10", "packages": ["ripgrep"]},
    "vm1": {"type": "vm", "ip": "192.168.83.11", "vcpu": 2},
    "inc": {"type": "incus", "ip": "192.168.83.12", "autoStart": True},
}


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if EVAL_MISSING:
        pytest.skip(EVAL_MISSING)
    tmp = tmp_path_factory.mktemp("nix-three")
    return evaluate(tmp, {"settings": settings(THREE, stateDir="/srv/sbx"), "host": INCUS_HOST})


# ---- parsing ---------------------------------------------------------------------------------


def test_there_are_nix_files_to_check() -> None:
    names = {p.relative_to(REPO).as_posix() for p in _nix_files()}
    assert {"flake.nix", "nix/modules/default.nix", "nix/modules/lib.nix"} <= names


@needs_nix
@pytest.mark.parametrize("path", _nix_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_nix_file_parses(path: Path) -> None:
    proc = subprocess.run(
        [NIX_INSTANTIATE, "--parse", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr


@needs_nix
def test_parse_check_catches_a_syntax_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nix"
    bad.write_text("{ inherit = 1; }\n")  # the mistake an option named "inherit" would make
    proc = subprocess.run([NIX_INSTANTIATE, "--parse", str(bad)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0


def test_eval_tests_say_why_they_skip() -> None:
    if EVAL_MISSING:
        print(f"NixOS module evaluation tests skipped: {EVAL_MISSING}")
    assert (LIB is not None and CONTAINERS_NIX is not None and MICROVM_NIX is not None) or EVAL_MISSING


def test_source_variables_are_not_server_settings(tmp_path: Path) -> None:
    # The server reads SANDBOX_MCP_* into its settings (and refuses unknown nixos.* ones): the
    # test-only variables must not land there, or every CLI call in the suite would fail.
    env = {LIB_ENV: "/x", CONTAINERS_ENV: "/x", MICROVM_ENV: "/x", "SANDBOX_MCP_REQUIRE_NIX_EVAL": "1"}
    assert load_settings(env=env, config_file=tmp_path / "none.toml") == load_settings(
        env={}, config_file=tmp_path / "none.toml"
    )


# Programs the evaluation tests run for real (the rules' and tmpfiles' own parsers).
EVAL_TOOLS = ("visudo", "cvtsudoers", "doas", "setpriv", "systemd-tmpfiles")


def test_eval_sources_present_where_required() -> None:
    # .ci/run sets this when it unpacked the sources: there, a skip would hide a broken setup.
    if os.environ.get("SANDBOX_MCP_REQUIRE_NIX_EVAL") == "1":
        assert not EVAL_MISSING, EVAL_MISSING
        missing = [tool for tool in EVAL_TOOLS if shutil.which(tool) is None]
        assert not missing, f"{missing} not installed (.ci/run's SANDBOX_MCP_SETUP_EXTRA installs them)"


# ---- naming: the module and the server agree -------------------------------------------------

NAMES = ["ws1", "a", "web-2", "nixpkgs-dev", "zzzzzzzzzzzz", "api-tests", "x9", "quick-test"]
NAME_RULES = ["ws1", "a", "web-2", "Web", "9ab", "a_b", "ab-", "-ab", "abcdefghijkl", "abcdefghijklm", "a.b"]


def _python_valid(name: str) -> bool:
    try:
        validate_name(name)
    except InvalidSpec:
        return False
    return True


@needs_lib
@pytest.mark.parametrize("fallback", ["0", "1"], ids=["fromHexString", "fallback"])
def test_mac_cid_and_name_rules_agree_with_python(tmp_path: Path, fallback: str) -> None:
    names = NAMES + [n for n in NAME_RULES if n not in NAMES]
    proc = _instantiate(
        NAMING_NIX,
        {"libPath": LIB, "inputFile": str(_write_json(tmp_path, names)), "fallback": fallback},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["usedFromHexString"] is (fallback == "0")
    for row in out["names"]:
        name = row["name"]
        assert row["valid"] is _python_valid(name), name
        assert row["mac"] == mac_for(name), name
        assert row["cid"] == cid_for(name), name


# ---- option types ----------------------------------------------------------------------------


@needs_eval
@pytest.mark.parametrize(
    ("workspace", "option"),
    [
        ({"type": "container", "ip": 42}, "sandboxed-workspace.workspaces.web.ip"),
        ({"type": "docker", "ip": "192.168.83.10"}, "sandboxed-workspace.workspaces.web.type"),
        ({"type": "container", "ip": "192.168.83.10", "packages": ["rm -rf /"]}, "packages"),
        ({"type": "vm", "ip": "192.168.83.10", "vcpu": 0}, "sandboxed-workspace.workspaces.web.vcpu"),
        ({"type": "vm", "ip": "192.168.83.10", "cid": 2}, "sandboxed-workspace.workspaces.web.cid"),
        ({"type": "container", "ip": "192.168.83.10", "memoryMiB": -1}, "workspaces.web.memoryMiB"),
        ({"type": "container", "ip": "192.168.83.10", "tasks": "many"}, "workspaces.web.tasks"),
        ({"type": "container", "ip": "192.168.83.10", "autoStart": "yes"}, "autoStart"),
        ({"type": "container", "ip": "192.168.83.10", "colour": "red"}, "colour"),
    ],
    ids=[
        "ip-int",
        "unknown-type",
        "bad-package",
        "zero-vcpu",
        "reserved-cid",
        "negative-memory",
        "tasks-str",
        "autostart-str",
        "unknown-option",
    ],
)
def test_bad_option_values_are_rejected(tmp_path: Path, workspace: dict[str, Any], option: str) -> None:
    err = evaluate_error(tmp_path, {"settings": settings({"web": workspace})})
    assert option in err


@needs_eval
def test_bad_user_name_is_rejected(tmp_path: Path) -> None:
    workspaces = {"web": {"type": "container", "ip": "192.168.83.10"}}
    err = evaluate_error(tmp_path, {"settings": settings(workspaces, user={"name": "Bad User"})})
    assert "sandboxed-workspace.user.name" in err


# ---- backends --------------------------------------------------------------------------------


def test_container_backend(three: dict[str, Any]) -> None:
    # The workspace's container is sbx-web: never one the administrator declared.
    assert set(three["containers"]) == {"sbx-web"}
    c = three["containers"]["sbx-web"]
    assert c["privateNetwork"] is True and c["ephemeral"] is True and c["restartIfChanged"] is True
    assert c["hostBridge"] == "sandbox-br"
    assert c["localAddress"] == "192.168.83.10/24"
    assert c["localMacAddress"] == mac_for("web")
    assert c["autoStart"] is False
    # Unprivileged: root inside is a uid range nspawn picks. The writable shares map only the
    # workspace user to the host owner (owneridmap); root inside reads the host key (rootidmap,
    # read-only). Never ":idmap", which made root inside host root on the shares.
    assert c["privateUsers"] == "pick"
    assert c["bindMounts"] == {
        "/home/agent/workspace": {
            "hostPath": "/srv/sbx/web/workspace",
            "mountPoint": "/home/agent/workspace:owneridmap",
            "isReadOnly": False,
        },
        "/etc/ssh-host-keys": {
            "hostPath": "/srv/sbx/web/ssh-host-keys",
            "mountPoint": "/etc/ssh-host-keys:rootidmap",
            "isReadOnly": True,
        },
        "/home/agent/claude-config": {
            "hostPath": "/srv/sbx/web/claude-config",
            "mountPoint": "/home/agent/claude-config:owneridmap",
            "isReadOnly": False,
        },
    }
    # What nixos-containers.nix hands systemd-nspawn for it (its /etc/nixos-containers/sbx-web.conf).
    conf = three["containerConf"]["sbx-web"]
    assert "PRIVATE_USERS=pick\n" in conf
    assert "HOST_BRIDGE=sandbox-br\n" in conf and "LOCAL_ADDRESS=192.168.83.10/24\n" in conf
    assert f"LOCAL_MAC_ADDRESS={mac_for('web')}\n" in conf
    flags = conf.split('EXTRA_NSPAWN_FLAGS="', 1)[1].split('"', 1)[0].split()
    assert sorted(flags) == sorted(
        [
            "--bind=/srv/sbx/web/workspace:/home/agent/workspace:owneridmap",
            "--bind-ro=/srv/sbx/web/ssh-host-keys:/etc/ssh-host-keys:rootidmap",
            "--bind=/srv/sbx/web/claude-config:/home/agent/claude-config:owneridmap",
        ]
    )
    unit = three["services"]["container@sbx-web"]
    # The module-wide default limits on the container's unit (its cgroup holds the container).
    limits = {k: unit["serviceConfig"][k] for k in ("CPUQuota", "MemoryMax", "MemorySwapMax", "TasksMax")}
    assert limits == {"CPUQuota": "400%", "MemoryMax": "4096M", "MemorySwapMax": "0", "TasksMax": 4096}
    # ... merged into nixos-containers.nix's own unit, not replacing it.
    assert unit["serviceConfig"]["Delegate"] is True and unit["serviceConfig"]["Type"] == "notify"
    # After its state directories, and never before the network policy is loaded.
    needs = ["sandboxed-workspace-setup-web.service", "sandboxed-workspace-firewall.service"]
    assert unit["requires"] == unit["after"] == needs
    # Restarted on a rebuild even without autoStart (nixpkgs only triggers for autoStart).
    assert unit["restartIfChanged"] is True
    assert unit["restartTriggers"] == [c["path"]]
    # owneridmap maps the mount point's owner: the unit makes the writable ones the workspace user's
    # in the fresh root, after nixos-containers.nix's own preStart.
    pre = unit["preStart"]
    assert pre.index("machinectl terminate") < pre.index('mkdir -p "$root"/home/agent/workspace')
    for target in ("/home/agent/workspace", "/home/agent/claude-config"):
        assert f'mkdir -p "$root"{target}\nchown -h 1000:1000 "$root"{target}\n' in pre
    assert "ssh-host-keys" not in pre


@needs_eval
@pytest.mark.parametrize("private_users", ["no", "identity"])
def test_root_on_the_host_only_when_asked_for_by_name(tmp_path: Path, private_users: str) -> None:
    web = {"web": _ws("container", "192.168.83.10")}
    out = evaluate(tmp_path, {"settings": settings(web, container={"privateUsers": private_users})})
    (msg,) = out["failedAssertions"]
    assert f'privateUsers = "{private_users}" makes root inside' in msg and "allowRootOnHost = true" in msg
    out = evaluate(
        tmp_path,
        {"settings": settings(web, container={"privateUsers": private_users, "allowRootOnHost": True})},
    )
    assert out["failedAssertions"] == []
    c = out["containers"]["sbx-web"]
    assert c["privateUsers"] == private_users
    assert c["bindMounts"]["/home/agent/workspace"]["mountPoint"] == "/home/agent/workspace"
    conf = out["containerConf"]["sbx-web"]
    assert f"PRIVATE_USERS={private_users}\n" in conf and "idmap" not in conf


@needs_eval
def test_the_root_on_host_option_says_it_gives_root_away(tmp_path: Path) -> None:
    text = (REPO / "nix" / "modules" / "options.nix").read_text()
    block = text[text.index("container.allowRootOnHost"):text.index("vm = {")]
    assert "GIVES ROOT ON THE HOST AWAY" in block


@needs_eval
@pytest.mark.parametrize(("value", "ok"), [(65536 * 1000, True), (65536 * 1000 + 5, False)])
def test_a_fixed_uid_range(tmp_path: Path, value: int, ok: bool) -> None:
    out = evaluate(
        tmp_path, {"settings": settings({"web": _ws("container", "192.168.83.10")}, container={"privateUsers": value})}
    )
    if ok:
        assert out["failedAssertions"] == []
        assert out["containers"]["sbx-web"]["bindMounts"]["/home/agent/workspace"]["mountPoint"].endswith(
            ":owneridmap"
        )
    else:
        assert any("not a multiple of\n65536" in m for m in out["failedAssertions"])


@needs_eval
def test_owneridmap_needs_systemd_255(tmp_path: Path) -> None:
    old = {"type": "derivation", "name": "systemd-254.10", "version": "254.10", "outPath": "/nix/store/x-systemd"}
    out = evaluate(
        tmp_path, {"settings": settings({"web": _ws("container", "192.168.83.10")}), "host": {"systemd": {"package": old}}}
    )
    (msg,) = out["failedAssertions"]
    assert '"owneridmap" bind option, which needs systemd 255' in msg and "254.10" in msg


@needs_eval
def test_limits_per_workspace(tmp_path: Path) -> None:
    workspaces = {
        "small": _ws("container", "192.168.83.10", cpus=1, memoryMiB=512, tasks=256),
        "vm1": _ws("vm", "192.168.83.11", cpus=3, memoryMiB=3072),
        "vm2": _ws("vm", "192.168.83.12", vcpu=2, memory=1536),  # the older names
        "vm3": _ws("vm", "192.168.83.13"),
        "big": _ws("container", "192.168.83.14"),
    }
    out = evaluate(
        tmp_path,
        {"settings": settings(workspaces, limits={"cpus": 6, "memoryMiB": 6144, "tasks": 9000})},
    )
    assert out["failedAssertions"] == []
    small = out["services"]["container@sbx-small"]["serviceConfig"]
    assert (small["CPUQuota"], small["MemoryMax"], small["TasksMax"]) == ("100%", "512M", 256)
    big = out["services"]["container@sbx-big"]["serviceConfig"]
    assert (big["CPUQuota"], big["MemoryMax"], big["TasksMax"]) == ("600%", "6144M", 9000)
    vms = {n: out["guests"][f"sbx-{n}"]["microvm"] for n in ("vm1", "vm2", "vm3")}
    assert [(v["vcpu"], v["mem"]) for v in vms.values()] == [(3, 3072), (2, 1536), (6, 6144)]


@needs_eval
def test_limits_from_the_registry(tmp_path: Path) -> None:
    registry = tmp_path / "sandboxed-workspaces.json"
    registry.write_text(
        json.dumps(
            {
                "version": 1,
                "authorizedKeys": [SERVER_KEY],
                "workspaces": {
                    "c1": {"type": "container", "ip": "192.168.83.10", "cpus": 2, "memoryMiB": 1024, "tasks": 300},
                    "v1": {"type": "vm", "ip": "192.168.83.11", "cpus": 2, "memoryMiB": 2048},
                },
            }
        )
    )
    out = evaluate(tmp_path, {"settings": settings({}, registryFile=str(registry))})
    unit = out["services"]["container@sbx-c1"]["serviceConfig"]
    assert (unit["CPUQuota"], unit["MemoryMax"], unit["TasksMax"]) == ("200%", "1024M", 300)
    assert (out["guests"]["sbx-v1"]["microvm"]["vcpu"], out["guests"]["sbx-v1"]["microvm"]["mem"]) == (2, 2048)


def test_vm_backend(three: dict[str, Any]) -> None:
    assert set(three["vms"]) == {"sbx-vm1"}
    assert three["vms"]["sbx-vm1"]["autostart"] is False
    assert three["vms"]["sbx-vm1"]["restartIfChanged"] is True
    assert three["guests"]["sbx-vm1"]["hostName"] == "vm1"  # the workspace's name, not the machine's
    mv = three["guests"]["sbx-vm1"]["microvm"]
    assert mv["hypervisor"] == "cloud-hypervisor"
    assert mv["interfaces"] == [{"type": "tap", "id": "vm-vm1", "mac": mac_for("vm1")}]
    assert mv["vsock"] == {"cid": cid_for("vm1")}
    assert mv["vcpu"] == 2 and mv["mem"] == 4096
    assert mv["writableStoreOverlay"] == "/nix/.rw-store"
    assert mv["volumes"] == [{"image": "overlay.img", "mountPoint": "/nix/.rw-store", "size": 8192}]
    shares = {s["tag"]: s for s in mv["shares"]}
    assert shares["ro-store"]["source"] == "/nix/store"
    assert shares["ro-store"]["mountPoint"] == "/nix/.ro-store"
    assert shares["ro-store"]["readOnly"] is True and shares["ro-store"]["posixAcl"] is False
    # virtiofsd (root on the host) lets the guest create and own files in a writable share only as
    # the workspace user (uid and gid 1000, the host owner); every other guest id is refused. No
    # ACLs or xattrs (file capabilities) either.
    translate = [
        f"--translate-{kind}={rule}"
        for kind in ("uid", "gid")
        for rule in ("forbid-guest:0:1000", "map:1000:1000:1", "forbid-guest:1001:4294966294")
    ]
    assert 1001 + 4294966294 == 2**32 - 1
    assert shares["workspace"] == {
        "proto": "virtiofs",
        "tag": "workspace",
        "source": "/srv/sbx/vm1/workspace",
        "mountPoint": "/home/agent/workspace",
        "readOnly": False,
        "posixAcl": False,
        "extraArgs": translate,
    }
    assert shares["claude-config"]["extraArgs"] == translate and shares["claude-config"]["posixAcl"] is False
    assert shares["ssh-host-keys"]["mountPoint"] == "/etc/ssh-host-keys"
    assert shares["ssh-host-keys"]["readOnly"] is True and shares["ssh-host-keys"]["posixAcl"] is False
    assert shares["claude-config"]["mountPoint"] == "/home/agent/claude-config"
    unit = three["services"]["microvm@sbx-vm1"]
    assert unit["overrideStrategy"] == "asDropin"
    needs = ["sandboxed-workspace-setup-vm1.service", "sandboxed-workspace-firewall.service"]
    assert unit["requires"] == needs
    # virtiofsd serves the shares: it starts only after the setup unit fixed their owner and mode.
    virtiofsd = three["services"]["microvm-virtiofsd@sbx-vm1"]
    assert virtiofsd["overrideStrategy"] == "asDropin"
    assert virtiofsd["requires"] == virtiofsd["after"] == needs
    setup = three["services"]["sandboxed-workspace-setup-vm1"]
    assert "microvm-virtiofsd@sbx-vm1.service" in setup["before"]
    # microvm.nix's own template orders virtiofsd before the VM, so the chain is complete.
    assert "microvm-virtiofsd@%i.service" in three["services"]["microvm@"]["after"]
    # The host bridge enslaves exactly the VMs' TAPs.
    taps = three["network"]["systemd"]["networks"]["41-sandboxed-workspace-taps"]
    assert taps["matchConfig"]["Name"] == ["vm-vm1"] and taps["networkConfig"]["Bridge"] == "sandbox-br"


def test_incus_backend(three: dict[str, Any]) -> None:
    unit = three["services"]["incus-workspace-inc"]
    assert unit["wantedBy"] == ["multi-user.target"]  # autoStart
    assert "incus.service" in unit["requires"] and "sandboxed-workspace-setup-inc.service" in unit["requires"]
    assert "sandboxed-workspace-firewall.service" in unit["requires"]
    assert unit["serviceConfig"]["Type"] == "oneshot" and unit["serviceConfig"]["RemainAfterExit"] is True
    # The image is evaluated from this workspace's guest modules.
    assert [t.rsplit("-", 1)[-1] for t in unit["restartTriggers"]] == ["inc", "inc"]
    start = unit["serviceConfig"]["ExecStart"].split("#", 1)[1]
    stop = unit["serviceConfig"]["ExecStop"].split("#", 1)[1]
    for script in (start, stop):
        assert "exec 9>/run/sandboxed-workspace-incus.lock\nflock 9\n" in script
    store = "/nix/store/00000000000000000000000000000000"
    images = f"{store}-metadata-inc/tarball/*.tar.xz {store}-tarball-inc/tarball/*.tar.xz"
    assert f"incus image import {images}" in start
    assert "incus delete --force workspace-inc" in start
    # Nothing is added imperatively: the instance comes from the default profile and its own.
    assert (
        "incus create --ephemeral sandboxed-workspace-inc-" in start
        and " workspace-inc --profile default --profile sandboxed-workspace-inc\n" in start
    )
    assert "config device add" not in start
    assert start.index("incus create") < start.index("incus start workspace-inc")
    # ... which NixOS's incus-preseed.service creates or updates on each rebuild.
    assert "incus-preseed.service" in unit["requires"] and "incus-preseed.service" in unit["after"]
    (profile,) = three["incusPreseed"]["profiles"]
    assert profile["name"] == "sandboxed-workspace-inc"
    assert profile["config"] == {
        "limits.cpu": "4",
        "limits.memory": "4096MiB",
        "limits.memory.swap": "false",
        "limits.processes": "4096",
        "security.nesting": "true",
        # A range of its own; only the workspace user passes through to the host owner.
        "security.idmap.isolated": "true",
        "raw.idmap": "uid 1000 1000\ngid 1000 1000",
    }
    # No `shift` on a writable share (it made root inside host root there); the read-only host key is
    # shifted so that root inside can read it.
    assert profile["devices"] == {
        "eth0": {
            "type": "nic",
            "nictype": "bridged",
            "parent": "sandbox-br",
            "hwaddr": mac_for("inc"),
            "name": "eth0",
            "host_name": "vi-inc",  # the port the network policy filters
        },
        "workspace": {
            "type": "disk",
            "source": "/srv/sbx/inc/workspace",
            "path": "/home/agent/workspace",
            "readonly": "false",
        },
        "ssh-host-keys": {
            "type": "disk",
            "source": "/srv/sbx/inc/ssh-host-keys",
            "path": "/etc/ssh-host-keys",
            "readonly": "true",
            "shift": "true",
        },
        "claude-config": {
            "type": "disk",
            "source": "/srv/sbx/inc/claude-config",
            "path": "/home/agent/claude-config",
            "readonly": "false",
        },
    }
    # raw.idmap needs root to be allowed to delegate that one id (/etc/subuid, /etc/subgid).
    assert three["rootSubIds"] == {
        "uids": [{"startUid": 1000, "count": 1}],
        "gids": [{"startGid": 1000, "count": 1}],
    }
    # Every value is a string, as Incus wants them.
    assert all(isinstance(v, str) for v in profile["config"].values())
    assert all(isinstance(v, str) for d in profile["devices"].values() for v in d.values())
    assert "incus stop --force workspace-inc" in stop


def test_hosts_aliases_and_setup_units(three: dict[str, Any]) -> None:
    assert three["hosts"] == {
        "192.168.83.10": ["workspace-web"],
        "192.168.83.11": ["workspace-vm1"],
        "192.168.83.12": ["workspace-inc"],
    }
    aliases = three["aliases"]
    assert aliases["workspace_web"] == "ssh agent@workspace-web"
    assert aliases["workspace_web_start"] == "sudo systemctl start container@sbx-web"
    assert aliases["workspace_vm1_stop"] == "sudo systemctl stop microvm@sbx-vm1"
    assert aliases["workspace_inc_restart"] == "sudo systemctl restart incus-workspace-inc"
    assert aliases["workspace_inc_status"] == "systemctl status incus-workspace-inc"
    assert len(aliases) == 15
    for name, unit in [("web", "container@sbx-web"), ("vm1", "microvm@sbx-vm1"), ("inc", "incus-workspace-inc")]:
        setup = three["services"][f"sandboxed-workspace-setup-{name}"]
        virtiofsd = [f"microvm-virtiofsd@sbx-{name}.service"] if name == "vm1" else []
        assert setup["before"] == [f"{unit}.service", *virtiofsd]
        assert setup["unitConfig"]["RequiresMountsFor"] == ["/srv/sbx"]  # after the nosuid mount
        script = setup["script"]
        assert "root=$(realpath -e -- /srv/sbx)\n" in script and f"name={name}\n" in script
        # The host key is made by its owner, not by root.
        assert 'as "$keys_owner" "$keys_group" ssh-keygen -q -t ed25519 -N "" -C "$name"' in script
        assert 'if [ ! -e "$key" ]' in script  # only when missing: the server's key is kept
        assert "authorized_keys" in script
        assert "hostKey" not in script  # no pin declared
    assert three["knownHosts"] == {}
    # The shares are nosuid,nodev on the host side too.
    assert three["fileSystems"] == {
        "/srv/sbx": {"device": "/srv/sbx", "fsType": "none", "options": ["nosuid", "nodev", "bind"]}
    }


def test_host_network(three: dict[str, Any]) -> None:
    net = three["network"]
    netdev = net["systemd"]["netdevs"]["40-sandboxed-workspace"]["netdevConfig"]
    assert netdev == {"Kind": "bridge", "Name": "sandbox-br"}
    assert net["systemd"]["networks"]["40-sandboxed-workspace"]["address"] == ["192.168.83.1/24"]
    assert net["nat"]["enable"] is True and net["nat"]["internalInterfaces"] == ["sandbox-br"]
    assert net["dnsmasq"]["settings"]["listen-address"] == "192.168.83.1"
    assert net["dnsmasq"]["settings"]["bind-dynamic"] is True
    assert net["systemd"]["config"]["networkConfig"]["ManageForeignRoutes"] is False
    assert net["dnsmasq"]["resolveLocalQueries"] is False
    assert net["firewall"]["interfaces"]["sandbox-br"]["allowedUDPPorts"] == [53]
    for pattern in ("vb-*", "vm-*", "veth*"):
        assert f"interface-name:{pattern}" in net["unmanaged"]


def test_guest_base_configuration(three: dict[str, Any]) -> None:
    for name, ip in [("web", "192.168.83.10"), ("vm1", "192.168.83.11")]:
        g = three["guests"][f"sbx-{name}"]
        assert g["hostName"] == name
        nw = g["network"]["10-sandboxed-workspace"]
        assert nw["matchConfig"] == {"MACAddress": mac_for(name)}
        assert nw["address"] == [f"{ip}/24"]
        assert nw["gateway"] == ["192.168.83.1"] and nw["dns"] == ["192.168.83.1"]
        ssh = g["openssh"]
        assert ssh["hostKeys"] == [{"path": "/etc/ssh-host-keys/ssh_host_ed25519_key", "type": "ed25519"}]
        assert ssh["authorizedKeysFiles"] == ["/etc/ssh-host-keys/authorized_keys"]
        assert ssh["settings"]["PasswordAuthentication"] is False
        assert ssh["settings"]["KbdInteractiveAuthentication"] is False
        user = g["users"]["agent"]
        assert user["uid"] == 1000 and user["home"] == "/home/agent" and user["isNormalUser"] is True
        # Its own group with its uid as gid: the one id the shares map, for uid and gid alike.
        assert user["group"] == "agent" and g["groups"]["agent"] == {"gid": 1000}
        assert g["doas"]["extraRules"] == [{"users": ["agent"], "noPass": True, "keepEnv": True}]
        assert g["variables"]["CLAUDE_CONFIG_DIR"] == "/home/agent/claude-config"
        assert "claude-bin" in g["packages"]  # the wrapper, not the bare package
        onboarding = g["services"]["sandboxed-workspace-claude-onboarding"]
        assert onboarding["serviceConfig"]["User"] == "agent"
        seeded = json.loads(onboarding["script"].split("#", 1)[1].split(" /home/agent/claude-config")[0])
        assert seeded["hasCompletedOnboarding"] is True
        assert seeded["projects"]["/home/agent/workspace"]["hasTrustDialogAccepted"] is True
        assert g["stateVersion"] == "25.05"
    assert three["guests"]["sbx-web"]["packages"][:1] == ["ripgrep"]


@needs_eval
def test_guest_options_user_keys_cache_and_claude(tmp_path: Path) -> None:
    out = evaluate(
        tmp_path,
        {
            "settings": settings(
                {"dev": _ws("container", "192.168.83.40", packages=["python3Packages.requests"])},
                user={"name": "alice", "uid": 1001, "authorizedKeys": ["ssh-ed25519 AAAAuser alice@laptop"]},
                claude={"onboarding": False, "skipPermissions": False},
                binaryCache={"netrcFile": "/run/agenix/netrc"},
            ),
            "host": {
                "nix": {
                    "settings": {"substituters": ["https://cache.example"], "trusted-public-keys": ["k:1"]}
                },
                "security": {"doas": {"enable": True}},
            },
        },
    )
    g = out["guests"]["sbx-dev"]
    assert g["users"]["alice"]["uid"] == 1001
    assert g["users"]["alice"]["openssh"]["authorizedKeys"]["keys"] == ["ssh-ed25519 AAAAuser alice@laptop"]
    assert g["packages"] == ["python3.12-requests-2.32.3", "git", "claude-code"]
    assert "sandboxed-workspace-claude-onboarding" not in g["services"]
    assert g["nix"] == {
        "substituters": ["https://cache.example"],
        "trusted-public-keys": ["k:1"],
        "netrc-file": "/var/lib/sandbox-secrets/netrc",
    }
    assert out["containers"]["sbx-dev"]["bindMounts"]["/var/lib/sandbox-secrets"] == {
        "hostPath": "/run/sandboxed-workspace/dev",
        "mountPoint": "/var/lib/sandbox-secrets:rootidmap",
        "isReadOnly": True,
    }
    assert out["containers"]["sbx-dev"]["bindMounts"]["/home/alice/workspace"]["isReadOnly"] is False
    script = out["services"]["sandboxed-workspace-setup-dev"]["script"]
    assert 'install -m 0400 -o 0 -g 0 /run/agenix/netrc "/run/sandboxed-workspace/$name/netrc"' in script
    assert "dir workspace 0700 1001 1001\n" in script
    assert out["aliases"]["workspace_dev_start"] == "doas systemctl start container@sbx-dev"
    assert out["aliases"]["workspace_dev"] == "ssh alice@workspace-dev"


@needs_eval
def test_pinned_host_key(tmp_path: Path) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPinned dev"
    out = evaluate(
        tmp_path,
        {"settings": settings({"dev": {"type": "container", "ip": "192.168.83.40", "hostKey": key}})},
    )
    assert out["knownHosts"] == {
        "workspace-dev": {"hostNames": ["workspace-dev", "192.168.83.40"], "publicKey": key}
    }
    script = out["services"]["sandboxed-workspace-setup-dev"]["script"]
    assert "!= 'ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPinned'" in script
    assert "exit 1" in script


@needs_eval
def test_disabled_module_sets_nothing(tmp_path: Path) -> None:
    out = evaluate(tmp_path, {"settings": {"workspaces": THREE}, "host": INCUS_HOST})
    assert out["containers"] == {} and out["vms"] == {}
    # Only microvm.nix's own unit templates, nothing of a workspace.
    assert out["services"] and all(name.endswith("@") for name in out["services"])
    assert out["hosts"] == {} and out["aliases"] == {} and out["failedAssertions"] == []
    assert out["network"]["systemd"] == {}


@needs_eval
def test_module_works_without_microvm_for_other_types(tmp_path: Path) -> None:
    out = evaluate(
        tmp_path,
        {"microvm": False, "settings": settings({"web": {"type": "container", "ip": "192.168.83.10"}})},
    )
    assert out["failedAssertions"] == []
    assert set(out["containers"]) == {"sbx-web"}


# ---- assertions ------------------------------------------------------------------------------


ASSERTION_CASES = {
    "duplicate-ip": (
        {"a": _ws("container", "192.168.83.10"), "b": _ws("vm", "192.168.83.10")},
        ["workspaces a, b share the IP 192.168.83.10", "Give each workspace its own ip"],
    ),
    "duplicate-cid": (
        {"a": _ws("vm", "192.168.83.10", cid=77), "b": _ws("vm", "192.168.83.11", cid=77)},
        ["workspaces a, b share the vsock CID 77", "Set a distinct cid"],
    ),
    "derived-cid-clash": (
        {"a": _ws("vm", "192.168.83.10"), "b": _ws("vm", "192.168.83.11", cid=cid_for("a"))},
        [f"workspaces a, b share the vsock CID {cid_for('a')}"],
    ),
    "uppercase-name": ({"Web": _ws("vm", "192.168.83.10")}, ['workspace name "Web" is invalid', "rename it"]),
    "digit-first": ({"9ab": _ws("vm", "192.168.83.10")}, ['workspace name "9ab" is invalid']),
    "underscore": ({"a_b": _ws("vm", "192.168.83.10")}, ['workspace name "a_b" is invalid']),
    "trailing-dash": ({"ab-": _ws("vm", "192.168.83.10")}, ['workspace name "ab-" is invalid']),
    "13-chars": ({"abcdefghijklm": _ws("vm", "192.168.83.10")}, ["at most 12"]),
    "container-8-chars": (
        {"abcdefgh": _ws("container", "192.168.83.10")},
        ['container workspace "abcdefgh" has 8', 'container "sbx-abcdefgh" may have at most 11',
         "has at most\n7", 'use type "vm" or "incus"'],
    ),
    "ip-outside-subnet": (
        {"a": _ws("container", "10.0.0.5")},
        ['sandboxed-workspace.workspaces.a.ip = "10.0.0.5" is not a usable address of\n192.168.83.0/24'],
    ),
    "ip-is-host": ({"a": _ws("container", "192.168.83.1")}, ['a.ip = "192.168.83.1" is not a usable']),
    "ip-is-broadcast": (
        {"a": _ws("container", "192.168.83.255")},
        ['a.ip = "192.168.83.255" is not a usable'],
    ),
    "ip-malformed": ({"a": _ws("container", "192.168.83.300")}, ['a.ip = "192.168.83.300" is not a usable']),
    "vcpu-on-container": (
        {"a": _ws("container", "192.168.83.10", vcpu=2)},
        ['sandboxed-workspace.workspaces.a.vcpu only applies to type "vm"', "Remove vcpu"],
    ),
    "memory-on-incus": (
        {"a": _ws("incus", "192.168.83.10", memory=2048)},
        ['sandboxed-workspace.workspaces.a.memory only applies to type "vm"'],
    ),
    "cid-on-container": ({"a": _ws("container", "192.168.83.10", cid=50)}, ["workspaces.a.cid only applies"]),
    "cpus-and-vcpu": (
        {"a": _ws("vm", "192.168.83.10", cpus=2, vcpu=4)},
        ["workspaces.a.cpus and sandboxed-workspace.workspaces.a.vcpu are both set", "remove vcpu"],
    ),
    "memory-twice": (
        {"a": _ws("vm", "192.168.83.10", memoryMiB=2048, memory=4096)},
        ["workspaces.a.memoryMiB and sandboxed-workspace.workspaces.a.memory are both set"],
    ),
    "unknown-package": (
        {"a": _ws("container", "192.168.83.10", packages=["ripgrep", "python3Packages.nope"])},
        ['names "python3Packages.nope", which is not a package of pkgs'],
    ),
}


@needs_eval
@pytest.mark.parametrize("case", list(ASSERTION_CASES))
def test_assertions_fire(tmp_path: Path, case: str) -> None:
    workspaces, expected = ASSERTION_CASES[case]
    out = evaluate(tmp_path, {"settings": settings(workspaces), "host": INCUS_HOST})
    messages = "\n".join(out["failedAssertions"])
    for fragment in expected:
        assert fragment in messages, f"{fragment!r} not in:\n{messages}"


@needs_eval
def test_valid_setup_passes_every_assertion(three: dict[str, Any]) -> None:
    assert three["failedAssertions"] == []
    # The guests' too: nixos-containers.nix's name checks, microvm.nix's share/interface checks.
    for name, guest in three["guests"].items():
        assert guest["failedAssertions"] == [], name


@needs_eval
def test_the_real_backend_modules_check_their_options(tmp_path: Path) -> None:
    # The evaluation uses nixpkgs' and microvm.nix's own option declarations, not loose stubs.
    err = evaluate_error(tmp_path, {"host": {"containers": {"x": {"path": "/nix/store/x", "privateUsers": "everyone"}}}})
    assert "containers.x.privateUsers" in err
    err = evaluate_error(tmp_path, {"host": {"microvm": {"vms": {"other": {"autostart": "yes", "config": {}}}}}})
    assert "microvm.vms.other.autostart" in err
    module = tmp_path / "bad-share.nix"
    module.write_text('{ microvm.shares = [ { tag = "t"; source = "/s"; mountPoint = "/m"; proto = "nfs"; } ]; }')
    err = evaluate_error(
        tmp_path,
        {"settings": settings({"v": {**_ws("vm", "192.168.83.10"), "config": str(module)}})},
    )
    assert "microvm.shares" in err and "proto" in err
    # microvm.nix's own guest assertions run too: a share tag the module already uses.
    module.write_text(
        '{ microvm.shares = [ { tag = "workspace"; source = "/s"; mountPoint = "/m"; proto = "virtiofs"; } ]; }'
    )
    out = evaluate(
        tmp_path,
        {"settings": settings({"v": {**_ws("vm", "192.168.83.10"), "config": str(module)}})},
    )
    assert any('share tag "workspace" is used 2 > 1 times' in m for m in out["guests"]["sbx-v"]["failedAssertions"])


@needs_eval
@pytest.mark.parametrize(
    ("type_", "host", "option"),
    [
        ("container", {"containers": {"sbx-web": {"path": "/nix/store/x-mine"}}}, 'containers."sbx-web"'),
        ("vm", {"microvm": {"vms": {"sbx-web": {"autostart": True, "config": {}}}}}, 'microvm.vms."sbx-web"'),
    ],
)
def test_a_machine_of_the_administrators_with_a_workspaces_name_is_refused(
    tmp_path: Path, type_: str, host: dict[str, Any], option: str
) -> None:
    web = {"web": _ws(type_, "192.168.83.10")}
    out = evaluate(tmp_path, {"settings": settings(web), "host": host})
    (msg,) = out["failedAssertions"]
    assert f"workspace web is the {'VM' if type_ == 'vm' else 'container'} sbx-web" in msg
    assert f"({option})" in msg and "would merge into one" in msg
    # The administrator's own machines under other names (even the bare workspace name) are theirs.
    mine = {k: {"web": v["sbx-web"]} for k, v in host.items()} if type_ == "container" else {
        "microvm": {"vms": {"web": {"autostart": True, "config": {}}}}
    }
    out = evaluate(tmp_path, {"settings": settings(web), "host": mine})
    assert out["failedAssertions"] == []
    machines = out["containers"] if type_ == "container" else out["vms"]
    assert {"web", "sbx-web"} <= set(machines)


@needs_eval
def test_vm_without_microvm_module_asks_for_it(tmp_path: Path) -> None:
    out = evaluate(tmp_path, {"microvm": False, "settings": settings({"v": _ws("vm", "192.168.83.10")})})
    (msg,) = out["failedAssertions"]
    assert "needs microvm.nix's host module" in msg and "nixosModules.default" in msg


@needs_eval
def test_incus_needs_incus_enabled(tmp_path: Path) -> None:
    out = evaluate(tmp_path, {"settings": settings({"i": _ws("incus", "192.168.83.10")})})
    (msg,) = out["failedAssertions"]
    assert "virtualisation.incus.enable = true;" in msg


@needs_eval
def test_subnet_too_small(tmp_path: Path) -> None:
    out = evaluate(tmp_path, {"settings": settings({}, network={"subnet": "192.168.83.0/31"})})
    assert any('subnet = "192.168.83.0/31" is not an IPv4 subnet' in m for m in out["failedAssertions"])


@needs_eval
def test_host_address_outside_subnet(tmp_path: Path) -> None:
    out = evaluate(tmp_path, {"settings": settings({}, network={"hostAddress": "10.1.1.1"})})
    assert any("hostAddress" in m and "10.1.1.1" in m for m in out["failedAssertions"])


# ---- the registry ----------------------------------------------------------------------------

SERVER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIServerKey sandbox-mcp"
WS1_MODULE = "{ pkgs, ... }: { environment.systemPackages = [ pkgs.jq ]; }\n"


def _registry_tree(tmp_path: Path) -> Path:
    """A flake-like directory as the server writes it: the registry and workspaces/ws1.nix."""
    root = tmp_path / "flake"
    (root / "workspaces").mkdir(parents=True)
    (root / "workspaces" / "ws1.nix").write_text(WS1_MODULE)
    registry = {
        "version": 1,
        "authorizedKeys": [SERVER_KEY],
        "workspaces": {
            "ws1": {
                "type": "container",
                "ip": "192.168.83.10",
                "packages": ["ripgrep", "python3Packages.requests"],
                "autoStart": False,
                "config": "workspaces/ws1.nix",
                "vcpu": None,
                "memory": None,
                "hostKey": None,
            },
            "vm2": {
                "type": "vm",
                "ip": "192.168.83.11",
                "packages": [],
                "autoStart": True,
                "config": None,
                "vcpu": 2,
                "memory": 2048,
                "hostKey": None,
            },
        },
    }
    path = root / "sandboxed-workspaces.json"
    path.write_text(json.dumps(registry, indent=2))
    return path


@needs_eval
def test_registry_evaluates_like_the_declared_equivalent(tmp_path: Path) -> None:
    registry = _registry_tree(tmp_path)
    from_registry = evaluate(tmp_path, {"settings": settings({}, registryFile=str(registry))})
    declared = evaluate(
        tmp_path,
        {
            "settings": settings(
                {
                    "ws1": {
                        "type": "container",
                        "ip": "192.168.83.10",
                        "packages": ["ripgrep", "python3Packages.requests"],
                        "config": str(registry.parent / "workspaces" / "ws1.nix"),
                    },
                    "vm2": _ws("vm", "192.168.83.11", autoStart=True, vcpu=2, memory=2048),
                },
                user={"authorizedKeys": [SERVER_KEY]},
            )
        },
    )
    assert from_registry["failedAssertions"] == []
    assert set(from_registry["workspaces"]) == {"ws1", "vm2"}
    for key in ("workspaces", "containers", "vms", "services", "hosts", "aliases", "network", "guests"):
        assert from_registry[key] == declared[key], key
    # The relative config path resolved against the registry's directory, and the server's key is in.
    ws1 = from_registry["guests"]["sbx-ws1"]
    assert "jq" in ws1["packages"] and "python3.12-requests-2.32.3" in ws1["packages"]
    assert ws1["users"]["agent"]["openssh"]["authorizedKeys"]["keys"] == [SERVER_KEY]
    assert from_registry["guests"]["sbx-vm2"]["microvm"]["mem"] == 2048


@needs_eval
def test_registry_and_declared_merge(tmp_path: Path) -> None:
    registry = _registry_tree(tmp_path)
    out = evaluate(
        tmp_path,
        {
            "settings": settings(
                {"mine": _ws("container", "192.168.83.30")},
                registryFile=str(registry),
                user={"authorizedKeys": ["ssh-ed25519 AAAAMine me"]},
            )
        },
    )
    assert out["failedAssertions"] == []
    assert set(out["workspaces"]) == {"mine", "ws1", "vm2"}
    keys = out["guests"]["sbx-mine"]["users"]["agent"]["openssh"]["authorizedKeys"]["keys"]
    assert keys == ["ssh-ed25519 AAAAMine me", SERVER_KEY]


@needs_eval
def test_name_in_registry_and_declarations_is_refused(tmp_path: Path) -> None:
    registry = _registry_tree(tmp_path)
    out = evaluate(
        tmp_path,
        {"settings": settings({"ws1": _ws("container", "192.168.83.30")}, registryFile=str(registry))},
    )
    msg = "\n".join(out["failedAssertions"])
    assert "workspaces ws1 are declared in\nsandboxed-workspace.workspaces and in the registry file" in msg
    assert "Remove one of the two" in msg


@needs_eval
def test_registry_is_type_checked(tmp_path: Path) -> None:
    registry = _registry_tree(tmp_path)
    data = json.loads(registry.read_text())
    data["workspaces"]["ws1"]["type"] = "docker"
    registry.write_text(json.dumps(data))
    err = evaluate_error(tmp_path, {"settings": settings({}, registryFile=str(registry))})
    assert "sandboxed-workspace.registryWorkspaces.ws1.type" in err


@needs_eval
def test_registry_version_and_absolute_config_are_refused(tmp_path: Path) -> None:
    registry = _registry_tree(tmp_path)
    data = json.loads(registry.read_text())
    data["version"] = 2
    data["workspaces"]["vm2"]["config"] = "/etc/sandbox.nix"
    registry.write_text(json.dumps(data))
    out = evaluate(tmp_path, {"settings": settings({}, registryFile=str(registry))})
    messages = "\n".join(out["failedAssertions"])
    assert "has version\n2; this module reads version 1" in messages
    assert "absolute config paths for\nvm2; they must be relative" in messages


@needs_eval
def test_the_registry_may_not_name_a_module_for_a_vm(tmp_path: Path) -> None:
    # The server's user writes the registry; a VM's module would set microvm.nix's host-side
    # options (microvm.binScripts, microvm.shares), which run as root on the host.
    registry = _registry_tree(tmp_path)
    (registry.parent / "workspaces" / "vm2.nix").write_text(
        '{ microvm.shares = [ { proto = "virtiofs"; tag = "root"; source = "/"; mountPoint = "/host"; } ]; }\n'
    )
    data = json.loads(registry.read_text())
    data["workspaces"]["vm2"]["config"] = "workspaces/vm2.nix"
    registry.write_text(json.dumps(data))
    out = evaluate(tmp_path, {"settings": settings({}, registryFile=str(registry))})
    (msg,) = out["failedAssertions"]
    assert "names a config module for the\nVM workspaces vm2" in msg
    assert "microvm.shares, microvm.binScripts" in msg and "runs on the host as root" in msg
    assert out["workspaces"]["vm2"]["hasConfig"] is False  # not even imported
    # The same module, declared by the administrator, is theirs to run.
    declared = settings({"vm2": _ws("vm", "192.168.83.11", config=str(registry.parent / "workspaces" / "vm2.nix"))})
    out = evaluate(tmp_path, {"settings": declared})
    assert out["failedAssertions"] == []
    assert any(s["source"] == "/" for s in out["guests"]["sbx-vm2"]["microvm"]["shares"])


# ---- the server's registry writer and the module's reader, on one file -----------------------

# nixos-rebuild cannot run here: the runtime's command prefix puts a no-op in front of it (python
# ignores the words after `-c CODE`), so prepare() writes the registry and "rebuilds" for real.
_NO_REBUILD = [sys.executable, "-c", "pass"]


async def _write_registry_with_the_server(tmp_path: Path, records: list[WorkspaceRecord]) -> Path:
    flake = tmp_path / "flake"
    flake.mkdir()
    settings = Settings(
        state_dir=tmp_path / "state",
        nixos=NixosSettings(flake=str(flake), host="fry", escalation="sudo"),
    )
    runtime = NixosRuntime(RuntimeContext.for_settings(settings, SERVER_KEY), command_prefix=_NO_REBUILD)
    for record in records:
        await runtime.prepare(record, no_progress)
    assert runtime.registry_path.is_file()
    return runtime.registry_path


def _record(name: str, type_: str, ip: str, packages: list[str]) -> WorkspaceRecord:
    return WorkspaceRecord(
        name=name,
        type=type_,  # type: ignore[arg-type]
        runtime="nixos",
        ip=ip,
        mac=mac_for(name),
        cid=cid_for(name),
        user="agent",
        packages=packages,
    )


@needs_eval
@pytest.mark.anyio
async def test_module_reads_the_registry_the_server_writes(tmp_path: Path) -> None:
    records = [
        _record("web", "container", "192.168.83.20", ["ripgrep", "python3Packages.requests"]),
        _record("vm1", "vm", "192.168.83.21", ["jq"]),
        _record("inc", "incus", "192.168.83.22", []),
    ]
    registry = await _write_registry_with_the_server(tmp_path, records)
    out = evaluate(
        tmp_path,
        {"settings": settings({}, registryFile=str(registry), stateDir="/srv/sbx"), "host": INCUS_HOST},
    )
    assert out["failedAssertions"] == []
    assert set(out["workspaces"]) == {"web", "vm1", "inc"}
    for name in ("web", "vm1", "inc"):
        # The per-workspace .nix template the server wrote is imported (relative to the registry);
        # a VM gets none, since its module would configure the host.
        assert out["workspaces"][name]["hasConfig"] is (name != "vm1")
        assert out["workspaces"][name]["autoStart"] is False
        assert out["workspaces"][name]["egress"] == "none"

    web = out["containers"]["sbx-web"]
    assert web["localAddress"] == "192.168.83.20/24" and web["localMacAddress"] == mac_for("web")
    assert web["hostBridge"] == "sandbox-br" and web["ephemeral"] is True
    assert web["bindMounts"]["/home/agent/workspace"]["hostPath"] == "/srv/sbx/web/workspace"
    guest = out["guests"]["sbx-web"]
    assert {"ripgrep", "python3.12-requests-2.32.3"} <= set(guest["packages"])
    # The server's client key, from the registry, may log in.
    assert guest["users"]["agent"]["openssh"]["authorizedKeys"]["keys"] == [SERVER_KEY]

    assert set(out["vms"]) == {"sbx-vm1"}
    mv = out["guests"]["sbx-vm1"]["microvm"]
    assert mv["interfaces"] == [{"type": "tap", "id": "vm-vm1", "mac": mac_for("vm1")}]
    assert mv["vsock"] == {"cid": cid_for("vm1")}
    assert out["guests"]["sbx-vm1"]["packages"][0] == "jq"

    unit = out["services"]["incus-workspace-inc"]
    assert unit["wantedBy"] == []  # the server starts it
    assert out["hosts"]["192.168.83.22"] == ["workspace-inc"]
    for name, type_ in [("web", "container"), ("vm1", "vm"), ("inc", "incus")]:
        # The units the module declares are the ones the server drives.
        unit_name = unit_for(type_, name)  # type: ignore[arg-type]
        assert f"sandboxed-workspace-setup-{name}.service" in out["services"][unit_name]["requires"]


# ---- issue 12.7: microvm.nix's tmpfiles rules versus the setup unit, for real -----------------


def _tmpfiles_lines(settings_: dict[str, Any], owner_map: dict[str, str]) -> list[str]:
    """tmpfiles.d lines from ``systemd.tmpfiles.settings`` entries, as NixOS writes them."""
    lines = []
    for path, types in settings_.items():
        for kind, e in types.items():
            user = owner_map.get(e["user"], e["user"])
            group = owner_map.get(e["group"], e["group"])
            lines.append(f"{kind} {path} {e['mode']} {user} {group} {e.get('age', '-')} -")
    return lines


@pytest.fixture
def open_dir(request: pytest.FixtureRequest) -> Path:
    """A directory under /tmp that other uids may pass through (pytest's own is 0700), removed after."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-mcp-setup-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(path, ignore_errors=True))
    path.chmod(0o755)
    return path


def _run_setup(out: dict[str, Any], name: str) -> subprocess.CompletedProcess[str]:
    """The setup unit's script, as systemd runs it (bash -e; its `path` is on this host's PATH)."""
    script = out["services"][f"sandboxed-workspace-setup-{name}"]["script"]
    return subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, check=False)


def _owner_mode(p: Path) -> tuple[int, int, str]:
    st = p.lstat()
    return st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)


NOBODY = 65534
def needs_root_tools(test: Any) -> Any:
    """Root (the setup unit chowns) and setpriv (it acts as the owners)."""
    test = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the setup unit chowns directories")(test)
    return pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")(test)


@needs_eval
@pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="systemd-tmpfiles not installed")
@needs_root_tools
def test_setup_unit_fixes_what_microvm_tmpfiles_created(tmp_path: Path, open_dir: Path) -> None:
    state_root = open_dir / "state"
    out = evaluate(
        tmp_path,
        {"settings": settings({"vm1": _ws("vm", "192.168.83.11")}, stateDir=str(state_root))},
    )
    rules = out["tmpfiles"]["10-microvm"]
    ours = {p: r for p, r in rules.items() if p.startswith(str(state_root))}
    assert set(ours) == {f"{state_root}/vm1/{d}" for d in ("workspace", "ssh-host-keys", "claude-config")}
    # What real microvm.nix declares: created as microvm:kvm 0775 (":" = only when missing).
    assert all(r["d"] == {"user": ":microvm", "group": ":kvm", "mode": ":0775"} for r in ours.values())

    # Apply those rules with systemd-tmpfiles, as the host does at boot. The microvm user and kvm
    # group do not exist here: nobody/nogroup stand in for them (any uid but the agent's).
    conf = tmp_path / "microvm.conf"
    conf.write_text("\n".join(_tmpfiles_lines(ours, {":microvm": ":nobody", ":kvm": ":nogroup"})) + "\n")
    subprocess.run(["systemd-tmpfiles", "--create", str(conf)], check=True, capture_output=True)
    ws_dir = state_root / "vm1" / "workspace"
    assert ws_dir.stat().st_uid != 1000 and oct(ws_dir.stat().st_mode & 0o7777) == "0o775"  # the bug's start

    proc = _run_setup(out, "vm1")
    assert proc.returncode == 0, proc.stderr
    root_st = state_root.stat()
    owner = (root_st.st_uid, root_st.st_gid)
    # Only the workspace user (the host owner) reads the shares; the workspace's directory lets
    # them pass without listing; the host key is its owner's alone.
    assert _owner_mode(state_root / "vm1") == (*owner, "0o711")
    assert _owner_mode(ws_dir) == (1000, 1000, "0o700")
    assert _owner_mode(state_root / "vm1" / "claude-config") == (1000, 1000, "0o700")
    keys = state_root / "vm1" / "ssh-host-keys"
    assert _owner_mode(keys) == (*owner, "0o700")  # not the kvm group's any more
    assert _owner_mode(keys / "ssh_host_ed25519_key") == (*owner, "0o600")
    assert _owner_mode(keys / "authorized_keys") == (*owner, "0o644")

    # A second start keeps the key (the server pinned it) and puts the modes back.
    key_before = (keys / "ssh_host_ed25519_key").read_bytes()
    os.chmod(ws_dir, 0o775)
    assert _run_setup(out, "vm1").returncode == 0
    assert (keys / "ssh_host_ed25519_key").read_bytes() == key_before
    assert _owner_mode(ws_dir) == (1000, 1000, "0o700")


OWNERS = {  # two daemon members' workspaces (ownerUid/ownerGid, as the server's registry writes them) and one without
    "c1": _ws("container", "192.168.83.12", ownerUid=NOBODY, ownerGid=NOBODY),
    "v1": _ws("vm", "192.168.83.13", ownerUid=4242, ownerGid=100),
    "i1": _ws("incus", "192.168.83.14", ownerUid=4242, ownerGid=100),
    "i2": _ws("incus", "192.168.83.15"),
}


@needs_eval
def test_every_share_maps_the_workspaces_owner_alone(tmp_path: Path) -> None:
    # Direct mode's owner chain (identity.host_identity): the owner's uid and group are the workspace
    # user's inside, in each type's mapping, and nobody else's; no owner: user.uid, as before.
    out = evaluate(tmp_path, {"settings": settings(OWNERS, stateDir="/srv/sbx"), "host": INCUS_HOST})
    shares = {s["tag"]: s for s in out["guests"]["sbx-v1"]["microvm"]["shares"]}
    for tag in ("workspace", "claude-config"):
        args = shares[tag]["extraArgs"]
        assert "--translate-uid=map:1000:4242:1" in args and "--translate-gid=map:1000:100:1" in args, args
        assert "--translate-uid=forbid-guest:0:1000" in args and "--translate-uid=map:1000:1000:1" not in args
    assert shares["ssh-host-keys"]["extraArgs"] == []
    profiles = {p["name"]: p["config"]["raw.idmap"] for p in out["incusPreseed"]["profiles"]}
    assert profiles == {"sandboxed-workspace-i1": "uid 4242 1000\ngid 100 1000",
                        "sandboxed-workspace-i2": "uid 1000 1000\ngid 1000 1000"}
    # Root may delegate exactly those ids to Incus, once each.
    assert sorted(r["startUid"] for r in out["rootSubIds"]["uids"]) == [1000, 4242]
    assert sorted(r["startGid"] for r in out["rootSubIds"]["gids"]) == [100, 1000]
    assert all(r["count"] == 1 for r in out["rootSubIds"]["uids"] + out["rootSubIds"]["gids"])
    for name, ids in (("c1", f"{NOBODY} {NOBODY}"), ("v1", "4242 100"), ("i2", "1000 1000")):
        script = out["services"][f"sandboxed-workspace-setup-{name}"]["script"]
        assert f"dir workspace 0700 {ids}\n" in script and f"dir claude-config 0700 {ids}\n" in script


@needs_eval
def test_a_registry_owner_reaches_the_module(tmp_path: Path) -> None:
    # What NixosRuntime.registry_entry writes for a daemon member's workspace is accepted as is.
    registry = _write_json(tmp_path, {"version": 1, "authorizedKeys": [], "workspaces": {
        "c1": {"type": "container", "ip": "192.168.83.12", "ownerUid": 4242, "ownerGid": 100, "hostKey": None}}})
    out = evaluate(tmp_path, {"settings": settings({}, registryFile=str(registry))})
    assert "dir workspace 0700 4242 100\n" in out["services"]["sandboxed-workspace-setup-c1"]["script"]
    bad = _write_json(tmp_path, {"version": 1, "authorizedKeys": [], "workspaces": {
        "c1": {"type": "container", "ip": "192.168.83.12", "ownerUid": 0}}})
    assert "ownerUid" in evaluate_error(tmp_path, {"settings": settings({}, registryFile=str(bad))})


@needs_eval
@needs_root_tools
def test_setup_unit_gives_each_workspace_to_its_owner_alone(tmp_path: Path, open_dir: Path) -> None:
    # Run for real: the state root as its user left it (0755) is narrowed to 0711; each workspace's
    # shares are its owner's, 0700; the other owner (here uid 1000, the default) can neither list the
    # state root nor enter another's workspace, and each owner can use their own.
    state_root = open_dir / "state"
    state_root.mkdir(mode=0o755)
    state_root.chmod(0o755)
    out = evaluate(tmp_path, {"settings": settings({k: OWNERS[k] for k in ("c1", "i2")}, stateDir=str(state_root)),
                              "host": INCUS_HOST})
    for name in ("c1", "i2"):
        proc = _run_setup(out, name)
        assert proc.returncode == 0, proc.stderr
    assert _owner_mode(state_root) == (0, 0, "0o711")
    assert _owner_mode(state_root / "c1") == (0, 0, "0o711")
    assert _owner_mode(state_root / "c1" / "workspace") == (NOBODY, NOBODY, "0o700")
    assert _owner_mode(state_root / "c1" / "claude-config") == (NOBODY, NOBODY, "0o700")
    assert _owner_mode(state_root / "i2" / "workspace") == (1000, 1000, "0o700")

    def as_user(uid: int, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                              capture_output=True, text=True, check=False)

    (state_root / "c1" / "workspace" / "plan.txt").write_text("nobody's\n")
    assert as_user(1000, "ls", str(state_root)).returncode != 0  # nobody lists whose workspaces are here
    assert as_user(1000, "cat", str(state_root / "c1" / "workspace" / "plan.txt")).returncode != 0
    assert as_user(1000, "touch", str(state_root / "c1" / "workspace" / "planted")).returncode != 0
    assert as_user(NOBODY, "cat", str(state_root / "c1" / "workspace" / "plan.txt")).stdout == "nobody's\n"
    assert as_user(NOBODY, "ls", str(state_root / "i2" / "workspace")).returncode != 0
    assert as_user(1000, "touch", str(state_root / "i2" / "workspace" / "mine")).returncode == 0
    # A second start puts a widened mode back.
    (state_root / "c1" / "workspace").chmod(0o755)
    state_root.chmod(0o755)
    assert _run_setup(out, "c1").returncode == 0
    assert _owner_mode(state_root / "c1" / "workspace")[2] == "0o700" and _owner_mode(state_root)[2] == "0o711"


@needs_eval
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the unit chowns")
def test_container_unit_makes_the_mount_points_the_workspace_users(tmp_path: Path) -> None:
    # owneridmap maps the owner of the mount point nspawn finds (nspawn's src/nspawn/nspawn-mount.c,
    # mount_bind: dest_uid = the existing mount point's owner, else the container's root): the unit's
    # preStart, run as systemd runs it, makes the writable ones the workspace user's in the fresh root.
    out = evaluate(tmp_path, {"settings": settings({"c1": _ws("container", "192.168.83.12")},
                                                   user={"name": "alice", "uid": 1001})})
    root = tmp_path / "root"
    root.mkdir()
    pre = out["services"]["container@sbx-c1"]["preStart"]
    env = {**os.environ, "root": str(root), "INSTANCE": "sbx-c1-not-running"}
    proc = subprocess.run(["bash", "-e", "-c", pre], capture_output=True, text=True, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    for d in ("workspace", "claude-config"):
        st = (root / "home" / "alice" / d).lstat()
        assert (st.st_uid, st.st_gid) == (1001, 1001), d
    assert not (root / "etc" / "ssh-host-keys").exists()  # read-only, rootidmap: root inside is its reader


@needs_eval
@needs_root_tools
def test_setup_unit_makes_the_key_as_its_owner(tmp_path: Path, open_dir: Path) -> None:
    # The server's user (here nobody) owns the state directory: the key is made by it, as it.
    state_root = open_dir / "state"
    state_root.mkdir()
    os.chown(state_root, NOBODY, NOBODY)
    out = evaluate(tmp_path, {"settings": settings({"c1": _ws("container", "192.168.83.12")}, stateDir=str(state_root))})
    proc = _run_setup(out, "c1")
    assert proc.returncode == 0, proc.stderr
    keys = state_root / "c1" / "ssh-host-keys"
    assert _owner_mode(state_root / "c1") == (NOBODY, NOBODY, "0o711")
    assert _owner_mode(keys) == (NOBODY, NOBODY, "0o700")
    for f, mode in (("ssh_host_ed25519_key", "0o600"), ("ssh_host_ed25519_key.pub", "0o644"),
                    ("authorized_keys", "0o644")):
        assert _owner_mode(keys / f) == (NOBODY, NOBODY, mode), f
    assert _owner_mode(state_root / "c1" / "workspace") == (1000, 1000, "0o700")


@needs_eval
@needs_root_tools
@pytest.mark.parametrize(
    "planted",
    ["workspace", "claude-config", "ssh-host-keys", "ssh-host-keys/ssh_host_ed25519_key",
     "ssh-host-keys/authorized_keys"],
)
def test_setup_unit_never_acts_through_a_symlink(tmp_path: Path, open_dir: Path, planted: str) -> None:
    # The server's user owns the state directory and plants a link to something of root's.
    state_root = open_dir / "state"
    (state_root / "c1").mkdir(parents=True)
    for d in (state_root, state_root / "c1"):
        os.chown(d, NOBODY, NOBODY)
    out = evaluate(tmp_path, {"settings": settings({"c1": _ws("container", "192.168.83.12")}, stateDir=str(state_root))})
    victim = open_dir / "victim"
    if planted.startswith("ssh-host-keys/"):
        assert _run_setup(out, "c1").returncode == 0  # a real key folder first
        (state_root / "c1" / planted).unlink()
        victim.write_text("root's\n")
        victim.chmod(0o640)
    else:
        victim.mkdir(mode=0o700)
    (state_root / "c1" / planted).symlink_to(victim)
    proc = _run_setup(out, "c1")
    assert proc.returncode != 0
    assert f"{planted} is a symbolic link; remove it" in proc.stderr
    want = "0o640" if victim.is_file() else "0o700"
    assert _owner_mode(victim) == (0, 0, want)
    if victim.is_file():
        assert victim.read_text() == "root's\n"


@needs_eval
def test_a_state_directory_on_its_own_file_system_gets_nosuid_too(tmp_path: Path) -> None:
    mine = {"fileSystems": {"/srv/sbx": {"device": "/dev/disk/by-label/sbx", "fsType": "ext4", "options": ["noatime"]}}}
    out = evaluate(tmp_path, {"settings": settings({"c1": _ws("container", "192.168.83.12")}, stateDir="/srv/sbx"),
                              "host": mine})
    fs = out["fileSystems"]["/srv/sbx"]
    assert (fs["device"], fs["fsType"]) == ("/dev/disk/by-label/sbx", "ext4")
    assert sorted(fs["options"]) == ["noatime", "nodev", "nosuid"]  # no "bind" on a disk of its own
    out = evaluate(tmp_path, {"settings": settings({"c1": _ws("container", "192.168.83.12")}, stateDir="/")})
    assert any('stateDir = "/"' in m for m in out["failedAssertions"])


@needs_eval
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: mounts")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_the_state_directory_is_nosuid_on_the_host(tmp_path: Path, open_dir: Path) -> None:
    # A setuid-root program left in a workspace directory, run by another host user through the mount
    # the module declares (fileSystems), does not run as root. ./scripts/test gives this test a mount
    # namespace of its own; the mount goes with the test.
    state_root = open_dir / "state"
    out = evaluate(tmp_path, {"settings": settings({"c1": _ws("container", "192.168.83.12")}, stateDir=str(state_root))})
    fs = out["fileSystems"][str(state_root)]
    assert fs["device"] == str(state_root) and fs["fsType"] == "none"
    (state_root / "c1" / "workspace").mkdir(parents=True)
    prog = state_root / "c1" / "workspace" / "id"
    shutil.copy("/usr/bin/id", prog)
    os.chown(prog, 0, 0)
    prog.chmod(0o4755)
    os.chmod(state_root / "c1", 0o755)
    os.chmod(state_root / "c1" / "workspace", 0o755)

    def euid_of_nobody() -> str:
        return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(prog), "-u"],
                              capture_output=True, text=True, check=True).stdout.strip()

    assert euid_of_nobody() == "0"  # the escape, without the mount
    opts = ",".join(fs["options"])
    subprocess.run(["mount", "--bind", fs["device"], str(state_root)], check=True)
    try:
        # util-linux applies bind + flags as mount(8) does for an fstab line of these options.
        subprocess.run(["mount", "-o", f"remount,{opts}", str(state_root)], check=True)
        assert euid_of_nobody() == str(NOBODY)
        findmnt = subprocess.run(["findmnt", "-n", "-o", "OPTIONS", str(state_root)],
                                 capture_output=True, text=True, check=True).stdout
        assert "nosuid" in findmnt and "nodev" in findmnt
    finally:
        subprocess.run(["umount", str(state_root)], check=False)


@needs_eval
def test_incus_profiles_merge_with_the_users_preseed(tmp_path: Path) -> None:
    users_preseed = {
        "storage_pools": [{"name": "default", "driver": "dir"}],
        "profiles": [{"name": "default", "devices": {"root": {"type": "disk", "path": "/", "pool": "default"}}}],
    }
    out = evaluate(
        tmp_path,
        {
            "settings": settings(
                {
                    "i1": _ws("incus", "192.168.83.10", cpus=2, memoryMiB=1024, tasks=500),
                    "i2": _ws("incus", "192.168.83.11"),
                }
            ),
            "host": {"virtualisation": {"incus": {"enable": True, "preseed": users_preseed}}},
        },
    )
    preseed = out["incusPreseed"]
    assert preseed["storage_pools"] == users_preseed["storage_pools"]
    names = [p["name"] for p in preseed["profiles"]]
    assert sorted(names) == ["default", "sandboxed-workspace-i1", "sandboxed-workspace-i2"]
    i1 = next(p for p in preseed["profiles"] if p["name"] == "sandboxed-workspace-i1")
    assert (i1["config"]["limits.cpu"], i1["config"]["limits.memory"], i1["config"]["limits.processes"]) == (
        "2",
        "1024MiB",
        "500",
    )


# ---- issue 10.7: sudo/doas rules pinned to the server's exact commands -----------------------

RULE_WORKSPACES = {
    "web": _ws("container", "192.168.83.10"),
    "vm1": _ws("vm", "192.168.83.11"),
    "inc": _ws("incus", "192.168.83.12"),
}


def _server_argv(escalation: hostcmd.Escalation) -> list[list[str]]:
    """What the server runs through the escalation, from hostcmd's own builders (prefix removed)."""
    n = 0 if escalation == "none" else 2  # "sudo -n" / "doas -n"
    argvs = [nixos_commands.nixos_rebuild_argv("/etc/nixos", "fry", escalation)[n:]]
    for name, ws in RULE_WORKSPACES.items():
        for action in ("start", "stop"):
            argvs.append(hostcmd.systemctl_argv(action, unit_for(ws["type"], name), escalation)[n:])
    return argvs


def _rules_case(user: str, escalation: str, host: dict[str, Any] | None = None) -> dict[str, Any]:
    server = {"user": user, "escalation": escalation, "flake": "/etc/nixos", "host": "fry"}
    return {
        "settings": settings(RULE_WORKSPACES, server=server),
        "host": {**INCUS_HOST, **(host or {})},
    }


@needs_eval
def test_rules_allow_exactly_what_hostcmd_runs(tmp_path: Path) -> None:
    out = evaluate(tmp_path, _rules_case("alice", "sudo"))
    assert out["failedAssertions"] == []
    assert sorted(out["privileges"]["commands"]) == sorted(_server_argv("sudo"))


@needs_eval
@pytest.mark.skipif(
    shutil.which("visudo") is None or shutil.which("cvtsudoers") is None, reason="sudo is not installed"
)
def test_sudo_rules_parse_to_the_servers_argv(tmp_path: Path) -> None:
    out = evaluate(tmp_path, _rules_case("alice", "sudo"))
    (rule,) = out["privileges"]["sudoRules"]
    assert out["privileges"]["doasRules"] == []
    # sudoers as NixOS's sudo module writes an extraRules entry: "USER HOST=(RUNAS) OPTS: CMD, ...".
    commands = ", ".join(f"{':'.join(c['options'])}: {c['command']}" for c in rule["commands"])
    line = f"{rule['users'][0]} ALL=({rule['runAs']}) {commands}\n"
    sudoers = tmp_path / "sudoers"
    sudoers.write_text(line)
    check = subprocess.run(["visudo", "-c", "-f", str(sudoers)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # sudo's own parser: each rule is one command with exactly the server's arguments (a bare
    # '#' would have cut "/etc/nixos#fry" off as a comment).
    parsed = json.loads(
        subprocess.run(["cvtsudoers", "-f", "json", str(sudoers)], capture_output=True, text=True, check=True).stdout
    )
    (spec,) = parsed["User_Specs"]
    assert spec["User_List"] == [{"username": "alice"}]
    (cmnd,) = spec["Cmnd_Specs"]
    assert cmnd["runasusers"] == [{"username": "root"}]
    assert {"authenticate": False} in cmnd["Options"]
    got = sorted(c["command"] for c in cmnd["Commands"])
    want = sorted(f"/run/current-system/sw/bin/{' '.join(argv)}" for argv in _server_argv("sudo"))
    assert got == want


@needs_eval
@pytest.mark.skipif(shutil.which("doas") is None, reason="doas is not installed (Debian package opendoas)")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv (util-linux) is not installed")
def test_doas_rules_permit_exactly_the_servers_argv(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    out = evaluate(tmp_path, _rules_case("nobody", "doas", {"security": {"doas": {"enable": True}}}))
    assert out["failedAssertions"] == []
    rules = out["privileges"]["doasRules"]
    assert out["privileges"]["sudoRules"] == []

    # doas.conf as NixOS's doas module writes extraRules entries.
    def render(r: dict[str, Any]) -> str:
        opts = "nopass setenv { SSH_AUTH_SOCK TERMINFO TERMINFO_DIRS  }"
        return f"permit {opts} {r['users'][0]} as {r['runAs']} cmd {r['cmd']} args {' '.join(r['args'])}"

    # Readable by nobody (pytest's own temp root is 0700); removed when the test ends.
    conf_dir = Path(tempfile.mkdtemp(prefix="sandbox-mcp-doas-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(conf_dir, ignore_errors=True))
    conf_dir.chmod(0o755)
    conf = conf_dir / "doas.conf"
    conf.write_text("\n".join(render(r) for r in rules) + "\n")
    conf.chmod(0o644)

    def doas_check(argv: list[str]) -> str:
        # doas -C matches for the calling user: run it as nobody, whom the rules name.
        proc = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "doas", "-C", str(conf), *argv],
            capture_output=True,
            text=True,
            check=False,
        )
        assert not proc.stderr, proc.stderr
        return proc.stdout.strip()

    for argv in _server_argv("doas"):
        assert doas_check(argv) == "permit nopass", argv
    near_misses = [
        ["nixos-rebuild", "switch", "--flake", "/etc/nixos#other"],
        ["nixos-rebuild", "switch", "--flake", "/etc/nixos"],
        ["nixos-rebuild", "switch", "--flake", "/etc/nixos#fry", "--option", "x", "y"],
        ["nixos-rebuild", "boot", "--flake", "/etc/nixos#fry"],
        ["systemctl", "restart", "container@web"],
        ["systemctl", "start", "container@other"],
        ["systemctl", "start", "sshd"],
        ["sh", "-c", "id"],
    ]
    for argv in near_misses:
        assert doas_check(argv) == "deny", argv


@needs_eval
def test_rules_need_flake_and_host(tmp_path: Path) -> None:
    out = evaluate(tmp_path, {"settings": settings(RULE_WORKSPACES, server={"user": "alice"}), "host": INCUS_HOST})
    assert any("server.flake or server.host is not" in m for m in out["failedAssertions"])
    out = evaluate(tmp_path, _rules_case("alice", "doas"))
    assert any("security.doas.enable = true;" in m for m in out["failedAssertions"])


@needs_eval
@pytest.mark.parametrize(
    ("server", "option"),
    [
        ({"user": "alice", "flake": "/etc/nix os", "host": "fry"}, "server.flake"),
        ({"user": "alice", "flake": "/etc/nixos#x", "host": "fry"}, "server.flake"),
        ({"user": "alice", "flake": "/etc/nixos", "host": "fry,ALL"}, "server.host"),
        ({"user": "ALL", "flake": "/etc/nixos", "host": "fry"}, "server.user"),
    ],
)
def test_rule_inputs_are_validated(tmp_path: Path, server: dict[str, str], option: str) -> None:
    err = evaluate_error(tmp_path, {"settings": settings(RULE_WORKSPACES, server=server), "host": INCUS_HOST})
    assert f"sandboxed-workspace.{option}" in err


@needs_eval
def test_no_rules_without_a_server_user(three: dict[str, Any]) -> None:
    assert three["privileges"] == {"commands": [], "sudoRules": [], "doasRules": []}


# ---- issue 14.4: the daemon as a systemd service ---------------------------------------------


@needs_eval
def test_daemon_service(tmp_path: Path) -> None:
    out = evaluate(
        tmp_path,
        {
            "settings": settings(
                {"web": _ws("container", "192.168.83.10")},
                stateDir="/srv/sbx",
                daemon={"enable": True, "environment": {"SANDBOX_MCP_BOOT_TIMEOUT_S": "180"}},
                server={"flake": "/etc/nixos", "host": "fry"},
            )
        },
    )
    assert out["failedAssertions"] == [] and out["warnings"] == []
    assert out["groups"] == {"sandbox-mcp": {}}
    unit = out["services"]["sandbox-mcp-daemon"]
    assert unit["wantedBy"] == ["multi-user.target"]
    sc = unit["serviceConfig"]
    assert sc["ExecStart"] == "/nix/store/00000000000000000000000000000000-sandbox-mcp-0.1.0/bin/sandbox-mcp daemon"
    assert "User" not in sc  # root
    # systemd makes /run/sandbox-mcp for the socket; the daemon makes the socket 0660 root:group.
    assert sc["RuntimeDirectory"] == "sandbox-mcp" and sc["RuntimeDirectoryMode"] == "0755"
    assert unit["restartIfChanged"] is False
    assert unit["environment"] == {
        "SANDBOX_MCP_DAEMON_SOCKET": "/run/sandbox-mcp/daemon.sock",
        "SANDBOX_MCP_DAEMON_GROUP": "sandbox-mcp",
        "SANDBOX_MCP_STATE_DIR": "/srv/sbx",
        "SANDBOX_MCP_BRIDGE": "sandbox-br",
        "SANDBOX_MCP_SUBNET": "192.168.83.0/24",
        "SANDBOX_MCP_USER": "agent",
        "SANDBOX_MCP_MODE": "nixos",
        "SANDBOX_MCP_NIXOS_FLAKE": "/etc/nixos",
        "SANDBOX_MCP_NIXOS_HOST": "fry",
        "SANDBOX_MCP_NIXOS_ESCALATION": "none",
        "SANDBOX_MCP_BOOT_TIMEOUT_S": "180",
    }
    # No sudo or doas rule: the group is the door.
    assert out["privileges"] == {"commands": [], "sudoRules": [], "doasRules": []}


@needs_eval
def test_daemon_environment_matches_the_servers_settings(tmp_path: Path) -> None:
    # The server reads exactly these variables into its settings (no typo, no unknown name).
    out = evaluate(
        tmp_path,
        {
            "settings": settings(
                {},
                daemon={"enable": True, "socket": "/run/sbx/d.sock", "group": "agents"},
                server={"flake": "/etc/nixos", "host": "fry"},
            )
        },
    )
    env = out["services"]["sandbox-mcp-daemon"]["environment"]
    assert out["services"]["sandbox-mcp-daemon"]["serviceConfig"]["RuntimeDirectory"] == "sbx"
    assert out["groups"] == {"agents": {}}
    assert env["SANDBOX_MCP_DAEMON_SOCKET"] == "/run/sbx/d.sock" and env["SANDBOX_MCP_DAEMON_GROUP"] == "agents"
    daemon_vars = {"SANDBOX_MCP_DAEMON_SOCKET", "SANDBOX_MCP_DAEMON_GROUP"}  # the daemon's own (issue 14)
    settings_env = {k: v for k, v in env.items() if k not in daemon_vars}
    for key in settings_env:
        field = key.removeprefix("SANDBOX_MCP_").lower()
        if field.startswith("nixos_"):
            assert field.removeprefix("nixos_") in NixosSettings.model_fields, key
        else:
            assert field in Settings.model_fields, key
    s = load_settings(env=settings_env, config_file=tmp_path / "none.toml")
    nixos = NixosSettings.of(s)  # SANDBOX_MCP_NIXOS_* are the old names of [runtimes.nixos]
    assert s.mode == "nixos" and nixos.flake == "/etc/nixos" and nixos.host == "fry"
    assert nixos.escalation == "none" and str(s.state_dir) == "/var/lib/sandboxed-workspace"
    assert s.bridge == "sandbox-br" and str(s.subnet) == "192.168.83.0/24" and s.user == "agent"


@needs_eval
def test_daemon_needs_a_package_and_warns_about_sudo_rules(tmp_path: Path) -> None:
    module = tmp_path / "no-package.nix"
    module.write_text("{ sandboxed-workspace.daemon.package = null; }\n")
    out = evaluate(tmp_path, {"settings": settings({}, daemon={"enable": True}), "modules": [str(module)]})
    assert any("daemon.package" in m and "nixosModules.default" in m for m in out["failedAssertions"])
    out = evaluate(
        tmp_path,
        {
            "settings": settings(
                {}, daemon={"enable": True}, server={"user": "alice", "flake": "/etc/nixos", "host": "fry"}
            )
        },
    )
    assert any("remove sandboxed-workspace.server.user" in w for w in out["warnings"])


@needs_eval
@pytest.mark.parametrize("socket", ["/tmp/d.sock", "/run/d.sock", "/run/a b/d.sock", "relative.sock"])
def test_daemon_socket_must_be_in_a_run_directory(tmp_path: Path, socket: str) -> None:
    err = evaluate_error(tmp_path, {"settings": settings({}, daemon={"enable": True, "socket": socket})})
    assert "sandboxed-workspace.daemon.socket" in err


@needs_eval
def test_flake_module_brings_microvm_and_the_daemon_package(tmp_path: Path) -> None:
    # The flake's nixosModules.default, with its inputs stood in (see eval.nix).
    out = evaluate(
        tmp_path,
        {
            "flake": True,
            "settings": settings({"vm1": _ws("vm", "192.168.83.11")}, daemon={"enable": True}),
        },
    )
    assert out["failedAssertions"] == []
    assert set(out["vms"]) == {"sbx-vm1"}  # microvm.nix's host module came with it
    exec_start = out["services"]["sandbox-mcp-daemon"]["serviceConfig"]["ExecStart"]
    assert exec_start.endswith("-sandbox-mcp-from-flake/bin/sandbox-mcp daemon")  # self's package


# ---- kernel limits -----------------------------------------------------------------------------

_OTHER_SYSCTL_MODULES = {
    # What nixpkgs' xserver.nix and incus.nix define for the same keys, at their priorities.
    "xserver": '{ lib, ... }: { boot.kernel.sysctl = { "fs.inotify.max_user_instances" = lib.mkDefault 524288; '
               '"fs.inotify.max_user_watches" = lib.mkDefault 524288; }; }',
    "incus": '{ lib, ... }: { boot.kernel.sysctl = { "fs.inotify.max_user_instances" = lib.mkOverride 1050 1048576; '
             '"fs.inotify.max_user_watches" = lib.mkOverride 1050 1048576; }; }',
    "same-priority": '{ lib, ... }: { boot.kernel.sysctl."fs.inotify.max_user_instances" = lib.mkOverride 1100 1; }',
}


def _module_file(tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.nix"
    path.write_text(_OTHER_SYSCTL_MODULES[name] + "\n")
    return str(path)


@needs_eval
def test_kernel_limits_where_containers_run(tmp_path: Path) -> None:
    web = {"web": _ws("container", "192.168.83.10")}
    # The same values scripts/setup writes (sandbox_mcp/sysctls.py), for declared containers and
    # for the daemon (direct mode runs its containers itself).
    assert evaluate(tmp_path, {"settings": settings(web)})["sysctl"] == sysctls.RECOMMENDED
    assert evaluate(tmp_path, {"settings": settings({}, daemon={"enable": True})})["sysctl"] == sysctls.RECOMMENDED
    # No container anywhere (a VM only), or the module off: the host's limits are left alone.
    assert evaluate(tmp_path, {"settings": settings({"vm1": _ws("vm", "192.168.83.11")})})["sysctl"] == {}
    assert evaluate(tmp_path, {"settings": {"enable": False, "workspaces": web}})["sysctl"] == {}
    # A user's own value wins.
    mine = {"boot": {"kernel": {"sysctl": {"fs.inotify.max_user_instances": 4096}}}}
    out = evaluate(tmp_path, {"settings": settings(web), "host": mine})
    assert out["sysctl"] == {**sysctls.RECOMMENDED, "fs.inotify.max_user_instances": 4096}


@needs_eval
def test_kernel_limits_coexist_with_xserver_and_incus(tmp_path: Path) -> None:
    web = {"web": _ws("container", "192.168.83.10")}
    # A desktop host (xserver.nix's mkDefault) and an Incus host (incus.nix's mkOverride 1050) set
    # the same keys; a definition at our priority would be refused as a duplicate, theirs win.
    out = evaluate(tmp_path, {"settings": settings(web), "modules": [_module_file(tmp_path, "xserver")]})
    assert out["sysctl"] == {"fs.inotify.max_user_instances": 524288, "fs.inotify.max_user_watches": 524288}
    out = evaluate(tmp_path, {"settings": settings(web), "host": INCUS_HOST,
                              "modules": [_module_file(tmp_path, "incus")]})
    assert out["sysctl"] == sysctls.RECOMMENDED
    err = evaluate_error(tmp_path, {"settings": settings(web), "modules": [_module_file(tmp_path, "same-priority")]})
    assert "fs.inotify.max_user_instances" in err and "defined multiple times" in err
