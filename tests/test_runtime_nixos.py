"""The nixos runtime and the host-command layer under it.

nixos-rebuild and systemctl cannot run here, so their argv are compared exactly, and the
runtime's operations are run for real through its ``command_prefix`` seam against a
stand-in script that records its argv and answers as configured (exit status, output).
Registry files, locks and git run for real in tmp_path; hostcmd.run runs real processes.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from sandbox_mcp import hostcmd
from sandbox_mcp.config import Settings
from sandbox_mcp.errors import BackendError, CommandFailed, CommandTimeout, Conflict, InvalidSpec
from sandbox_mcp.models import WorkspaceRecord
from sandbox_mcp.naming import cid_for, mac_for
from sandbox_mcp.runtimes import RuntimeContext
from sandbox_mcp.runtimes.nixos import (
    WORKSPACE_TEMPLATE,
    NixosRuntime,
    nixos_mode_available,
    parse_unit_show,
    unit_for,
)
from sandbox_mcp.runtimes.nixos import commands as nixos_commands
from sandbox_mcp.runtimes.nixos.settings import NixosSettings

from .points import HUNG_S, process_alive, wait_until

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOkhxFnbcLQ8M6k7bSDZ8zE6gL1iA8sE2pZQkq4wmJXy sandbox-mcp"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---- hostcmd: pure argv builders -----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "escalation", "expected"),
    [
        (["systemctl", "start", "x"], "doas", ["doas", "-n", "systemctl", "start", "x"]),
        (["systemctl", "start", "x"], "sudo", ["sudo", "-n", "systemctl", "start", "x"]),
        (["systemctl", "start", "x"], "none", ["systemctl", "start", "x"]),
    ],
)
def test_escalate(argv: list[str], escalation: hostcmd.Escalation, expected: list[str]) -> None:
    assert hostcmd.escalate(argv, escalation) == expected


def test_escalate_rejects_unknown() -> None:
    with pytest.raises(InvalidSpec, match="unknown escalation"):
        hostcmd.escalate(["true"], "su")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("action", "unit", "escalation", "expected"),
    [
        ("start", "container@ws1", "sudo", ["sudo", "-n", "systemctl", "start", "container@ws1"]),
        ("stop", "microvm@ws1", "doas", ["doas", "-n", "systemctl", "stop", "microvm@ws1"]),
        ("restart", "incus-workspace-ws1", "none", ["systemctl", "restart", "incus-workspace-ws1"]),
        ("reset-failed", "container@a-b", "none", ["systemctl", "reset-failed", "container@a-b"]),
    ],
)
def test_systemctl_argv(action: str, unit: str, escalation: hostcmd.Escalation, expected: list[str]) -> None:
    assert hostcmd.systemctl_argv(action, unit, escalation) == expected


@pytest.mark.parametrize(
    ("action", "unit"),
    [("enable", "container@ws1"), ("start", "-H"), ("start", "a b"), ("start", ""), ("start", "x;y")],
)
def test_systemctl_argv_rejects(action: str, unit: str) -> None:
    with pytest.raises(InvalidSpec):
        hostcmd.systemctl_argv(action, unit, "sudo")


def test_systemctl_show_argv() -> None:
    assert hostcmd.systemctl_show_argv("container@ws1", ["ActiveState", "MainPID"]) == [
        "systemctl",
        "show",
        "-p",
        "ActiveState,MainPID",
        "container@ws1",
    ]
    with pytest.raises(InvalidSpec):
        hostcmd.systemctl_show_argv("container@ws1", [])
    with pytest.raises(InvalidSpec):
        hostcmd.systemctl_show_argv("container@ws1", ["Active State"])


@pytest.mark.parametrize(
    ("lines", "ok"), [(1, True), (200, True), (100_000, True), (0, False), (100_001, False)]
)
def test_journalctl_argv(lines: int, ok: bool) -> None:
    if ok:
        assert hostcmd.journalctl_argv("microvm@ws1", lines) == [
            "journalctl",
            "-u",
            "microvm@ws1",
            "-n",
            str(lines),
            "--no-pager",
            "-o",
            "short-iso",
        ]
    else:
        with pytest.raises(InvalidSpec):
            hostcmd.journalctl_argv("microvm@ws1", lines)


@pytest.mark.parametrize(
    ("flake", "host", "escalation", "action", "expected"),
    [
        (
            "/etc/nixos",
            "fry",
            "sudo",
            "switch",
            ["sudo", "-n", "nixos-rebuild", "switch", "--flake", "/etc/nixos#fry"],
        ),
        (
            "/etc/nixos",
            "fry",
            "doas",
            "switch",
            ["doas", "-n", "nixos-rebuild", "switch", "--flake", "/etc/nixos#fry"],
        ),
        (
            Path("/home/u/cfg"),
            "my_host-2",
            "none",
            "boot",
            ["nixos-rebuild", "boot", "--flake", "/home/u/cfg#my_host-2"],
        ),
    ],
)
def test_nixos_rebuild_argv(
    flake: str, host: str, escalation: hostcmd.Escalation, action: str, expected: list[str]
) -> None:
    assert nixos_commands.nixos_rebuild_argv(flake, host, escalation, action) == expected


@pytest.mark.parametrize(
    ("flake", "host", "action"),
    [
        ("/etc/nixos", "fry.extra", "switch"),
        ("/etc/nixos", "a b", "switch"),
        ("/etc/nixos", "", "switch"),
        ("/etc/nixos", '"fry"', "switch"),
        ("/etc/nixos", "-fry", "switch"),
        ("/etc/nixos", "fry", "switch --rollback"),
        ("", "fry", "switch"),
        ("--impure", "fry", "switch"),
        ("/etc/nixos#other", "fry", "switch"),
        ("/etc/ni\nxos", "fry", "switch"),
    ],
)
def test_nixos_rebuild_argv_rejects(flake: str, host: str, action: str) -> None:
    with pytest.raises(InvalidSpec):
        nixos_commands.nixos_rebuild_argv(flake, host, "sudo", action)


def test_git_argv() -> None:
    assert nixos_commands.git_intent_to_add_argv(
        "/etc/nixos", ["/etc/nixos/a.json", Path("/etc/nixos/w/b.nix")]
    ) == [
        "git",
        "-C",
        "/etc/nixos",
        "add",
        "--intent-to-add",
        "--",
        "/etc/nixos/a.json",
        "/etc/nixos/w/b.nix",
    ]
    assert nixos_commands.git_forget_argv("/f", ["/f/x.nix"]) == [
        "git",
        "-C",
        "/f",
        "rm",
        "--cached",
        "--quiet",
        "--ignore-unmatch",
        "--",
        "/f/x.nix",
    ]
    with pytest.raises(InvalidSpec):
        nixos_commands.git_intent_to_add_argv("/f", [])
    assert nixos_commands.git_status_argv("/f") == [
        "git", "-C", "/f", "status", "--porcelain=v1", "-z", "--untracked-files=no",
    ]  # fmt: skip


# ---- hostcmd.run: real processes -----------------------------------------------------------


async def _all_die(pids: list[int]) -> None:
    """Wait until every PID is gone (a SIGKILL lands a moment after kill(2)); kill survivors and fail."""
    try:
        await wait_until(lambda: not any(process_alive(p) for p in pids), f"processes {pids} to die")
    finally:
        for pid in pids:
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)  # the test's own process, left behind


@pytest.mark.anyio
async def test_run_streams_lines_as_they_come(tmp_path: Path) -> None:
    # The script prints "first", then waits until the test has seen that line: a run() that
    # collected output only at the end would never let it finish (and hit the timeout).
    go = tmp_path / "go"
    script = f"echo first; echo err-line >&2; while [ ! -e {go} ]; do sleep 0.01; done; echo second; printf 'no-newline'"
    seen: list[str] = []

    async def on_line(line: str) -> None:
        seen.append(line)
        if line == "first":
            go.touch()

    done = await hostcmd.run(["sh", "-c", script], timeout_s=HUNG_S, on_line=on_line)
    assert done.returncode == 0
    assert done.stdout == "first\nsecond\nno-newline"
    assert done.stderr == "err-line\n"
    assert done.argv == ("sh", "-c", script)
    assert sorted(seen) == ["err-line", "first", "no-newline", "second"]
    assert seen.index("first") < seen.index("second")


@pytest.mark.anyio
async def test_run_failure_carries_evidence() -> None:
    argv = ["sh", "-c", "echo some output; echo 'it broke: reason' >&2; exit 3"]
    with pytest.raises(CommandFailed) as info:
        await hostcmd.run(argv, timeout_s=10)
    assert info.value.argv == tuple(argv)
    assert info.value.exit_status == 3
    assert "it broke: reason" in info.value.stderr
    assert "status 3" in str(info.value) and "it broke: reason" in str(info.value)


@pytest.mark.anyio
async def test_run_failure_without_stderr_quotes_stdout() -> None:
    with pytest.raises(CommandFailed, match="only on stdout"):
        await hostcmd.run(["sh", "-c", "echo only on stdout; exit 1"], timeout_s=10)


@pytest.mark.anyio
async def test_run_check_false_returns_status() -> None:
    done = await hostcmd.run(["sh", "-c", "exit 5"], timeout_s=10, check=False)
    assert done.returncode == 5


@pytest.mark.anyio
@pytest.mark.parametrize(
    "script",
    [
        "sleep infinity & echo $!; echo $$; wait",  # the leader waits for its child
        "sleep infinity & echo $!",  # the leader exits at once; the child keeps the pipes open
    ],
)
async def test_run_timeout_kills_the_process_group(script: str) -> None:
    pids: list[int] = []

    async def on_line(line: str) -> None:
        pids.append(int(line))

    # `sleep infinity` never ends by itself: only the kill can end the run (or the upper bound).
    with anyio.fail_after(HUNG_S), pytest.raises(CommandTimeout, match="did not finish within"):
        await hostcmd.run(["sh", "-c", script], timeout_s=0.7, on_line=on_line)
    assert pids, "the script printed no PIDs"
    await _all_die(pids)


@pytest.mark.anyio
async def test_run_timeout_kills_what_ignores_sigterm() -> None:
    pids: list[int] = []

    async def on_line(line: str) -> None:
        pids.append(int(line))

    # SIGKILL after the grace period: nothing else ends `sleep infinity` under `trap '' TERM`.
    with anyio.fail_after(HUNG_S), pytest.raises(CommandTimeout):
        await hostcmd.run(
            ["sh", "-c", "trap '' TERM; sleep infinity & echo $!; wait"], timeout_s=0.5, on_line=on_line
        )
    assert pids
    await _all_die(pids)


@pytest.mark.anyio
async def test_run_cancellation_kills_the_process() -> None:
    pids: list[int] = []

    with anyio.CancelScope() as scope:

        async def on_line(line: str) -> None:
            pids.append(int(line))
            scope.cancel()  # cancelled while it runs: its child's PID is the evidence

        await hostcmd.run(["sh", "-c", "sleep infinity & echo $!; wait"], timeout_s=HUNG_S, on_line=on_line)
    assert scope.cancelled_caught
    assert pids
    await _all_die(pids)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("program", "hint"),
    [("sandbox-mcp-no-such-program", "install it"), ("/nonexistent/bin/nixos-rebuild", "NixOS")],
)
async def test_run_missing_program(program: str, hint: str) -> None:
    with pytest.raises(BackendError, match=hint) as info:
        await hostcmd.run([program, "--version"], timeout_s=10)
    assert program in str(info.value)
    assert not isinstance(info.value, CommandFailed)


# ---- nixos: pure parts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "name", "unit"),
    [
        ("container", "ws1", "container@sbx-ws1"),
        ("vm", "ws1", "microvm@sbx-ws1"),
        ("incus", "a-2", "incus-workspace-a-2"),
    ],
)
def test_unit_for(type_: str, name: str, unit: str) -> None:
    assert unit_for(type_, name) == unit  # type: ignore[arg-type]


@pytest.mark.parametrize(("type_", "name"), [("docker", "ws1"), ("vm", "Bad"), ("vm", "x;rm")])
def test_unit_for_rejects(type_: str, name: str) -> None:
    with pytest.raises(InvalidSpec):
        unit_for(type_, name)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "now", "running", "pid", "state", "uptime", "detail"),
    [
        (
            "LoadState=loaded\nActiveState=active\nSubState=running\nMainPID=4242\n"
            "ActiveEnterTimestampMonotonic=100000000\n",
            130.0,
            True,
            4242,
            "active (running)",
            30.0,
            None,
        ),
        (
            "MainPID=0\nActiveState=inactive\nSubState=dead\n"
            "ActiveEnterTimestampMonotonic=0\nLoadState=loaded\n",
            130.0,
            False,
            None,
            "inactive (dead)",
            None,
            None,
        ),
        (
            "LoadState=not-found\nActiveState=inactive\nSubState=dead\nMainPID=0\n",
            5.0,
            False,
            None,
            "inactive (dead)",
            None,
            "does not exist",
        ),
        ("ActiveState=failed\nSubState=failed\nMainPID=\n", 5.0, False, None, "failed (failed)", None, None),
        ("garbage\n", 5.0, False, None, "unknown", None, None),
    ],
)
def test_parse_unit_show(
    text: str,
    now: float,
    running: bool,
    pid: int | None,
    state: str,
    uptime: float | None,
    detail: str | None,
) -> None:
    d = parse_unit_show(text, now)
    assert (d.runtime, d.running, d.pid, d.unit_state) == ("nixos", running, pid, state)
    assert d.uptime_s == (pytest.approx(uptime) if uptime is not None else None)
    assert (detail in (d.detail or "")) if detail else d.detail is None


@pytest.mark.parametrize(
    ("marker", "flake", "host", "expected"),
    [
        ("etc/NIXOS", "/etc/nixos", "fry", True),
        ("run/current-system", "/etc/nixos", "fry", True),
        ("etc/NIXOS", None, "fry", False),
        ("etc/NIXOS", "/etc/nixos", None, False),
        (None, "/etc/nixos", "fry", False),
    ],
)
def test_nixos_mode_available(
    tmp_path: Path, marker: str | None, flake: str | None, host: str | None, expected: bool
) -> None:
    if marker:
        (tmp_path / marker).parent.mkdir(parents=True)
        (tmp_path / marker).touch()
    settings = Settings(nixos=NixosSettings(flake=flake, host=host))
    assert nixos_mode_available(settings, root=tmp_path) is expected


def _settings(tmp_path: Path, **nixos: object) -> Settings:
    cfg = {"flake": str(tmp_path / "flake"), "host": "fry", "escalation": "sudo", **nixos}
    return Settings(state_dir=tmp_path / "state", nixos=NixosSettings.model_validate(cfg))


def _record(
    name: str = "ws1", type_: str = "container", ip: str = "192.168.83.10", **kw: object
) -> WorkspaceRecord:
    return WorkspaceRecord.model_validate(
        {
            "name": name,
            "type": type_,
            "runtime": "nixos",
            "ip": ip,
            "mac": mac_for(name),
            "cid": cid_for(name),
            "user": "agent",
            **kw,
        }
    )


@pytest.mark.parametrize(
    ("nixos", "key", "match"),
    [
        ({"flake": None}, KEY, "nixos.flake and nixos.host"),
        ({"host": None}, KEY, "nixos.flake and nixos.host"),
        ({"flake": "relative/dir"}, KEY, "absolute"),
        ({"host": "fry.bad"}, KEY, "nixosConfigurations"),
        ({}, "not a key", "client_public_key"),
        ({}, KEY + "\nssh-ed25519 AAAA second", "client_public_key"),
    ],
)
def test_constructor_rejects(tmp_path: Path, nixos: dict[str, object], key: str, match: str) -> None:
    with pytest.raises(InvalidSpec, match=match):
        NixosRuntime(RuntimeContext.for_settings(_settings(tmp_path, **nixos), key))


@pytest.mark.parametrize("escalation", ["sudo", "doas", "none"])
@pytest.mark.parametrize(
    ("type_", "unit"),
    [("container", "container@sbx-ws1"), ("vm", "microvm@sbx-ws1"), ("incus", "incus-workspace-ws1")],
)
def test_operation_argv(tmp_path: Path, escalation: str, type_: str, unit: str) -> None:
    rt = NixosRuntime(RuntimeContext.for_settings(_settings(tmp_path, escalation=escalation), KEY))
    rec = _record(type_=type_)
    esc = [] if escalation == "none" else [escalation, "-n"]
    assert rt.rebuild_argv() == [*esc, "nixos-rebuild", "switch", "--flake", f"{tmp_path}/flake#fry"]
    assert rt.systemctl_argv("start", rec) == [*esc, "systemctl", "start", unit]
    assert rt.systemctl_argv("stop", rec) == [*esc, "systemctl", "stop", unit]
    assert rt.status_argv(rec) == [
        "systemctl",
        "show",
        "-p",
        "LoadState,ActiveState,SubState,MainPID,ActiveEnterTimestampMonotonic",
        unit,
    ]
    assert rt.logs_argv(rec, 50) == ["journalctl", "-u", unit, "-n", "50", "--no-pager", "-o", "short-iso"]


# ---- nixos: operations for real, through a recording stand-in ------------------------------

STAND_IN = r"""
import json, os, pathlib, sys, time
here = pathlib.Path(__file__).parent
cfg = json.loads((here / "behaviour.json").read_text())
argv = sys.argv[1:]
entry = {"argv": argv}
if "nixos-rebuild" in argv:
    key = "rebuild"
    reg = pathlib.Path(cfg["registry"])
    entry["registry"] = json.loads(reg.read_text()) if reg.exists() else None
