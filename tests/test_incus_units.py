"""The Incus runtime's pure parts, exactly: request bodies, the address file, the pack command, settings.

These need no daemon; tests/test_incus_e2e.py runs the same code against a real incusd.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from sandbox_mcp.config import load_settings
from sandbox_mcp.errors import BackendError, InvalidSpec
from sandbox_mcp.models import Limits, WorkspaceRecord
from sandbox_mcp.runtimes import check_settings, runtime_class
from sandbox_mcp.runtimes.incus import IncusRuntime, instance_body, network_env
from sandbox_mcp.runtimes.incus.api import cert_fingerprint, probe
from sandbox_mcp.runtimes.incus.image import incus_image_key, metadata_yaml, pack_argv, setup_script
from sandbox_mcp.runtimes.incus.settings import IncusSettings


def record() -> WorkspaceRecord:
    return WorkspaceRecord(name="ws1", type="incus", runtime="incus", ip="192.168.83.7", mac="02:aa:bb:cc:dd:ee",
                           cid=100, user="agent")


def test_registered() -> None:
    assert runtime_class("incus") is IncusRuntime
    assert IncusRuntime.types == frozenset({"incus"}) and IncusRuntime.modes == frozenset({"direct"})


def test_instance_body_exact() -> None:
    body = instance_body(
        record=record(), fingerprint="ab" * 32, tag="t" * 20, pool="default",
        limits=Limits(cpus=1.5, memory_mib=1024, tasks=4096, disk_mib=3072),
        nic={"nictype": "bridged", "parent": "sandbox-br"},
        disks={"workspace": {"type": "disk", "source": "/s/ws1/workspace", "path": "/home/agent/workspace"}},
    )  # fmt: skip
    assert body == {
        "name": "sbx-ws1",
        "type": "container",
        "ephemeral": True,
        "start": False,
        "profiles": [],
        "source": {"type": "image", "fingerprint": "ab" * 32},
        "config": {
            "security.privileged": "false",
            "security.idmap.isolated": "true",
            "security.nesting": "false",
            "limits.cpu": "2",
            "limits.cpu.allowance": "150ms/100ms",
            "limits.memory": "1024MiB",
            "limits.processes": "4096",
            "limits.kernel.fsize": "unlimited",
            "limits.kernel.nofile": "1024:524288",
            "user.sandbox-mcp.tag": "t" * 20,
            "user.sandbox-mcp.workspace": "ws1",
        },
        "devices": {
            "root": {"type": "disk", "path": "/", "pool": "default", "size": "3072MiB"},
            "eth0": {"type": "nic", "name": "eth0", "hwaddr": "02:aa:bb:cc:dd:ee", "nictype": "bridged",
                     "parent": "sandbox-br"},
            "workspace": {"type": "disk", "source": "/s/ws1/workspace", "path": "/home/agent/workspace"},
        },
    }  # fmt: skip


@pytest.mark.parametrize(
    ("ip", "expected"),
    [("192.168.83.7", "IFACE=eth0\nADDRESS=192.168.83.7/24\nGATEWAY=192.168.83.1\n")],
)
def test_network_env(ip: str, expected: str) -> None:
    subnet = ipaddress.IPv4Network("192.168.83.0/24")
    assert network_env(ip, subnet, subnet.network_address + 1) == expected


@pytest.mark.parametrize("bad", ["10.0.0.5", "192.168.83.7; reboot", "$(id)", ""])
def test_network_env_refuses(bad: str) -> None:
    subnet = ipaddress.IPv4Network("192.168.83.0/24")
    with pytest.raises(InvalidSpec):
        network_env(bad, subnet, subnet.network_address + 1)


def test_pack_argv_exact(tmp_path: Path) -> None:
    argv = pack_argv(tmp_path / "out.tar.zst", Path("/cache"), "bookworm-base-123", tmp_path / "x",
                     ["rootfs/etc/a"])
    assert argv == [
        "tar", "--create", f"--file={tmp_path}/out.tar.zst", "--numeric-owner", "--xattrs", "--xattrs-include=*",
        "--use-compress-program=zstd -T0 -3", "--checkpoint=5000", "--checkpoint-action=echo=packed %u",
        f"--directory={tmp_path}/x", "metadata.yaml", "rootfs/etc/a",
        "--directory=/cache", "--transform=s,^bookworm-base-123,rootfs,S", "bookworm-base-123",
    ]  # fmt: skip


def test_image_key_follows_root() -> None:
    assert incus_image_key("a") != incus_image_key("b")
    assert incus_image_key("a") == incus_image_key("a")


def test_metadata_is_yaml_and_json() -> None:
    meta = json.loads(metadata_yaml("k", "bookworm", 1700000000))
    assert meta["creation_date"] == 1700000000 and meta["properties"]["release"] == "bookworm"
    assert meta["architecture"]


def test_setup_script_sources_only_our_file() -> None:
    script = setup_script("agent")
    assert ". /etc/sandbox-mcp/network.env" in script
    assert 'ip address replace "$ADDRESS" dev "$IFACE"' in script
    assert "chown agent:agent /home/agent/workspace" in script


def test_settings_from_env_and_remote_needs_certs() -> None:
    def incus(env: dict[str, str]) -> IncusSettings:
        settings = load_settings(env, config_file=Path("/nonexistent"))
        check_settings(settings)  # what start-up does: each runtime checks its section
        return IncusSettings.of(settings)

    s = incus({"SANDBOX_MCP_INCUS_PROJECT": "team", "SANDBOX_MCP_INCUS_STORAGE_POOL": "fast"})
    assert (s.project, s.storage_pool, s.url) == ("team", "fast", None)
    with pytest.raises(InvalidSpec, match="client_cert"):
        incus({"SANDBOX_MCP_INCUS_URL": "https://incus.example:8443"})
    with pytest.raises(InvalidSpec, match=r"\[runtimes.incus\].*project \(old name incus.project\)"):
        incus({"SANDBOX_MCP_INCUS_PROJECT": "a b"})


def test_probe_without_daemon_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="is incusd running"):
        probe(IncusSettings(socket=tmp_path / "absent.socket"), timeout_s=5)


def test_cert_fingerprint_refuses_non_certificates(tmp_path: Path) -> None:
    (tmp_path / "x.pem").write_text("not a certificate")
    with pytest.raises(InvalidSpec, match="server_cert"):
        cert_fingerprint(tmp_path / "x.pem")


@pytest.mark.anyio
async def test_prune_drops_old_and_orphaned_images_only(tmp_path: Path) -> None:
    from sandbox_mcp.config import Settings
    from sandbox_mcp.images import ImageStore
    from sandbox_mcp.runtimes.incus.image import INCUS_IMAGE_VERSION, IncusImage

    store = ImageStore(tmp_path / "images")

    async def build(tmp: Path) -> None:
        (tmp / "image.tar.zst").write_bytes(b"x")

    await store.ensure("root-a", build, {"recipe": "debian-root"})
    current = {"recipe": "incus-image", "version": INCUS_IMAGE_VERSION}
    await store.ensure("incus-kept", build, {**current, "root": "root-a"})
    await store.ensure("incus-orphan", build, {**current, "root": "root-gone"})
    await store.ensure("incus-old", build, {**current, "version": INCUS_IMAGE_VERSION - 1, "root": "root-a"})
    images = IncusImage(Settings(image_dir=tmp_path / "images"), store)
    assert sorted(images.prune()) == ["incus-old", "incus-orphan"]
    assert store.exists("incus-kept") and store.exists("root-a")


def test_doctor_check_without_daemon(tmp_path: Path) -> None:
    from sandbox_mcp.config import Settings
    from sandbox_mcp.runtimes import RuntimeContext

    s = Settings(state_dir=tmp_path, incus=IncusSettings(socket=tmp_path / "absent.socket"))
    checks = IncusRuntime(RuntimeContext.for_settings(s, "")).checks()
    assert [(c.name, c.ok, c.required) for c in checks] == [("incus", False, False)]
    assert "incus-base" in (checks[0].fix or "") and "absent.socket" in checks[0].detail
