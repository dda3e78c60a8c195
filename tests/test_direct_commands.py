"""The exact host commands direct mode runs (pure builders), and host-detection parsers.

The end-to-end tests run these commands for real; these pin them down case by case.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from sandbox_mcp.errors import InvalidSpec
from sandbox_mcp.images.debootstrap import (
    BASE_PACKAGES,
    EXACT_NAMES_SH,
    apt_install_argv,
    debootstrap_argv,
    detect_debian_mirror,
    detect_debian_suite,
    image_key,
)
from sandbox_mcp.manager import parse_mode
from sandbox_mcp.paths import WorkspacePaths
from sandbox_mcp.runtimes.nspawn import hosts_file, launch_argv, nspawn_argv
from sandbox_mcp.runtimes.nspawn.rootfs import RootMounts


def test_nspawn_argv_exact() -> None:
    paths = WorkspacePaths.of(Path("/st"), "ws1")
    assert nspawn_argv(
        name="ws1", image_root=Path("/img/k"), netns_path=Path("/run/netns/sbx-ws1"), paths=paths, user="agent",
        tag="0123abcd",
    ) == [
        "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
        "--machine=sbx-ws1", "--hostname=ws1", "--directory=/img/k", "--volatile=overlay",
        "--network-namespace-path=/run/netns/sbx-ws1",
        "--drop-capability=CAP_MKNOD,CAP_AUDIT_CONTROL,CAP_LINUX_IMMUTABLE,CAP_SYS_TTY_CONFIG",
        "--rlimit=RLIMIT_FSIZE=infinity", "--rlimit=RLIMIT_NOFILE=1024:524288",
        "--link-journal=no", "--console=read-only",
        "--setenv=SANDBOX_MCP_WORKSPACE=0123abcd",
        "--bind=/st/ws1/workspace:/home/agent/workspace",
        "--bind=/st/ws1/claude-config:/home/agent/claude-config",
        "--bind-ro=/st/ws1/ssh-host-keys:/etc/ssh-host-keys",
        "--bind-ro=/st/ws1/runtime/hosts:/etc/hosts",
        "--bind-ro=/st/ws1/runtime/resolv.conf:/etc/resolv.conf",
    ]  # fmt: skip


def test_nspawn_argv_user_namespaced_exact() -> None:
    paths = WorkspacePaths.of(Path("/st"), "ws1")
    mounts = RootMounts(paths.runtime / "mnt")
    argv = nspawn_argv(name="ws1", image_root=Path("/img/k"), netns_path=None, paths=paths, user="agent",
                       uid_base=524288, mounts=mounts, tag="0123abcd")
    assert argv == [
        "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
        "--machine=sbx-ws1", "--hostname=ws1", "--directory=/st/ws1/runtime/mnt/root",
        "--private-users=524288:65536", "--private-users-ownership=off", "--private-network",
        "--drop-capability=CAP_MKNOD,CAP_AUDIT_CONTROL,CAP_LINUX_IMMUTABLE,CAP_SYS_TTY_CONFIG",
        "--rlimit=RLIMIT_FSIZE=infinity", "--rlimit=RLIMIT_NOFILE=1024:524288",
        "--link-journal=no", "--console=read-only",
        "--setenv=SANDBOX_MCP_WORKSPACE=0123abcd",
        "--bind=/st/ws1/runtime/mnt/workspace:/home/agent/workspace",
        "--bind=/st/ws1/runtime/mnt/claude:/home/agent/claude-config",
        "--bind-ro=/st/ws1/runtime/mnt/keys:/etc/ssh-host-keys",
        "--bind-ro=/st/ws1/runtime/hosts:/etc/hosts",
        "--bind-ro=/st/ws1/runtime/resolv.conf:/etc/resolv.conf",
    ]  # fmt: skip
    # A warm pool slot: no shares, and its init is told (the agent that waits at boot stays off there).
    slot = nspawn_argv(name="ws1", image_root=Path("/img/k"), netns_path=None, paths=paths, user="agent",
                       uid_base=524288, mounts=mounts, tag="0123abcd", shares=False)
    assert [a for a in slot if a not in argv] == ["sandbox-mcp.pool-slot"] == slot[-1:]
    assert [a for a in argv if a not in slot] == [
        "--bind=/st/ws1/runtime/mnt/workspace:/home/agent/workspace",
        "--bind=/st/ws1/runtime/mnt/claude:/home/agent/claude-config",
    ]
    # No resource limit on nspawn (issue 28: a file-size limit there reached every process inside).
    launched = launch_argv(argv, [Path("/cg/ws1/cgroup.procs")], user_namespaced=True)
    assert launched[3:] == ["sh", "/cg/ws1/cgroup.procs", "--", "env", "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1", *argv]
    assert launch_argv(argv, [], user_namespaced=False)[3:] == ["sh", "--", *argv]
    assert [a for a in launched if "rlimit" in a.lower()] == [a for a in argv if a.startswith("--rlimit=")]
    with pytest.raises(InvalidSpec):
        nspawn_argv(name="ws1", image_root=Path("/i"), netns_path=None, paths=paths, user="agent", uid_base=524288,
                    tag="0123abcd")
    with pytest.raises(InvalidSpec):
        nspawn_argv(name="ws1", image_root=Path("/i"), netns_path=None, paths=paths, user="agent", tag="0123abcd")


def test_nspawn_argv_refuses_bind_separators() -> None:
    with pytest.raises(InvalidSpec, match="SANDBOX_MCP_STATE_DIR"):
        nspawn_argv(name="a", image_root=Path("/i"), netns_path=Path("/n"),
                    paths=WorkspacePaths.of(Path("/odd:dir"), "a"), user="agent", tag="t")


def test_hosts_file() -> None:
    assert hosts_file("ws1", "192.168.83.1").splitlines()[:3] == [
        "127.0.0.1\tlocalhost", "127.0.1.1\tws1", "192.168.83.1\tsandbox-host"
    ]


@pytest.mark.parametrize(
    ("mirror", "tail"),
    [(None, ["bookworm", "/t"]), ("http://mirror.example/debian", ["bookworm", "/t", "http://mirror.example/debian"])],
)
def test_debootstrap_argv(mirror: str | None, tail: list[str]) -> None:
    argv = debootstrap_argv(Path("/t"), "bookworm", mirror)
    assert argv[:3] == ["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES)]
    assert argv[3:] == tail
    assert {"systemd", "openssh-server", "sudo"} <= set(BASE_PACKAGES)


def test_apt_install_argv_passes_packages_as_arguments_not_shell_text() -> None:
    argv = apt_install_argv(Path("/img"), ["jq", "python3"])
    assert argv[:6] == ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--as-pid2", "--directory=/img"]
    assert argv[-3:] == ["sh", "jq", "python3"]  # "$@" in the script, never spliced
    assert "--private-users=2147418112:65536" in argv and "--private-users-ownership=map" in argv
    assert EXACT_NAMES_SH in argv[-4]


def test_image_key_depends_on_every_input() -> None:
    base = image_key("bookworm", "agent", 1000, [])
    assert base.startswith("bookworm-base-")
    assert image_key("bookworm", "agent", 1000, ["jq"]).startswith("bookworm-pkgs-")
    assert image_key("bookworm", "agent", 1000, ["b", "a"]) == image_key("bookworm", "agent", 1000, ["a", "b"])
    others = {image_key("trixie", "agent", 1000, []), image_key("bookworm", "dev", 1000, []),
              image_key("bookworm", "agent", 1001, [])}
    assert base not in others and len(others) == 3


def test_image_key_follows_the_recipe_code(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same version number, different recipe (two branches that both bumped it): different images."""
    from sandbox_mcp.images import debootstrap

    base = image_key("bookworm", "agent", 1000, [])
    monkeypatch.setattr(debootstrap, "recipe_digest", lambda: "another-recipe")
    assert image_key("bookworm", "agent", 1000, []) != base