elif "journalctl" in argv:
    key = "journal"
else:
    key = argv[argv.index("systemctl") + 1]
with open(here / "calls.jsonl", "a") as f:
    f.write(json.dumps(entry) + "\n")
b = cfg.get(key, {})
if key == "rebuild" and b.get("fail_with") in ((entry["registry"] or {}).get("workspaces") or {}):
    b = {**b, "rc": 1, "stderr": ["error: " + b["fail_with"] + " is broken"]}
for line in b.get("stdout", []):
    print(line, flush=True)
for line in b.get("stderr", []):
    print(line, file=sys.stderr, flush=True)
time.sleep(b.get("sleep", 0))
sys.exit(b.get("rc", 0))
"""


class Host:
    """The stand-in for systemctl/journalctl/nixos-rebuild, and what it was asked to run."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "stand-in"
        self.dir.mkdir()
        (self.dir / "host.py").write_text(STAND_IN)
        self.behaviour: dict[str, object] = {}
        self.prefix = [sys.executable, str(self.dir / "host.py")]

    def set(self, registry: Path, **behaviour: object) -> None:
        self.behaviour = {"registry": str(registry), **behaviour}
        (self.dir / "behaviour.json").write_text(json.dumps(self.behaviour))

    def calls(self) -> list[dict[str, object]]:
        path = self.dir / "calls.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class Progress:
    def __init__(self) -> None:
        self.messages: list[tuple[str, float | None]] = []

    async def __call__(self, message: str, fraction: float | None = None) -> None:
        self.messages.append((message, fraction))

    def lines(self) -> list[str]:
        return [m for m, _ in self.messages]


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


