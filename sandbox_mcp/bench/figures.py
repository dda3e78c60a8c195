"""What every bench section computes the same way."""

from __future__ import annotations

__all__ = ["pct"]


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``: the nearest rank, no interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]
