"""The documented scripts never run code as root that another user could have changed.

``scripts/check-root-owned`` is what ``scripts/setup`` (and so ``scripts/serve``) asks before
running the checkout's code as root; here it runs for real on checkouts whose files or parent
directories another user owns or may write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "scripts" / "check-root-owned"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHECK), str(path)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of a few files of this checkout, root-owned, under a root-owned 0755 directory."""
    os.chmod(tmp_path, 0o755)
    co = tmp_path / "parent" / "co"
    (co / "scripts").mkdir(parents=True)
    os.chmod(co.parent, 0o755)
    for rel in ("pyproject.toml", "scripts/setup"):
        shutil.copy2(ROOT / rel, co / rel)
    return co


def _up_to_root_is_safe(path: Path) -> bool:
    """pytest's tmp dirs sit under the machine's /tmp: sticky, so fine, unless something above is not."""
    return _check(path).returncode == 0


def test_a_root_owned_checkout_passes(checkout: Path) -> None:
    r = _check(checkout)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_parent_another_user_owns_is_refused(checkout: Path) -> None:
    assert _up_to_root_is_safe(checkout)
    os.chown(checkout.parent, 65534, 65534)
    r = _check(checkout)
    assert r.returncode == 1
    assert str(checkout.parent) in r.stdout and "would become root" in r.stdout
    assert "sudo git clone" in r.stdout  # says what to do


def test_a_file_another_user_owns_or_may_write_is_refused(checkout: Path) -> None:
    target = checkout / "scripts" / "setup"
    os.chown(target, 65534, 0)
    assert _check(checkout).returncode == 1
    os.chown(target, 0, 0)
    os.chmod(target, 0o757)  # world-writable
    assert _check(checkout).returncode == 1
    os.chmod(target, 0o775)  # group-writable, group root: only root
    assert _check(checkout).returncode == 0
    os.chown(target, 0, 65534)  # group-writable by another group
    assert _check(checkout).returncode == 1


def test_root_made_caches_inside_and_symlinks_do_not_count(checkout: Path) -> None:
    venv = checkout / ".venv" / "bin"
    venv.mkdir(parents=True)
    os.chown(venv, 65534, 65534)  # inside a venv: root's own business, skipped
    (checkout / "link").symlink_to("pyproject.toml")
    assert _check(checkout).returncode == 0


def test_setup_refuses_before_installing_anything(checkout: Path) -> None:
    os.chown(checkout.parent, 65534, 65534)
    shutil.copy2(CHECK, checkout / "scripts" / "check-root-owned")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBOX_MCP_")}
    r = subprocess.run(["bash", str(checkout / "scripts" / "setup")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 1
    assert "refusing to run as root" in r.stderr
    assert not (checkout / ".venv").exists()