@pytest.fixture
def flake(tmp_path: Path) -> Path:
    (tmp_path / "flake").mkdir()
    return tmp_path / "flake"


def _runtime(tmp_path: Path, host: Host, **nixos: object) -> NixosRuntime:
    rt = NixosRuntime(RuntimeContext.for_settings(_settings(tmp_path, **nixos), KEY), command_prefix=host.prefix)
    host.set(rt.registry_path)
    return rt


def _entry(ip: str, packages: list[str], name: str, type_: str = "container") -> dict[str, object]:
    return {
        "type": type_,
        "ip": ip,
        "egress": "none",
        "packages": packages,
        "autoStart": False,
        # A VM's guest module would configure the host: the registry names none.
        "config": None if type_ == "vm" else f"workspaces/{name}.nix",
        "cpus": None,
        "memoryMiB": None,
        "tasks": None,
        "ownerUid": None,
        "ownerGid": None,
        "hostKey": None,
    }


def test_registry_entry_carries_the_limits_in_the_modules_units(tmp_path: Path) -> None:
    rt = NixosRuntime(RuntimeContext.for_settings(_settings(tmp_path), KEY))
    record = _record(limits={"cpus": 1.5, "memory_mib": 768, "tasks": 300})
    entry = rt.registry_entry(record)
    assert (entry["cpus"], entry["memoryMiB"], entry["tasks"]) == (2, 768, 300)  # whole CPUs, rounded up
    assert rt.assign(record, []).isolation == "unprivileged-container"
    assert rt.assign(_record(type_="vm"), []).isolation == "microvm"


