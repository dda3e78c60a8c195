"""The host side of the workspace network: the bridge, per-workspace links, NAT and host names.

- :mod:`.netlink`: :class:`HostNetwork`, the service runtimes share (bridge, veth + netns), over pyroute2;
- :mod:`.nat`: opt-in outbound access, an nftables table of our own;
- :mod:`.hostsfile`: the managed ``workspace-NAME`` block in the host's hosts file.
"""

from .netlink import NETNS_DIR, HostNetwork

__all__ = ["NETNS_DIR", "HostNetwork"]
