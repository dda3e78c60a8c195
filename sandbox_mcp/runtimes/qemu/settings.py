"""The qemu runtime's settings: ``[runtimes.qemu]`` (old names ``vm_cpus``, ``vm_memory_mib``, ``vm_disk_gib``,
``vm_accelerator``)."""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field

from ...models import VM_MIN_MEMORY_MIB
from ..base import RuntimeSettings

__all__ = ["QemuSettings"]


class QemuSettings(RuntimeSettings):
    """How direct-mode VMs (type ``vm``) are sized and run."""

    section = "qemu"

    cpus: int = Field(
        default_factory=lambda: max(1, min(os.cpu_count() or 1, 8)),
        ge=1, le=64, description="vCPUs of a VM when create gives none; default: the host's CPUs, at most 8",
    )  # fmt: skip
    memory_mib: int = Field(
        default=2048, ge=VM_MIN_MEMORY_MIB, le=1 << 20, description="Memory of a VM when create gives none, MiB"
    )
    disk_gib: int = Field(
        default=8, ge=2, le=1024, description="Size of a VM's root disk, which bounds its throw-away writable layer"
    )
    accelerator: Literal["auto", "kvm", "tcg"] = Field(
        default="auto",
        description="How VMs run: 'kvm' (hardware), 'tcg' (software emulation, slow) or 'auto' (KVM when a probe "
        "shows it boots a guest, else TCG)",
    )