def test_registry_entry_names_a_daemon_members_workspace_owner(tmp_path: Path) -> None:
    # The module makes the shares the owner's and maps them alone (tests/test_nix.py): the same
    # identity as direct mode's host_identity (the primary group; a uid without an entry, its own id).
    rt = NixosRuntime(RuntimeContext.for_settings(_settings(tmp_path), KEY))
    nobody = pwd.getpwnam("nobody")
    entry = rt.registry_entry(_record(owner_uid=nobody.pw_uid))
    assert (entry["ownerUid"], entry["ownerGid"]) == (nobody.pw_uid, nobody.pw_gid)
    unknown = next(u for u in range(4242424, 4243424) if not _has_entry(u))
    assert _owner_ids(rt, unknown) == (unknown, unknown)
    for none in (None, 0):  # the server's own (or root's): the module's user.uid
        assert _owner_ids(rt, none) == (None, None)


def _has_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _owner_ids(rt: NixosRuntime, owner_uid: int | None) -> tuple[object, object]:
    entry = rt.registry_entry(_record(owner_uid=owner_uid))
    return entry["ownerUid"], entry["ownerGid"]


def test_egress_is_recorded_for_the_module_to_enforce(tmp_path: Path) -> None:
    # The module's network policy is direct mode's, per workspace (tests/test_nix_firewall.py).
    rt = NixosRuntime(RuntimeContext.for_settings(_settings(tmp_path), KEY))
    assert rt.registry_entry(_record(egress="internet"))["egress"] == "internet"
    assert rt.registry_entry(_record(egress="none"))["egress"] == "none"
    # A domain list needs the egress resolver, which the module does not run: refused before anything changes.
    with pytest.raises(InvalidSpec, match="not available in nixos mode"):
        rt.validate(_record(egress=["pypi.org"]))


