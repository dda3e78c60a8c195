"""What the runtimes share of this host itself (not its network: :mod:`sandbox_mcp.hostnet`).

- :mod:`.cgroups`: the host's cgroup hierarchies, a cgroup per workspace with its limits, OOM-kill counts;
- :mod:`.caps`: what this kernel offers user-namespaced containers and the limits that cap them.

Below every runtime package: a runtime imports these, never another runtime's helpers.
"""

__all__: list[str] = []
