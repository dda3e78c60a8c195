"""The nspawn runtime's settings: ``[runtimes.nspawn]`` (old flat names ``private_users``, ``allow_privileged``,
``cgroups``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ..base import RuntimeSettings

__all__ = ["NspawnSettings"]


class NspawnSettings(RuntimeSettings):
    """How containers (type ``container``) are isolated and given their cgroup."""

    section = "nspawn"

    private_users: bool = Field(
        default=True,
        description="Run containers in a user namespace (root inside is an unprivileged uid on the host); "
        "false asks for privileged containers, which also needs allow_privileged",
    )
    allow_privileged: bool = Field(
        default=False,
        description="Allow privileged containers (root inside is root on the host) where user-namespaced ones "
        "cannot run or private_users is false",
    )
    cgroups: Literal["auto", "systemd", "direct"] = Field(
        default="auto",
        description="Who makes a container's cgroup: 'systemd' starts it in a delegated transient scope (needs "
        "systemd as PID 1), 'direct' has the server write the cgroup tree itself, 'auto' picks systemd where "
        "/run/systemd/system exists",
    )
