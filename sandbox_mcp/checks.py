"""Host prerequisite checks that runtimes and ``doctor`` share: each says what is wrong and how to fix it."""

from __future__ import annotations

import shutil

from .models import Check

__all__ = ["Check", "which_check"]


def which_check(program: str, package: str, why: str, *, name: str | None = None, required: bool = True) -> Check:
    """A check that ``program`` is on PATH, naming the Debian package that has it."""
    path = shutil.which(program)
    if path:
        return Check(name=name or program, ok=True, detail=path, required=required)
    return Check(name=name or program, ok=False, detail=f"{program} not found ({why})",
                 fix=f"apt-get install {package}", required=required)