def _snapshot(root: Path) -> dict[str, bytes]:
    """The flake's files, without the (empty) lock files."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


@pytest.mark.anyio
async def test_prepare_writes_registry_and_template_then_rebuilds(
    tmp_path: Path, flake: Path, host: Host
) -> None:
    rt = _runtime(tmp_path, host)
    host.set(
        rt.registry_path,
        rebuild={
            "stdout": ["building the system configuration..."],
            "stderr": ["activating the configuration..."],
        },
    )
    progress = Progress()
    rec = _record(packages=["ripgrep", "python3Packages.requests", "ripgrep"])
    assert await rt.prepare(rec, progress) == rec

    expected = {
        "version": 1,
        "authorizedKeys": [KEY],
        "workspaces": {"ws1": _entry("192.168.83.10", ["python3Packages.requests", "ripgrep"], "ws1")},
    }
    text = (flake / "sandboxed-workspaces.json").read_text()
    assert json.loads(text) == expected
    assert text == json.dumps(expected, indent=2) + "\n"
    assert list(json.loads(text)) == ["version", "authorizedKeys", "workspaces"]
    assert (flake / "workspaces" / "ws1.nix").read_text() == WORKSPACE_TEMPLATE
    # No temp files left behind by the atomic write.
    assert sorted(os.listdir(flake)) == [
        "sandboxed-workspaces.json",
        "sandboxed-workspaces.json.lock",
        "sandboxed-workspaces.json.rebuild.lock",
        "workspaces",
    ]

    calls = host.calls()
    assert [c["argv"] for c in calls] == [
        ["sudo", "-n", "nixos-rebuild", "switch", "--flake", f"{flake}#fry"]
    ]
    assert calls[0]["registry"] == expected  # the rebuild saw the new registry
    lines = progress.lines()
    assert "building the system configuration..." in lines and "activating the configuration..." in lines
    assert all(f is None for m, f in progress.messages if m.startswith(("building", "activating")))


@pytest.mark.anyio
async def test_second_workspace_keeps_the_first_and_foreign_keys(
    tmp_path: Path, flake: Path, host: Host
) -> None:
    rt = _runtime(tmp_path, host)
    other_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFzz me@laptop"
    (flake / "sandboxed-workspaces.json").write_text(
        json.dumps({"version": 1, "authorizedKeys": [other_key], "workspaces": {}})
    )
    await rt.prepare(_record("ws1"), Progress())
    await rt.prepare(_record("vm2", "vm", "192.168.83.11", packages=["git"]), Progress())
    data = json.loads((flake / "sandboxed-workspaces.json").read_text())
    assert data == {
        "version": 1,
        "authorizedKeys": [other_key, KEY],
        "workspaces": {
            "vm2": _entry("192.168.83.11", ["git"], "vm2", "vm"),
            "ws1": _entry("192.168.83.10", [], "ws1"),
        },
    }
    assert len(host.calls()) == 2


@pytest.mark.anyio
async def test_prepare_is_idempotent_for_the_same_entry_and_refuses_a_different_one(
    tmp_path: Path, flake: Path, host: Host
) -> None:
    rt = _runtime(tmp_path, host)
    await rt.prepare(_record("ws1"), Progress())
    await rt.prepare(_record("ws1"), Progress())  # a retry after a crash
    before = _snapshot(flake)
    with pytest.raises(Conflict, match="other settings"):
        await rt.prepare(_record("ws1", ip="192.168.83.20"), Progress())
    with pytest.raises(Conflict, match="already used by 'ws1'"):
        await rt.prepare(_record("ws2", ip="192.168.83.10"), Progress())
    assert _snapshot(flake) == before
    assert len(host.calls()) == 2


@pytest.mark.anyio
async def test_workspace_file_is_written_once_and_never_overwritten(
    tmp_path: Path, flake: Path, host: Host
) -> None:
    rt = _runtime(tmp_path, host)
    mine = "{ pkgs, ... }: { environment.systemPackages = [ pkgs.htop ]; }\n"
    (flake / "workspaces").mkdir()
    (flake / "workspaces" / "ws1.nix").write_text(mine)
    await rt.prepare(_record("ws1"), Progress())
    assert (flake / "workspaces" / "ws1.nix").read_text() == mine

    await rt.prepare(_record("ws2", ip="192.168.83.11"), Progress())
    (flake / "workspaces" / "ws2.nix").write_text("# edited\n{ ... }: { }\n")
    await rt.prepare(_record("ws2", ip="192.168.83.11"), Progress())
    assert (flake / "workspaces" / "ws2.nix").read_text() == "# edited\n{ ... }: { }\n"


@pytest.mark.anyio
async def test_custom_registry_and_config_dir_give_a_relative_config_path(tmp_path: Path, host: Host) -> None:
    rt = _runtime(
        tmp_path,
        host,
        registry_file=str(tmp_path / "reg" / "r.json"),
        workspace_config_dir=str(tmp_path / "conf"),
    )
    (tmp_path / "flake").mkdir()
    await rt.prepare(_record("ws1"), Progress())
    data = json.loads((tmp_path / "reg" / "r.json").read_text())
    assert data["workspaces"]["ws1"]["config"] == "../conf/ws1.nix"
    assert (tmp_path / "reg" / data["workspaces"]["ws1"]["config"]).read_text() == WORKSPACE_TEMPLATE


@pytest.mark.anyio
async def test_registry_mode_is_kept(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host)
    reg = flake / "sandboxed-workspaces.json"
    reg.write_text(json.dumps({"version": 1, "authorizedKeys": [], "workspaces": {}}))
    reg.chmod(0o640)
    await rt.prepare(_record("ws1"), Progress())
    assert reg.stat().st_mode & 0o777 == 0o640


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("record", "match"),
    [
        (_record(packages=["ripgrep", "foo; rm -rf /"]), "not a valid nix package"),
        (_record(packages=["pkgs.${x}"]), "not a valid nix package"),
        (_record("abcdefgh"), "at most 7"),
        (_record(ip="10.0.0.5"), "outside the workspace subnet"),
        (_record(ip="192.168.83.1"), "reserved"),
    ],
)
async def test_invalid_spec_changes_nothing(
    tmp_path: Path, flake: Path, host: Host, record: WorkspaceRecord, match: str
) -> None:
    rt = _runtime(tmp_path, host)
    await rt.prepare(_record("keep"), Progress())
    before = _snapshot(flake)
    with pytest.raises(InvalidSpec, match=match):
        await rt.prepare(record, Progress())
    assert _snapshot(flake) == before
    assert len(host.calls()) == 1


def test_twelve_characters_are_fine_for_vm_and_incus(tmp_path: Path) -> None:
    rt = NixosRuntime(RuntimeContext.for_settings(_settings(tmp_path), KEY))
    for type_ in ("vm", "incus"):
        assert rt.registry_entry(_record("abcdefghijkl", type_))["type"] == type_


@pytest.mark.anyio
@pytest.mark.parametrize("had_registry", [True, False])
async def test_failed_rebuild_restores_the_previous_files(
    tmp_path: Path, flake: Path, host: Host, had_registry: bool
) -> None:
    rt = _runtime(tmp_path, host)
    reg = flake / "sandboxed-workspaces.json"
    if had_registry:
        await rt.prepare(_record("ws1"), Progress())
        # Odd but valid formatting the restore must keep byte for byte.
        reg.write_bytes(json.dumps(json.loads(reg.read_text()), indent=4).encode() + b"\n\n")
    before = _snapshot(flake)
    out = [f"evaluating line {i}" for i in range(30)]
    err = ["error: attribute 'ripgrepp' missing", "       at /nix/store/x-source/default.nix:12:5"]
    host.set(reg, rebuild={"stdout": out, "stderr": err, "rc": 1})
    progress = Progress()
    with pytest.raises(CommandFailed) as info:
        await rt.prepare(_record("ws2", ip="192.168.83.11", packages=["ripgrepp"]), progress)

    assert _snapshot(flake) | {"sandboxed-workspaces.json.lock": b""} == before | {
        "sandboxed-workspaces.json.lock": b""
    }
    assert reg.exists() is had_registry
    assert not (flake / "workspaces" / "ws2.nix").exists()
    if had_registry:
        assert (flake / "workspaces" / "ws1.nix").exists()
    msg = str(info.value)
    assert "error: attribute 'ripgrepp' missing" in msg and "default.nix:12:5" in msg
    assert "previous configuration was restored" in msg
    assert info.value.exit_status == 1
    assert info.value.argv[-4:] == ("nixos-rebuild", "switch", "--flake", f"{flake}#fry")
    assert set(out + err) <= set(progress.lines())
    rebuild = host.calls()[-1]
    assert "ws2" in rebuild["registry"]["workspaces"]  # type: ignore[index]


@pytest.mark.anyio
async def test_rebuild_timeout_restores_too(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host, rebuild_timeout_s=1)
    await rt.prepare(_record("ws1"), Progress())
    before = _snapshot(flake)
    host.set(rt.registry_path, rebuild={"stdout": ["building..."], "sleep": 30})
    with pytest.raises(CommandTimeout):
        await rt.prepare(_record("ws2", ip="192.168.83.11"), Progress())
    assert _snapshot(flake) == before


@pytest.mark.anyio
async def test_destroy_removes_the_entry_and_an_unedited_file(
    tmp_path: Path, flake: Path, host: Host
) -> None:
    rt = _runtime(tmp_path, host)
    for name, ip in (("ws1", "192.168.83.10"), ("ws2", "192.168.83.11"), ("ws3", "192.168.83.12")):
        await rt.prepare(_record(name, ip=ip), Progress())
    (flake / "workspaces" / "ws3.nix").write_text("# mine\n{ ... }: { }\n")

    await rt.destroy(_record("ws2", ip="192.168.83.11"))
    await rt.destroy(_record("ws3", ip="192.168.83.12"))
    data = json.loads((flake / "sandboxed-workspaces.json").read_text())
    assert data == {
        "version": 1,
        "authorizedKeys": [KEY],
        "workspaces": {"ws1": _entry("192.168.83.10", [], "ws1")},
    }
    assert not (flake / "workspaces" / "ws2.nix").exists()
    assert (flake / "workspaces" / "ws3.nix").read_text() == "# mine\n{ ... }: { }\n"
    calls = host.calls()
    assert len(calls) == 5 and "ws2" not in calls[3]["registry"]["workspaces"]  # type: ignore[index]

    await rt.destroy(_record("ws2", ip="192.168.83.11"))  # idempotent: nothing to rebuild
    assert len(host.calls()) == 5


@pytest.mark.anyio
async def test_failed_destroy_restores_the_registry(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host)
    await rt.prepare(_record("ws1"), Progress())
    before = _snapshot(flake)
    host.set(rt.registry_path, rebuild={"stderr": ["error: switching failed"], "rc": 2})
    with pytest.raises(CommandFailed, match="(?s)switching failed.*previous configuration was restored"):
        await rt.destroy(_record("ws1"))
    assert _snapshot(flake) == before


@pytest.mark.anyio
async def test_lock_serialises_changes(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host)
    lock = flake / "sandboxed-workspaces.json.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    progress = Progress()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rt.prepare, _record("ws1"), progress)
            await wait_until(lambda: any("waiting for another change" in m for m in progress.lines()),
                             "prepare to report that it waits for the lock")
            # Nothing written while someone else holds the lock.
            assert not (flake / "sandboxed-workspaces.json").exists()
            os.close(fd)
            fd = -1
    finally:
        if fd >= 0:
            os.close(fd)
    assert "ws1" in json.loads((flake / "sandboxed-workspaces.json").read_text())["workspaces"]


@pytest.mark.anyio
async def test_concurrent_prepares_keep_both(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host)
    host.set(rt.registry_path, rebuild={"sleep": 0.3})
    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(rt.prepare, _record(f"ws{i}", ip=f"192.168.83.{10 + i}"), Progress())
    data = json.loads((flake / "sandboxed-workspaces.json").read_text())
    assert sorted(data["workspaces"]) == ["ws0", "ws1", "ws2"]


@pytest.mark.anyio
async def test_the_registry_is_free_while_a_rebuild_runs(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host)
    host.set(rt.registry_path, rebuild={"sleep": 1.5})
    registry = flake / "sandboxed-workspaces.json"
    async with anyio.create_task_group() as tg:
        tg.start_soon(rt.prepare, _record("ws1"), Progress())
        await wait_until(lambda: len(host.calls()) == 1, "the first rebuild to start")
        # While it runs, the registry lock is free and a second create records its change.
        fd = os.open(flake / "sandboxed-workspaces.json.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if it were held
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        tg.start_soon(rt.prepare, _record("ws2", ip="192.168.83.11"), Progress())
        await wait_until(lambda: "ws2" in json.loads(registry.read_text())["workspaces"],
                         "the second create to write the registry during the first rebuild")
        assert len(host.calls()) == 1  # ... and its rebuild waits for the first one
    calls = host.calls()
    assert len(calls) == 2
    assert sorted(calls[1]["registry"]["workspaces"]) == ["ws1", "ws2"]  # type: ignore[index]


@pytest.mark.anyio
async def test_a_failed_rebuild_takes_back_only_its_own_change(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host)
    host.set(rt.registry_path, rebuild={"sleep": 1.0, "fail_with": "bad"})
    registry = flake / "sandboxed-workspaces.json"
    failed: list[BaseException] = []

    async def create_bad() -> None:
        try:
            await rt.prepare(_record("bad"), Progress())
        except CommandFailed as exc:
            failed.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(create_bad)
        await wait_until(lambda: len(host.calls()) == 1, "the failing rebuild to start")
        tg.start_soon(rt.prepare, _record("good", ip="192.168.83.11"), Progress())
    assert len(failed) == 1 and "bad is broken" in str(failed[0])
    # The other create's entry, written while the failing rebuild ran, stays; the failed one is gone.
    assert sorted(json.loads(registry.read_text())["workspaces"]) == ["good"]
    assert not (flake / "workspaces" / "bad.nix").exists()
    assert (flake / "workspaces" / "good.nix").exists()
    assert sorted(host.calls()[-1]["registry"]["workspaces"]) == ["good"]  # type: ignore[index]


@pytest.mark.anyio
async def test_a_vm_gets_no_module_in_the_registry(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host)
    await rt.prepare(_record("vm1", "vm", "192.168.83.11"), Progress())
    entry = json.loads((flake / "sandboxed-workspaces.json").read_text())["workspaces"]["vm1"]
    assert entry["config"] is None and entry["egress"] == "none"
    assert not (flake / "workspaces" / "vm1.nix").exists()
    inet = _record("web", ip="192.168.83.12").model_copy(update={"egress": "internet"})
    assert rt.registry_entry(inet)["egress"] == "internet"


@pytest.mark.anyio
async def test_old_vm_entries_lose_their_module_at_the_next_write(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host)
    old = {**_entry("192.168.83.11", [], "vm1", "vm"), "config": "workspaces/vm1.nix"}
    del old["egress"]  # older servers wrote no egress either
    registry = flake / "sandboxed-workspaces.json"
    registry.write_text(json.dumps({"version": 1, "authorizedKeys": [KEY], "workspaces": {"vm1": old}}))
    await rt.prepare(_record("ws1"), Progress())
    data = json.loads(registry.read_text())
    assert data["workspaces"]["vm1"] == _entry("192.168.83.11", [], "vm1", "vm")
    # A retry for the old entry is the same workspace, not one "with other settings".
    registry.write_text(json.dumps({"version": 1, "authorizedKeys": [KEY], "workspaces": {"vm1": old}}))
    await rt.prepare(_record("vm1", "vm", "192.168.83.11"), Progress())
    assert json.loads(registry.read_text())["workspaces"]["vm1"] == _entry("192.168.83.11", [], "vm1", "vm")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_git_flake_gets_new_files_intended_and_forgotten(
    tmp_path: Path, flake: Path, host: Host
) -> None:
    _git(flake, "init", "-q")
    (flake / "flake.nix").write_text("{ outputs = _: { }; }\n")
    _git(flake, "add", "flake.nix")
    _git(flake, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "host")
    rt = _runtime(tmp_path, host)
    await rt.prepare(_record("ws1"), Progress())
    assert _git(flake, "ls-files").split() == ["flake.nix", "sandboxed-workspaces.json", "workspaces/ws1.nix"]

    host.set(rt.registry_path, rebuild={"rc": 1, "stderr": ["error: nope"]})
    with pytest.raises(CommandFailed):
        await rt.prepare(_record("ws2", ip="192.168.83.11"), Progress())
    # The created file is gone from disk and from the index: no dangling entry for Nix to trip on.
    assert _git(flake, "ls-files").split() == ["flake.nix", "sandboxed-workspaces.json", "workspaces/ws1.nix"]

    host.set(rt.registry_path)
    await rt.destroy(_record("ws1"))
    assert _git(flake, "ls-files").split() == ["flake.nix", "sandboxed-workspaces.json"]


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
async def test_someone_elses_uncommitted_changes_refuse_the_rebuild(
    tmp_path: Path, flake: Path, host: Host
) -> None:
    _git(flake, "init", "-q")
    for name in ("flake.nix", "configuration.nix"):
        (flake / name).write_text("{ }\n")
    _git(flake, "add", "flake.nix", "configuration.nix")
    _git(flake, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "host")
    rt = _runtime(tmp_path, host)
    await rt.prepare(_record("ws1"), Progress())
    # The server's own files, and edits of a workspace's module, are not someone else's.
    (flake / "workspaces" / "ws1.nix").write_text("# edited\n{ ... }: { }\n")
    await rt.prepare(_record("ws2", ip="192.168.83.11"), Progress())
    assert len(host.calls()) == 2

    # A half-done edit of the host's configuration: a rebuild would apply it.
    (flake / "configuration.nix").write_text("{ services.openssh.enable = false; }\n")
    before = _snapshot(flake)
    with pytest.raises(Conflict, match=r"uncommitted changes to configuration\.nix.*Commit or stash"):
        await rt.prepare(_record("ws3", ip="192.168.83.12"), Progress())
    with pytest.raises(Conflict, match="configuration.nix"):
        await rt.destroy(_record("ws1"))
    assert _snapshot(flake) == before and len(host.calls()) == 2  # nothing written, nothing rebuilt


@pytest.mark.anyio
async def test_start_stop_status_logs_run_the_unit_commands(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host, escalation="doas")
    rec = _record("ws1", "vm")
    now_us = int(time.monotonic() * 1e6)
    host.set(
        rt.registry_path,
        show={
            "stdout": [
                "LoadState=loaded",
                "ActiveState=active",
                "SubState=running",
                "MainPID=777",
                f"ActiveEnterTimestampMonotonic={now_us - 5_000_000}",
            ]
        },
        journal={"stdout": ["2024-01-01T00:00:00+0000 host systemd[1]: Started microvm@ws1."]},
        stop={
            "rc": 5,
            "stderr": ["Failed to stop microvm@ws1.service: Unit microvm@ws1.service not loaded."],
        },
    )
    progress = Progress()
    assert await rt.start(rec, progress) == rec
    await rt.stop(rec)  # "not loaded" counts as stopped
    before = time.monotonic()
    detail = await rt.status(rec)
    after = time.monotonic()
    log = await rt.logs(rec, 20)
    assert [c["argv"] for c in host.calls()] == [
        ["doas", "-n", "systemctl", "start", "microvm@sbx-ws1"],
        ["doas", "-n", "systemctl", "stop", "microvm@sbx-ws1"],
        [
            "systemctl",
            "show",
            "-p",
            "LoadState,ActiveState,SubState,MainPID,ActiveEnterTimestampMonotonic",
            "microvm@sbx-ws1",
        ],
        ["journalctl", "-u", "microvm@sbx-ws1", "-n", "20", "--no-pager", "-o", "short-iso"],
    ]
    assert (detail.unit, detail.running, detail.pid, detail.unit_state) == (
        "microvm@sbx-ws1",
        True,
        777,
        "active (running)",
    )
    # The unit entered 'active' 5 s before now_us: the uptime is bracketed by the clock read around
    # the call (exact, whatever the machine's speed; 1 µs for the stand-in's rounding).
    uptime = detail.uptime_s
    entered = (now_us - 5_000_000) / 1e6
    assert uptime is not None and before - entered - 1e-6 <= uptime <= after - entered + 1e-6
    assert "Started microvm@ws1." in log


@pytest.mark.anyio
async def test_start_and_stop_failures(tmp_path: Path, flake: Path, host: Host) -> None:
    rt = _runtime(tmp_path, host)
    host.set(
        rt.registry_path,
        start={
            "rc": 1,
            "stderr": ["Job for container@ws1.service failed because the control process exited."],
        },
        stop={"rc": 1, "stderr": ["Failed to stop: Access denied"]},
    )
    with pytest.raises(CommandFailed, match="(?s)control process exited.*workspace_logs"):
        await rt.start(_record(), Progress())
    with pytest.raises(CommandFailed, match="Access denied"):
        await rt.stop(_record())