def test_detect_suite_and_mirror(tmp_path: Path) -> None:
    (tmp_path / "os-release").write_text('NAME="Debian"\nVERSION_CODENAME=trixie\n')
    assert detect_debian_suite(tmp_path / "os-release") == "trixie"
    assert detect_debian_suite(tmp_path / "missing") == "bookworm"
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://local.mirror/debian-security\n\nTypes: deb\nURIs: http://local.mirror/debian\n"
    )
    assert detect_debian_mirror(apt) == "http://local.mirror/debian"
    (apt / "sources.list.d" / "debian.sources").unlink()
    (apt / "sources.list").write_text("deb [arch=amd64] http://other.mirror/debian bookworm main\n")
    assert detect_debian_mirror(apt) == "http://other.mirror/debian"
    (apt / "sources.list").write_text("deb http://archive.ubuntu.example/ubuntu noble main\n")
    assert detect_debian_mirror(apt) is None


@pytest.mark.parametrize(("mode", "expected"), [("644", 0o644), ("0755", 0o755), (None, None), (0o600, 0o600)])
def test_parse_mode(mode: str | int | None, expected: int | None) -> None:
    assert parse_mode(mode) == expected


@pytest.mark.parametrize("mode", ["999", "rwx", "7777", "", "64"])
def test_parse_mode_rejects(mode: str) -> None:
    with pytest.raises(InvalidSpec, match="octal"):
        parse_mode(mode)


