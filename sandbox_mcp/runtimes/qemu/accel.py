"""Which accelerator a VM gets: KVM where it really boots a guest, software emulation (TCG) otherwise.

``/dev/kvm`` existing is not enough: on a PVM host (the ``kvm_pvm`` module, as on the project's
own machines) ordinary guest kernels hang under it. So the choice is, in order:

1. the ``accelerator`` setting (``[runtimes.qemu]``) when it is ``kvm`` or ``tcg`` (the operator knows);
2. a reliable sign read from the host: no ``/dev/kvm``, ``kvm_pvm`` loaded, or a ``/dev/kvm``
   only root may open (qemu runs unprivileged: :func:`kvm_groups`) mean TCG, without trying;
3. otherwise a bounded test boot of the VM kernel under KVM (no root: it must reach the panic
   "unable to mount root" and exit, thanks to ``panic=-1 -no-reboot``); a kernel that does not
   get there in time means TCG. The result is kept per host boot (``/proc/sys/kernel/random/boot_id``).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from ... import hostcmd
from ...errors import CommandFailed, CommandTimeout
from ...fsutil import atomic_write

__all__ = [
    "SET_BY",
    "AccelChoice",
    "Accelerator",
    "choose_accelerator",
    "configured",
    "kvm_groups",
    "kvm_sign",
    "probe_argv",
    "probe_boot",
]

Accelerator = Literal["kvm", "tcg"]

PROBE_TIMEOUT_S = 30.0


class AccelChoice(BaseModel):
    """The accelerator VMs use on this host, and why (shown by ``doctor`` and ``workspace_status``)."""

    accelerator: Accelerator
    reason: str


def kvm_groups(dev: Path = Path("/dev/kvm")) -> list[int] | None:
    """The supplementary groups an unprivileged qemu needs to open ``dev``: [] when anyone may, [its group]
    when that group may (udev's usual ``0660 root:kvm``), None when only root may (or it is missing)."""
    try:
        st = os.stat(dev)
    except OSError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o006 == 0o006:
        return []
    if mode & 0o060 == 0o060 and st.st_gid != 0:
        return [st.st_gid]
    return None


def kvm_sign(dev: Path = Path("/dev/kvm"), sys_module: Path = Path("/sys/module")) -> AccelChoice | None:
    """Decide from what the host shows, without booting anything; None when only a test boot can tell."""
    if not dev.exists():
        return AccelChoice(accelerator="tcg", reason=f"{dev} is missing (no hardware virtualisation offered here)")
    if (sys_module / "kvm_pvm").exists():
        return AccelChoice(
            accelerator="tcg",
            reason=f"{dev} is served by kvm_pvm (a PVM host), on which ordinary guest kernels hang",
        )
    if kvm_groups(dev) is None:
        return AccelChoice(
            accelerator="tcg",
            reason=f"only root may open {dev} and qemu runs unprivileged; make it 0660 with group kvm (udev's "
            "default) or 0666",
        )
    return None


def probe_argv(kernel: Path, accelerator: Accelerator, console: Path) -> list[str]:
    """A boot of ``kernel`` alone that ends by itself: it panics at the missing root and qemu exits."""
    return [
        "qemu-system-x86_64", "-accel", accelerator, "-M", "q35",
        "-cpu", "host" if accelerator == "kvm" else "max", "-smp", "1", "-m", "256",
        "-display", "none", "-nodefaults", "-no-user-config", "-no-reboot",
        "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 root=/dev/sbx-none",
        "-serial", f"file:{console}",
    ]  # fmt: skip


async def probe_boot(kernel: Path, accelerator: Accelerator, console: Path, timeout_s: float) -> bool:
    """True when ``kernel`` boots under ``accelerator`` to its root mount within ``timeout_s``.

    Raises:
        BackendError: qemu-system-x86_64 is missing.
    """
    try:
        await hostcmd.run(probe_argv(kernel, accelerator, console), timeout_s=timeout_s)
    except CommandTimeout:
        return False
    except CommandFailed:
        return False
    try:
        text = console.read_text(errors="replace")
    except OSError:
        return False
    return "Kernel panic" in text or "VFS: Unable to mount root" in text


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def cached_choice(cache: Path) -> AccelChoice | None:
    """The probe result stored during this host boot, or None."""
    try:
        data = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("boot_id") != _boot_id():
        return None
    try:
        return AccelChoice.model_validate(data)
    except ValueError:
        return None


SET_BY = "set by [runtimes.qemu] accelerator"


def configured(setting: Literal["auto", "kvm", "tcg"]) -> AccelChoice | None:
    """The accelerator the setting names, or None for ``auto`` (the evidence decides)."""
    return None if setting == "auto" else AccelChoice(accelerator=setting, reason=SET_BY)


async def choose_accelerator(
    setting: Literal["auto", "kvm", "tcg"], kernel: Path, cache: Path
) -> AccelChoice:
    """The accelerator for VMs on this host (see the module docstring for the order of evidence), given the
    ``accelerator`` setting.

    Raises:
        BackendError: qemu-system-x86_64 is missing (only when a test boot is needed).
    """
    chosen = configured(setting)
    if chosen is not None:
        return chosen
    sign = kvm_sign()
    if sign is not None:
        return sign
    found = cached_choice(cache)
    if found is not None:
        return found
    cache.parent.mkdir(parents=True, exist_ok=True)
    console = cache.with_suffix(".console")
    if await probe_boot(kernel, "kvm", console, PROBE_TIMEOUT_S):
        choice = AccelChoice(accelerator="kvm", reason="a test boot under KVM reached the kernel's root mount")
    else:
        choice = AccelChoice(
            accelerator="tcg",
            reason=f"a test boot under KVM did not reach the root mount in {PROBE_TIMEOUT_S:.0f} s "
            f"(see {console}); set accelerator = 'kvm' in [runtimes.qemu] to force it",
        )
    atomic_write(cache, json.dumps({**choice.model_dump(), "boot_id": _boot_id()}), mode=0o644)
    return choice
