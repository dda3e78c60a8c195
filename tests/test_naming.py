"""Name rules, IP allocation, deterministic MAC / vsock CID and their collision checks."""

from __future__ import annotations

import hashlib
import ipaddress

import pytest

from sandbox_mcp.errors import Conflict, InvalidSpec
from sandbox_mcp.naming import (
    allocate_ip,
    check_identity_collisions,
    cid_for,
    is_pool_slot,
    mac_for,
    pool_slot_name,
    tap_name,
    validate_ident,
    validate_name,
    validate_packages,
    veth_names,
)

SUBNET = ipaddress.IPv4Network("192.168.83.0/24")


@pytest.mark.parametrize("name", ["a", "ws1", "my-project", "abcdefghijkl", "x-1-y"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name
    assert len(tap_name(name)) <= 15 and all(len(v) <= 15 for v in veth_names(name))


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("abcdefghijklm", "13 characters"),
        ("1abc", "starting with a letter"),
        ("-abc", "starting with a letter"),
        ("Abc", "lowercase"),
        ("a_b", "lowercase"),
        ("a.b", "lowercase"),
        ("a b", "lowercase"),
        ("ab-", "end with"),
        ("a;rm", "lowercase"),
        ("é", "lowercase"),
    ],
)
def test_invalid_names(name: str, why: str) -> None:
    with pytest.raises(InvalidSpec, match=why):
        validate_name(name)


def test_mac_and_cid_are_deterministic_and_match_the_documented_derivation() -> None:
    h = hashlib.sha256(b"ws1").hexdigest()
    assert mac_for("ws1") == f"02:{h[0:2]}:{h[2:4]}:{h[4:6]}:{h[6:8]}:{h[8:10]}"
    assert cid_for("ws1") == 100 + int(h[:6], 16)
    assert mac_for("ws1") == mac_for("ws1") and mac_for("ws1") != mac_for("ws2")
    first_octet = int(mac_for("anything").split(":")[0], 16)
    assert first_octet & 0b10 and not first_octet & 0b1  # locally administered, unicast
    assert all(cid_for(n) >= 100 for n in ("a", "b", "zz", "ws-12"))


def test_identity_collisions_are_refused() -> None:
    others = {"other": (mac_for("ws1"), 5), "third": ("02:00:00:00:00:01", cid_for("ws1"))}
    with pytest.raises(Conflict, match="MAC .* already used by 'other'"):
        check_identity_collisions("ws1", {"other": others["other"]})
    with pytest.raises(Conflict, match="vsock CID .* already used by 'third'"):
        check_identity_collisions("ws1", {"third": others["third"]})
    check_identity_collisions("ws1", {"ws1": (mac_for("ws1"), cid_for("ws1"))})  # itself is fine
    check_identity_collisions("ws1", {"x": (mac_for("x"), cid_for("x"))})


def test_allocation_skips_taken_and_reserved_addresses() -> None:
    assert allocate_ip(SUBNET, []) == "192.168.83.10"
    assert allocate_ip(SUBNET, ["192.168.83.10", "192.168.83.11"]) == "192.168.83.12"
    assert allocate_ip(SUBNET, ["192.168.83.10"], "192.168.83.50") == "192.168.83.50"


@pytest.mark.parametrize(
    ("requested", "error", "match"),
    [
        ("192.168.83.10", Conflict, "already in use"),
        ("192.168.84.10", InvalidSpec, "outside"),
        ("192.168.83.1", InvalidSpec, "reserved"),
        ("192.168.83.0", InvalidSpec, "reserved"),
        ("192.168.83.255", InvalidSpec, "reserved"),
        ("not-an-ip", InvalidSpec, "not an IPv4"),
        ("192.168.83.300", InvalidSpec, "not an IPv4"),
        ("::1", InvalidSpec, "not an IPv4"),
    ],
)
def test_bad_or_taken_ip(requested: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        allocate_ip(SUBNET, ["192.168.83.10"], requested)


def test_full_subnet() -> None:
    small = ipaddress.IPv4Network("10.9.0.0/28")
    taken = [str(small.network_address + i) for i in range(10, 15)]
    with pytest.raises(Conflict, match="no free IP"):
        allocate_ip(small, taken)


def test_packages() -> None:
    assert validate_packages(["jq", "python3-venv", "jq", "g++"]) == ["g++", "jq", "python3-venv"]
    assert validate_packages(["ripgrep", "python3Packages.requests"], "nix") == ["python3Packages.requests", "ripgrep"]
    for bad in ["rm -rf /", "$(x)", "a;b", "", "Upper"]:
        with pytest.raises(InvalidSpec, match="not a valid debian package"):
            validate_packages([bad])
    for bad in ["a b", "pkgs.${x}", "../x", "a..b"]:
        with pytest.raises(InvalidSpec, match="not a valid nix package"):
            validate_packages([bad], "nix")


def test_uid_bases_are_distinct_aligned_ranges() -> None:
    from sandbox_mcp.naming import UID_RANGE, allocate_uid_base

    first = allocate_uid_base([])
    assert first == 8 * UID_RANGE
    second = allocate_uid_base([first])
    assert second == first + UID_RANGE
    assert allocate_uid_base([first, first + 2 * UID_RANGE]) == second  # a hole is reused
    taken: list[int] = []
    for _ in range(40):
        taken.append(allocate_uid_base(taken))
    assert len(set(taken)) == 40 and all(b % UID_RANGE == 0 and b >= first for b in taken)


def test_no_validator_accepts_a_trailing_newline() -> None:
    """`$` matches before a final newline: every validator matches the whole string instead."""
    import ipaddress

    from sandbox_mcp.hostnet import firewall
    from sandbox_mcp.ssh.commands import agent_command, build_exec_command

    for bad in ("ws1\n", "ws1\n\n"):
        with pytest.raises(InvalidSpec):
            validate_name(bad)
    with pytest.raises(InvalidSpec):
        validate_packages(["jq\n"])
    with pytest.raises(InvalidSpec):
        validate_packages(["ripgrep\n"], "nix")
    with pytest.raises(InvalidSpec):
        firewall.table_name("sandbox-br\n")
    with pytest.raises(InvalidSpec):
        firewall.admit_script("sandbox-br", "sb-ws1", "02:aa:bb:cc:dd:ee\n", ipaddress.IPv4Address("192.168.83.10"),
                              egress=False)
    with pytest.raises(InvalidSpec):
        build_exec_command("true", cwd="/", env={"PATH\n": "x"}, timeout_s=1)
    with pytest.raises(InvalidSpec):
        agent_command("/usr/lib/agent.py\n")


def test_pool_slot_names_are_unique_and_no_user_can_give_one() -> None:
    slots = {pool_slot_name() for _ in range(200)}
    assert len(slots) == 200
    for slot in slots:
        assert is_pool_slot(slot) and validate_ident(slot) == slot
        with pytest.raises(InvalidSpec):
            validate_name(slot)  # so a user's workspace never takes a slot's veth, machine or cgroup name
        assert len(veth_names(slot)[0]) <= 15
    assert validate_ident("web-2") == "web-2"
    for bad in ("0p1234567", "0p123456789", "0P12345678", "0p1234567g", "../0p12345678", "0p12345678\n"):
        assert not is_pool_slot(bad)
        with pytest.raises(InvalidSpec):
            validate_ident(bad)