def test_hosts_file_block_is_ours_alone(tmp_path: Path) -> None:
    from sandbox_mcp.hostnet.hostsfile import render_hosts, update_hosts_file

    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1\tlocalhost\n10.0.0.5\tother  # keep me\n")
    hosts.chmod(0o644)
    assert update_hosts_file(hosts, {"b": "192.168.83.11", "a": "192.168.83.10"}, "/st") is True
    lines = hosts.read_text().splitlines()
    assert lines[:2] == ["127.0.0.1\tlocalhost", "10.0.0.5\tother  # keep me"]
    assert lines[3:5] == ["192.168.83.10\tworkspace-a", "192.168.83.11\tworkspace-b"]
    assert update_hosts_file(hosts, {"b": "192.168.83.11", "a": "192.168.83.10"}, "/st") is False
    # another server's block (another state dir) is left alone
    update_hosts_file(hosts, {"z": "192.168.83.99"}, "/other")
    update_hosts_file(hosts, {"a": "192.168.83.10"}, "/st")
    text = hosts.read_text()
    assert "workspace-b" not in text and "workspace-a" in text and "workspace-z" in text
    update_hosts_file(hosts, {}, "/st")
    update_hosts_file(hosts, {}, "/other")
    assert hosts.read_text() == "127.0.0.1\tlocalhost\n10.0.0.5\tother  # keep me\n"
    assert hosts.stat().st_mode & 0o777 == 0o644
    assert render_hosts("", {}, "/st") == ""


