"""The kernel limits scripts/setup raises: the file it writes, and the kernel fact behind it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sandbox_mcp import sysctls

REPO = Path(__file__).resolve().parents[1]


def _fake_proc(root: Path, values: dict[str, str]) -> Path:
    for key, value in values.items():
        f = root / "sys" / key.replace(".", "/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(value + "\n")
    return root


def _settings_in(text: str) -> dict[str, str]:
    return dict(
        (k.strip(), v.strip()) for line in text.splitlines() if line and not line.startswith("#")
        for k, v in [line.split("=", 1)]
    )


@pytest.mark.parametrize(
    ("current", "expected"),
    [
        # Debian's defaults here: both raised to what Incus sets.
        ({"fs.inotify.max_user_instances": 128, "fs.inotify.max_user_watches": 192536},
         {"fs.inotify.max_user_instances": "1048576", "fs.inotify.max_user_watches": "1048576"}),
        # Already higher: kept, never lowered (a later boot applies this file after others).
        ({"fs.inotify.max_user_instances": 4194304, "fs.inotify.max_user_watches": 192536},
         {"fs.inotify.max_user_instances": "4194304", "fs.inotify.max_user_watches": "1048576"}),
        # Unreadable: the recommendation.
        ({"fs.inotify.max_user_instances": None, "fs.inotify.max_user_watches": 2000000},
         {"fs.inotify.max_user_instances": "1048576", "fs.inotify.max_user_watches": "2000000"}),
    ],
)
def test_conf_raises_and_never_lowers(current: dict[str, int | None], expected: dict[str, str]) -> None:
    assert _settings_in(sysctls.conf_text(current)) == expected


def test_setup_gets_the_file_from_this_hosts_values(tmp_path: Path) -> None:
    proc = _fake_proc(tmp_path, {"fs.inotify.max_user_instances": "128", "fs.inotify.max_user_watches": "9999999"})
    out = subprocess.run([sys.executable, "-m", "sandbox_mcp.sysctls", "--proc", str(proc)], capture_output=True,
                         text=True, check=True, cwd=REPO).stdout
    assert _settings_in(out) == {"fs.inotify.max_user_instances": "1048576", "fs.inotify.max_user_watches": "9999999"}
    conf = tmp_path / "60-sandbox-mcp.conf"
    conf.write_text(out)
    if shutil.which("sysctl"):
        # procps parses the file as `sysctl -p` would, and writes nothing (--dry-run).
        dry = subprocess.run(["sysctl", "--dry-run", "-p", str(conf)], capture_output=True, text=True, check=True)
        assert dry.stdout.split("\n")[:2] == ["fs.inotify.max_user_instances = 1048576",
                                              "fs.inotify.max_user_watches = 9999999"]


def test_setup_writes_and_applies_only_that_file() -> None:
    script = (REPO / "scripts" / "setup").read_text()
    assert "SANDBOX_MCP_SETUP_SYSCTL" in script
    assert f'conf={sysctls.CONF_PATH}' in script
    assert 'sysctl -q -p "$conf"' in script and "sysctl --system" not in script


@pytest.mark.skipif(os.geteuid() != 0, reason="the probe writes user-namespace maps: needs root")
def test_inotify_instances_are_charged_to_the_user_namespaces_owner() -> None:
    # Why setup raises the host's limit: a root-owned user namespace (what nspawn makes) spends its
    # owner's count in the parent namespace, not a count of its own. The probe sets a limit inside a
    # user namespace of its own, so the host's count is never touched.
    out = subprocess.run([sys.executable, str(REPO / "tests" / "inotify_ucount_probe.py")], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result == {"limit": 10, "root_owned": 10, "root_owned_with_6_held_by_root": 4,
                      "uid1000_owned_with_6_held_by_root": 10,
                      "headroom_4_with_6_held": True, "headroom_5_with_6_held": False}
