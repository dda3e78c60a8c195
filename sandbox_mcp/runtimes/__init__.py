"""Runtimes: one package per way of realising a workspace, behind :class:`Runtime`, found by name.

The table below maps runtime names to classes. The built-in runtimes (one package each under
``runtimes/``) are imported only when asked for; a separate package can add its own under the
``sandbox_mcp.runtimes`` entry-point group (``name = "package.module:Class"``), the way pyinfra
finds its connectors, or with :func:`register`. The manager asks :func:`build_runtimes` for the
runtimes of a mode and :func:`type_table` for which of them serves each workspace type; it never
names one.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import entry_points

from ..config import Settings
from ..errors import InvalidSpec
from ..models import BUILTIN_TYPES, WorkspaceType
from .base import (
    Endpoint,
    GuestExec,
    Mode,
    NetworkNeeds,
    Progress,
    Runtime,
    RuntimeContext,
    RuntimeSettings,
    RuntimeState,
    no_progress,
)

__all__ = [
    "Endpoint",
    "GuestExec",
    "Mode",
    "NetworkNeeds",
    "Progress",
    "Runtime",
    "RuntimeContext",
    "RuntimeSettings",
    "RuntimeState",
    "build_runtimes",
    "check_settings",
    "known_types",
    "no_progress",
    "register",
    "resolve_mode",
    "runtime_class",
    "runtime_names",
    "type_table",
]

ENTRY_POINT_GROUP = "sandbox_mcp.runtimes"

# name -> "module:Class"; imported on first use.
_BUILTIN: dict[str, str] = {
    "nspawn": "sandbox_mcp.runtimes.nspawn:NspawnRuntime",
    "nixos": "sandbox_mcp.runtimes.nixos:NixosRuntime",
    "incus": "sandbox_mcp.runtimes.incus:IncusRuntime",
    "qemu": "sandbox_mcp.runtimes.qemu:QemuRuntime",
}
_registered: dict[str, str | type[Runtime]] = {}


def register(name: str, runtime: str | type[Runtime]) -> None:
    """Make ``runtime`` (a class, or ``"module:Class"``) available under ``name``; replaces a previous one."""
    _registered[name] = runtime


def _spec_table() -> dict[str, str | type[Runtime]]:
    table: dict[str, str | type[Runtime]] = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        table.setdefault(ep.name, ep.value)
    table.update(_registered)
    return table


def runtime_names() -> list[str]:
    """Every runtime name known: built in, from entry points, registered."""
    return sorted(_spec_table())


def runtime_class(name: str) -> type[Runtime]:
    """The runtime class registered as ``name``.

    Raises:
        InvalidSpec: no runtime has that name.
    """
    spec = _spec_table().get(name)
    if spec is None:
        raise InvalidSpec(f"no runtime named {name!r}; known: {', '.join(runtime_names())}")
    if isinstance(spec, str):
        module, _, attr = spec.partition(":")
        spec = getattr(importlib.import_module(module), attr)
    assert isinstance(spec, type) and issubclass(spec, Runtime), f"{name}: {spec!r} is not a Runtime"
    return spec


def resolve_mode(settings: Settings) -> Mode:
    """The mode to run in: the configured one, or for ``auto`` the mode of a runtime that claims this host."""
    if settings.mode != "auto":
        return settings.mode
    for name in runtime_names():
        cls = runtime_class(name)
        if cls.claims_host(settings):
            return next(iter(sorted(cls.modes)))
    return "direct"


def check_settings(settings: Settings) -> None:
    """Check every runtime section of ``settings`` (``[runtimes.NAME]``) with its runtime's settings model,
    whatever the mode: a mistake in one not used now still shows at start-up.

    Raises:
        InvalidSpec: a section names no known runtime, or a value fails (the message names section and field).
    """
    for name in sorted(settings.runtimes):
        if name not in runtime_names():
            raise InvalidSpec(f"the settings have a section [runtimes.{name}], but no runtime is named "
                              f"{name!r}; known: {', '.join(runtime_names())}")
        runtime_class(name).config_of(settings)


def build_runtimes(mode: Mode, ctx: RuntimeContext) -> dict[str, Runtime]:
    """One instance of every runtime that belongs to ``mode``, by name, once all settings sections check.

    Raises:
        InvalidSpec: a settings section fails (:func:`check_settings`), or a runtime of that mode refuses the
            settings (its message says what to set).
    """
    check_settings(ctx.settings)
    return {name: cls(ctx) for name in runtime_names() if mode in (cls := runtime_class(name)).modes}


def known_types() -> list[WorkspaceType]:
    """Every workspace type some known runtime realises, in any mode: the built-in ones in their
    order, then the others sorted (what create_workspace's ``type`` and the CLI's ``--type`` offer)."""
    claimed = {t for name in runtime_names() for t in runtime_class(name).types}
    return [t for t in BUILTIN_TYPES if t in claimed] + sorted(claimed - set(BUILTIN_TYPES))


def type_table(runtimes: Mapping[str, Runtime], chosen: Mapping[WorkspaceType, str]) -> dict[WorkspaceType, Runtime]:
    """Which of ``runtimes`` serves each type: the only one claiming it, or the one ``chosen``
    (``Settings.runtime_for_type``) names.

    Raises:
        InvalidSpec: two runtimes claim a type and ``chosen`` does not say which serves it, or
            ``chosen`` names a runtime that is not here or does not realise that type.
    """
    table: dict[WorkspaceType, Runtime] = {}
    claims: dict[WorkspaceType, list[str]] = {}
    for name in sorted(runtimes):
        for t in runtimes[name].types:
            claims.setdefault(t, []).append(name)
    for t, names in sorted(claims.items()):
        pick = chosen.get(t)
        if pick is None and len(names) > 1:
            raise InvalidSpec(
                f"runtimes {', '.join(names)} all realise type {t!r}; say which serves it with the setting "
                f"runtime_for_type (e.g. [runtime_for_type] {t} = \"{names[0]}\" in the config file)"
            )
        if pick is not None and pick not in names:
            raise InvalidSpec(
                f"runtime_for_type names {pick!r} for type {t!r}, but only {', '.join(names)} realise it here"
            )
        table[t] = runtimes[pick or names[0]]
    for t in chosen:
        if t not in claims:
            raise InvalidSpec(f"runtime_for_type names type {t!r}, which no runtime of this mode realises")
    return table