def test_firewall_tables_are_ours_alone_and_replace_atomically() -> None:
    import ipaddress

    from sandbox_mcp.hostnet.firewall import EGRESS_MARK, base_script, table_name

    script = base_script("sandbox-br", ipaddress.IPv4Network("192.168.83.0/24"), nat=True,
                         nameservers=[ipaddress.IPv4Address("192.168.1.1")])
    t = table_name("sandbox-br")
    assert t == "sandbox_mcp_sandbox_br"
    lines = [line.strip() for line in script.splitlines()]
    for family in ("bridge", "inet"):
        i = lines.index(f"add table {family} {t}")
        assert lines[i + 1 : i + 3] == [f"delete table {family} {t}", f"table {family} {t} {{"]
    assert "ip saddr 192.168.83.0/24 ip daddr != 192.168.83.0/24 masquerade" in lines
    assert 'iifname "sandbox-br" ct state established,related accept' in lines  # the server's SSH replies
    assert 'iifname "sandbox-br" drop' in lines  # nothing else reaches the host
    assert f'iifname "sandbox-br" meta mark {EGRESS_MARK:#x} ip daddr != @closed accept' in lines
    assert f'iifname "sandbox-br" meta mark {EGRESS_MARK:#x} ip daddr {{ 192.168.1.1 }} udp dport 53 accept' in lines
    assert "iifname @ports oifname @ports drop" in lines  # workspace to workspace
    assert "masquerade" not in base_script("sandbox-br", ipaddress.IPv4Network("192.168.83.0/24"), nat=False)
    # An egress workspace keeps at most so many connections open; checked before it is let out.
    limit = (f'iifname "sandbox-br" meta mark {EGRESS_MARK:#x} ct state new add @egress_conns '
             "{ ip saddr ct count over 512 } drop")
    assert lines.index(limit) < lines.index(f'iifname "sandbox-br" meta mark {EGRESS_MARK:#x} ip daddr != @closed accept')
    assert "ct count over 7 " in base_script("sandbox-br", ipaddress.IPv4Network("192.168.83.0/24"), nat=False,
                                             max_connections=7)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(InvalidSpec):
            base_script("sandbox-br", ipaddress.IPv4Network("192.168.83.0/24"), nat=False, max_connections=bad)
    no_host = base_script("sandbox-br", ipaddress.IPv4Network("192.168.83.0/24"), nat=False, host_access=False)
    assert "chain output" not in no_host and "owners" not in no_host  # the NixOS rendering
    # The host's own connections into the bridge: root's, and each workspace's owner's (admit_script).
    i = lines.index("chain output {")
    assert lines[i + 1 : i + 6] == [
        "type filter hook output priority filter; policy accept;",
        'oifname "sandbox-br" ct state established,related accept',
        'oifname "sandbox-br" meta skuid 0 accept',
        'oifname "sandbox-br" ip daddr vmap @owners',
        'oifname "sandbox-br" drop',
    ]


def test_admit_and_revoke_a_port_exactly() -> None:
    import ipaddress

    from sandbox_mcp.hostnet.firewall import admit_script, admitted_ports, revoke_script

    script = admit_script("sandbox-br", "sb-ws1", "02:aa:bb:cc:dd:ee", ipaddress.IPv4Address("192.168.83.10"),
                          egress=False)
    t = "sandbox_mcp_sandbox_br"
    assert script.splitlines() == [
        f"add chain bridge {t} port_sb_ws1",
        f"flush chain bridge {t} port_sb_ws1",
        f"add rule bridge {t} port_sb_ws1 ether saddr != 02:aa:bb:cc:dd:ee drop",
        f"add rule bridge {t} port_sb_ws1 ether type ip ip saddr != 192.168.83.10 drop",
        f"add rule bridge {t} port_sb_ws1 ether type arp arp saddr ether != 02:aa:bb:cc:dd:ee drop",
        f"add rule bridge {t} port_sb_ws1 ether type arp arp saddr ip != 192.168.83.10 drop",
        f"add rule bridge {t} port_sb_ws1 ether type != {{ ip, arp }} drop",
        f'add element bridge {t} ports {{ "sb-ws1" : jump port_sb_ws1 }}',
    ]  # fmt: skip
    owned = admit_script("sandbox-br", "sb-ws1", "02:aa:bb:cc:dd:ee", ipaddress.IPv4Address("192.168.83.10"),
                         egress=False, owner=1234)
    assert owned.splitlines()[len(script.splitlines()):] == [  # who on the host may connect to it
        f"add chain inet {t} host_sb_ws1", f"flush chain inet {t} host_sb_ws1",
        f"add rule inet {t} host_sb_ws1 meta skuid 1234 accept",
        f"add element inet {t} owners {{ 192.168.83.10 : jump host_sb_ws1 }}",
    ]
    for bad_owner in (-1, 2**32, True, "1000"):
        with pytest.raises(InvalidSpec):
            admit_script("sandbox-br", "sb-ws1", "02:aa:bb:cc:dd:ee", ipaddress.IPv4Address("192.168.83.10"),
                         egress=False, owner=bad_owner)  # type: ignore[arg-type]
    assert "meta mark set" in admit_script("sandbox-br", "sb-ws1", "02:aa:bb:cc:dd:ee",
                                           ipaddress.IPv4Address("192.168.83.10"), egress=True)
    listed = ('elements = { "sb-ws1" : jump port_sb_ws1 }\n\tchain port_sb_ws1 {\n'
              "elements = { 192.168.83.10 : jump host_sb_ws1 }\n\tchain host_sb_ws1 {\n")
    assert admitted_ports(listed) == ["sb-ws1"]
    assert revoke_script("sandbox-br", "sb-ws1", listed).splitlines() == [
        f'delete element bridge {t} ports {{ "sb-ws1" }}', f"delete chain bridge {t} port_sb_ws1",
        f"delete element inet {t} owners {{ 192.168.83.10 }}", f"delete chain inet {t} host_sb_ws1",
    ]
    assert revoke_script("sandbox-br", "sb-ws1", "") == ""
    with pytest.raises(InvalidSpec):
        admit_script("sandbox-br", "sb-ws1; flush ruleset", "02:aa:bb:cc:dd:ee",
                     ipaddress.IPv4Address("192.168.83.10"), egress=False)


