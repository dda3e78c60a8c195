"""Names, addresses and identifiers: pure functions, no I/O.

The MAC and vsock CID derivations match the NixOS module (``nix/modules/lib.nix``)
bit for bit, so a workspace has the same identity in both modes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from collections.abc import Iterable, Mapping

from .errors import Conflict, InvalidSpec, clip_repr

__all__ = [
    "AGENT_GID",
    "AGENT_UID_BASE",
    "CID_OFFSET",
    "FIRST_HOST_OFFSET",
    "MAX_NAME_LEN",
    "BUILD_UID_BASE",
    "UID_RANGE",
    "SECRETS_PROXY_UID",
    "VM_UID_BASE",
    "agent_uid_for",
    "allocate_ip",
    "allocate_uid_base",
    "allocate_vm_uid",
    "check_identity_collisions",
    "cid_for",
    "mac_for",
    "is_pool_slot",
    "netns_name",
    "pool_slot_name",
    "tap_name",
    "validate_ident",
    "validate_ip",
    "validate_name",
    "validate_packages",
    "veth_names",
]

MAX_NAME_LEN = 12  # "vm-" + 12 = 15, Linux's IFNAMSIZ - 1
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]*$")
# Debian package names (policy 5.6.7), optionally with a version or release: "jq", "python3-venv", "gcc=4:12.2.0-3"
_DEB_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
# Nix attribute paths: "ripgrep", "python3Packages.requests"
_NIX_ATTR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_'-]*(\.[A-Za-z_][A-Za-z0-9_'-]*)*$")

CID_OFFSET = 100  # CIDs 0-2 are reserved by vsock(7); 3-99 are left for manual assignment
UID_RANGE = 65536  # host uids per user-namespaced workspace (0..65535 inside)
FIRST_UID_BASE = 8 * UID_RANGE  # 524288: above the ranges useradd hands out in /etc/subuid by default
BUILD_UID_BASE = 0x7FFF0000  # the image build container's range; below 2^31 (uids read as signed ints)
# One range of single uids below the build's: a VM's qemu runs as one of them (never a container's range).
VM_UID_BASE = BUILD_UID_BASE - UID_RANGE
# Below those, the agent's files on the host: one uid per workspace (AGENT_UID_BASE + 1 + 24 bits of the
# name's digest, as the CID: unique among registered workspaces) and one group for all (AGENT_GID), so
# the host's git refuses the agent's repositories as another user's (sandbox_mcp/agentfiles.py).
AGENT_UID_BASE = VM_UID_BASE - (1 << 24) - UID_RANGE
AGENT_GID = AGENT_UID_BASE
LAST_UID_BASE = AGENT_UID_BASE - UID_RANGE
# The secrets proxy's worker (sandbox_mcp.secrets.supervisor) runs as the VM range's last uid, never handed to a VM.
SECRETS_PROXY_UID = VM_UID_BASE + UID_RANGE - 1
FIRST_HOST_OFFSET = 10  # automatic IPs start at .10 of the subnet; lower ones are left for the host's use


def validate_name(name: str) -> str:
    """Check a workspace name: lowercase letters, digits and '-', starting with a letter, ≤ 12 characters.

    Raises:
        InvalidSpec: with the rule that was broken.
    """
    if not isinstance(name, str) or not name:
        raise InvalidSpec("workspace name is empty; use lowercase letters, digits and '-', e.g. 'myproject'")
    if len(name) > MAX_NAME_LEN:
        raise InvalidSpec(
            f"workspace name {clip_repr(name, 40)} is {len(name)} characters; the limit is {MAX_NAME_LEN} "
            f"(its network interface 'vm-NAME' must fit Linux's 15-character limit)"
        )
    if not _NAME_RE.fullmatch(name):
        raise InvalidSpec(
            f"workspace name {clip_repr(name)} is invalid: use lowercase letters, digits and '-', "
            f"starting with a letter (e.g. 'web-2')"
        )
    if name.endswith("-"):
        raise InvalidSpec(f"workspace name {name!r} must not end with '-'")
    return name


_SLOT_RE = re.compile(r"^0p[0-9a-f]{8}$")


def pool_slot_name() -> str:
    """A fresh name for a warm pool's slot: ``0p`` and 8 hex digits.

    It starts with a digit, which :func:`validate_name` refuses, so no workspace a user names
    can ever take a slot's machine name, veth or cgroup, before or after the slot is claimed.
    """
    return "0p" + secrets.token_hex(4)


def is_pool_slot(name: str) -> bool:
    """Whether ``name`` is one :func:`pool_slot_name` makes."""
    return bool(_SLOT_RE.fullmatch(name))


def validate_ident(name: str) -> str:
    """Check a name host-side parts are made from (veth, netns, cgroup, scope): a workspace's
    (:func:`validate_name`) or a warm pool slot's (:func:`pool_slot_name`).

    Raises:
        InvalidSpec: it is neither.
    """
    return name if isinstance(name, str) and is_pool_slot(name) else validate_name(name)


def validate_packages(packages: Iterable[str], flavour: str = "debian") -> list[str]:
    """Validate package names before they reach a shell or a Nix file.

    ``flavour`` is ``"debian"`` (direct mode, apt names) or ``"nix"`` (attribute paths).
    Returns the sorted, de-duplicated list.
    """
    pattern = _DEB_PACKAGE_RE if flavour == "debian" else _NIX_ATTR_RE
    out = set()
    for pkg in packages:
        if not isinstance(pkg, str) or not pattern.fullmatch(pkg) or len(pkg) > 128:
            example = "'jq' or 'python3-venv'" if flavour == "debian" else "'ripgrep' or 'python3Packages.requests'"
            raise InvalidSpec(f"package {clip_repr(pkg)} is not a valid {flavour} package name; expected e.g. {example}")
        out.add(pkg)
    return sorted(out)


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def mac_for(name: str) -> str:
    """Deterministic locally administered unicast MAC: ``02:`` + the first 5 bytes of sha256(name)."""
    h = _digest(name)
    return "02:" + ":".join(h[i : i + 2] for i in range(0, 10, 2))


def cid_for(name: str) -> int:
    """Deterministic vsock CID: the first 24 bits of sha256(name), offset past the reserved values."""
    return CID_OFFSET + int(_digest(name)[:6], 16)


def veth_names(name: str) -> tuple[str, str]:
    """The host-side and container-side names of a container's veth pair (≤ 15 characters)."""
    return f"sb-{name}", f"sc-{name}"


def agent_uid_for(name: str) -> int:
    """The host uid of workspace ``name``'s files (see AGENT_UID_BASE): unique where its CID is."""
    return AGENT_UID_BASE + 1 + int(_digest(name)[:6], 16)


def tap_name(name: str) -> str:
    return f"vm-{name}"


def netns_name(name: str) -> str:
    return f"sbx-{name}"


def check_identity_collisions(
    name: str, others: Mapping[str, tuple[str | None, int | None]], *, mac: bool = True, cid: bool = True
) -> None:
    """Refuse a name whose derived MAC (when ``mac``: the workspace gets one) or CID (when ``cid``) equals
    another workspace's.

    ``others`` maps existing workspace names to their ``(mac, cid)``, None for what one has not.

    Raises:
        Conflict: naming the other workspace, so the user can pick another name.
    """
    mine_mac = mac_for(name) if mac else None
    mine_cid = cid_for(name) if cid else None
    for other, (omac, ocid) in others.items():
        if other == name:
            continue
        if mine_mac is not None and omac == mine_mac:
            raise Conflict(
                f"workspace name {name!r} derives MAC {mine_mac}, already used by {other!r}; pick another name"
            )
        if mine_cid is not None and ocid == mine_cid:
            raise Conflict(
                f"workspace name {name!r} derives vsock CID {mine_cid}, already used by {other!r}; pick another name"
            )


def validate_ip(ip: str, subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """Check that ``ip`` is a usable workspace address in ``subnet`` (not network, broadcast or the host)."""
    try:
        addr = ipaddress.IPv4Address(ip)
    except (ipaddress.AddressValueError, ValueError) as exc:
        raise InvalidSpec(f"{clip_repr(ip)} is not an IPv4 address; use e.g. '{subnet.network_address + 20}'") from exc
    if addr not in subnet:
        raise InvalidSpec(f"IP {ip} is outside the workspace subnet {subnet}")
    if addr in (subnet.network_address, subnet.broadcast_address, subnet.network_address + 1):
        raise InvalidSpec(f"IP {ip} is reserved in {subnet} (network, broadcast or the host's address)")
    return addr


def allocate_ip(
    subnet: ipaddress.IPv4Network,
    taken: Iterable[str | ipaddress.IPv4Address],
    requested: str | None = None,
) -> str:
    """Return ``requested`` if it is valid and free, else the lowest free address from ``.10`` on.

    ``taken`` holds the registry's addresses and those live on the host.

    Raises:
        InvalidSpec: ``requested`` is malformed or outside the subnet.
        Conflict: ``requested`` is in use, or the subnet is full.
    """
    used = {ipaddress.IPv4Address(str(t)) for t in taken}
    if requested is not None:
        addr = validate_ip(requested, subnet)
        if addr in used:
            raise Conflict(f"IP {addr} is already in use; omit ip to get a free one allocated")
        return str(addr)
    start = int(subnet.network_address) + FIRST_HOST_OFFSET
    for n in range(start, int(subnet.broadcast_address)):
        addr = ipaddress.IPv4Address(n)
        if addr not in used:
            return str(addr)
    raise Conflict(f"no free IP left in {subnet}; destroy unused workspaces or set SANDBOX_MCP_SUBNET to a larger one")


def allocate_uid_base(taken: Iterable[int]) -> int:
    """The lowest free host uid base (a multiple of 65536, from 524288 on) for a user-namespaced workspace.

    ``taken`` holds the bases of the registry's workspaces and of cgroups/containers live on the host.
    Root inside the workspace is host uid ``base``; its users are ``base+uid``.

    Raises:
        Conflict: every range is in use.
    """
    used = set(taken)
    for base in range(FIRST_UID_BASE, LAST_UID_BASE + 1, UID_RANGE):
        if base not in used:
            return base
    raise Conflict("no free uid range left for a user-namespaced workspace; destroy unused workspaces")


def allocate_vm_uid(taken: Iterable[int]) -> int:
    """The lowest free host uid (also its gid) for a VM's qemu process, one of ``VM_UID_BASE..+65534`` (the last is the secrets proxy's).

    ``taken`` holds the uids of the registry's VMs and of qemu processes live on the host.

    Raises:
        Conflict: all 65536 are taken.
    """
    used = set(taken)
    for uid in range(VM_UID_BASE, SECRETS_PROXY_UID):
        if uid not in used:
            return uid
    raise Conflict("no free uid left for a VM's qemu process; destroy unused VM workspaces")
