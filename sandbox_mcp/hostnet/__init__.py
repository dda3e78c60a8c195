"""The host side of the workspace network: the bridge, per-workspace links, NAT and host names.

- :mod:`.netlink`: :class:`HostNetwork`, the service runtimes share (bridge, veth + netns), over pyroute2;
- :mod:`.nat`: opt-in outbound access, an nftables table of our own;
- :mod:`.hostsfile`: the managed ``workspace-NAME`` block in the host's hosts file;
- egress by domain: :mod:`.egress_sets` (a set and chain per workspace, the DNS redirect),
  :mod:`.resolver` (the egress resolver process), :mod:`.resolver_service` (its policy file and lifecycle).
"""

from .netlink import NETNS_DIR, HostNetwork

__all__ = ["NETNS_DIR", "HostNetwork"]