def test_an_address_another_port_holds_is_found() -> None:
    """What admit refuses as taken (nft list's layout): another port's anti-spoofing rule or map element."""
    import ipaddress

    from sandbox_mcp.hostnet.firewall import claimed_addresses, claims_of_others

    listed = (
        "table bridge t {\n\tmap ports {\n\t\telements = { \"sb-old\" : jump port_sb_old,\n"
        "\t\t\t     \"sb-ws1\" : jump port_sb_ws1 }\n\t}\n"
        "\tchain port_sb_old {\n\t\tether saddr != 02:aa:bb:cc:dd:01 drop\n"
        "\t\tether type ip ip saddr != 192.168.83.10 drop\n\t}\n"
        "\tchain port_sb_ws1 {\n\t\tether type ip ip saddr != 192.168.83.10 drop\n\t}\n}\n"
        "table inet t {\n\tmap owners {\n\t\telements = { 192.168.83.100 : jump host_sb_x }\n\t}\n}\n"
    )
    ten, one, hundred = (ipaddress.IPv4Address(f"192.168.83.{n}") for n in (10, 1, 100))
    assert claims_of_others("sb-ws1", ten, listed) == ["port_sb_old"]
    assert claims_of_others("sb-old", ten, listed) == ["port_sb_ws1"]
    assert claims_of_others("sb-ws1", one, listed) == []  # .1 is not a prefix match of .10
    assert claims_of_others("sb-ws1", hundred, listed) == ["host_sb_x"]
    assert claims_of_others("sb-x", hundred, listed) == []  # its own
    assert claimed_addresses(listed) == {ten, hundred}  # what the allocator skips


_UPGRADE = """
import ipaddress, re, subprocess, sys
from sandbox_mcp.hostnet import firewall as fw
def nft(script):
    subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True)
def listed():
    return subprocess.run(["nft", "list", "table", "inet", fw.table_name("br0")], capture_output=True,
                          text=True, check=True).stdout
full = fw.base_script("br0", ipaddress.IPv4Network("192.168.83.0/24"), nat=False)
old = re.sub(r"    (set egress_conns|map owners|chain output) \\{[^}]*\\}\\n", "", full)
old = "\\n".join(line for line in old.splitlines() if "ct count" not in line)
assert "output" not in old and "owners" not in old
nft(old)  # an older version's tables, with a workspace running
nft(fw.upgrade_script("br0", listed()))
nft(fw.admit_script("br0", "ve-x", "02:00:00:00:00:01", ipaddress.IPv4Address("192.168.83.10"), egress=True,
                    owner=1000))
now = listed()
assert fw.upgrade_script("br0", now) == "" and "meta skuid 1000 accept" in now and "ct count over 512" in now
nft(fw.revoke_script("br0", "ve-x", now))
assert "host_ve_x" not in listed()
print("ok")
"""


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("unshare") is None,
                    reason="loads the tables into nft in a network namespace of its own: needs root and nft")
def test_tables_of_an_older_version_are_upgraded_in_place_and_nft_takes_every_script() -> None:
    import subprocess
    import sys

    r = subprocess.run(["unshare", "--net", sys.executable, "-c", _UPGRADE], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr
