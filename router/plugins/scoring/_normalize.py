"""Shared scaling for load scorers."""
from __future__ import annotations


def inverse_relative(loads: dict[str, float]) -> dict[str, float]:
    """1 - load / max(load): proportional to the headroom against the busiest candidate, so a small
    load difference moves the score a little (and a prefix hit can outweigh it), a large one a lot."""
    top = max(loads.values(), default=0.0)
    if top <= 0:
        return {name: 1.0 for name in loads}
    return {name: 1.0 - load / top for name, load in loads.items()}
